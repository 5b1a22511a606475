"""Data set loaders: MNIST (idx files) and CIFAR-10 (binary, or the pickle version read safely).

Every loader returns ``(images, labels)``: images uint8 (N, C, H, W), labels int64 (N,). Bad files
(missing, truncated, wrong magic, inconsistent sizes) raise :class:`DataError` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .fileio import publish
from .validate import InputError

__all__ = [
    "DataError",
    "load_mnist",
    "load_cifar10",
    "load_dataset",
    "embedded_mnist_root",
    "read_idx",
    "write_idx",
    "cut_mnist_subset",
    "to_float",
    "split_validation",
]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_BIN_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
CIFAR_PY_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class DataError(InputError):
    """A data file is missing, truncated or not in the expected format (an :class:`engine.validate.InputError`)."""


def _check_count(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def embedded_mnist_root() -> Path:
    """Folder of the small real MNIST subset shipped with the package (idx files, gzipped)."""
    return Path(__file__).resolve().parent / "assets" / "mnist_small"


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    if images.dtype != torch.uint8:
        raise DataError(f"images must be uint8, got {images.dtype}")
    return images.to(torch.float32) / 255.0


def _split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, OSError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc}); the file is damaged or truncated") from exc


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read an idx file (gzipped or not) of unsigned bytes into a numpy uint8 array."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an idx header")
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    magic = struct.unpack(">i", raw[:4])[0]
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise DataError(f"{path}: bad idx magic 0x{magic:08x} (expected unsigned-byte data, e.g. 0x{expected_magic or 2051:08x})")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"{path}: idx magic {magic} but {expected_magic} expected (images 2051, labels 2049)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count:
        raise DataError(
            f"{path}: header announces {count} bytes of data for shape {dims}, "
            f"file holds {len(raw) - header} (truncated or padded)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file (gzipped when the name ends in .gz), atomically."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim
    payload = struct.pack(">i", magic) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".gz":
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as fh:
            fh.write(payload)
    else:
        tmp.write_bytes(payload)
    publish(tmp, path)


def _find(root: Path, stem: str) -> Path:
    candidates = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
    for name in candidates:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no {stem}[.gz] found (looked for {', '.join(candidates)})")


def load_mnist(root: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST from its canonical idx files (``train-images-idx3-ubyte[.gz]`` ...).

    Returns images uint8 (N, 1, 28, 28) and labels int64 (N,).
    """
    root = Path(root)
    img_stem, lbl_stem = MNIST_FILES[_split(split)]
    img_path, lbl_path = _find(root, img_stem), _find(root, lbl_stem)
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise DataError(f"{img_path}: images must be 3-D (N, H, W), got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{lbl_path}: {labels.shape} labels for {images.shape[0]} images")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lbl_path}: label {int(labels.max())} out of range 0..9")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 python version: arrays, lists, dicts, bytes, str and ints only."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only arrays, lists, dicts, bytes, str and ints are allowed"
        )


