"""ImageNet-style data: class folders of image files, the ImageNet validation layout, and a packed store.

- :class:`ImageFolderData` reads ``ROOT/<class>/**/<image>`` as torchvision's ``datasets.ImageFolder`` does (classes
  are the sorted folder names, files sorted within each, the same image extensions, every image converted to RGB)
  and applies the standard evaluation transform: the shorter side resized to ``round(size / 0.875)`` (256 for 224,
  bilinear, antialiased, the longer side scaled in proportion and truncated as torchvision's ``Resize``), then a
  centred ``size`` x ``size`` crop (torchvision's ``CenterCrop`` offsets). Items are uint8 (3, size, size) tensors
  (pixels j / 255 once the engine converts them) and labels; nothing is decoded before it is asked for.
  ``labels_file=`` reads the ImageNet validation layout instead: images in one folder, a text file of
  ``<file name> <label>`` lines (label: a 0-based class index, or a class name such as a WordNet id, numbered by
  ``classes=``: the training folder of class folders, or a file of names in order).
- :func:`pack` writes any such data set once into a packed store: fixed-size shards of preprocessed uint8 images
  (``shard-NNNNN.npy``, plain arrays, read without pickle), the labels, and ``index.json`` with every shard's size
  and sha256. :class:`PackedData` reads it memory-mapped (no process loads the whole set, nothing is decoded
  again) and refuses a missing, truncated or altered shard with its name (sizes are checked on opening, each shard's
  sha256 the first time it is read). A packed store gives the very images of the folder it was packed from.

Decoding uses Pillow (already required by matplotlib) rather than torchvision, whose PyPI wheels cannot be
imported beside the CPU build of torch this project pins; the semantics above are torchvision's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .data import DataError

__all__ = ["IMG_EXTENSIONS", "ImageFolderData", "ImageView", "PackedData", "pack", "resize_size", "load_image",
           "class_names", "DEFAULT_SHARD_IMAGES", "materialise", "memory_bytes"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_SHARD_IMAGES = 4096
FORMAT = "engine-packed-images"
VERSION = 1


def resize_size(size: int) -> int:
    """The shorter side before the centre crop: 256 for 224 (ImageNet's evaluation ratio 0.875)."""
    return int(round(size / 0.875))


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"image_size must be a positive integer, got {size!r}")
    return size


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _folder_samples(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"{root}: no class folders (ROOT/<class>/<image files>)")
    samples = []
    for c, name in enumerate(classes):
        found = []
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
            found += [(Path(dirpath) / f, c) for f in sorted(files) if _is_image(f)]
        if not found:
            raise DataError(f"{root / name}: class folder without image files ({', '.join(IMG_EXTENSIONS)})")
        samples += found
    return classes, samples


def class_names(source) -> list[str]:
    """The class names of a folder of class folders (sorted, as :class:`ImageFolderData` numbers them) or of a text
    file of one name per line (in that order), or a list of names as given."""
    if isinstance(source, (list, tuple)):
        names = [str(n) for n in source]
    else:
        path = Path(source)
        if path.is_dir():
            names = sorted(e.name for e in os.scandir(path) if e.is_dir())
        else:
            try:
                names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"cannot read the class names {path}: {exc}") from None
    if not names or len(set(names)) != len(names):
        raise DataError(f"class names from {source}: {'none' if not names else 'a name repeats'}")
    return names


