"""Poison sets and the files that hold them.

A :class:`PoisonSet` is a clean-label poison: replacement images for some training images, within an L_inf box
around the originals. This module holds it and everything about its files: the safetensors poison file (float32,
or compactly as int8 codes or sign directions of the perturbation; :meth:`PoisonSet.encode`), its content hash and
:func:`init_record` (a poison's identity), and the reading of poisoning checkpoints (:func:`read_checkpoint`, the
file :func:`engine.pacd.poison` writes as it goes; :meth:`PoisonSet.from_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as _checkpoint
from ..fileio import publish

__all__ = ["PoisonSet", "PoisonError", "ENCODINGS", "FORMAT", "init_record", "read_checkpoint"]

FORMAT = "engine.poison/1"
# how a poison file stores the images: float32 as they are; int8 codes of the perturbation in units of about eps/127;
# sign: the direction (-1, 0, +1) of each pixel of a vertex poison, 2 bits a pixel (see PoisonSet.encode)
ENCODINGS = ("float32", "int8", "sign")


class PoisonError(ValueError):
    """A poison set or poisoning checkpoint is invalid, tampered with, or does not match its data."""


def _hash_clean(images: torch.Tensor, labels: torch.Tensor) -> str:
    x = images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images.to(torch.float32)
    h = hashlib.sha256()
    h.update(x.contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_poison_meta(meta: dict, path) -> None:
    """PoisonError naming ``path`` unless the metadata of a poison file has the fields and types a PoisonSet needs."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    checks = {
        "clean_sha256": lambda v: isinstance(v, str),
        "eps": lambda v: number(v) and v > 0,
        "sigma": lambda v: number(v) and v >= 0,
        "method": lambda v: isinstance(v, str),
        "target_class": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "settings": lambda v: isinstance(v, dict),
    }
    bad = [k for k, ok in checks.items() if k not in meta or not ok(meta[k])]
    if bad:
        raise PoisonError(f"{path}: poison metadata missing or malformed: {', '.join(f'{k}={meta.get(k)!r}' for k in bad)}")


