from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"


def _find_data_dir() -> Path | None:
    for candidate in (os.environ.get("HARNESS_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "mnist.npz").is_file():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real MNIST (../shared/data or $HARNESS_DATA_DIR)."""
    found = _find_data_dir()
    if found is None:
        pytest.skip("real MNIST not found: set HARNESS_DATA_DIR to the folder holding mnist.npz")
    return found


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never download: a missing dataset must be reported, not fetched.
    monkeypatch.setenv("HARNESS_OFFLINE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")


def write_sweep(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


TINY_SWEEP = """
schema_version: 1
name: {name}
dataset: mnist
subset: {{train: {train}, test: {test}}}
budget:
  epochs: 1
  batch_size: 64
  seeds: {seeds}
  validation_split: 0.1
defaults:
  preprocess: unit
  optimizer: adam
variants:
  - name: mlp_32
    reference: 90.0
    model:
      dense: {{units: [32]}}
  - name: cnn_8
    model:
      conv:
        - {{filters: [8], kernel_size: 3, pool: max}}
      dense: {{units: [16]}}
"""


def tiny_sweep_text(*, name: str = "tiny", train: int = 2000, test: int = 500, seeds: int = 2) -> str:
    return TINY_SWEEP.format(name=name, train=train, test=test, seeds=seeds)


# --------------------------------------------------------------------------- Keras backends

def backend_params() -> list:
    """Every Keras backend, skipped with the reason where it is not installed (TensorFlow and JAX
    in CI; PyTorch where installed)."""
    from harness.backends import BACKENDS, EXTRAS, backend_version

    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                backend_version(name) is None, reason=f'{name} not installed (pip install -e ".[{EXTRAS[name]}]")'
            ),
            id=name,
        )
        for name in BACKENDS
    ]


@pytest.fixture(scope="session")
def backend_trainers():
    """Long-lived real training processes, one per Keras backend (KERAS_BACKEND set before Keras
    is imported there, exactly as in a sweep worker); closed at the end of the session."""
    from backend_worker import BackendTrainer

    trainers: dict[str, BackendTrainer] = {}
    yield trainers
    for trainer in trainers.values():
        trainer.close()


@pytest.fixture()
def train_on(backend_trainers):
    """`train_on(backend, run, prepared)` -> RunRecord, trained in a real process of that backend
    (a list of runs: trained fused, `settings` setting constants of `harness.fused` for that call)."""

    def train(backend: str, run, prepared, settings=None):
        from backend_worker import BackendTrainer

        if backend not in backend_trainers:
            backend_trainers[backend] = BackendTrainer(backend)
        if isinstance(run, (list, tuple)):
            return backend_trainers[backend].train_group(list(run), prepared, settings)
        return backend_trainers[backend].train(run, prepared)

    return train


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE local Ray cluster for the whole test run (2 CPUs, 127.0.0.1 only, no dashboard, token
    auth on), started the way the harness starts its own; skipped where Ray is not installed."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported here: Ray reads its settings on import
        pytest.skip('Ray not installed (pip install -e ".[ray]")')
    # actors import the fake train functions (tests/) and this checkout by path
    paths = [str(Path(__file__).parent), str(REPO)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    from harness.ray_executor import start_local_cluster

    start_local_cluster(num_cpus=2)  # imports Ray after setting what Ray reads on import
    import ray

    yield ray
    ray.shutdown()
