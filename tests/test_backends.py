"""Keras backends on the parent side: versions without imports, worker environments (GPU ones
simulated: no GPU here), `auto`, and the one-line error naming the extra."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from harness import backends
from harness.backends import BACKENDS, DEVICE_MEMORY_ENV, BackendNotInstalled, choose_backend, worker_env
from harness.devices import parse_nvidia_smi, plan_workers
from harness.plan import BackendContext, sweep_backends
from harness.spec import load_sweep

from conftest import backend_params, tiny_sweep_text, write_sweep

TWO_GPUS = parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n")


def test_versions_come_from_metadata_without_importing_any_backend() -> None:
    code = (
        "import sys; from harness import backends\n"
        "print({b: backends.backend_version(b) for b in backends.BACKENDS})\n"
        "assert not {'tensorflow', 'jax', 'torch', 'keras'} & set(sys.modules), sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    import importlib.metadata

    assert backends.backend_version("tensorflow") in {importlib.metadata.version(d) for d in ("tensorflow", "tensorflow-cpu") if _has(d)}


def _has(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_cpu_worker_env_per_backend() -> None:
    tf = dict(worker_env("tensorflow", threads=1))
    assert tf["KERAS_BACKEND"] == "tensorflow" and tf["TF_NUM_INTRAOP_THREADS"] == "1" and tf["CUDA_VISIBLE_DEVICES"] == ""
    jax = dict(worker_env("jax", threads=1))
    assert jax["KERAS_BACKEND"] == "jax" and jax["JAX_PLATFORMS"] == "cpu"
    assert "intra_op_parallelism_threads=1" in jax["XLA_FLAGS"] and "--xla_cpu_multi_thread_eigen=false" in jax["XLA_FLAGS"]
    assert "TF_NUM_INTRAOP_THREADS" not in jax
    two = dict(worker_env("jax", threads=2))["XLA_FLAGS"]
    assert two.startswith("--") and "intra_op_parallelism_threads=2" in two  # XLA reads a bare word as a file
    torch = dict(worker_env("torch", threads=3))
    assert torch["KERAS_BACKEND"] == "torch" and torch["HARNESS_TORCH_THREADS"] == "3" and torch["OMP_NUM_THREADS"] == "3"


def test_gpu_workers_share_memory_per_backend_simulated() -> None:
    """Several runs per GPU: JAX must not preallocate 75% per process; each takes its share."""
    slots = plan_workers(gpus=TWO_GPUS, pending=100, cpu_count=16, runs_per_gpu=3, backend="jax")
    assert len(slots) == 6 and {s.backend for s in slots} == {"jax"}
    for slot in slots:
        env = slot.environ()
        assert env["KERAS_BACKEND"] == "jax" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
        assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(0.3)
        assert "JAX_PLATFORMS" not in env and env["CUDA_VISIBLE_DEVICES"] in {"0", "1"}
    tf = plan_workers(gpus=TWO_GPUS, pending=100, cpu_count=16, runs_per_gpu=2)
    assert all(s.environ()["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" and s.backend == "tensorflow" for s in tf)
    torch = plan_workers(gpus=TWO_GPUS, pending=100, cpu_count=16, runs_per_gpu=2, backend="torch")
    assert all(float(s.environ()["HARNESS_TORCH_MEMORY_FRACTION"]) == pytest.approx(0.45) for s in torch)
    # deterministic GPU ops need flags before the backend starts; XLA flags are merged, not replaced
    det = plan_workers(gpus=TWO_GPUS, pending=1, cpu_count=16, backend="jax", deterministic=True)[0].environ()
    assert "--xla_gpu_deterministic_ops=true" in det["XLA_FLAGS"] and "intra_op_parallelism_threads" in det["XLA_FLAGS"]


def test_a_slot_moves_to_another_backend_in_place() -> None:
    slot = plan_workers(gpus=TWO_GPUS, pending=4, cpu_count=8, runs_per_gpu=2)[1]
    moved = slot.for_backend("jax")
    assert (moved.name, moved.device, moved.threads, moved.gpu) == (slot.name, slot.device, slot.threads, 1)
    assert moved.environ()["KERAS_BACKEND"] == "jax" and moved.environ()["CUDA_VISIBLE_DEVICES"] == "1"
    assert moved.environ()["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.450"
    assert moved.environ()[DEVICE_MEMORY_ENV] == slot.environ()[DEVICE_MEMORY_ENV]


def test_each_gpu_worker_is_told_the_memory_share_the_groups_were_planned_with(monkeypatch) -> None:
    """The figure the fusion width is planned with (`gpu_worker_memory_bytes`: the smallest used GPU's
    share) reaches every GPU worker, whichever GPU it has and whichever backend it moves to; a
    CPU worker, or a GPU of unknown size, is told nothing."""
    from harness.backends import worker_memory_bytes
    from harness.devices import gpu_worker_memory_bytes, parse_nvidia_smi

    gpus = parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA A100-SXM4-40GB, 40960\n")
    share = gpu_worker_memory_bytes(gpus, 3)
    assert share == int(40960 * 2**20 * 0.9 / 3)
    for backend in ("tensorflow", "jax", "torch"):
        slots = plan_workers(gpus=gpus, pending=100, cpu_count=16, runs_per_gpu=3, backend=backend)
        assert len(slots) == 6 and all(s.memory_bytes == share for s in slots)
        assert all(s.environ()[DEVICE_MEMORY_ENV] == str(share) for s in slots)
    # --gpus 0: the share is the chosen H100's, not the smaller A100's it does not train on, and the
    # sweep plans its fusion widths with the same figure
    from harness.execute import SweepOptions, _Machine, _memory_share

    big = int(81559 * 2**20 * 0.9 / 3)
    only_h100 = plan_workers(gpus=gpus, pending=100, cpu_count=16, runs_per_gpu=3, use_gpus=[0])
    assert len(only_h100) == 3 and all(s.memory_bytes == big for s in only_h100)
    machine = _Machine(gpus=tuple(gpus), cpus=(0,), backend_context=None, backends={"tensorflow": 1})
    assert _memory_share(machine, SweepOptions(gpus=(0,), runs_per_gpu=3)) == big
    assert _memory_share(machine, SweepOptions(gpus=None, runs_per_gpu=3)) == share
    # --in-process looks for no GPU (`_machine`): no share, and --gpus is no error
    no_gpus = dataclasses.replace(machine, gpus=())
    assert _memory_share(no_gpus, SweepOptions(gpus=(0,), runs_per_gpu=3)) is None
    assert all(DEVICE_MEMORY_ENV not in s.environ() for s in plan_workers(gpus=[], pending=4, cpu_count=4))
    unknown = plan_workers(gpus=parse_nvidia_smi("0, some GPU, 0\n"), pending=4, cpu_count=4)
    assert all(DEVICE_MEMORY_ENV not in s.environ() and s.memory_bytes is None for s in unknown)
    # the worker's side
    monkeypatch.setenv(DEVICE_MEMORY_ENV, str(share))
    assert worker_memory_bytes() == share
    for junk in ("", "0", "-5", "1e9", "lots"):
        monkeypatch.setenv(DEVICE_MEMORY_ENV, junk)
        assert worker_memory_bytes() is None, junk
    monkeypatch.delenv(DEVICE_MEMORY_ENV)
    assert worker_memory_bytes() is None


def test_auto_uses_the_measurement_then_the_documented_fallback() -> None:
    calibration = {"steps": {"dense": {"tensorflow": 0.004, "jax": 0.001}, "conv": {"tensorflow": 0.02, "jax": 0.05}}}
    both = ("tensorflow", "jax")
    backend, reason = choose_backend("auto", kind="dense", device_kind="cpu", installed=both, calibration=calibration)
    assert backend == "jax" and "fastest measured dense step on cpu" in reason and "jax 1.00 ms" in reason
    assert choose_backend("auto", kind="conv", device_kind="cpu", installed=both, calibration=calibration)[0] == "tensorflow"
    # a measured backend that is no longer installed is not chosen
    assert choose_backend("auto", kind="dense", device_kind="cpu", installed=("tensorflow",), calibration=calibration)[0] == "tensorflow"
    # without calibration: JAX for dense and TensorFlow for conv on CPU, JAX on GPU
    assert choose_backend("auto", kind="dense", device_kind="cpu", installed=both)[0] == "jax"
    backend, reason = choose_backend("auto", kind="conv", device_kind="cpu", installed=both)
    assert backend == "tensorflow" and "no calibration" in reason
    assert choose_backend("auto", kind="conv", device_kind="gpu", installed=("torch", "tensorflow"))[0] == "torch"
    assert choose_backend("jax", kind="conv", device_kind="cpu", installed=()) == ("jax", "")
    with pytest.raises(BackendNotInstalled, match="no Keras backend is installed"):
        choose_backend("auto", kind="dense", device_kind="cpu", installed=())


def test_missing_backend_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text().replace("validation_split: 0.1", "validation_split: 0.1\n  keras_backend: torch")))
    context = BackendContext(installed=("tensorflow", "jax"))
    if backends.backend_version("torch") is not None:
        pytest.skip("torch is installed here")
    with pytest.raises(BackendNotInstalled) as info:
        sweep_backends(spec, context)
    message = info.value.one_line()
    assert "s.yaml" in message and "key 'budget.keras_backend'" in message
    assert "Keras backend 'torch' is not installed" in message and 'pip install -e ".[torch]"' in message and "\n" not in message


def test_sweep_backends_counts_runs_per_resolved_backend(tmp_path: Path) -> None:
    text = tiny_sweep_text(seeds=3) + "grid:\n  budget.keras_backend: [tensorflow, auto]\n"
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", text))
    counts = sweep_backends(spec, BackendContext(installed=("tensorflow", "jax")))
    # mlp_32 x {tensorflow, auto->jax (dense)} and cnn_8 x {tensorflow, auto->tensorflow (conv)}, 3 seeds each
    assert counts == {"tensorflow": 9, "jax": 3}


def test_default_backend_follows_keras_backend_env() -> None:
    assert backends.default_backend({}) == "tensorflow"
    assert backends.default_backend({"KERAS_BACKEND": "jax"}) == "jax"
    assert backends.default_backend({"KERAS_BACKEND": "mlx"}) == "tensorflow"


def test_workers_are_shared_out_among_backends() -> None:
    from harness.backends import share_workers

    assert share_workers({"tensorflow": 6, "jax": 6}, 2) == ["jax", "tensorflow"] or share_workers(
        {"tensorflow": 6, "jax": 6}, 2
    ) == ["tensorflow", "jax"]
    assert share_workers({"tensorflow": 9, "jax": 3}, 4) == ["tensorflow", "tensorflow", "tensorflow", "jax"]
    assert share_workers({"tensorflow": 30, "jax": 1}, 2) == ["tensorflow", "jax"]  # every backend gets a worker
    assert share_workers({"tensorflow": 5, "jax": 5, "torch": 5}, 2) == ["jax", "tensorflow"]  # the rest wait
    assert share_workers({"jax": 4}, 3) == ["jax"] * 3


E2E_SWEEP = """
schema_version: 1
name: backends_e2e
dataset: mnist
subset: {train: 2000, test: 1000}
budget: {epochs: 1, batch_size: 64, seeds: 3, validation_split: 0.1}
defaults: {preprocess: unit, optimizer: adam}
variants:
  - name: mlp_64
    model: {dense: {units: [64]}}