def _brief(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_poison_tensors(tensors: dict[str, torch.Tensor], payload: str, path) -> None:
    """PoisonError naming ``path`` unless a poison file's tensors have the dtypes and shapes :meth:`PoisonSet.save`
    writes: (P,) int64 indices (distinct, >= 0) and labels; float32 (P, C, H, W) images, int8 codes or 1-D uint8
    directions (whose shapes are checked against the file's image_shape)."""
    idx, labels, stored = tensors["indices"], tensors["labels"], tensors[payload]
    want = {"images": torch.float32, "codes": torch.int8, "directions": torch.uint8}[payload]
    bad = []
    if idx.dtype != torch.int64 or idx.dim() != 1:
        bad.append(f"indices {_described(idx)} (expected (P,) int64)")
    elif idx.numel() and (int(idx.min()) < 0 or torch.unique(idx).numel() != idx.numel()):
        bad.append("indices negative or repeated")
    if labels.dtype != torch.int64 or labels.shape != idx.shape:
        bad.append(f"labels {_described(labels)} (expected {tuple(idx.shape)} int64)")
    if (stored.dtype != want or (payload == "images" and (stored.dim() != 4 or stored.shape[0] != idx.shape[0]))
            or (payload == "directions" and stored.dim() != 1)):
        shape = f"({idx.shape[0]}, C, H, W) " if payload == "images" else "(N,) " if payload == "directions" else ""
        bad.append(f"{payload} {_described(stored)} (expected {shape}{str(want).replace('torch.', '')})")
    if bad:
        raise PoisonError(f"{path}: malformed poison tensors: {'; '.join(bad)}; the file was not written by "
                          "PoisonSet.save, or was altered")


def _content_hash(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _poison_sha256(ps: "PoisonSet") -> str:
    """The poison's identity: the sha256 its float32 file carries (images as float32, whatever the file's encoding)."""
    return _content_hash(ps._tensors(), ps._meta())


def _read_file(path: Path, with_tensors: bool) -> tuple[dict, dict, str, dict[str, torch.Tensor]]:
    """A poison file's JSON header (an object of a known format and encoding), its meta, its encoding and,
    ``with_tensors``, its tensors."""
    from safetensors import safe_open

    if not path.is_file():
        raise PoisonError(f"{path}: no such poison set")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("engine_poison")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if with_tensors else {}
    except Exception as exc:
        raise PoisonError(f"{path}: not a readable safetensors file ({exc})") from exc
    if raw is None:
        raise PoisonError(f"{path}: safetensors file without poison metadata")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PoisonError(f"{path}: unreadable poison metadata ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("meta", {}), dict):
        what = header if not isinstance(header, dict) else header["meta"]
        raise PoisonError(f"{path}: unreadable poison metadata (a JSON {type(what).__name__} where PoisonSet.save "
                          "writes an object): the file was edited or damaged")
    meta = header.get("meta", {})
    if meta.get("format") != FORMAT:
        raise PoisonError(f"{path}: unknown poison format {_brief(meta.get('format'))}")
    encoding = header.get("encoding", "float32")
    if encoding not in ENCODINGS:
        raise PoisonError(f"{path}: unknown poison encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    return header, meta, encoding, tensors


def read_poison_header(path: str | os.PathLike) -> dict:
    """What a poison file says of itself, read from its header alone (no images, no training set needed).

    Returns ``{"meta": {format, clean_sha256, eps, sigma, method, target_class, settings}, "encoding": ...,
    "sha256": identity}``; ``sha256`` is the poison's identity, the sha256 of its float32 file whatever the file's
    encoding (the ``sha256`` of :func:`init_record`, the ``poison_content_sha256`` of an evaluation's trace). The
    header is not checked against the contents here: :meth:`PoisonSet.load` does that."""
    path = Path(path)
    header, meta, encoding, _ = _read_file(path, with_tensors=False)
    identity = header.get("sha256") if encoding == "float32" else header.get("poison_sha256")
    if not isinstance(identity, str):
        raise PoisonError(f"{path}: the poison metadata has no sha256 of the poison: the file was edited or damaged")
    _check_poison_meta(meta, path)
    return {"meta": meta, "encoding": encoding, "sha256": identity}


def init_record(ps: "PoisonSet") -> dict:
    """What a run warm-started from ``ps`` (``poison(init=ps)``) records as ``settings["init"]``.

    ``sha256`` is the poison's identity: the sha256 of its float32 file, also for a poison stored compactly
    (a lossless encoding keeps it; a lossy one, :meth:`PoisonSet.encode`, makes a new poison)."""
    return json.loads(json.dumps({
        "sha256": _poison_sha256(ps),
        "outer_steps": int(ps.settings.get("outer_steps", 0)),
        "total_outer_steps": int(ps.settings.get("total_outer_steps", ps.settings.get("outer_steps", 0))),
        "method": ps.method,
        "eps": ps.eps,
        **{k: ps.settings[k] for k in ("solver", "damping", "method_args", "seed") if k in ps.settings},
    }))


def _project(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """x projected onto the L_inf box of radius eps around the originals x0, then onto [0, 1]."""
    return torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp_(0.0, 1.0)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two float32 tensors hold the same bits (torch.equal would also take -0.0 for 0.0)."""
    return (a.dtype == b.dtype == torch.float32 and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)))


def _vertex(x0: torch.Tensor, eps: float, direction: torch.Tensor) -> torch.Tensor:
    """The vertex of the eps box along ``direction`` (float32, -1 / 0 / +1 a pixel), then onto [0, 1]: the arithmetic
    of :func:`combine_poisons`' vote (one float32 product, one sum, the projection), so a sign file decodes a vote
    poison bit for bit."""
    return _project(x0 + eps * direction, x0, eps)


def _int8_scale(eps: float) -> torch.Tensor:
    """The unit of int8 codes: eps / 127 rounded to float32, one float32 step larger where 127 units of it fall short
    of eps in float32 (so that codes +-127 reach the eps bound and a vertex poison is exact in int8 too)."""
    scale = torch.tensor(eps / 127, dtype=torch.float32)
    if float(scale * 127) < float(torch.tensor(eps, dtype=torch.float32)):
        scale = torch.nextafter(scale, torch.tensor(math.inf, dtype=torch.float32))
    return scale


def _int8_decode(codes: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """_project(x0 + codes * unit, x0, eps) as separate elementwise float32 operations (a product, a sum, the
    projection; no fused multiply-add), so every CPU decodes the same bits."""
    delta = codes.to(torch.float32) * _int8_scale(eps)
    return _project(x0 + delta, x0, eps)


def _int8_encode(images: torch.Tensor, x0: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, decoded): per pixel the code in [-127, 127] whose decoding lies nearest the image, exactly on it where
    a code decodes to it (ties go to the rounded quotient (u - x0) / unit)."""
    if eps == 0:
        codes = torch.zeros(images.shape, dtype=torch.int8)
        return codes, _int8_decode(codes, x0, eps)
    target = images.to(torch.float64)
    q = torch.round((target - x0.to(torch.float64)) / float(_int8_scale(eps))).clamp_(-127, 127)
    best, best_err = None, None
    for cand in (q, q - 1, q + 1, torch.full_like(q, -127), torch.full_like(q, 127), torch.zeros_like(q)):
        cand = cand.clamp(-127, 127)
        err = (_int8_decode(cand, x0, eps).to(torch.float64) - target).abs()
        if best is None:
            best, best_err = cand, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    codes = best.to(torch.int8)
    return codes, _int8_decode(codes, x0, eps)


def _sign_pack(direction: torch.Tensor) -> torch.Tensor:
    """Directions -1 / 0 / +1 as 2-bit codes 0 / 1 / 2, four pixels a byte (the first in the low bits), padded with 1."""
    c = (direction.reshape(-1).to(torch.int64) + 1).to(torch.uint8)
    c = torch.cat([c, torch.ones((-c.numel()) % 4, dtype=torch.uint8)]).view(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def _sign_unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 directions of ``shape`` from :func:`_sign_pack`'s bytes; a code 3 or a padding other than 1 is refused."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 3) // 4:
        raise PoisonError(f"sign directions: expected {(n + 3) // 4} uint8 bytes for {n} pixels, got "
                          f"{tuple(packed.shape)} {packed.dtype}")
    c = torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], 1).reshape(-1)
    if bool((c[:n] == 3).any()) or bool((c[n:] != 1).any()):
        raise PoisonError("sign directions: invalid 2-bit codes (3, or padding other than 1)")
    return (c[:n].to(torch.float32) - 1).reshape(shape)


@dataclass
class PoisonSet:
    """A clean-label poison: replacements for some training images.

    indices: (P,) int64 positions in the training set; images: (P, C, H, W) float32 poisoned images
    in [0, 1]; labels: (P,) int64 their (unchanged) labels; clean_sha256: hash of the clean originals
    (images as float32 in [0, 1] and labels) so that :meth:`apply` refuses another data set.
    encoding: how :meth:`save` stores the images ("float32", "int8" or "sign"; see :meth:`encode`, which makes
    a PoisonSet whose images are exactly what its compact file decodes to).
    """

    indices: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    clean_sha256: str
    eps: float
    sigma: float
    method: str
    target_class: int
    settings: dict = field(default_factory=dict)
    encoding: str = "float32"
    # the clean originals at indices (float32), kept by encode() and load() so that save() can write codes
    _x0: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.indices.dim() != 1 or self.images.shape[0] != self.indices.shape[0] or self.labels.shape != self.indices.shape:
            raise PoisonError(
                f"inconsistent poison set: {tuple(self.indices.shape)} indices, {tuple(self.images.shape)} images, "
                f"{tuple(self.labels.shape)} labels"
            )
        if self.encoding not in ENCODINGS:
            raise PoisonError(f"unknown poison encoding {self.encoding!r} (known: {', '.join(ENCODINGS)})")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def _meta(self) -> dict:
        return {
            "format": FORMAT,
            "clean_sha256": self.clean_sha256,
            "eps": self.eps,
            "sigma": self.sigma,
            "method": self.method,
            "target_class": self.target_class,
            "settings": self.settings,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "indices": self.indices.to(torch.int64).contiguous(),
            "images": self.images.to(torch.float32).contiguous(),
            "labels": self.labels.to(torch.int64).contiguous(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (atomically) whose JSON metadata carries a sha256 of the contents.

        float32: the images as they are (the format of every earlier poison file). int8 / sign: codes relative to
        the clean originals (see :meth:`encode`), the encoding and the poison's float32 sha256 in the metadata; a
        poison that its encoding does not represent exactly is refused (save never changes a poison).
        """
        from safetensors.torch import save_file

        path = Path(path)
        meta = self._meta()
        if self.encoding == "float32":
            tensors = self._tensors()
            header = {"meta": meta, "sha256": _content_hash(tensors, meta)}
        else:
            tensors, info = self._compact(path, meta)
            header = {**info, "sha256": _content_hash(tensors, info)}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # two processes saving one poison never share it
        save_file(tensors, str(tmp), metadata={"engine_poison": json.dumps(header)})
        publish(tmp, path)

    def _compact(self, path: Path, meta: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors and metadata (less the sha256) of this poison's int8 or sign file."""
        enc = self.encoding
        if self._x0 is None or tuple(self._x0.shape) != tuple(self.images.shape):
            raise PoisonError(
                f"{path}: {'an' if enc == 'int8' else 'a'} {enc} poison file stores the images relative to their clean "
                f"originals, which this "
                f"PoisonSet does not hold: make it with encode(train_data, {enc!r}) or load it with the training set"
            )
        images, x0 = self.images.to(torch.float32).contiguous(), self._x0
        if enc == "int8":
            codes, decoded = _int8_encode(images, x0, self.eps)
            stored = {"codes": codes.contiguous()}
        else:
            direction = (images - x0).sign()
            decoded = _vertex(x0, self.eps, direction)
            stored = {"directions": _sign_pack(direction)}
        if not _same_bits(decoded, images):
            off = int((decoded != images).sum())
            raise PoisonError(
                f"{path}: this poison is not exactly representable as {enc} ({off} of {images.numel()} pixels "
                f"differ): quantise it first with encode(train_data, {enc!r}), which makes a new poison"
            )
        stored.update({"indices": self.indices.to(torch.int64).contiguous(),
                       "labels": self.labels.to(torch.int64).contiguous()})
        info = {"meta": meta, "encoding": enc, "image_shape": list(images.shape),
                "poison_sha256": _poison_sha256(self)}
        if enc == "int8":
            info["int8_scale"] = float(_int8_scale(self.eps))
        return stored, info

    @classmethod
    def load(cls, path: str | os.PathLike, train_data=None) -> "PoisonSet":
        """Read a poison set written by :meth:`save`; a modified file is refused.

        ``train_data`` (images, labels): the training set the poison was crafted from. An int8 or sign file needs
        it (its images are decoded from the clean originals); given with any file, another training set is
        refused (as :meth:`apply` does). A compact file's decoded images are checked against the sha256 of the
        poison it was saved from.
        """
        path = Path(path)
        header, meta, encoding, tensors = _read_file(path, with_tensors=True)
        payload = {"float32": "images", "int8": "codes", "sign": "directions"}[encoding]
        if set(tensors) != {"indices", payload, "labels"}:
            raise PoisonError(f"{path}: unexpected tensors {sorted(tensors)} for a {encoding} poison file")
        hashed = meta if encoding == "float32" else {k: v for k, v in header.items() if k != "sha256"}
        if _content_hash(tensors, hashed) != header.get("sha256"):
            raise PoisonError(f"{path}: contents do not match their sha256: the file was modified or damaged")
        _check_poison_meta(meta, path)
        _check_poison_tensors(tensors, payload, path)
        if encoding != "float32" and train_data is None:
            hint = ", ".join(f"{k} {meta['settings'][k]}" for k in ("dataset", "val_size") if k in meta["settings"])
            raise PoisonError(
                f"{path}: {'an' if encoding == 'int8' else 'a'} {encoding} poison file stores its images relative to "
                f"the clean training images: pass the "
                f"training set it was crafted on (PoisonSet.load(path, train_data); on the command line its --dataset, "
                f"--data-root and --val-size{f': {hint}' if hint else ''})"
            )
        if encoding == "float32":
            images = tensors["images"]
        else:  # the shape is checked against the stored payload before anything of that size is allocated
            shape = header.get("image_shape")
            stored = tensors[payload]
            if (not isinstance(shape, list) or len(shape) != 4
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
                    or shape[0] != tensors["indices"].numel()
                    or (encoding == "int8" and list(stored.shape) != shape)
                    or (encoding == "sign" and stored.numel() != -(-math.prod(shape) // 4))):
                raise PoisonError(f"{path}: image_shape {shape!r} does not describe the {len(tensors['indices'])} images "
                                  f"of its {tuple(stored.shape)} {payload}")
            images = torch.empty(shape, dtype=torch.float32)
        ps = cls(
            tensors["indices"],
            images,
            tensors["labels"],
            meta["clean_sha256"],
            meta["eps"],
            meta["sigma"],
            meta["method"],
            meta["target_class"],
            meta["settings"],
            encoding,
        )
        if train_data is None:
            return ps
        try:
            x0 = ps._originals(train_data)
            if encoding == "int8":
                codes = tensors["codes"]
                if codes.dtype != torch.int8 or bool((codes == -128).any()):  # its shape: checked with image_shape
                    raise PoisonError(f"int8 codes must be {tuple(images.shape)} int8 in [-127, 127]")
                if header.get("int8_scale") != float(_int8_scale(ps.eps)):
                    raise PoisonError(f"int8 unit {header.get('int8_scale')!r} is not {float(_int8_scale(ps.eps))!r} "
                                      f"(eps {ps.eps} / 127 in float32)")
                ps.images = _int8_decode(codes, x0, ps.eps)
            elif encoding == "sign":
                ps.images = _vertex(x0, ps.eps, _sign_unpack(tensors["directions"], tuple(images.shape)))
        except PoisonError as exc:
            raise PoisonError(f"{path}: {exc}") from None
        ps._x0 = x0
        if encoding != "float32" and _poison_sha256(ps) != header.get("poison_sha256"):
            raise PoisonError(
                f"{path}: the decoded images are not those of the poison saved (sha256 {header.get('poison_sha256')}): "
                "the file was altered, or this machine's float32 arithmetic decodes them differently"
            )
        return ps

    def _originals(self, train_data) -> torch.Tensor:
        """The clean originals at ``indices`` (float32 in [0, 1]), after checking that ``train_data`` is the training
        set this poison was crafted from."""
        images, labels = train_data
        idx = self.indices
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= images.shape[0]):
            raise PoisonError(f"poison indices out of range for a training set of {images.shape[0]} images")
        if tuple(images.shape[1:]) != tuple(self.images.shape[1:]):
            raise PoisonError(
                f"poison images {tuple(self.images.shape[1:])} do not match training images {tuple(images.shape[1:])}"
            )
        recorded = ", ".join(f"{k} {self.settings[k]}" for k in ("dataset", "val_size") if k in self.settings)
        recorded = f" (it records {recorded})" if recorded else ""
        if not torch.equal(torch.as_tensor(labels)[idx].to(torch.int64), self.labels):
            raise PoisonError("labels at the poison indices differ from the poison's labels (clean-label poison): not "
                              f"the training set it was crafted from{recorded}")
        if _hash_clean(images[idx], torch.as_tensor(labels)[idx]) != self.clean_sha256:
            raise PoisonError(
                f"the training images at the poison indices are not the originals this poison was crafted from{recorded}"
            )
        x0 = images[idx]
        return x0.to(torch.float32) / 255.0 if x0.dtype == torch.uint8 else x0.to(torch.float32)

    def _check_box(self, images: torch.Tensor, x0: torch.Tensor, what: str) -> None:
        """|images - x0| <= eps (+1e-6) and images in [0, 1], or a PoisonError naming ``what``."""
        if images.numel() == 0:
            return
        if not bool(torch.isfinite(images).all()) or float(images.min()) < 0 or float(images.max()) > 1:
            raise PoisonError(f"{what}: images outside [0, 1]")
        dist = float((images - x0).abs().max())
        if dist > self.eps + 1e-6:
            raise PoisonError(f"{what}: images {dist:.6g} from their originals, outside the eps box ({self.eps})")

    def encode(self, train_data, encoding: str, *, snap: bool = False) -> "PoisonSet":
        """This poison as a PoisonSet stored with ``encoding``, whose images are exactly those its file decodes to.

        ``train_data``: the training set the poison was crafted from (the originals x0 at ``indices``, checked as
        :meth:`apply` does). Encodings (u the poison, eps its L_inf radius):

        - "float32": the images as they are (4 bytes a pixel).
        - "int8": codes c in [-127, 127] in units of eps / 127 (rounded to float32; see ``_int8_scale``), decoded
          as _project(x0 + c * unit, x0, eps) in float32 (1 byte a pixel); per pixel the code decoding nearest
          u, so |decoded - u| <= eps / 254 plus float32 rounding, and u itself where a code decodes to it.
        - "sign": directions d in {-1, 0, +1} (2 bits a pixel), decoded as _project(x0 + eps * d, x0, eps), the
          arithmetic of :func:`combine_poisons`' vote. Only for a poison at a vertex of its feasible set: every
          pixel u == _project(x0 + eps * sign(u - x0), x0, eps) bit for bit (x0, or x0 +- eps clipped to [0, 1]);
          another poison is refused unless ``snap`` moves every pixel out to the vertex along its sign (what a
          vote of that one poison gives).

        Where the decoded images equal the poison's bit for bit (a vote poison as sign, an int8 poison as int8) the
        result is the same poison (same settings and :func:`init_record` sha256). Otherwise it is a new poison:
        ``settings["quantized"]`` records the encoding, :func:`init_record` of this poison (``from``), how many
        pixels changed and by at most how much. Either way the result keeps the eps box, [0, 1] and the labels.
        """
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if snap and encoding != "sign":
            raise ValueError(f"snap moves a poison to a vertex for the sign encoding, not for {encoding!r}")
        x0 = self._originals(train_data)
        images = self.images.to(torch.float32).contiguous()
        self._check_box(images, x0, "encode")
        if encoding == "float32":
            decoded = images.clone()
        elif encoding == "int8":
            decoded = _int8_encode(images, x0, self.eps)[1]
        else:
            decoded = _vertex(x0, self.eps, (images - x0).sign())
            if not snap and not _same_bits(decoded, images):
                off = int((decoded != images).sum())
                raise PoisonError(
                    f"sign encoding: {off} of {images.numel()} pixels are not at a vertex of the eps box (x0, or "
                    f"x0 +- eps clipped to [0, 1]); a sign file stores vertex poisons (e.g. a vote of poison-combine): "
                    f"pass snap=True (poison-encode --snap) to move every pixel out to the vertex along its sign, a new "
                    f"poison, or use int8"
                )
        settings = json.loads(json.dumps(self.settings))
        if not _same_bits(decoded, images):
            change = (decoded.to(torch.float64) - images.to(torch.float64)).abs()
            settings["quantized"] = {
                "encoding": encoding,
                **({"snap": True} if encoding == "sign" else {}),
                "from": init_record(self),
                "changed_pixels": int((change > 0).sum()),
                "max_abs_change": float(change.max()),
            }
        out = PoisonSet(self.indices.clone(), decoded, self.labels.clone(), self.clean_sha256, self.eps, self.sigma,
                        self.method, self.target_class, settings, encoding)
        out._check_box(decoded, x0, f"encode({encoding!r})")
        out._x0 = x0
        return out

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, train_data) -> "PoisonSet":
        """The poison as it stands in a poisoning checkpoint (``poison(checkpoint=...)``), e.g. to
        evaluate a long run part-way through while it goes on.

        ``train_data`` must be the training set the run was started on (its target-class images are
        checked against the run's hash of the clean originals). Reading is safe while the run writes:
        checkpoints are replaced atomically. ``settings["outer_steps"]`` is the step of the snapshot.
        """
        path = Path(checkpoint)
        if not path.is_file():
            raise PoisonError(f"{path}: no such poisoning checkpoint")
        tensors, meta = read_checkpoint(path)
        settings = meta.get("settings") or {}
        missing = [k for k in ("target_class", "clean_sha256", "eps", "sigma", "method") if k not in settings]
        if missing or "u" not in tensors:
            raise PoisonError(f"{path}: incomplete poisoning checkpoint (missing {missing or ['u']})")
        idx, labels = _run_originals(settings, tensors["u"].shape[0], train_data, path)
        target = int(settings["target_class"])
        history = meta.get("history") or []
        snap = dict(settings)
        snap.update({"outer_steps": int(meta["step"]), "snapshot_of": str(path), **_history_summary(history)})
        return cls(
            idx.clone(),
            tensors["u"].to(torch.float32),
            labels[idx].clone(),
            settings["clean_sha256"],
            float(settings["eps"]),
            float(settings["sigma"]),
            settings["method"],
            target,
            json.loads(json.dumps(snap)),
        )

    def apply(self, train_data) -> tuple[torch.Tensor, torch.Tensor]:
        """The poisoned training set: float32 images in [0, 1] with the poison at ``indices``; labels unchanged.

        Refuses a training set whose images or labels at ``indices`` are not the ones the poison was
        crafted from.
        """
        images, labels = train_data
        self._originals(train_data)
        idx = self.indices
        out = images.to(torch.float32) / 255.0 if images.dtype == torch.uint8 else images.to(torch.float32).clone()
        out[idx] = self.images.to(torch.float32)
        return out, labels.to(torch.int64).clone()

    def linf(self, train_data) -> float:
        """max |poison - original| over all pixels (``train_data``: the training set it was crafted from)."""
        x0 = self._originals(train_data)
        return float((self.images - x0).abs().max()) if len(self) else 0.0


# ----------------------------------------------------------------------------------------------
# poisoning checkpoints (the file; what it holds: engine.pacd.crafter)
# ----------------------------------------------------------------------------------------------

CHECKPOINT_KEY = "engine_poison_checkpoint"  # the safetensors metadata entry of a poisoning checkpoint
_CHECKPOINT = _checkpoint.Layout(
    key=CHECKPOINT_KEY,
    error=PoisonError,
    unreadable="{path}: unreadable poisoning checkpoint ({exc})",
    missing="{path}: not a poisoning checkpoint",
    bad_json="{path}: unreadable poisoning checkpoint metadata ({exc})",
    not_object="{path}: unreadable poisoning checkpoint metadata (a JSON {kind}, not an object): the file was edited "
               "or damaged",
)


def _history_summary(history: list[dict]) -> dict:
    """What a poison set keeps of its run's per-step log: the last 20 entries, the upper objective at
    every step and the seconds of all steps (over every invocation of a resumed run)."""
    return {
        "history_tail": history[-20:],
        "upper_by_step": [round(float(e["upper"]), 6) for e in history],
        "step_seconds_total": float(sum(e["seconds"] for e in history)),
    }


def _save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a poisoning checkpoint (``tensors`` and the JSON object ``meta``) atomically."""
    _checkpoint.save(path, tensors, meta, CHECKPOINT_KEY)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a poisoning checkpoint (the file ``poison(checkpoint=...)`` writes); a PoisonError
    naming ``path`` unless the metadata is a JSON object with the fields (and types) and the tensors the run writes
    (:meth:`engine.pacd.Crafter.state_dict`, stored as ``engine.pacd.crafter`` lays it out)."""
    meta, tensors = _checkpoint.read(path, _CHECKPOINT, tensors=True)

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    settings = meta.get("settings")
    checks = {
        "step": count(meta.get("step")),
        "reset_index": count(meta.get("reset_index")),
        "p_t": count(meta.get("p_t")),
        "settings": isinstance(settings, dict),
        "opt_w_groups": isinstance(meta.get("opt_w_groups"), list)
        and all(isinstance(g, dict) for g in meta["opt_w_groups"]),
        "history": isinstance(meta.get("history"), list) and all(  # (upper may be nan: a run that diverged)
            isinstance(e, dict) and all(isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool)
                                        for k in ("upper", "seconds")) for e in meta["history"]),
    }
    bad = [f"{k}={_brief(meta.get(k))}" for k, ok in checks.items() if not ok]
    if isinstance(settings, dict):
        setting_checks = {
            "target_class": count(settings.get("target_class")),
            "clean_sha256": isinstance(settings.get("clean_sha256"), str),
            "eps": number(settings.get("eps")) and settings["eps"] >= 0,
            "sigma": number(settings.get("sigma")) and settings["sigma"] >= 0,
            "method": isinstance(settings.get("method"), str),
        }
        bad += [f"settings.{k}={_brief(settings.get(k))}" for k, ok in setting_checks.items() if not ok]
    if bad:
        raise PoisonError(f"{path}: poisoning checkpoint metadata missing or malformed: {', '.join(bad)}")
    u = tensors.get("u")
    expected = {"u": u is not None and u.dtype == torch.float32 and u.dim() == 4}
    if expected["u"]:
        expected.update({
            "u_m": _same_shape(tensors.get("u_m"), u.shape, torch.float32),
            "u_v": _same_shape(tensors.get("u_v"), u.shape, torch.float32),
            "u_t": _same_shape(tensors.get("u_t"), u.shape[:1], torch.int64),
            "p": tensors.get("p") is not None and tensors["p"].dtype == torch.float32 and tensors["p"].dim() == 1,
        })
        if expected["p"] and ("p_m" in tensors or "p_v" in tensors):  # the solver's Adam moments, once it has stepped
            expected.update({k: _same_shape(tensors.get(k), tensors["p"].shape, torch.float32) for k in ("p_m", "p_v")})
    wrong = [f"{k} {_described(tensors.get(k))}" for k, ok in expected.items() if not ok]
    if wrong:
        raise PoisonError(f"{path}: poisoning checkpoint tensors missing or malformed: {', '.join(wrong)}")
    return tensors, meta


def _run_originals(settings: dict, rows: int, train_data, where) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, int64 labels) of ``train_data``'s images of the run's target class, checked to be the ``rows``
    originals the run poisons (its settings' hash of them); a PoisonError naming ``where`` otherwise."""
    images, labels = train_data
    labels = torch.as_tensor(labels).to(torch.int64)
    target = int(settings["target_class"])
    idx = (labels == target).nonzero().flatten()
    if idx.numel() != rows or _hash_clean(images[idx], labels[idx]) != settings["clean_sha256"]:
        raise PoisonError(
            f"{where}: the training set's {idx.numel()} images of class {target} are not the originals this run "
            f"poisons ({rows} images): pass the same training split the run was started on"
        )
    return idx, labels


def _same_shape(t: torch.Tensor | None, shape, dtype: torch.dtype) -> bool:
    return t is not None and t.dtype == dtype and tuple(t.shape) == tuple(shape)


def _described(t: torch.Tensor | None) -> str:
    return "absent" if t is None else f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"



_load_checkpoint = read_checkpoint  # the former private name
