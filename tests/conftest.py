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
