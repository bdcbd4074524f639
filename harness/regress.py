"""Baselines, the nightly regression gate, and the history of nightly results.

A baseline is a versioned JSON file of a sweep's per-seed accuracies, health counts and
environment (meant to be committed). `compare` decides per variant (see its docstring); the
environment (sweep, dataset fingerprint, library versions, device) is compared too and a
difference is reported in its own section. The history is a JSON-lines file beside the baseline
with one line per night; `detect_steps` fits it with a penalised L1 piecewise-constant model (the
approach of asv's step detection) to find drifts and falls that no single night shows.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from harness import __version__
from harness.aggregate import welch_p
from harness.errors import UserError
from harness.records import RunStatus, utcnow
from harness.fsio import check_writable_target, safe_write
from harness.report import load_results, output_path
from harness.stats import mann_whitney_p, paired_permutation_p
from harness.store import ResultStore

if TYPE_CHECKING:
    from harness.report import SweepResults

BASELINE_FORMAT = "harness-baseline"
BASELINE_VERSION = 2  # 2: health counts per variant and the environment; version 1 still reads
READABLE_VERSIONS = (1, 2)
DEFAULT_THRESHOLD = 0.2  # accuracy points
DEFAULT_ALPHA = 0.01


def finished_accuracies(results: "SweepResults") -> dict[str, dict[str, Any]]:
    """Per variant name: its id and the seeds and test accuracies (%) of its finished runs."""
    variants: dict[str, dict[str, Any]] = {}
    for name, record in zip(results.variants, results.records):
        if record.status is RunStatus.DONE and record.test_accuracy is not None:
            entry = variants.setdefault(name, {"variant_id": record.variant_id, "seeds": [], "accuracy": []})
            entry["seeds"].append(record.seed)
            entry["accuracy"].append(100 * record.test_accuracy)
    return variants


def baseline_from_store(store: ResultStore, sweep: str) -> dict[str, Any]:
    current, _ids, results = current_results(store, sweep)
    if not any(r.accuracy for r in current.values()):
        raise UserError(f"sweep '{sweep}' has no finished run to make a baseline of", key="--sweep")
    variants = {
        name: {
            "variant_id": r.variant_id,
            "seeds": list(r.seeds),
            "accuracy": [round(a, 4) for a in r.accuracy],
            **dataclasses.asdict(r.health),
        }
        for name, r in current.items()
    }
    return {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "sweep": sweep,
        "created_at": utcnow(),
        "harness": __version__,
        "versions": dict(results.versions),
        "dataset": results.info.dataset.fingerprint,
        "environment": environment(results),
        "variants": variants,
    }


def save_baseline(store: ResultStore, sweep: str, *, out: str | Path | None = None) -> Path:
    out = check_writable_target(output_path(out, sweep, ".json", folder=Path("reports") / "baselines"), key="--out")
    return safe_write(out, json.dumps(baseline_from_store(store, sweep), indent=2, sort_keys=True) + "\n", key="--out")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_baseline(path: str | Path) -> dict[str, Any]:
    """Read and check a baseline: every problem is a `UserError` naming the file and the key."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("baseline file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"not a readable JSON baseline: {exc}", file=str(path)) from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise UserError(f"not a harness baseline (format should be '{BASELINE_FORMAT}')", file=str(path), key="format")
    if data.get("version") not in READABLE_VERSIONS:
        raise UserError(
            f"baseline version {data.get('version')} is not supported (this harness reads {READABLE_VERSIONS})",
            file=str(path),
            key="version",
        )
    if not isinstance(data.get("variants"), dict):
        raise UserError("a baseline needs a 'variants' mapping", file=str(path), key="variants")
    for name, entry in data["variants"].items():
        key = f"variants.{name}"
        if not isinstance(entry, dict):
            raise UserError("a variant entry must be a mapping", file=str(path), key=key)
        accuracy = entry.get("accuracy")
        if not isinstance(accuracy, list):
            raise UserError("a variant entry needs an 'accuracy' list (per-seed %)", file=str(path), key=f"{key}.accuracy")
        if not all(_is_number(a) and 0 <= a <= 100 for a in accuracy):
            raise UserError("accuracies must be finite numbers between 0 and 100", file=str(path), key=f"{key}.accuracy")
        seeds = entry.get("seeds")
        if seeds is not None and (
            not isinstance(seeds, list) or len(seeds) != len(accuracy)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        ):
            raise UserError("'seeds' must be a list of integers, one per accuracy", file=str(path), key=f"{key}.seeds")
        for kind in ("failed", "diverged", "collapsed"):
            value = entry.get(kind, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"'{kind}' must be a count >= 0", file=str(path), key=f"{key}.{kind}")
        if not accuracy and not any(entry.get(k) for k in ("failed", "diverged", "collapsed")):
            raise UserError("a variant entry has no accuracies and no failures", file=str(path), key=f"{key}.accuracy")
    return data