def _val_samples(root: Path, labels_file: Path, classes) -> tuple[list[str], list[tuple[Path, int]]]:
    try:
        lines = labels_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the labels file {labels_file}: {exc}") from None
    pairs = []
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DataError(f"{labels_file}:{k}: expected '<file name> <label>', got {line!r}")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise DataError(f"{labels_file}: no labels")
    numeric = all(lab.lstrip("-").isdigit() for _, lab in pairs)
    if numeric:
        top = max(int(lab) for _, lab in pairs)
        if min(int(lab) for _, lab in pairs) < 0:
            raise DataError(f"{labels_file}: negative class index")
        classes = [str(c) for c in range(top + 1)] if classes is None else class_names(classes)
        if top >= len(classes):
            raise DataError(f"{labels_file}: class index {top} beyond the {len(classes)} classes")
        index = {str(c): c for c in range(top + 1)}
        pairs = [(f, str(int(lab))) for f, lab in pairs]
    else:
        if classes is None:
            raise DataError(f"{labels_file} names its classes: give the class list they are numbered by (classes=: the "
                            "training folder of class folders, or a file of names in order; --val-classes)")
        classes = class_names(classes)
        index = {name: c for c, name in enumerate(classes)}
        unknown = sorted({lab for _, lab in pairs} - set(index))
        if unknown:
            raise DataError(f"{labels_file} has classes not in the class list: {', '.join(unknown[:5])}")
    samples = []
    for name, lab in pairs:
        path = root / name
        if not path.is_file():
            raise DataError(f"{labels_file} lists {name}, which is not a file in {root}")
        samples.append((path, index[lab]))
    return classes, samples


