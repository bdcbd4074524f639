from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from harness.data import load_dataset, prepare_inputs, prepare_targets, read_idx, stratified_subset
from harness.errors import DataError
from harness.spec import DatasetRef, Subset

MNIST = DatasetRef(kind="builtin", name="mnist")


def test_builtin_mnist_from_data_dir(data_dir: Path) -> None:
    ds = load_dataset(MNIST, data_dir=data_dir)
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    assert ds.num_classes == 10 and ds.x_train.dtype == np.uint8


def test_idx_folder_equals_npz(data_dir: Path, tmp_path: Path) -> None:
    npz = load_dataset(DatasetRef(kind="npz", name="mnist", path=str(data_dir / "mnist.npz")))
    idx = load_dataset(DatasetRef(kind="idx", name="mnist", path=str(data_dir / "mnist-idx")))
    assert np.array_equal(npz.x_train, idx.x_train) and np.array_equal(npz.y_test, idx.y_test)
    assert npz.fingerprint == idx.fingerprint


def test_mnist_in_csv_format(data_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(MNIST, data_dir=data_dir, subset=Subset(train=300, test=100))
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        rows = np.column_stack([y, x.reshape(len(x), -1)])
        np.savetxt(tmp_path / f"mnist_{split}.csv", rows, fmt="%d", delimiter=",")
    csv = load_dataset(DatasetRef(kind="csv", name="m", train=str(tmp_path / "mnist_train.csv"), test=str(tmp_path / "mnist_test.csv")))
    assert np.array_equal(csv.x_train, ds.x_train) and np.array_equal(csv.y_train, ds.y_train)
    assert csv.x_test.shape == (100, 28, 28)


def test_subset_is_stratified_and_deterministic(data_dir: Path) -> None:
    a = load_dataset(MNIST, data_dir=data_dir, subset=Subset(train=1000, test=200))
    b = stratified_subset(load_dataset(MNIST, data_dir=data_dir).y_train, 1000)
    assert len(a.y_train) == 1000 and len(a.y_test) == 200
    counts = np.bincount(a.y_train, minlength=10)
    full = np.bincount(load_dataset(MNIST, data_dir=data_dir).y_train, minlength=10) / 60000 * 1000
    assert np.all(np.abs(counts - full) <= 1)
    assert np.array_equal(load_dataset(MNIST, data_dir=data_dir).y_train[b], a.y_train)
    assert not np.all(np.diff(a.y_train) >= 0), "subset must be shuffled, not sorted by class"


def test_fingerprint_depends_on_content(data_dir: Path) -> None:
    small = load_dataset(MNIST, data_dir=data_dir, subset=Subset(train=500))
    other = load_dataset(MNIST, data_dir=data_dir, subset=Subset(train=501))
    assert small.fingerprint != other.fingerprint


def test_gzipped_and_plain_idx_read_the_same(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "mnist-idx" / "t10k-labels-idx1-ubyte.gz"
    plain = tmp_path / "t10k-labels-idx1-ubyte"
    with gzip.open(src) as fin, open(plain, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    assert np.array_equal(read_idx(src), read_idx(plain))


def test_missing_builtin_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(MNIST, data_dir=tmp_path)
    message = info.value.one_line()
    assert str(tmp_path / "mnist.npz") in message and "keras.datasets.mnist" in message


def test_fashion_looks_in_debian_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    import harness.data as data

    debian = tmp_path / "fashion-mnist"
    shutil.copytree(data_dir / "mnist-idx", debian)  # same idx layout as Debian's package
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", debian)
    ds = load_dataset(DatasetRef(kind="builtin", name="fashion_mnist"), data_dir=tmp_path / "empty")
    assert ds.source == str(debian) and ds.x_train.shape == (60000, 28, 28)


def test_unreadable_npz(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read npz file"):
        load_dataset(DatasetRef(kind="npz", name="bad", path=str(bad)))


def test_npz_without_expected_arrays(tmp_path: Path) -> None:
    path = tmp_path / "odd.npz"
    np.savez(path, images=np.zeros((2, 28, 28)))
    with pytest.raises(DataError, match="lacks arrays x_train"):
        load_dataset(DatasetRef(kind="npz", name="odd", path=str(path)))


def test_prepare_inputs_scaling_and_shape() -> None:
    x = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    assert prepare_inputs(x, preprocess="none", images=False).tolist() == [[0, 255, 51, 102]]
    assert prepare_inputs(x, preprocess="unit", images=False).max() == 1.0
    centered = prepare_inputs(x, preprocess="centered", images=True)
    assert centered.shape == (1, 2, 2, 1) and centered.min() == -0.5 and centered.max() == 0.5


def test_prepare_targets() -> None:
    y = np.array([2, 0])
    assert prepare_targets(y, loss="sparse_categorical_crossentropy", num_classes=3).tolist() == [2, 0]
    assert prepare_targets(y, loss="categorical_crossentropy", num_classes=3).tolist() == [[0, 0, 1], [1, 0, 0]]


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_debian_fashion_mnist(tmp_path: Path) -> None:
    ds = load_dataset(DatasetRef(kind="builtin", name="fashion_mnist"), data_dir=tmp_path)
    assert ds.source == "/usr/share/datasets/fashion-mnist"
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28) and ds.num_classes == 10


def test_the_planner_and_the_workers_split_alike(tmp_path, data_dir) -> None:
    """1,001 images, validation 0.1: 100 held out, 901 trained on, for the plan's FLOPs, the ETA
    and the fusion memory estimate as for the worker's arrays (the plan once counted 900)."""
    from harness.data import split_sizes
    from harness.spec import load_sweep
    from harness.sweep import prepare_sweep
    from harness.train import prepared_inputs

    from conftest import tiny_sweep_text, write_sweep

    assert split_sizes(1001, 0.1) == (901, 100) and split_sizes(10, 0.0) == (10, 0)
    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(train=1001, test=100))),
                             data_dir=data_dir)
    run = prepared.runs[0]
    assert run.dataset["n_train"] == 1001
    inputs = prepared_inputs(prepared.dataset, preprocess="unit", images=False, loss="categorical_crossentropy",
                             validation_split=run.variant.validation_split)
    assert run.n_fit == inputs.n_fit == 901 and len(inputs.x_val) == 100