class Verdict(enum.Enum):
    IMPROVED = "improved"
    UNCHANGED = "unchanged"
    REGRESSED = "regressed"
    MISSING = "missing"
    NEW = "new"


@dataclasses.dataclass(frozen=True)
class Health:
    """Seeds of a variant that did not give a healthy result, by kind."""

    failed: int = 0  # infrastructure
    diverged: int = 0  # loss became NaN
    collapsed: int = 0  # finished, but collapsed / near chance / train-eval mismatch

    def worse_than(self, other: "Health") -> list[str]:
        """What got worse against `other`, in words (empty when nothing did)."""
        return [
            f"{getattr(self, kind)} {kind} (baseline {getattr(other, kind)})"
            for kind in ("failed", "diverged", "collapsed")
            if getattr(self, kind) > getattr(other, kind)
        ]

    @property
    def total(self) -> int:
        return self.failed + self.diverged + self.collapsed


@dataclasses.dataclass(frozen=True)
class VariantResult:
    """One variant's nightly result: per-seed accuracies (%) of its finished runs and its health."""

    accuracy: tuple[float, ...]
    seeds: tuple[int, ...]
    health: Health = Health()
    variant_id: str = ""


@dataclasses.dataclass(frozen=True)
class Comparison:
    variant: str
    verdict: Verdict
    baseline_mean: float
    current_mean: float
    baseline_n: int
    current_n: int
    p_value: float  # one-sided Welch p in the direction of the change
    note: str = ""
    robust_p: float = math.nan  # one-sided Mann-Whitney U, or the paired permutation test by seed
    robust_test: str = ""
    low_n: bool = False  # fewer than 2 seeds on a side: the threshold alone decided
    health: str = ""  # what got worse, in words

    @property
    def delta(self) -> float:
        return self.current_mean - self.baseline_mean


@dataclasses.dataclass(frozen=True)
class EnvDifference:
    key: str
    baseline: str
    tonight: str


def check_gate_options(*, threshold: float, alpha: float) -> None:
    """NaN or out-of-range options would make every comparison false and hide any regression."""
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise UserError(f"--threshold must be a finite number of points >= 0, not {threshold!r}", key="--threshold")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 < alpha < 1:
        raise UserError(f"--alpha must be a finite number in (0, 1), not {alpha!r}", key="--alpha")


def _robust_p(after: Sequence[float], before: Sequence[float], after_seeds: Sequence[int],
              before_seeds: Sequence[int], *, alternative: str, alpha: float) -> tuple[float, str]:
    """Paired sign-flip permutation test when tonight ran the baseline's seeds and there are enough
    pairs for it to reach alpha (2^-n < alpha); otherwise Mann-Whitney U."""
    pairs = len(after)
    if list(after_seeds) == list(before_seeds) and pairs >= 2 and 2.0**-pairs < alpha:
        return paired_permutation_p(after, before, alternative=alternative), "paired permutation"
    return mann_whitney_p(after, before, alternative=alternative), "Mann-Whitney U"


