"""Thin click CLI: parse, call one plain function, map user errors to one line and exit code 2.

Only this module decides exit codes: 0 ok, 1 some runs failed (sweep) or a regression (regress),
2 bad input, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). SIGTERM is handled exactly as
Ctrl-C: workers stopped, claims of unfinished runs released, finished runs kept.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from harness import __version__
from harness.errors import StoreError, UserError
from harness.store import DEFAULT_STORE

EXIT_RUNS_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so it unwinds exactly as Ctrl-C does."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the clean-up short
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
MAX_CALIBRATE_SIZE = 16384  # three 16384^2 float32 matrices: 3 GiB


def _finite(value: float | None, name: str) -> float | None:
    """click's FloatRange lets nan through (every comparison with nan is false): refuse it and inf."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number of seconds (got {value})", param_hint=name)
    return value


class _SeedCount(click.ParamType):
    """`--seeds N` (seeds 0..N-1) or `--seeds auto` (adaptive seeds)."""

    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"expected a whole number or 'auto' (got {value!r})", param, ctx)


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _sigterm_as_interrupt():
                return func(*args, **kwargs)
        except UserError as exc:
            click.echo(f"harness: error: {exc.one_line()}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except Terminated:
            click.echo("harness: terminated (SIGTERM); finished runs are stored, re-run to resume", err=True)
            sys.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            click.echo("harness: interrupted; finished runs are stored, re-run to resume", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


store_option = click.option(
    "--store", "store_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_STORE,
    show_default=True, help="SQLite results store.",
)


class _OneLineErrors(click.Group):
    """Click's usage errors (a bad flag value, an unknown option) as one line and exit 2, like ours."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "harness"
            click.echo(f"harness: error: {where}: {' '.join(exc.format_message().split())} (see --help)", err=True)
            sys.exit(EXIT_USER_ERROR)
        except click.ClickException as exc:
            click.echo(f"harness: error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("harness: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_OneLineErrors)
@click.version_option(__version__, prog_name="harness")
def cli() -> None:
    """Seeded architecture sweeps for Keras models: train, store, compare."""


@cli.command()
@click.argument("sweep_file", type=click.Path(path_type=Path))
@click.option("--seeds", type=_SeedCount(), default=None,
              help="Override the seeds: N (seeds 0..N-1), or auto: more seeds only for the variants whose "
                   "interval is still wide (the file's budget.seeds {min, max, ci_half_width}, else 3 to 10, +-0.5).")
@click.option("--epochs", type=int, default=None, help="Override every variant's epochs.")
@click.option("--subset", default=None, metavar="TRAIN[:TEST]", help="Train on a stratified subset.")
@click.option("--only", multiple=True, metavar="PATTERN",
              help="Only the variants whose name matches this glob (repeatable), e.g. --only 'seed003*'.")
@store_option
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding mnist.npz / idx files (default: $HARNESS_DATA_DIR).")
@click.option("--rerun-failed", is_flag=True, help="Train failed runs again.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Retry a run that fails during this sweep up to N times.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              callback=lambda _ctx, _param, value: _finite(value, "--timeout"),
              help="Seconds a run may take before its worker is killed and the run marked FAILED.")
@click.option("--gpus", default=None, metavar="0,1|none", help="GPUs to use (default: all that nvidia-smi lists; with --executor ray, only none).")
@click.option("--runs-per-gpu", type=int, default=1, show_default=True, help="Worker processes per GPU.")
@click.option("--workers", type=int, default=None, help="CPU worker processes (default: one per core).")
@click.option("--threads", type=int, default=None, help="Threads per worker (default: cores / workers).")
@click.option("--in-process", is_flag=True, help="Train in this process, one run at a time (debugging).")
@click.option("--executor", "executor_kind", type=click.Choice(["pool", "ray"]), default="pool", show_default=True,
              help="pool: worker processes on this machine; ray: actors on a Ray cluster (pip install -e \".[ray]\").")
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster to use with --executor ray, e.g. auto or 10.0.0.5:6379 (default: $RAY_ADDRESS, "
                   "else a local cluster on 127.0.0.1).")
@click.option("--keras-backend", type=click.Choice(["tensorflow", "jax", "torch", "auto"]), default=None,
              help="Keras backend of every variant (default: the sweep's budget.keras_backend, else "
                   "$KERAS_BACKEND, else tensorflow); auto: the fastest measured by `harness calibrate`.")
@click.option("--fuse", type=click.IntRange(min=1), default=None, metavar="K",
              help="Train K runs of a variant together in one worker (default: auto).")
@click.option("--dry-run", is_flag=True, help="Print the plan and train nothing.")
@_user_errors
def sweep(
    sweep_file: Path,
    seeds: int | str | None,
    epochs: int | None,
    subset: str | None,
    only: tuple[str, ...],
    store_path: Path,
    data_dir: Path | None,
    rerun_failed: bool,
    retries: int,
    timeout_s: float | None,
    gpus: str | None,
    runs_per_gpu: int,
    workers: int | None,
    threads: int | None,
    in_process: bool,
    executor_kind: str,
    address: str | None,
    keras_backend: str | None,
    fuse: int | None,
    dry_run: bool,
) -> None:
    """Train every variant x seed of SWEEP_FILE that the store does not hold yet."""
    from harness.devices import parse_gpu_list
    from harness.execute import ExecutorKind, SweepOptions, describe_sweep, execute_sweep
    from harness.spec import load_sweep, parse_subset

    spec = load_sweep(sweep_file).with_overrides(
        seeds=seeds, epochs=epochs, subset=parse_subset(subset) if subset else None, only=only,
        keras_backend=keras_backend,
    )
    if in_process and executor_kind != "pool":
        raise UserError("--in-process trains in this process; drop it to use --executor ray", key="--in-process")
    options = SweepOptions(
        store=store_path, data_dir=data_dir, executor=ExecutorKind.INLINE if in_process else ExecutorKind(executor_kind),
        address=address,
        rerun_failed=rerun_failed, retries=retries, timeout_s=timeout_s, fuse=fuse,
        gpus=tuple(parse_gpu_list(gpus)) if gpus is not None else None, runs_per_gpu=runs_per_gpu,
        workers=workers, threads=threads,
    )
    note = functools.partial(click.echo, err=True)
    if dry_run:
        if any(v.model.builder for v in spec.variants):
            note("note: building the builder models to count their parameters (imports TensorFlow and runs "
                 "the builder code in this process)")
        click.echo(describe_sweep(spec, options, notify=note))
        return
    outcome = execute_sweep(spec, options, notify=note)
    elsewhere = f", {outcome.finished_elsewhere} finished by another sweep meanwhile" if outcome.finished_elsewhere else ""
    click.echo(
        f"sweep {spec.name}: {outcome.planned} runs planned, {outcome.skipped} already in the store, "
        f"{outcome.trained} trained ({outcome.failed} failed or diverged){elsewhere}; store {store_path}"
    )
    if outcome.has_failed_runs:
        sys.exit(EXIT_RUNS_FAILED)


@cli.command()
@click.argument("sweep_file", type=click.Path(path_type=Path))
@click.option("--tuner", type=click.Choice(["random", "bayesian", "hyperband"]), default="random", show_default=True,
              help="KerasTuner's RandomSearch, BayesianOptimization or Hyperband.")
@click.option("--max-trials", type=click.IntRange(min=1), default=10, show_default=True,
              help="Trials of the search in all (one execution each); a larger number continues an earlier search.")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True,
              help="Best trials to train over the sweep's seeds.")
@click.option("--objective", default="val_accuracy", show_default=True, help="The tuner's objective (a Keras log name).")
@click.option("--variant", "variant_name", default=None, help="The build(hp) variant to search (default: the only one).")
@click.option("--seeds", type=int, default=None, help="Override the seed count of the re-training.")
@click.option("--epochs", type=int, default=None, help="Override the epochs (search and re-training).")
@click.option("--subset", default=None, metavar="TRAIN[:TEST]", help="Search and train on a stratified subset.")
@store_option
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding the data sets (default: $HARNESS_DATA_DIR).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The generated sweep file (default reports/NAME-tuned.yaml).")
@click.option("--workers", type=int, default=None, help="CPU worker processes for the re-training.")
@click.option("--threads", type=int, default=None, help="Threads per worker (and for the search).")
@click.option("--in-process", is_flag=True, help="Re-train in this process (debugging).")
@click.pass_context
@_user_errors
def tune(
    ctx: click.Context,
    sweep_file: Path,
    tuner: str,
    max_trials: int,
    top: int,
    objective: str,
    variant_name: str | None,
    seeds: int | None,
    epochs: int | None,
    subset: str | None,
    store_path: Path,
    data_dir: Path | None,
    out: Path | None,
    workers: int | None,
    threads: int | None,
    in_process: bool,
) -> None:
    """KerasTuner search of a build(hp) builder, then its top trials over the sweep's seeds."""
    from harness.spec import load_sweep, parse_subset
    from harness.sweep import prepare_sweep
    from harness.tune import check_tuned_out, make_job, search_in_child, tunable_variant, tune_summary
    from harness.tune import tuned_sweep_data, write_tuned_sweep

    spec = load_sweep(sweep_file).with_overrides(
        seeds=seeds, epochs=epochs, subset=parse_subset(subset) if subset else None
    )
    variant = tunable_variant(spec, variant_name)
    out = out or Path("reports") / f"{spec.name}-tuned.yaml"
    check_tuned_out(out)
    prepared = prepare_sweep(spec, data_dir=data_dir)
    job = make_job(
        spec, variant, data_fingerprint=prepared.dataset.fingerprint, data_dir=prepared.data_dir, tuner=tuner,
        max_trials=max_trials, objective=objective, state_root=store_path.parent / "tune", threads=threads,
    )
    click.echo(f"search: {tuner}, up to {max_trials} trials of '{variant.name}'; state in "
               f"{job.directory}/{job.project_name} (a stopped search resumes)", err=True)
    result = search_in_child(job)
    click.echo(tune_summary(result, top=top))
    path = write_tuned_sweep(tuned_sweep_data(spec, variant, result, top=top, tuner=tuner, out=out), out)
    click.echo(f"wrote {path}; training its {min(top, len(result.trials))} variants over seeds {list(spec.seeds)}")
    ctx.invoke(sweep, sweep_file=path, store_path=store_path, data_dir=data_dir, workers=workers, threads=threads,
               in_process=in_process)


@cli.command()
@click.option("--sweep", "sweep_name", default=None, help="Sweep name (default: every sweep in the store).")
@store_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file (default reports/NAME.md, or reports/NAME.csv with --format csv).")
@click.option("--format", "fmt", type=click.Choice(["md", "csv"]), default="md", show_default=True,
              help="md: leaderboard with plots; csv: every run as one row.")
@click.option("--no-plots", is_flag=True, help="Markdown only, no PNG/SVG plots.")
@_user_errors
def report(sweep_name: str | None, store_path: Path, out: Path | None, fmt: str, no_plots: bool) -> None:
    """Write the markdown leaderboard of a sweep (and its plots), or a CSV of its runs."""
    from harness.report import write_export, write_report
    from harness.store import SQLiteStore

    with SQLiteStore(store_path, create=False) as store:
        for name in _sweep_names(store, store_path, sweep_name, out):
            if fmt == "csv":
                path = write_export(store, name, out=out)
            else:
                path = write_report(store, name, out=out, with_plots=not no_plots)
            click.echo(f"wrote {path}")


@cli.command()
@click.option("--sweep", "sweep_name", default=None, help="Sweep name (default: every sweep in the store).")
@store_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Default reports/NAME.csv.")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write TensorBoard logs (per-epoch scalars, an HParams experiment) to this folder instead of CSV.")
@_user_errors
def export(sweep_name: str | None, store_path: Path, out: Path | None, tensorboard_dir: Path | None) -> None:
    """Every run of a sweep as one CSV row, for pandas users (or as TensorBoard logs)."""
    from harness.report import write_export
    from harness.store import SQLiteStore

    with SQLiteStore(store_path, create=False) as store:
        if tensorboard_dir is not None:
            from harness.tbexport import export_tensorboard

            if out is not None:
                raise UserError("give either --out (CSV) or --tensorboard DIR", key="--out")
            names = _sweep_names(store, store_path, sweep_name, None)
            if len(names) > 1:
                raise UserError("--tensorboard needs --sweep when the store holds several sweeps", key="--tensorboard")
            name = names[0]
            path = export_tensorboard(store, name, out=tensorboard_dir)
            click.echo(f"wrote {path} (open it with: tensorboard --logdir {path})")
            return
        for name in _sweep_names(store, store_path, sweep_name, out):
            click.echo(f"wrote {write_export(store, name, out=out)}")


def _sweep_names(store, store_path: Path, sweep_name: str | None, out: Path | None) -> list[str]:
    names = [sweep_name] if sweep_name else store.sweeps()
    if not names:
        raise UserError("the store holds no sweep yet", file=str(store_path))
    if out is not None and len(names) > 1:
        raise UserError("--out needs --sweep when the store holds several sweeps", key="--out")
    return names


@cli.group()
def baseline() -> None:
    """Baselines for the nightly regression check."""


@baseline.command("save")
@click.option("--sweep", "sweep_name", required=True, help="Sweep whose per-seed accuracies become the baseline.")
@store_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Default reports/baselines/NAME.json (meant to be committed).")
@_user_errors
def baseline_save(sweep_name: str, store_path: Path, out: Path | None) -> None:
    """Store a sweep's per-seed test accuracies as a versioned JSON baseline."""
    from harness.regress import save_baseline
    from harness.store import SQLiteStore

    with SQLiteStore(store_path, create=False) as store:
        click.echo(f"wrote {save_baseline(store, sweep_name, out=out)}")


@cli.command()
@click.option("--sweep", "sweep_name", required=True)
@click.option("--baseline", "baseline_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@store_option
@click.option("--threshold", type=float, default=0.2, show_default=True,
              help="Smallest drop in mean accuracy (points) that can count as a regression.")
@click.option("--alpha", type=float, default=0.01, show_default=True,
              help="Significance level of the one-sided tests (Welch and Mann-Whitney / paired permutation).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the summary here.")
@click.option("--fail-on-missing", is_flag=True, help="Exit 1 when a baseline variant has no result tonight.")
@click.option("--allow-env-change", is_flag=True,
              help="Do not fail when the sweep, dataset, library versions or device differ from the baseline's.")
@click.option("--history", "history_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON-lines history of nightly results: tonight is appended, then step detection runs over it.")
@click.option("--fail-on-drift", is_flag=True, help="Exit 1 when step detection over the history finds a fall.")
@_user_errors
def regress(sweep_name: str, baseline_path: Path, store_path: Path, threshold: float, alpha: float,
            out: Path | None, fail_on_missing: bool, allow_env_change: bool, history_path: Path | None,
            fail_on_drift: bool) -> None:
    """Compare the latest results with a baseline; exit 1 on a regression, an environment change or
    (with --fail-on-missing / --fail-on-drift) a missing variant or a fall in the history."""
    from harness.regress import Verdict, check_gate_options, load_baseline, render_comparison, run_gate
    from harness.fsio import check_writable_target, safe_write
    from harness.store import SQLiteStore

    check_gate_options(threshold=threshold, alpha=alpha)
    if out is not None:
        out = check_writable_target(out, key="--out")
    base = load_baseline(baseline_path)
    with SQLiteStore(store_path, create=False) as store:
        gate = run_gate(store, sweep_name, base, threshold=threshold, alpha=alpha, history=history_path)
    trend = None
    if out is not None and gate.history is not None and len(gate.history):
        from harness.plots import draw_history

        png = draw_history(gate.history, out.parent / out.stem, title=f"{sweep_name}: nightly mean accuracy")
        trend = os.path.relpath(png, out.parent)
    text = render_comparison(gate, sweep=sweep_name, baseline_path=str(baseline_path), threshold=threshold,
                             alpha=alpha, history_path=str(history_path) if history_path else None, trend_plot=trend)
    click.echo(text)
    if out is not None:
        safe_write(out, text, key="--out")
    failing = gate.count(Verdict.REGRESSED) or (fail_on_missing and gate.count(Verdict.MISSING))
    if failing or (gate.env and not allow_env_change) or (fail_on_drift and gate.drifts):
        sys.exit(EXIT_RUNS_FAILED)


@cli.command()
@store_option
@_user_errors
def status(store_path: Path) -> None:
    """Per sweep: runs done / diverged / failed / running / pending; then the claims, live or stale."""
    from harness.leases import claim_states
    from harness.report import status_rows
    from harness.store import SQLiteStore

    with SQLiteStore(store_path, create=False) as store:
        rows = status_rows(store)
        claims = claim_states(store)
    if not rows:
        click.echo("no sweeps in the store yet")
    else:
        click.echo(f"{'sweep':<28} {'planned':>8} {'done':>6} {'diverged':>9} {'failed':>7} {'running':>8} {'pending':>8}")
    for row in rows:
        click.echo(
            f"{row['sweep']:<28} {row['planned']:>8} {row['done']:>6} {row['diverged']:>9} "
            f"{row['failed']:>7} {row['running']:>8} {row['pending']:>8}"
        )
    if claims:
        live = sum(1 for c in claims if c.is_live)
        click.echo(f"\nclaims: {live} live, {len(claims) - live} stale (owner gone or lease not renewed: "
                   "the next sweep takes it over)")
        click.echo(f"{'run':<22} {'state':<6} {'why':<48} owner (host:pid:tag:pidns:boot)")
        for claim in claims[:50]:
            click.echo(f"{claim.run_id:<22} {claim.state.value:<6} {claim.reason:<48} {claim.owner}")
        if len(claims) > 50:
            click.echo(f"... and {len(claims) - 50} more")


@cli.group("store")
def store_group() -> None:
    """The results store: schema upgrades."""


@store_group.command("upgrade")
@store_option
@_user_errors
def store_upgrade(store_path: Path) -> None:
    """Upgrade a store from an older harness to this schema, in place, after a backup beside it."""
    from harness.store import upgrade_store

    result = upgrade_store(store_path)
    if result.backup is None:
        click.echo(f"{store_path}: already at schema version {result.to_version}; nothing to do")
        return
    click.echo(
        f"upgraded {store_path} from schema version {result.from_version} to {result.to_version}; "
        f"the old store is kept as {result.backup}"
    )


@cli.command()
@store_option
@click.option("--size", type=click.IntRange(min=64, max=MAX_CALIBRATE_SIZE), default=None,
              help=f"Matrix size (default 2048 CPU, 8192 GPU; at most {MAX_CALIBRATE_SIZE}: three float32 "
                   "matrices of that size must fit in memory).")
@click.option("--keras-backend", "backend_names", multiple=True, type=click.Choice(["tensorflow", "jax", "torch"]),
              help="Backends to time a training step of (repeatable; default: every installed one).")
@click.option("--gpus", default=None, metavar="0,1|none", help="Calibrate the first of these GPUs (default: nvidia-smi's first).")
@_user_errors
def calibrate(store_path: Path, size: int | None, backend_names: tuple[str, ...], gpus: str | None) -> None:
    """Measure this machine: the peak matmul FLOP/s (the report's MFU line) and one training step of
    a dense and a conv model under each installed Keras backend (what `keras_backend: auto` uses)."""
    from harness.backends import require_installed
    from harness.calibrate import calibrate as measure, save_calibration
    from harness.devices import detect_gpus, parse_gpu_list, plan_workers
    from harness.store import SQLiteStore

    for name in backend_names:
        require_installed(name, key="--keras-backend")
    use_gpus = parse_gpu_list(gpus) if gpus is not None else None
    detected = detect_gpus() if use_gpus != [] else []
    cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slot = plan_workers(gpus=detected, pending=10**6, cpu_count=cpu_count, use_gpus=use_gpus)[0]
    with SQLiteStore(store_path) as store:  # a store we cannot write is refused before the measurement
        if store.readonly:
            raise StoreError("the store is read-only: calibrate saves its result there", file=str(store_path))
        result = measure(gpu=slot.gpu, threads=slot.threads, all_threads=cpu_count, size=size, backends=backend_names or None)
        save_calibration(store, result)
    peak = result.peak
    if peak is not None:
        click.echo(
            f"peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s on {peak['device']} with {peak.get('keras_backend', '?')} "
            f"({peak['size']}x{peak['size']} float32 matmul, best of 10)"
        )
    for timing in result.timings:
        if timing.error:
            click.echo(f"{timing.backend}: failed: {timing.error}")
            continue
        steps = ", ".join(f"{kind} {1e3 * s:.2f} ms/step" for kind, s in timing.step_s.items())
        click.echo(f"{timing.backend} {timing.version}: {steps} ({result.threads} thread{'s' if result.threads > 1 else ''})")
    for kind, by_backend in result.steps().items():
        if by_backend:
            click.echo(f"auto on {result.device_kind}: {kind} models -> {min(by_backend, key=by_backend.__getitem__)}")
    click.echo(f"saved in {store_path}")


def main() -> None:
    cli(prog_name="harness")


if __name__ == "__main__":
    main()
