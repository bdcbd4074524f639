"""CIFAR-10/100 (python batches, tar.gz, npz, Keras' cache) and `dataset: {loader: ...}`.

The CIFAR files are small real-format files made here (pickled dicts of bytes keys, protocol 2, as
published), never a download."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from harness import train
from harness.cli import cli
from harness.data import load_dataset
from harness.errors import DataError
from harness.records import RunStatus
from harness.spec import DatasetRef, Subset, load_sweep
from harness.sweep import prepare_sweep

from conftest import write_sweep

RNG = np.random.default_rng(0)


def cifar_images(n: int, label_of: int = 0) -> tuple[np.ndarray, list[int]]:
    """(n, 3072) rows in CIFAR's channel-first order; channel c of image i is filled with i*3 + c."""
    rows = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            rows[i, c] = (i * 3 + c) % 256
    return rows.reshape(n, 3072), [(i + label_of) % 10 for i in range(n)]


def batch_bytes(data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> bytes:
    return pickle.dumps({b"batch_label": b"made by the tests", label_key: labels, b"data": data,
                         b"filenames": [b"x.png"] * len(labels)}, protocol=2)


def make_cifar10(folder: Path, per_batch: int = 6) -> Path:
    folder.mkdir(parents=True)
    for b in range(1, 6):
        data, labels = cifar_images(per_batch, label_of=b)
        (folder / f"data_batch_{b}").write_bytes(batch_bytes(data, labels))
    data, labels = cifar_images(per_batch)
    (folder / "test_batch").write_bytes(batch_bytes(data, labels))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"plane"] * 10}, protocol=2))
    return folder


def make_cifar100(folder: Path) -> Path:
    folder.mkdir(parents=True)
    data, _ = cifar_images(20)
    fine = [i * 5 % 100 for i in range(20)]
    for name in ("train", "test"):
        blob = pickle.dumps({b"data": data, b"fine_labels": fine, b"coarse_labels": [i % 20 for i in fine]}, protocol=2)
        (folder / name).write_bytes(blob)
    return folder