def compare(
    baseline: dict[str, Any],
    current: Mapping[str, VariantResult | Sequence[float]],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    current_ids: dict[str, str] | None = None,
) -> list[Comparison]:
    """Compare each variant's per-seed accuracies (%) and health with the baseline's.

    Regressed when (a) more seeds failed, diverged or collapsed than in the baseline, or (b) the
    mean fell by more than `threshold` points and a one-sided test says so at `alpha`: Welch's t-test
    or the robust test (Mann-Whitney U; paired by seed when the seeds match and there are enough),
    either one; with fewer than 2 seeds on a side the threshold alone decides (marked low n).
    Improved symmetrically (without the health part). Missing: in the baseline, no run tonight.
    """
    check_gate_options(threshold=threshold, alpha=alpha)
    rows = []
    for name, entry in baseline["variants"].items():
        before = [float(a) for a in entry["accuracy"]]
        before_seeds = [int(s) for s in entry.get("seeds") or range(len(before))]
        before_health = Health(**{k: int(entry.get(k) or 0) for k in ("failed", "diverged", "collapsed")})
        result = current.get(name)
        if result is not None and not isinstance(result, VariantResult):
            result = VariantResult(tuple(float(a) for a in result), tuple(range(len(result))))
        b_mean = float(np.mean(before)) if before else math.nan
        if result is None or (not result.accuracy and result.health.total == 0):
            rows.append(Comparison(name, Verdict.MISSING, b_mean, math.nan, len(before), 0, math.nan, "no run tonight"))
            continue
        after = list(result.accuracy)
        worse = result.health.worse_than(before_health)
        note = ""
        if current_ids and entry.get("variant_id") and current_ids.get(name) not in (None, entry["variant_id"]):
            note = "variant config changed since the baseline"
        a_mean = float(np.mean(after)) if after else math.nan
        delta = a_mean - b_mean
        low_n = len(after) < 2 or len(before) < 2
        direction = "less" if (math.isnan(delta) or delta < 0) else "greater"
        p = welch_p(after, before, alternative=direction)
        robust, test = (
            _robust_p(after, before, result.seeds, before_seeds, alternative=direction, alpha=alpha) if after else (math.nan, "")
        )
        significant = low_n or (not math.isnan(p) and p < alpha) or (not math.isnan(robust) and robust < alpha)
        if worse:
            verdict = Verdict.REGRESSED
        elif not math.isnan(delta) and delta < -threshold and significant:
            verdict = Verdict.REGRESSED
        elif not math.isnan(delta) and delta > threshold and significant:
            verdict = Verdict.IMPROVED
        else:
            verdict = Verdict.UNCHANGED
        if low_n:
            note = "; ".join(x for x in (note, "low n: fewer than 2 seeds on a side, threshold alone") if x)
        rows.append(Comparison(name, verdict, b_mean, a_mean, len(before), len(after), p, note, robust, test, low_n,
                               "; ".join(worse)))
    for name, result in current.items():
        values = result.accuracy if isinstance(result, VariantResult) else result
        if name not in baseline["variants"] and len(values):
            rows.append(Comparison(name, Verdict.NEW, math.nan, float(np.mean(values)), 0, len(values), math.nan, "not in the baseline"))
    return rows


def current_results(store: ResultStore, sweep: str) -> tuple[dict[str, VariantResult], dict[str, str], "SweepResults"]:
    """Tonight's per-variant results (accuracies by seed and health), variant ids, and the results."""
    results = load_results(store, sweep)
    finished = finished_accuracies(results)
    out: dict[str, VariantResult] = {}
    for row in results.summary.itertuples(index=False):
        if not (row.n or row.failed or row.diverged):
            continue
        entry = finished.get(row.variant, {"seeds": [], "accuracy": []})
        out[row.variant] = VariantResult(
            accuracy=tuple(entry["accuracy"]), seeds=tuple(entry["seeds"]),
            health=Health(failed=int(row.failed), diverged=int(row.diverged), collapsed=int(row.n - row.healthy)),
            variant_id=entry.get("variant_id", ""),
        )
    ids = {name: r.variant_id for name, r in out.items() if r.variant_id}
    return out, ids, results


def current_accuracies(store: ResultStore, sweep: str) -> tuple[dict[str, list[float]], dict[str, str]]:
    variants = finished_accuracies(load_results(store, sweep))
    return (
        {name: entry["accuracy"] for name, entry in variants.items()},
        {name: entry["variant_id"] for name, entry in variants.items()},
    )


# --------------------------------------------------------------------------- environment


ENV_VERSIONS = ("tensorflow", "keras", "numpy", "python")


def environment(results: "SweepResults") -> dict[str, str]:
    """What a nightly result depends on besides the code: sweep, data, library versions, device."""
    versions = results.versions
    devices = sorted({_device_kind(r.device) for r in results.records if r.device})
    env = {"sweep": results.name, "dataset": str(results.info.dataset.fingerprint or "")}
    for key in ENV_VERSIONS:
        value = str(versions.get(key, ""))
        env[key] = ".".join(value.split(".")[:2]) if key == "python" else value
    env["device"] = ", ".join(devices)
    return env


