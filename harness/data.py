"""Datasets: find them, read them (npz, idx(.gz), mnist-in-csv), subset them, fingerprint them.

numpy and pandas only; Keras' downloader is the last resort and is imported only then.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np

from harness.errors import DataError
from harness.spec import DatasetRef, Subset

DATA_DIR_ENV = "HARNESS_DATA_DIR"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBSET_SEED = 20180609  # fixed: every run of a sweep sees the same subset, whatever its seed

_BUILTIN_CANDIDATES = {
    "mnist": ("mnist.npz", "mnist-idx", "mnist"),
    "fashion_mnist": ("fashion_mnist.npz", "fashion-mnist.npz", "fashion-mnist-idx", "fashion-mnist", "fashion_mnist"),
    # CIFAR: an npz with x_train/y_train/x_test/y_test, or the python batches as published
    # (the folder, or the .tar.gz it comes in); Keras' cache holds the folder.
    "cifar10": ("cifar10.npz", "cifar-10.npz", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar100.npz", "cifar-100.npz", "cifar-100-python", "cifar-100-python.tar.gz"),
}
_KERAS_CACHE_NAMES = {
    "mnist": ("mnist.npz",),
    "fashion_mnist": (),
    "cifar10": ("cifar-10-batches-py", "cifar-10-batches-py_extracted/cifar-10-batches-py"),
    "cifar100": ("cifar-100-python", "cifar-100-python_extracted/cifar-100-python"),
}


def split_sizes(n_train: int, validation_split: float) -> tuple[int, int]:
    """(examples trained on, examples held out for validation) of `n_train` under
    `validation_split`: the last round(n * split) are held out. The harness's rule (Keras' own
    `fit(validation_split=...)` trains on floor(n * (1 - split)): one example fewer at times; the
    harness slices the arrays itself), shared by the planner, the workers, KerasTuner searches and
    the records' step counts."""
    n_val = int(round(int(n_train) * float(validation_split or 0.0)))
    return int(n_train) - n_val, n_val


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    source: str
    x_train: np.ndarray  # (N, H, W) or (N, H, W, C), uint8 pixels
    y_train: np.ndarray  # (N,) integer labels
    x_test: np.ndarray
    y_test: np.ndarray
    subset: Subset | None = None

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @functools.cached_property
    def fingerprint(self) -> str:
        """Content hash of the arrays actually trained on: same data, same hash, whatever the file."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "n_train": int(len(self.y_train)),
            "n_test": int(len(self.y_test)),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "subset": self.subset.model_dump() if self.subset else None,
        }


# --------------------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzipped), as published by LeCun for MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError("not an idx file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"unknown idx data type 0x{dtype_code:02x}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    expected = int(np.prod(shape))
    if array.size != expected:
        raise ValueError(f"idx file holds {array.size} values, header says {expected}")
    return array.reshape(shape).astype(np.dtype(dtypes[dtype_code]).newbyteorder("="))


def _find_idx(folder: Path, prefix: str) -> Path:
    matches = sorted(p for p in folder.iterdir() if p.name.startswith(prefix) and "idx" in p.name)
    if not matches:
        raise FileNotFoundError(f"no {prefix}*idx* file in {folder}")
    return matches[0]


def read_idx_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        read_idx(_find_idx(folder, "train-images")),
        read_idx(_find_idx(folder, "train-labels")),
        read_idx(_find_idx(folder, "t10k-images")),
        read_idx(_find_idx(folder, "t10k-labels")),
    )


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four arrays of a Keras-layout npz file. Any damage is a `ValueError` in plain words
    (numpy alone would call a non-zip file "pickled data" and a truncated one a `BadZipFile`)."""
    import zipfile
    import zlib

    if not zipfile.is_zipfile(path):
        raise ValueError("not an npz archive (no zip directory: truncated, or another kind of file)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data.files]
            if missing:
                raise ValueError(f"npz file lacks arrays {', '.join(missing)}")
            return data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError) as exc:
        raise ValueError(f"damaged npz archive ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        if "pickled" in str(exc):
            raise ValueError("the npz holds an object array, which is refused (plain numeric arrays only)") from None
        raise


def read_mnist_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mnist-in-csv: one image a line, the label then 784 pixels (a header line is skipped)."""
    import pandas as pd

    with open(path, encoding="utf-8") as handle:
        first = handle.readline().split(",")[0].strip()
    header = 0 if not first.lstrip("-").isdigit() else None
    frame = pd.read_csv(path, header=header, dtype=np.int64)
    values = frame.to_numpy()
    labels, pixels = values[:, 0], values[:, 1:]
    side = int(round(pixels.shape[1] ** 0.5))
    if side * side != pixels.shape[1]:
        raise ValueError(f"{pixels.shape[1]} pixel columns do not make a square image")
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("pixel values must be in 0..255")
    return pixels.reshape(-1, side, side).astype(np.uint8), labels.astype(np.int64)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python batches and nothing else: the only globals allowed are numpy's
    array reconstruction and `_codecs.encode` (how protocol-2 pickles spell bytes). Any other
    global (os.system, builtins.eval...) is refused, so a crafted file cannot run code."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (CIFAR batches need only numpy arrays)")
        return super().find_class(module, name)


def _unpickle_batch(data: bytes, name: str) -> dict:
    try:
        batch = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ValueError(f"{name}: not a CIFAR python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{name}: not a CIFAR python batch (a {type(batch).__name__}, not a dict)")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}


def _cifar_arrays(batches: list[tuple[str, dict]], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name, batch in batches:
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"{name}: a CIFAR batch needs 'data' and '{label_key}'")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{name}: 'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
        label = np.asarray(batch[label_key])
        if label.shape != (len(data),):
            raise ValueError(f"{name}: {len(label)} labels for {len(data)} images")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # channels last
        labels.append(label.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _cifar_members(path: Path) -> dict[str, bytes]:
    """The files of a CIFAR python folder, or of the .tar.gz it is published as (read, not extracted)."""
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
    import tarfile

    members: dict[str, bytes] = {}
    with tarfile.open(path, "r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile():
                handle = archive.extractfile(member)
                if handle is not None:
                    members[Path(member.name).name] = handle.read()
    return members


def read_cifar(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 (`data_batch_1..5`, `test_batch`) or CIFAR-100 (`train`, `test`, fine labels) python
    batches, unpickled with a restricted unpickler; images come out (N, 32, 32, 3) uint8."""
    files = _cifar_members(path)
    train_names = sorted(n for n in files if n.startswith("data_batch_"))
    if train_names and "test_batch" in files:
        names, test_names, label_key = train_names, ["test_batch"], "labels"
    elif "train" in files and "test" in files:
        names, test_names, label_key = ["train"], ["test"], "fine_labels"
    else:
        raise ValueError("expected CIFAR-10 data_batch_* and test_batch, or CIFAR-100 train and test files")
    x_train, y_train = _cifar_arrays([(n, _unpickle_batch(files[n], n)) for n in names], label_key)
    x_test, y_test = _cifar_arrays([(n, _unpickle_batch(files[n], n)) for n in test_names], label_key)
    return x_train, y_train, x_test, y_test


def is_cifar_path(path: Path) -> bool:
    if path.is_dir():
        return (path / "test_batch").is_file() or ((path / "train").is_file() and (path / "test").is_file())
    return path.name.endswith((".tar.gz", ".tgz"))


# --------------------------------------------------------------------------- resolution


def configured_data_dir(data_dir: str | Path | None = None) -> Path | None:
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def _read_path(path: Path):
    if is_cifar_path(path):
        return read_cifar(path)
    if path.is_dir():
        return read_idx_folder(path)
    return read_npz(path)


def keras_cache_dir() -> Path:
    """Where Keras' own downloader keeps its datasets ($KERAS_HOME/datasets, default ~/.keras/datasets)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser() / "datasets"


def _read_found(path: Path, name: str):
    try:
        return str(path), _read_path(path)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {name}: {exc}", file=str(path), key="dataset") from None


def _load_builtin(name: str, data_dir: Path | None):
    looked: list[str] = []
    if data_dir is not None:
        for candidate in _BUILTIN_CANDIDATES[name]:
            path = data_dir / candidate
            looked.append(str(path))
            if path.exists():
                return _read_found(path, name)
    else:
        looked.append(f"${DATA_DIR_ENV} (not set)")
    if name == "fashion_mnist":
        looked.append(str(DEBIAN_FASHION_DIR))
        if DEBIAN_FASHION_DIR.is_dir():
            return _read_found(DEBIAN_FASHION_DIR, name)
    for cached in _KERAS_CACHE_NAMES.get(name, ()):
        path = keras_cache_dir() / cached
        looked.append(str(path))
        if path.exists():
            return _read_found(path, name)
    looked.append(f"keras.datasets.{name}.load_data() (download)")
    try:
        arrays = _keras_download(name)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not found"
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise DataError(
            f"dataset '{name}' not found; looked in {'; '.join(looked)} ({reason}). "
            f"Pass --data-dir or set {DATA_DIR_ENV} to a folder holding {_BUILTIN_CANDIDATES[name][0]}",
            key="dataset",
        ) from None
    return f"keras.datasets.{name}", arrays


def _keras_download(name: str):
    if os.environ.get("HARNESS_OFFLINE"):
        raise RuntimeError("HARNESS_OFFLINE is set")
    import keras  # heavy import: only when no local copy was found

    (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    return x_train, y_train, x_test, y_test


def call_loader(ref: DatasetRef):
    """Import and call the sweep's `dataset: {loader: ...}` function (the user's code runs here:
    in the sweep's process, which needs the data's fingerprint to plan, and in each worker)."""
    import json

    from harness.builders import load_builder

    assert ref.loader is not None
    where = f"loader '{ref.loader}'"
    try:
        function = load_builder(ref.loader, root=ref.code_root, expected_sha256=None)
        result = function(**json.loads(ref.loader_args))
    except Exception as exc:  # noqa: BLE001 - the user's code: any failure is a one-line error
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DataError(f"{where} failed: {type(exc).__name__}: {message}".rstrip(": "), key="dataset.loader") from None
    try:
        (x_train, y_train), (x_test, y_test) = result
    except (TypeError, ValueError):
        raise DataError(
            f"{where} returned {type(result).__name__}; expected (x_train, y_train), (x_test, y_test)", key="dataset.loader"
        ) from None
    return f"loader {ref.loader}", (x_train, y_train, x_test, y_test)


def _read_ref(ref: DatasetRef, data_dir: Path | None):
    if ref.kind == "builtin":
        return _load_builtin(ref.name, data_dir)
    if ref.kind == "loader":
        return call_loader(ref)
    if ref.kind == "csv":
        for path in (ref.train, ref.test):
            if not Path(path).is_file():
                raise DataError("file not found", file=path, key="dataset")
        arrays = []
        for path, key in ((ref.train, "dataset.train"), (ref.test, "dataset.test")):
            try:
                arrays += read_mnist_csv(Path(path))
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise DataError(f"cannot read mnist-in-csv data: {exc}", file=path, key=key) from None
        x_train, y_train, x_test, y_test = arrays
        return ref.train, (x_train, y_train, x_test, y_test)
    path = Path(ref.path)
    if not path.exists():
        raise DataError("not found", file=str(path), key="dataset")
    try:
        return str(path), _read_path(path)
    except (OSError, ValueError, EOFError) as exc:
        kind = "CIFAR python batches" if is_cifar_path(path) else "idx folder" if path.is_dir() else "npz file"
        raise DataError(f"cannot read {kind}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=str(path), key="dataset") from None


def _check_arrays(arrays, source: str):
    x_train, y_train, x_test, y_test = (np.asarray(a) for a in arrays)
    # Labels as a column (Keras' CIFAR loaders return (N, 1)) become (N,).
    y_train, y_test = (y.reshape(-1) if y.ndim == 2 and y.shape[1:] == (1,) else y for y in (y_train, y_test))
    for label, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim not in (3, 4) or len(x) != len(y) or y.ndim != 1 or len(y) == 0:
            raise DataError(
                f"{label} arrays have shapes {x.shape} and {y.shape}; expected (N, H, W[, C]) images and (N,) labels",
                file=source,
                key="dataset",
            )
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise DataError(f"{label} labels must be non-negative integers", file=source, key="dataset")
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def stratified_subset(labels: np.ndarray, size: int, *, seed: int = SUBSET_SEED) -> np.ndarray:
    """Indices of a deterministic class-stratified sample of `size` items, in shuffled order."""
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts / counts.sum() * size
    take = np.floor(exact).astype(int)
    remainder = size - take.sum()
    order = np.argsort(-(exact - take), kind="stable")
    take[order[:remainder]] += 1
    chosen = []
    for cls, n in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        chosen.append(rng.permutation(members)[:n])
    picked = np.concatenate(chosen)
    return picked[rng.permutation(len(picked))]


@functools.lru_cache(maxsize=4)
def _load_cached(ref: DatasetRef, data_dir: str | None, subset: Subset | None) -> Dataset:
    source, arrays = _read_ref(ref, Path(data_dir) if data_dir else None)
    x_train, y_train, x_test, y_test = _check_arrays(arrays, source)
    if subset is not None:
        if subset.train:
            idx = stratified_subset(y_train, subset.train)
            x_train, y_train = x_train[idx], y_train[idx]
        if subset.test:
            idx = stratified_subset(y_test, subset.test)
            x_test, y_test = x_test[idx], y_test[idx]
    return Dataset(
        name=ref.name,
        source=source,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        subset=subset,
    )


def load_dataset(ref: DatasetRef, *, subset: Subset | None = None, data_dir: str | Path | None = None) -> Dataset:
    """Find and read a dataset. Raise `DataError` naming every place looked when it is missing."""
    folder = configured_data_dir(data_dir)
    return _load_cached(ref, str(folder) if folder else None, subset)


def prepare_inputs(x: np.ndarray, *, preprocess: str, images: bool) -> np.ndarray:
    """Scale pixels as the variant asks and shape them for a conv (N,H,W,C) or dense (N,D) model."""
    x = x.astype(np.float32)
    if preprocess == "unit":
        x /= 255.0
    elif preprocess == "centered":
        x = x / 255.0 - 0.5
    elif preprocess != "none":
        raise ValueError(f"unknown preprocess {preprocess!r}")
    if images:
        return x if x.ndim == 4 else x[..., np.newaxis]
    return x.reshape(len(x), -1)


def prepare_targets(y: np.ndarray, *, loss: str, num_classes: int) -> np.ndarray:
    """Integer labels for the sparse loss, one-hot rows for every other loss."""
    if loss == "sparse_categorical_crossentropy":
        return y.astype(np.int64)
    return np.eye(num_classes, dtype=np.float32)[y]