def _check_plain(obj, where: str, depth: int = 0) -> None:
    if depth > 4:
        raise DataError(f"{where}: nesting too deep for a CIFAR-10 batch")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, where, depth + 1)
            _check_plain(v, where, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_plain(v, where, depth + 1)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "uib":
            raise DataError(f"{where}: array of dtype {obj.dtype} not allowed")
    elif not isinstance(obj, (bytes, str, int)):
        raise DataError(f"{where}: object of type {type(obj).__name__} not allowed")


def _load_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: {exc}") from exc
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, struct.error) as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    _check_plain(obj, str(path))
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or ("labels" not in obj and "fine_labels" not in obj):
        raise DataError(f"{path}: missing 'data' or 'labels' entries (keys: {sorted(obj)})")
    data = np.asarray(obj["data"])
    labels = np.asarray(obj.get("labels", obj.get("fine_labels")), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % CIFAR_RECORD:
        raise DataError(f"{path}: {len(raw)} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records (truncated?)")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def load_cifar10(root: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10: the binary version (``data_batch_1.bin`` ... ``test_batch.bin``, in ``root`` or
    ``root/cifar-10-batches-bin``), else the python version (``cifar-10-batches-py``) through a
    restricted unpickler that refuses anything but arrays, lists, dicts, bytes, str and ints.

    Returns images uint8 (N, 3, 32, 32) and labels int64 (N,).
    """
    root = Path(root)
    split = _split(split)
    for folder in (root, root / "cifar-10-batches-bin"):
        paths = [folder / f for f in CIFAR_BIN_FILES[split]]
        if all(p.is_file() for p in paths):
            parts = [_load_cifar_bin(p) for p in paths]
            break
        if any(p.is_file() for p in paths):
            missing = [p.name for p in paths if not p.is_file()]
            raise DataError(f"{folder}: CIFAR-10 binary files incomplete, missing {missing}")
    else:
        for folder in (root, root / "cifar-10-batches-py"):
            paths = [folder / f for f in CIFAR_PY_FILES[split]]
            if all(p.is_file() for p in paths):
                parts = [_load_cifar_pickle(p) for p in paths]
                break
        else:
            raise DataError(
                f"{root}: no CIFAR-10 {split} files found "
                "(binary data_batch_*.bin / test_batch.bin, or python cifar-10-batches-py)"
            )
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{root}: CIFAR-10 label out of range 0..9 ({labels.min()}..{labels.max()})")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


DATASETS = ("mnist", "cifar10", "imagefolder", "imagenet-val", "packed")
IMAGE_DATASETS = ("imagefolder", "imagenet-val", "packed")  # read on demand (engine.imagedata)


def load_dataset(name: str, root: str | os.PathLike | None, split: str, *, image_size: int | None = None,
                 labels_file: str | os.PathLike | None = None, classes=None):
    """(images, labels) by name; ``root=None`` for mnist means the embedded subset.

    mnist and cifar10 give tensors. imagefolder (class folders), imagenet-val (one folder and ``labels_file``) and
    packed (a store written by ``engine.imagedata.pack``) give an :class:`engine.imagedata.ImageView` of uint8
    images read on demand and an int64 labels tensor; ``split`` does not apply to them (the folder is the split),
    ``image_size`` (default 224) to the folders only; ``classes`` numbers imagenet-val's class names.
    """
    if name in IMAGE_DATASETS:
        from . import imagedata

        if root is None:
            raise DataError(f"{name} needs --data-root (the folder of the images)")
        if name == "packed":
            ds = imagedata.PackedData(root)
            if image_size is not None and tuple(ds.image_shape[1:]) != (image_size, image_size):
                raise DataError(f"{root} holds {ds.image_shape[1]}x{ds.image_shape[2]} images, not the {image_size} "
                                "asked for (a packed store keeps the size it was packed at)")
        else:
            if name == "imagenet-val" and labels_file is None:
                raise DataError("imagenet-val needs its labels file (--val-labels: lines '<file name> <label>')")
            ds = imagedata.ImageFolderData(root, 224 if image_size is None else image_size,
                                           labels_file=labels_file if name == "imagenet-val" else None, classes=classes)
        shape = ds.image_shape if name == "packed" else (3, ds.image_size, ds.image_size)
        return imagedata.ImageView(ds, tuple(shape)), torch.as_tensor(ds.targets, dtype=torch.int64)
    if name == "mnist":
        return load_mnist(embedded_mnist_root() if root is None else root, split)
    if name == "cifar10":
        if root is None:
            raise DataError("cifar10 needs --data-root (no CIFAR-10 data is shipped)")
        return load_cifar10(root, split)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def cut_mnist_subset(src_root, dst_root, *, n_train: int, n_test: int, seed: int = 0) -> dict:
    """Write a random subset of MNIST (sorted original indices) as gzipped idx files.

    Returns provenance: chosen indices' sha256 and the source files' md5.
    """
    src_root, dst_root = Path(src_root), Path(dst_root)
    dst_root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    info = {"seed": seed, "source_md5": {}, "counts": {}}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = load_mnist(src_root, split)
        idx = np.sort(rng.choice(images.shape[0], size=n, replace=False))
        img_stem, lbl_stem = MNIST_FILES[split]
        write_idx(dst_root / (img_stem + ".gz"), images[idx, 0].numpy())
        write_idx(dst_root / (lbl_stem + ".gz"), labels[idx].numpy().astype(np.uint8))
        np.savetxt(dst_root / f"{split}-indices.txt", idx, fmt="%d")
        info["counts"][split] = {str(c): int((labels[idx] == c).sum()) for c in range(10)}
        for stem in (img_stem, lbl_stem):
            info["source_md5"][stem] = hashlib.md5(_find(src_root, stem).read_bytes()).hexdigest()
    return info


def split_validation(images: torch.Tensor, labels: torch.Tensor, val_size: int = 0, train_size: int | None = None,
                     seed: int = 0):
    """Hold out ``val_size`` random images for validation and keep ``train_size`` of the others.

    images: (N, ...), labels: (N,). Returns ((train_images, train_labels), (val_images, val_labels)
    or None). The split is a fixed permutation from ``seed`` (independent of the training seed);
    with val_size 0 and train_size None the data come back unchanged.
    """
    n = images.shape[0]
    _check_count("val_size", val_size, 0)
    if train_size is not None:
        _check_count("train_size", train_size, 1)
    if val_size >= n or (train_size is not None and val_size + train_size > n):
        raise ValueError(f"val_size {val_size} + train_size {train_size} exceed the {n} images available")
    if val_size == 0 and train_size is None:
        return (images, labels), None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx = order[:val_size]
    train_idx = order[val_size:] if train_size is None else order[val_size : val_size + train_size]
    train_idx = train_idx.sort().values
    val = (images[val_idx.sort().values], labels[val_idx.sort().values]) if val_size else None
    return (images[train_idx], labels[train_idx]), val