def _device_kind(label: str) -> str:
    """A device label without its worker details: 'cpu x86_64 (2 threads)' -> 'cpu x86_64'."""
    return label.split(" (")[0].strip()


def env_differences(baseline: dict[str, Any], env: Mapping[str, str]) -> list[EnvDifference]:
    """Where tonight's environment differs from the baseline's. Keys the baseline did not record
    (older baselines have no device) are not differences."""
    recorded = dict(baseline.get("environment") or {})
    if not recorded:  # a version-1 baseline: rebuild what it has
        versions = baseline.get("versions") or {}
        recorded = {"sweep": baseline.get("sweep"), "dataset": baseline.get("dataset")}
        for key in ENV_VERSIONS:
            if versions.get(key):
                value = str(versions[key])
                recorded[key] = ".".join(value.split(".")[:2]) if key == "python" else value
    diffs = []
    for key, tonight in env.items():
        before = recorded.get(key)
        if before in (None, "") or tonight in (None, ""):
            continue
        if str(before) != str(tonight):
            diffs.append(EnvDifference(key, str(before), str(tonight)))
    return diffs


# --------------------------------------------------------------------------- history


HISTORY_FORMAT = "harness-history"
HISTORY_VERSION = 1
HISTORY_NIGHTS = 200  # step detection looks at this many most recent nights at most
MIN_NIGHTS = 4  # fewer nights than this: no step detection


def history_entry(current: Mapping[str, VariantResult], env: Mapping[str, str], *, at: str | None = None) -> dict[str, Any]:
    """One night as a history line: per variant its accuracies by seed and health, and the environment."""
    return {
        "format": HISTORY_FORMAT,
        "version": HISTORY_VERSION,
        "at": at or utcnow(),
        "environment": dict(env),
        "variants": {
            name: {"seeds": list(r.seeds), "accuracy": [round(a, 4) for a in r.accuracy], **dataclasses.asdict(r.health)}
            for name, r in current.items()
        },
    }


def load_history(path: str | Path) -> list[dict[str, Any]]:
    """Every night of a history file (none when it does not exist yet); a bad line is a UserError."""
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the history: {exc}", file=str(path)) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"line {number} is not JSON: {exc.msg}", file=str(path)) from None
        if not isinstance(entry, dict) or entry.get("format") != HISTORY_FORMAT or entry.get("version") != HISTORY_VERSION:
            raise UserError(f"line {number} is not a harness history entry (version {HISTORY_VERSION})", file=str(path))
        if not isinstance(entry.get("variants"), dict) or not all(
            isinstance(v, dict) and isinstance(v.get("accuracy"), list) and all(_is_number(a) for a in v["accuracy"])
            for v in entry["variants"].values()
        ):
            raise UserError(f"line {number}: 'variants' must map names to entries with an 'accuracy' list",
                            file=str(path), key="variants")
        entries.append(entry)
    return entries


def append_history(path: str | Path, entry: dict[str, Any]) -> Path:
    """Add one night (the file is rewritten whole via a temp file: never half a line)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    return safe_write(path, old + json.dumps(entry, sort_keys=True) + "\n", key="--history")


def history_frame(entries: Sequence[dict[str, Any]]):
    """Long table of the history: night, at, variant, mean, n, standard error, unhealthy seeds."""
    import pandas as pd

    rows = []
    for night, entry in enumerate(entries):
        for name, v in entry["variants"].items():
            acc = [float(a) for a in v["accuracy"]]
            rows.append({
                "night": night, "at": entry.get("at", ""), "variant": name,
                "mean": float(np.mean(acc)) if acc else math.nan, "n": len(acc),
                "se": float(np.std(acc, ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else math.nan,
                "unhealthy": sum(int(v.get(k) or 0) for k in ("failed", "diverged", "collapsed")),
            })
    return pd.DataFrame(rows, columns=["night", "at", "variant", "mean", "n", "se", "unhealthy"])


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int  # index of its first point
    end: int  # one past its last point
    level: float  # the median of its points


def l1_segments(values: Sequence[float], *, penalty: float) -> list[Segment]:
    """Exact minimiser of  penalty * (number of segments) + sum |y_i - level of its segment|  over
    piecewise-constant fits (each level the median of its segment): dynamic programming over the
    last segment's start, O(n^2) segment costs."""
    y = np.asarray(values, dtype=float)
    n = len(y)
    if n == 0:
        return []
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    start_of = np.zeros(n + 1, dtype=int)
    for end in range(1, n + 1):
        for start in range(end):
            chunk = y[start:end]
            cost = best[start] + penalty + float(np.abs(chunk - np.median(chunk)).sum())
            if cost < best[end] - 1e-12:
                best[end], start_of[end] = cost, start
    segments = []
    end = n
    while end > 0:
        start = int(start_of[end])
        segments.append(Segment(start, end, float(np.median(y[start:end]))))
        end = start
    return segments[::-1]