def test_cifar10_python_batches_from_the_data_dir(tmp_path: Path) -> None:
    make_cifar10(tmp_path / "cifar-10-batches-py")
    ds = load_dataset(DatasetRef(kind="builtin", name="cifar10"), data_dir=tmp_path)
    assert ds.source == str(tmp_path / "cifar-10-batches-py")
    assert ds.x_train.shape == (30, 32, 32, 3) and ds.x_test.shape == (6, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.image_shape == (32, 32, 3)
    # Channels last: image 4's red, green and blue planes hold 12, 13, 14.
    assert ds.x_test[4, 7, 9].tolist() == [12, 13, 14]
    assert ds.y_train[:6].tolist() == [1, 2, 3, 4, 5, 6]  # data_batch_1 first
    sub = load_dataset(DatasetRef(kind="builtin", name="cifar10"), data_dir=tmp_path, subset=Subset(train=10))
    assert len(sub.y_train) == 10 and sub.fingerprint != ds.fingerprint


def test_same_arrays_same_fingerprint_whatever_the_layout(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path / "a" / "cifar-10-batches-py")
    batches = load_dataset(DatasetRef(kind="builtin", name="cifar10"), data_dir=tmp_path / "a")
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "b" / "cifar10.npz", x_train=batches.x_train, y_train=batches.y_train,
             x_test=batches.x_test, y_test=batches.y_test)
    npz = load_dataset(DatasetRef(kind="builtin", name="cifar10"), data_dir=tmp_path / "b")
    (tmp_path / "c").mkdir()
    with tarfile.open(tmp_path / "c" / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(folder, arcname="cifar-10-batches-py")
    tar = load_dataset(DatasetRef(kind="builtin", name="cifar10"), data_dir=tmp_path / "c")
    assert batches.fingerprint == npz.fingerprint == tar.fingerprint
    assert tar.source.endswith("cifar-10-python.tar.gz")


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    make_cifar100(tmp_path / "cifar-100-python")
    ds = load_dataset(DatasetRef(kind="builtin", name="cifar100"), data_dir=tmp_path)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.y_train.max() == 95 and ds.num_classes == 96


def test_keras_cache_is_looked_in_after_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    make_cifar10(tmp_path / "keras" / "datasets" / "cifar-10-batches-py")
    ds = load_dataset(DatasetRef(kind="builtin", name="cifar10"), data_dir=tmp_path / "empty")
    assert ds.source == str(tmp_path / "keras" / "datasets" / "cifar-10-batches-py")
    with pytest.raises(DataError) as caught:
        load_dataset(DatasetRef(kind="builtin", name="cifar100"), data_dir=tmp_path / "empty")
    message = caught.value.one_line()
    assert "cifar-100-python" in message and str(tmp_path / "keras" / "datasets") in message
    assert "HARNESS_OFFLINE" in message


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/nonexistent")


def test_crafted_pickle_cannot_run_code(tmp_path: Path) -> None:
    global MARKER
    MARKER = tmp_path / "pwned"
    folder = make_cifar10(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"refused global (posix|os)\.system"):
        load_dataset(DatasetRef(kind="builtin", name="cifar10"), data_dir=tmp_path)
    assert not MARKER.exists()
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR python batch"):
        load_dataset(DatasetRef(kind="builtin", name="cifar10"), data_dir=tmp_path)


def test_cifar_batch_with_wrong_shape_is_a_data_error(tmp_path: Path) -> None:
    folder = make_cifar10(tmp_path / "cifar-10-batches-py")
    (folder / "test_batch").write_bytes(batch_bytes(np.zeros((2, 100), np.uint8), [0, 1]))
    with pytest.raises(DataError, match=r"test_batch: 'data' is uint8 \(2, 100\); expected uint8 \(N, 3072\)"):
        load_dataset(DatasetRef(kind="builtin", name="cifar10"), data_dir=tmp_path)


LOADER = '''
import numpy as np


def stripes(n_train=40, n_test=10, side=8):
    """Horizontal or vertical stripes: a two-class data set any model learns."""
    def make(n, offset):
        x = np.zeros((n, side, side), np.uint8)
        y = (np.arange(n) + offset) % 2
        x[y == 0, ::2, :] = 255
        x[y == 1, :, ::2] = 255
        return x, y
    return make(n_train, 0), make(n_test, 1)


def broken():
    raise OSError("disk on fire")


def wrong():
    return "not arrays"
'''

LOADER_SWEEP = """
schema_version: 1
name: striped
dataset: {dataset}
budget: {{epochs: 2, batch_size: 8, seeds: 1}}
variants:
  - name: mlp
    model: {{dense: {{units: [8]}}}}
"""


def test_loader_dataset(tmp_path: Path) -> None:
    (tmp_path / "my_data.py").write_text(LOADER)
    path = write_sweep(tmp_path / "s.yaml", LOADER_SWEEP.format(dataset='{loader: "my_data:stripes", args: {n_train: 60}}'))
    spec = load_sweep(path)
    assert spec.dataset.kind == "loader" and spec.dataset.name == "stripes"
    prepared = prepare_sweep(spec)
    ds = prepared.dataset
    assert ds.x_train.shape == (60, 8, 8) and ds.num_classes == 2 and ds.source == "loader my_data:stripes"
    record = train.train_run(prepared.runs[0], ds)
    assert record.status is RunStatus.DONE and record.dataset["n_train"] == 60, record.error


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ('{loader: "my_data:missing"}', "key 'dataset.loader': module 'my_data' (" ),
        ('{loader: "nope:stripes"}', "key 'dataset.loader': module 'nope' not found"),
        ('{loader: "my_data:broken"}', "loader 'my_data:broken' failed: OSError: disk on fire"),
        ('{loader: "my_data:wrong"}', "returned str; expected (x_train, y_train), (x_test, y_test)"),
        ('{loader: "my_data:stripes", path: x.npz}', "give either 'loader' or files"),
        ('{path: x.npz, args: {a: 1}}', "'args' only applies to a dataset 'loader'"),
        ("cifar11", "unknown dataset 'cifar11'; expected one of mnist, fashion_mnist, cifar10, cifar100"),
    ],
)
def test_bad_loader_is_one_line_exit_2(dataset: str, expected: str, tmp_path: Path) -> None:
    (tmp_path / "my_data.py").write_text(LOADER)
    path = write_sweep(tmp_path / "s.yaml", LOADER_SWEEP.format(dataset=dataset))
    store = tmp_path / "results" / "h.db"
    result = CliRunner().invoke(cli, ["sweep", str(path), "--store", str(store)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not store.parent.exists()


CIFAR_SWEEP = """
schema_version: 1
name: cifar_tiny
dataset: cifar10
budget: {epochs: 1, batch_size: 8, seeds: 1}
defaults: {optimizer: adam}
variants:
  - name: conv
    model:
      conv: [{filters: [4], kernel_size: 3, pool: max}]
      dense: {units: [8]}
  - name: builder
    model: {builder: "rgb:net"}
"""

RGB_BUILDER = '''
import keras


def net(input_shape, num_classes):
    assert input_shape == (32, 32, 3), input_shape
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
'''


def test_cifar_shaped_sweep_trains_from_a_data_dir(tmp_path: Path) -> None:
    make_cifar10(tmp_path / "data" / "cifar-10-batches-py")
    (tmp_path / "rgb.py").write_text(RGB_BUILDER)
    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "c.yaml", CIFAR_SWEEP)), data_dir=tmp_path / "data")
    conv, builder = (train.train_run(run, prepared.dataset) for run in prepared.runs)
    assert conv.status is RunStatus.DONE and builder.status is RunStatus.DONE, (conv.error, builder.error)
    assert conv.metrics["params"] == prepared.runs[0].summary.params  # the shape walk on RGB images
    assert conv.metrics["params"] == (3 * 3 * 3 * 4 + 4) + (15 * 15 * 4 * 8 + 8) + (8 * 10 + 10)
    assert builder.metrics["params"] == (3 * 3 * 3 * 4 + 4) + (4 * 10 + 10)
    assert conv.dataset["image_shape"] == [32, 32, 3]