class ImageFolderData:
    """Class folders (or the ImageNet validation layout) as an indexable data set of (uint8 (3, S, S), label)."""

    def __init__(self, root: str | os.PathLike, image_size: int = 224, *, labels_file: str | os.PathLike | None = None,
                 classes=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder")
        self.image_size = _check_size(image_size)
        self.labels_file = None if labels_file is None else Path(labels_file)
        if self.labels_file is None:
            self.classes, self.samples = _folder_samples(self.root)
        else:
            self.classes, self.samples = _val_samples(self.root, self.labels_file, classes)
        self.targets = [c for _, c in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[int(i)]
        return load_image(path, self.image_size), label


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """One image file -> uint8 (3, size, size): RGB, shorter side to :func:`resize_size`, centre crop (module doc)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            short = resize_size(size)
            if w <= h:
                nw, nh = short, int(short * h / w)
            else:
                nw, nh = int(short * w / h), short
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read the image {path}: {exc}") from None
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    if top < 0 or left < 0:  # only for a shorter side below the crop (not after the resize above)
        raise DataError(f"{path}: {nw}x{nh} after resizing is smaller than the {size} crop")
    crop = arr[top : top + size, left : left + size]
    return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))


# -- packed store -----------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_array(path: Path, array: np.ndarray) -> tuple[str, int]:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return _sha256(path), path.stat().st_size


def pack(dataset, out: str | os.PathLike, *, shard_images: int = DEFAULT_SHARD_IMAGES, source: dict | None = None,
         progress: bool = False) -> dict:
    """Write ``dataset`` (indexable (uint8 image, label) items of one shape, e.g. :class:`ImageFolderData`) as a packed
    store in the folder ``out``; returns its index.

    Shards are written one at a time (each complete file renamed into place) and recorded in ``index.partial.json``,
    so an interrupted pack continues where it stopped when run again with the same data set and settings;
    ``index.json`` is written last. ``source`` is recorded in the index (where the images came from).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    shard_images = _check_size(shard_images)
    n = len(dataset)
    if n == 0:
        raise DataError("nothing to pack: the data set is empty")
    first = dataset[0][0]
    if not isinstance(first, torch.Tensor) or first.dtype != torch.uint8 or first.dim() != 3:
        raise DataError(f"pack needs uint8 (C, H, W) images, got {getattr(first, 'dtype', type(first))}")
    if (out / "index.json").exists():
        raise DataError(f"{out} already holds a packed store (index.json); choose another folder or remove it")
    out.mkdir(parents=True, exist_ok=True)
    targets = getattr(dataset, "targets", None)
    if targets is None or len(targets) != n:
        targets = [dataset[i][1] for i in range(n)]
    labels = np.asarray([int(t) for t in targets], np.int64)
    index = {"format": FORMAT, "version": VERSION, "count": n, "image_shape": list(first.shape),
             "classes": list(getattr(dataset, "classes", [])), "shard_images": shard_images, "source": source or {},
             "shards": []}
    partial = out / "index.partial.json"
    if partial.exists():
        done = json.loads(partial.read_text())
        same = {k: v for k, v in done.items() if k != "shards"} == {k: v for k, v in index.items() if k != "shards"}
        if not same:
            raise DataError(f"{partial} is of another pack (data set or settings differ); remove {out} to start again")
        index["shards"] = done["shards"]
    starts = range(len(index["shards"]) * shard_images, n, shard_images)
    for start in tqdm(starts, desc="pack", unit="shard", disable=not progress):
        stop = min(n, start + shard_images)
        block = np.empty((stop - start, *first.shape), np.uint8)
        for k in range(start, stop):
            img = dataset[k][0]
            if tuple(img.shape) != tuple(first.shape) or img.dtype != torch.uint8:
                raise DataError(f"image {k} is {img.dtype} {tuple(img.shape)}, the first {tuple(first.shape)} uint8")
            block[k - start] = img.numpy()
        name = f"shard-{len(index['shards']):05d}.npy"
        sha, size = _write_array(out / name, block)
        index["shards"].append({"file": name, "count": stop - start, "bytes": size, "sha256": sha})
        tmp = partial.with_name(partial.name + ".tmp")
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        os.replace(tmp, partial)
    sha, size = _write_array(out / "labels.npy", labels)
    index["labels"] = {"file": "labels.npy", "bytes": size, "sha256": sha}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / "index.json")
    partial.unlink(missing_ok=True)
    return index


class PackedData:
    """A packed store (:func:`pack`) as an indexable data set of (uint8 image, label), read memory-mapped."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        path = self.root / "index.json"
        try:
            index = json.loads(path.read_text())
        except FileNotFoundError:
            partial = " (an unfinished pack: run it again)" if (self.root / "index.partial.json").exists() else ""
            raise DataError(f"{self.root} is not a packed store: no index.json{partial}") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {path}: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(f"{path}: not a packed store of this engine (format {FORMAT} version {VERSION})")
        self.index = index
        self.classes = list(index.get("classes", []))
        self.image_shape = tuple(index["image_shape"])
        entries = index["shards"]
        if sum(e["count"] for e in entries) != index["count"]:
            raise DataError(f"{path}: its shards hold {sum(e['count'] for e in entries)} images, not {index['count']}")
        for e in [*entries, index["labels"]]:
            f = self.root / e["file"]
            if not f.is_file():
                raise DataError(f"packed store {self.root}: shard {e['file']} is missing")
            if f.stat().st_size != e["bytes"]:
                raise DataError(f"packed store {self.root}: shard {e['file']} has {f.stat().st_size} bytes, "
                                f"not {e['bytes']} (truncated or replaced)")
        self._entries = entries
        self._starts = np.cumsum([0] + [e["count"] for e in entries])
        self._arrays: dict[int, np.ndarray] = {}
        labels = self._load(index["labels"], (index["count"],), np.int64)
        self.targets = torch.from_numpy(np.array(labels))

    def _load(self, entry: dict, shape: tuple, dtype) -> np.ndarray:
        f = self.root / entry["file"]
        if _sha256(f) != entry["sha256"]:
            raise DataError(f"packed store {self.root}: shard {entry['file']} does not match its sha256 (corrupt)")
        try:
            arr = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"packed store {self.root}: cannot read shard {entry['file']}: {exc}") from None
        if arr.shape != shape or arr.dtype != dtype:
            raise DataError(f"packed store {self.root}: shard {entry['file']} is {arr.dtype} {arr.shape}, expected "
                            f"{np.dtype(dtype)} {shape}")
        return arr

    def _shard(self, s: int) -> np.ndarray:
        if s not in self._arrays:
            e = self._entries[s]
            self._arrays[s] = self._load(e, (e["count"], *self.image_shape), np.uint8)
        return self._arrays[s]

    def __len__(self) -> int:
        return int(self.index["count"])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} of a packed store of {len(self)}")
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return torch.from_numpy(np.array(self._shard(s)[i - self._starts[s]])), int(self.targets[i])


class ImageView:
    """The images of an indexable (uint8 image, label) data set as a read-on-demand stand-in for an (N, C, H, W) uint8
    tensor: ``shape``, ``dtype``, ``len`` and indexing by an int, a slice, a list or an int64 tensor of indices (the
    stacked images). What the command line and :func:`engine.certify_dataset` take beside a labels tensor."""

    def __init__(self, dataset, image_shape: tuple[int, ...]):
        self.dataset = dataset
        self.shape = torch.Size((len(dataset), *image_shape))
        self.dtype = torch.uint8

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> torch.Tensor:
        if isinstance(ids, (int, np.integer)):
            return self.dataset[int(ids)][0]
        if isinstance(ids, slice):
            ids = range(*ids.indices(len(self)))
        elif isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        items = [self.dataset[int(i)][0] for i in ids]
        if not items:
            return torch.empty((0, *self.shape[1:]), dtype=torch.uint8)
        return torch.stack(items)


def memory_bytes() -> int:
    """Memory this process may use in bytes: the machine's physical memory, or the container's limit (cgroup v2
    ``memory.max`` / v1 ``memory.limit_in_bytes``) where that is lower; 0 where neither can be read."""
    try:
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        total = 0
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(path).read_text().strip())
        except (OSError, ValueError):  # absent, unreadable or "max"
            continue
        if limit > 0:
            total = min(total, limit) if total else limit
    return total


def materialise(images, what: str, *, progress: bool = False, chunk: int = 256, copies: float = 1.0,
                memory_fraction: float = 0.8) -> torch.Tensor:
    """The images of an :class:`ImageView` decoded once into one uint8 (N, C, H, W) tensor (a tensor comes back as it
    is): what training, crafting and evaluation hold in memory, as they do for MNIST and CIFAR-10.

    ``copies``: how many bytes per decoded byte the caller will hold (e.g. its train / validation split and a float32
    copy); with the processes of this node (torchrun's ``LOCAL_WORLD_SIZE``, each decoding its own copy) the need is
    refused when over ``memory_fraction`` of :func:`memory_bytes` (a :class:`DataError` naming ``what``, the sizes
    and the machine's memory), before anything is decoded, rather than swapping or being killed half way."""
    if isinstance(images, torch.Tensor):
        return images
    if not isinstance(images, ImageView):
        raise TypeError(f"{what}: expected an ImageView or a uint8 tensor, got {type(images).__name__}")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    size, have = images.shape.numel(), memory_bytes()
    need = size * copies * local
    if have and need > memory_fraction * have:
        n, c, h, w = images.shape
        held = f"{copies:g} x " if copies != 1 else ""
        ranks = f" x {local} processes" if local > 1 else ""
        raise DataError(f"{what} holds {n:,} images of {c}x{h}x{w}: {size / 2**30:.1f} GiB decoded, {held}that"
                        f"{ranks} = {need / 2**30:.1f} GiB held, more than {memory_fraction:.0%} of the "
                        f"{have / 2**30:.1f} GiB this process may use; training, crafting and evaluation hold their "
                        "data in memory: give a smaller folder (a subset of the classes or images) or a smaller "
                        "--image-size (certify and predict read any size on demand)")
    out = torch.empty(images.shape, dtype=torch.uint8)
    n = images.shape[0]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc=f"decode {what}", dynamic_ncols=True)
    try:
        for i in range(0, n, chunk):
            out[i : i + chunk] = images[i : min(i + chunk, n)]
            if bar is not None:
                bar.update(min(chunk, n - i))
    finally:
        if bar is not None:
            bar.close()
    return out