def step_penalty(values: Sequence[float], standard_errors: Sequence[float] = ()) -> float:
    """The cost of one more step: a few noise amplitudes times log(n). The noise is the larger of
    a robust estimate from night-to-night changes (MAD of differences; steps barely move it) and
    the typical standard error of a night's mean over its seeds."""
    y = np.asarray(values, dtype=float)
    n = len(y)
    diffs = np.abs(np.diff(y))
    robust = 1.4826 * float(np.median(diffs)) / math.sqrt(2) if len(diffs) else 0.0
    se = [s for s in standard_errors if s is not None and math.isfinite(s)]
    noise = max(robust, float(np.median(se)) if se else 0.0, 1e-3)
    return 3.0 * noise * max(1.0, math.log(n))


@dataclasses.dataclass(frozen=True)
class Drift:
    """A variant whose latest level sits more than the threshold under an earlier level."""

    variant: str
    peak: float  # the highest earlier level
    peak_from: str  # when that level started
    level: float  # the latest level
    since: str  # when the latest level started
    nights: int  # nights in the fit

    @property
    def fell_by(self) -> float:
        return self.peak - self.level

    @property
    def text(self) -> str:
        return (
            f"{self.variant}: fell {self.fell_by:.2f} points, from a level of {self.peak:.2f} (from {self.peak_from}) "
            f"to {self.level:.2f} (since {self.since}), over {self.nights} nights"
        )


def detect_drifts(entries: Sequence[dict[str, Any]], *, threshold: float = DEFAULT_THRESHOLD) -> tuple[list[Drift], dict[str, list[Segment]]]:
    """Per variant, the step fit of its nightly means (the last `HISTORY_NIGHTS` nights, at least
    `MIN_NIGHTS`), and a `Drift` when its latest level is more than `threshold` points under the
    highest earlier one: a slow drift, or a fall back after an improvement, that no single
    night-to-baseline comparison shows."""
    frame = history_frame(entries[-HISTORY_NIGHTS:])
    drifts, fits = [], {}
    for name, rows in frame.groupby("variant", sort=False):
        rows = rows.dropna(subset=["mean"]).sort_values("night")
        if len(rows) < MIN_NIGHTS:
            continue
        values = rows["mean"].tolist()
        segments = l1_segments(values, penalty=step_penalty(values, rows["se"].tolist()))
        fits[name] = segments
        if len(segments) < 2:
            continue
        at = rows["at"].tolist()
        peak = max(segments[:-1], key=lambda s: s.level)
        last = segments[-1]
        if peak.level - last.level > threshold:
            drifts.append(Drift(name, peak.level, at[peak.start], last.level, at[last.start], len(rows)))
    return drifts, fits


@dataclasses.dataclass(frozen=True)
class GateResult:
    """Everything `harness regress` decided, for the CLI to turn into an exit code."""

    rows: tuple[Comparison, ...]
    env: tuple[EnvDifference, ...]
    drifts: tuple[Drift, ...] = ()
    nights: int = 0  # nights in the history, tonight included (0: no history kept)
    history: Any = None  # history_frame of the nights, for the trend plot

    def count(self, verdict: Verdict) -> int:
        return sum(1 for r in self.rows if r.verdict is verdict)