grid:
  budget.keras_backend: [tensorflow, jax]
"""


@pytest.mark.slow
def test_same_sweep_trains_under_tensorflow_and_jax_and_agrees(tmp_path: Path, data_dir: Path) -> None:
    """One small sweep over both backends through `harness sweep` (real workers of each backend):
    run ids differ by backend, accuracies agree within their seed spread, the report compares them."""
    from click.testing import CliRunner

    from harness.backends import backend_version
    from harness.cli import cli
    from harness.report import load_results
    from harness.store import SQLiteStore

    if backend_version("jax") is None:
        pytest.skip('jax not installed (pip install -e ".[jax]")')
    sweep = write_sweep(tmp_path / "s.yaml", E2E_SWEEP)
    store_path = tmp_path / "h.db"
    runner = CliRunner()
    result = runner.invoke(cli, ["sweep", str(sweep), "--data-dir", str(data_dir), "--store", str(store_path), "--workers", "2"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "1 thread, jax)" in result.stderr and "1 thread, tensorflow)" in result.stderr
    with SQLiteStore(store_path, create=False) as store:
        results = load_results(store, "backends_e2e")
    runs = results.runs
    assert len(runs) == 6 and set(runs["status"]) == {"done"}
    assert runs.groupby("keras_backend")["run_id"].nunique().to_dict() == {"jax": 3, "tensorflow": 3}
    assert runs["variant_id"].nunique() == 1
    for record in results.records:
        backend = record.budget["keras_backend"]
        assert record.versions["keras_backend"] == backend and record.versions[backend] == backend_version(backend)
    acc = {b: sorted(g["test_accuracy"]) for b, g in runs.groupby("keras_backend")}
    spread = max(max(v) for v in acc.values()) - min(min(v) for v in acc.values())
    means = {b: sum(v) / len(v) for b, v in acc.items()}
    assert abs(means["tensorflow"] - means["jax"]) <= max(spread, 1.0), acc
    # 28 steps of Adam on 1,800 images: both backends learn (chance is 10%; measured 75-80% on both)
    assert all(65.0 < a for v in acc.values() for a in v), acc
    report = runner.invoke(cli, ["report", "--sweep", "backends_e2e", "--store", str(store_path), "--no-plots",
                                 "--out", str(tmp_path / "r.md")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "r.md").read_text()
    assert "## Keras backends side by side" in text and "| JAX |" in text and "| TensorFlow |" in text
    assert f"JAX {backend_version('jax')} (3 runs)" in text


TIMEOUT_SWEEP = """
schema_version: 1
name: slowpoke
dataset: mnist
subset: {train: 600, test: 200}
budget: {epochs: 1, batch_size: 32, seeds: 2}
variants:
  - name: mlp_16
    model: {dense: {units: [16]}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_timeouts_isolate_and_resume_on_every_backend(backend: str, tmp_path: Path, data_dir: Path) -> None:
    """Real workers of `backend`: runs past --timeout become FAILED records (their workers killed
    and replaced, the sweep goes on, exit 1); --rerun-failed then trains exactly those, on `backend`."""
    from click.testing import CliRunner

    from harness.cli import cli
    from harness.store import SQLiteStore

    sweep = write_sweep(tmp_path / "s.yaml", TIMEOUT_SWEEP)
    store_path = tmp_path / "h.db"
    common = ["sweep", str(sweep), "--data-dir", str(data_dir), "--store", str(store_path), "--keras-backend", backend,
              "--workers", "1", "--fuse", "1"]  # per-run timeouts: one run per group
    runner = CliRunner()
    first = runner.invoke(cli, [*common, "--timeout", "0.01"])
    assert first.exit_code == 1, first.output + first.stderr
    assert "2 trained (2 failed or diverged)" in first.output
    with SQLiteStore(store_path, create=False) as store:
        records = store.records(r for r, _v, _s in store.plan("slowpoke"))
    assert [r.status.value for r in records] == ["failed", "failed"]
    assert all("timed out after 0.01 s" in r.error for r in records)
    again = runner.invoke(cli, [*common, "--rerun-failed"])
    assert again.exit_code == 0, again.output + again.stderr
    assert "2 runs planned, 0 already in the store, 2 trained (0 failed or diverged)" in again.output
    with SQLiteStore(store_path, create=False) as store:
        records = store.records(r for r, _v, _s in store.plan("slowpoke"))
    assert [r.status.value for r in records] == ["done", "done"]
    assert {r.versions["keras_backend"] for r in records} == {backend}


KERAS_PIPELINE = """
import importlib
import importlib.util
import json
import sys

from harness.backends import import_keras_for_worker, keras_arrays_without_autotune
from harness.train import warm_up

import_keras_for_worker()  # the first half of a worker's `train.warm_up`: Keras imported
installed = [m for m in ("sklearn", "matplotlib", "jax") if importlib.util.find_spec(m) is not None]
skipped = [m for m in installed if m not in sys.modules]
later = [importlib.import_module(m).__name__ for m in installed]  # as a user's model module imports them

import numpy as np
import keras
from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

def train():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dropout(0.2),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy", steps_per_execution=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((203, 12)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 203)]
    model.fit(x, y, batch_size=16, epochs=2, shuffle=True, validation_split=0.1, verbose=0)
    return model.get_weights(), model.evaluate(x, y, batch_size=32, verbose=0)

def options():
    return ArrayDataAdapter(np.zeros((10, 2)), np.zeros((10,)), batch_size=4).get_tf_dataset().options()

warm_up()  # the second half: the worker's settings (CPU, one thread) through its adapter
wrapped = ArrayDataAdapter.get_tf_dataset
keras_arrays_without_autotune(threads=1)  # once per process
wrapped_once = ArrayDataAdapter.get_tf_dataset is wrapped
after, ours = train(), options()
ArrayDataAdapter.get_tf_dataset = wrapped.keras_own  # Keras' own pipeline, in the same process
before, keras_own = train(), options()
print(json.dumps({
    "installed": installed, "skipped": skipped, "later": later,
    "keras_own": [keras_own.autotune.enabled, keras_own.threading.private_threadpool_size],
    "ours": [ours.autotune.enabled, ours.threading.private_threadpool_size],
    "wrapped_once": wrapped_once,
    "same_bits": all(np.array_equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1],
}))
"""


def test_a_tensorflow_cpu_worker_feeds_arrays_without_tf_data_autotuning() -> None:
    """A worker imports Keras without the integrations it never uses, and feeds arrays through
    Keras' tf.data pipeline with autotuning off and one thread (its teardown after each `fit` and
    `evaluate` stalled about 2.5 s half the time): the same training to the bit, shuffling and
    validation included."""
    pytest.importorskip("tensorflow")
    import json
    import os

    env = {**os.environ, **dict(worker_env("tensorflow", threads=1)), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", KERAS_PIPELINE], capture_output=True, text=True, env=env,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # Keras was imported without the integrations it loads eagerly (scikit-learn, matplotlib, and
    # JAX under TensorFlow), and a later import of them by any other module still loads them
    assert out["skipped"] == out["installed"] and out["later"] == out["installed"]
    assert out["keras_own"][0] is not False  # Keras' default: autotuning on
    assert out["ours"] == [False, 1]  # what a CPU worker's adapter sets up
    assert out["wrapped_once"] and out["same_bits"]


def test_keras_own_imports_of_skipped_integrations_fail_and_everyone_elses_load(tmp_path: Path, monkeypatch) -> None:
    """The worker's import hook: a module of Keras or TensorFlow importing a skipped library (an
    import statement, a from-import, `importlib.import_module` as Keras' lazy modules do) gets
    `ModuleNotFoundError` (which they catch); any other importer gets the library, and with the
    hook gone Keras' own import loads it too."""
    package = tmp_path / "harness_probe_integration"
    package.mkdir()
    (package / "__init__.py").write_text("LOADED = True\n")
    (package / "base.py").write_text("class Estimator:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hook = backends._SkipIntegrations(["harness_probe_integration"])
    ways = {
        "import": "import harness_probe_integration as probe\nok = probe.LOADED",
        "from": "from harness_probe_integration.base import Estimator\nok = Estimator is not None",
        "import_module": "import importlib\nok = importlib.import_module('harness_probe_integration').LOADED",
    }

    def loads(importer: str, way: str) -> bool:
        for name in [m for m in sys.modules if m.startswith("harness_probe_integration")]:
            del sys.modules[name]
        namespace = {"__name__": importer}
        try:
            exec(ways[way], namespace)  # noqa: S102 - the importer's module name is the point
        except ModuleNotFoundError:
            assert "harness_probe_integration" not in sys.modules  # nothing half-imported is left
            return False
        return namespace["ok"]

    before = list(sys.meta_path)
    sys.meta_path.insert(0, hook)
    try:
        for way in ways:
            assert not loads("keras.src.wrappers.fixes", way), way
            assert not loads("tensorflow.lite.python.util", way), way
            for importer in ("user_model", "keras_tuner.src.tuners.sklearn_tuner", "tensorflow_probability", "harness.builders"):
                assert loads(importer, way), (importer, way)
    finally:
        sys.meta_path.remove(hook)
    assert sys.meta_path == before
    assert all(loads("keras.src.wrappers.fixes", way) for way in ways)
    for name in [m for m in sys.modules if m.startswith("harness_probe_integration")]:
        del sys.modules[name]


def test_jax_is_skipped_only_where_the_worker_names_another_backend() -> None:
    """Keras' JAX backend imports JAX itself; without `KERAS_BACKEND` Keras may take its backend
    from `keras.json`, so JAX is kept then."""
    assert backends.worker_skipped_imports({"KERAS_BACKEND": "tensorflow"}) == ("sklearn", "matplotlib", "jax")
    assert backends.worker_skipped_imports({"KERAS_BACKEND": "torch"}) == ("sklearn", "matplotlib", "jax")
    for environ in ({"KERAS_BACKEND": "jax"}, {}, {"KERAS_BACKEND": ""}, {"KERAS_BACKEND": "numpy"}):
        assert backends.worker_skipped_imports(environ) == ("sklearn", "matplotlib"), environ
    for backend in BACKENDS:  # every worker's environment names its backend
        skipped = backends.worker_skipped_imports(dict(worker_env(backend, threads=1)))
        assert ("jax" in skipped) == (backend != "jax")