def run_gate(
    store: ResultStore,
    sweep: str,
    baseline: dict[str, Any],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    history: str | Path | None = None,
) -> GateResult:
    """Compare tonight with the baseline, compare the environments, and (with `history`) append
    tonight to the history and look for steps in it."""
    check_gate_options(threshold=threshold, alpha=alpha)
    current, ids, results = current_results(store, sweep)
    rows = compare(baseline, current, threshold=threshold, alpha=alpha, current_ids=ids)
    env = environment(results)
    diffs = env_differences(baseline, env)
    if history is None:
        return GateResult(tuple(rows), tuple(diffs))
    entries = load_history(history)
    entry = history_entry(current, env)
    append_history(history, entry)
    entries.append(entry)
    drifts, _fits = detect_drifts(entries, threshold=threshold)
    return GateResult(tuple(rows), tuple(diffs), tuple(drifts), len(entries), history_frame(entries))


def render_comparison(
    rows: Sequence[Comparison] | GateResult, *, sweep: str, baseline_path: str, threshold: float, alpha: float,
    history_path: str | None = None, trend_plot: str | None = None,
) -> str:
    gate = rows if isinstance(rows, GateResult) else GateResult(tuple(rows), ())
    order = [Verdict.REGRESSED, Verdict.MISSING, Verdict.IMPROVED, Verdict.UNCHANGED, Verdict.NEW]
    lines = [
        f"# Regression check: {sweep}",
        "",
        f"Against `{baseline_path}`. A variant **regressed** when more of its seeds failed, diverged or "
        f"collapsed than in the baseline, or when its mean test accuracy fell by more than {threshold:g} points "
        f"and a one-sided test gives p < {alpha:g}: Welch's t-test or the robust one (Mann-Whitney U; a paired "
        "permutation test by seed when the seeds match and there are enough of them), either. With fewer than 2 "
        "seeds on a side no test exists and the threshold alone decides (*low n*). **Missing**: in the baseline, "
        "no run tonight.",
        "",
        "**" + ", ".join(f"{gate.count(v)} {v.value}" for v in order) + "**"
        + (f"; **{len(gate.env)} environment difference{'s' if len(gate.env) != 1 else ''}**" if gate.env else ""),
        "",
        "| Verdict | Variant | Baseline mean (%) | Tonight mean (%) | Change (points) | n base / tonight | "
        "Welch p | Robust p | Health | Note |",
        "|---|---|---:|---:|---:|---|---:|---|---|---|",
    ]
    fmt = lambda x, d=2: "—" if math.isnan(x) else f"{x:.{d}f}"  # noqa: E731
    for verdict in order:
        for r in (r for r in gate.rows if r.verdict is verdict):
            robust = "—" if math.isnan(r.robust_p) else f"{r.robust_p:.4f} ({r.robust_test})"
            n = f"{r.baseline_n} / {r.current_n}" + (" (low n)" if r.low_n else "")
            lines.append(
                f"| {verdict.value} | {r.variant} | {fmt(r.baseline_mean)} | {fmt(r.current_mean)} | "
                f"{'—' if math.isnan(r.delta) else f'{r.delta:+.2f}'} | {n} | {fmt(r.p_value, 4)} | {robust} | "
                f"{r.health or '—'} | {r.note} |"
            )
    if gate.env:
        lines += [
            "",
            "## Environment differences",
            "",
            "Tonight did not run in the baseline's environment, so a change in accuracy may come from it rather "
            "than from the code. This fails the check unless `--allow-env-change` is given; refresh the baseline "
            "on purpose when the change is meant.",
            "",
            "| What | Baseline | Tonight |",
            "|---|---|---|",
        ]
        lines += [f"| {d.key} | {d.baseline} | {d.tonight} |" for d in gate.env]
    if gate.nights:
        lines += [
            "",
            "## History",
            "",
            f"{gate.nights} night{'s' if gate.nights != 1 else ''} in `{history_path}` (tonight appended). Each "
            "variant's nightly means are fitted with a penalised L1 piecewise-constant model (asv's step "
            f"detection); a fall of more than {threshold:g} points from an earlier level to the latest one is "
            f"listed here. Step detection needs {MIN_NIGHTS} nights.",
            "",
        ]
        lines += [f"- **drift**: {d.text}" for d in gate.drifts] or ["No drift or fall found."]
        if trend_plot:
            lines += ["", f"![trend]({trend_plot})"]
    return "\n".join(lines) + "\n"
