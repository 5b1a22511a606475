"""PACD: poisoning against certified defenses (Mehra, Kailkhura, Chen and Hamm, CVPR 2021).

Clean-label, L_inf-bounded poison on every training image of a target class, crafted by bilevel
optimisation (ApproxGrad) so that models trained on it with a certified-robust procedure
(Gaussian augmentation, MACER or SmoothAdv) have a smaller certified radius on the target class.

Upper level (minimised over the poison u): the soft certified-radius surrogate on validation
images of the target class (:func:`soft_radius_objective`). Lower level (minimised over the
weights w): the training loss of the chosen procedure on clean non-target data plus the poison.
Per outer step, on a minibatch: ``niter1`` Adam steps on w; approximately solve
(H + s I) p = dF/dw by ``niter2`` solver steps (p warm-started); step u along
-(d^2 G / du dw) p, then project onto the eps box around the originals and onto [0, 1].
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import bilevel
from .bilevel import AdamState, flat_params
from .fileio import ExclusiveLock, publish
from .smoothing import pool_first_view
from .validate import InputError, InputTypeError, check_dataset, check_model_fits, check_progress, describe_module

__all__ = [
    "PoisonSet",
    "PoisonError",
    "poison",
    "combine_poisons",
    "soft_radius_objective",
    "derive_seed",
    "METHODS",
    "ENCODINGS",
    "CONTROLS",
    "random_poison",
    "PRESETS",
    "preset",
]

METHODS = ("gaussian", "macer", "smoothadv")
FORMAT = "engine.poison/1"
# how a poison file stores the images: float32 as they are; int8 codes of the perturbation in units of about eps/127;
# sign: the direction (-1, 0, +1) of each pixel of a vertex poison, 2 bits a pixel (see PoisonSet.encode)
ENCODINGS = ("float32", "int8", "sign")


class PoisonError(ValueError):
    """A poison set or poisoning checkpoint is invalid, tampered with, or does not match its data."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 chain): distinct inputs give independent streams."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x >> 1


def _generator(device, *parts: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


# ----------------------------------------------------------------------------------------------
# upper objective
# ----------------------------------------------------------------------------------------------


def soft_radius_objective(
    model,
    x,
    target: int,
    *,
    sigma: float,
    k: int = 20,
    beta: float = 16.0,
    a: float = 0.001,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
):
    """Soft certified-radius surrogate of PACD's upper level (to be minimised by the attacker).

    x: (V, C, H, W) validation images of class ``target`` in [0, 1]. With p = mean over k noise draws
    of softmax(beta * logits) (shape (V, K)), counting only images whose top-1 of p is ``target``:

        F = (sigma / 2) * sum_counted [Phi^-1((1-2a) p_target + a) - Phi^-1((1-2a) p_2 + a)] / V

    where p_2 is the largest other class. ``noise`` (k, V, C, H, W) may be given to freeze the draws.
    Returns (F scalar, counted fraction).
    """
    v = x.shape[0]
    if noise is None:
        noise = torch.randn((k,) + tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
    logits = model((x.unsqueeze(0) + sigma * noise).reshape((k * v,) + tuple(x.shape[1:])))
    probs = F.softmax(beta * logits, dim=1).reshape(k, v, -1).mean(0)
    p_t = probs[:, target]
    others = probs.clone()
    others[:, target] = -1.0
    p_2 = others.max(dim=1).values
    counted = (probs.argmax(dim=1) == target).to(x.dtype)
    gap = torch.special.ndtri((1 - 2 * a) * p_t + a) - torch.special.ndtri((1 - 2 * a) * p_2 + a)
    return (sigma / 2) * (gap * counted).sum() / v, float(counted.mean())


# ----------------------------------------------------------------------------------------------
# poison sets
# ----------------------------------------------------------------------------------------------


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
        tmp = path.with_name(path.name + ".tmp")
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
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise PoisonError(f"{path}: no such poison set")
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get("engine_poison")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
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
        tensors, meta = _load_checkpoint(path)
        settings = meta.get("settings") or {}
        missing = [k for k in ("target_class", "clean_sha256", "eps", "sigma", "method") if k not in settings]
        if missing or "u" not in tensors:
            raise PoisonError(f"{path}: incomplete poisoning checkpoint (missing {missing or ['u']})")
        images, labels = train_data
        labels = torch.as_tensor(labels).to(torch.int64)
        target = int(settings["target_class"])
        idx = (labels == target).nonzero().flatten()
        if idx.numel() != tensors["u"].shape[0] or _hash_clean(images[idx], labels[idx]) != settings["clean_sha256"]:
            raise PoisonError(
                f"{path}: the training set's {idx.numel()} images of class {target} are not the originals this run "
                f"poisons ({tensors['u'].shape[0]} images): pass the same training split the run was started on"
            )
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
# lower-level problems
# ----------------------------------------------------------------------------------------------


class _Functional(torch.nn.Module):
    """``model`` evaluated with the given parameter dict (torch.func.functional_call)."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self.params = params

    def forward(self, x):
        return torch.func.functional_call(self.model, self.params, (x,))


@dataclass
class _Step:
    """One outer step's minibatch and frozen randomness."""

    xc: torch.Tensor  # (Bc, C, H, W) clean non-target images
    yc: torch.Tensor
    pos: torch.Tensor  # (Bp,) positions of the poison batch in u
    yp: torch.Tensor
    xv: torch.Tensor  # (Bv, C, H, W) validation images of the target class
    seed: int  # key of this step's randomness


def _method_args(method: str, args: dict) -> dict:
    defaults = {
        "gaussian": {},
        "macer": {"k": 2, "beta": 16.0, "gamma": 8.0, "lbd": 1.0},
        "smoothadv": {"eps": 0.5, "steps": 10, "m": 1},
    }[method]
    unknown = set(args) - set(defaults)
    if unknown:
        raise ValueError(f"unknown arguments for method {method!r}: {sorted(unknown)} (known: {sorted(defaults)})")
    return {**defaults, **args}


class _Lower:
    """G(w, u) of one outer step: the procedure's training loss on the clean batch plus the poison batch.

    ``loss(params, u, key)`` evaluates it with the noise drawn from ``key`` (same key, same noise), so
    the Hessian and mixed products see one fixed sample of the stochastic objective.
    """

    def __init__(self, method: str, model: torch.nn.Module, step: _Step, sigma: float, margs: dict):
        self.method, self.model, self.step, self.sigma, self.margs = method, model, step, sigma, margs
        self.forward = pool_first_view(model)  # same layers and gradients, faster to train (smoothing.pool_first_view)
        self.y = torch.cat([step.yc, step.yp])
        self.delta = None

    def prepare(self, u_batch: torch.Tensor) -> None:
        """SmoothAdv: attack points for the clean and poison batch at the current weights (outside the graph)."""
        if self.method != "smoothadv":
            return
        from .attacks import smoothadv

        x = torch.cat([self.step.xc, u_batch.detach()])
        g = _generator(x.device, self.step.seed, 11)
        adv = smoothadv(
            self.forward,
            x,
            self.y,
            sigma=self.sigma,
            eps=self.margs["eps"],
            steps=self.margs["steps"],
            m=self.margs["m"],
            generator=g,
        )
        self.delta = (adv - x).detach()

    def noisy_inputs(self, u_batch: torch.Tensor, key: int) -> torch.Tensor:
        """Cross-entropy procedures: the batch [clean; poison] (+ SmoothAdv perturbation) + sigma * noise(key)."""
        x = torch.cat([self.step.xc, u_batch])
        if self.delta is not None:
            x = x + self.delta
        g = _generator(x.device, self.step.seed, key)
        return x + self.sigma * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)

    def loss(self, model: torch.nn.Module, u_batch: torch.Tensor, key: int) -> torch.Tensor:
        if self.method == "macer":
            from .losses import macer

            m = self.margs
            x = torch.cat([self.step.xc, u_batch])
            g = _generator(x.device, self.step.seed, key)
            return macer(
                model, x, self.y, sigma=self.sigma, k=m["k"], beta=m["beta"], gamma=m["gamma"], lbd=m["lbd"], generator=g
            )
        return F.cross_entropy(model(self.noisy_inputs(u_batch, key)), self.y)

    def products(self, u_batch: torch.Tensor, key: int, backend: str = "auto"):
        """(hvp, mixed) closures at the current weights for the noise sample ``key``; flat vectors in,
        flat H v and the poison-batch mixed term d/du (grad_w G . p) out.

        Cross-entropy procedures (Gaussian augmentation, SmoothAdv) use :func:`engine.hvp` /
        :func:`engine.mixed_vjp` with ``backend`` (the fused R-operator sweep where the model is
        supported). MACER's loss is not a cross-entropy: one forward pass gives the logits of its noisy
        copies, where the loss is expanded to second order (:func:`engine.hessian.expand_logit_loss`,
        exact first and second derivatives there), and the same products run on that expansion; the
        poison's mixed term sums those of its k copies. With ``backend="torch_func"`` MACER instead
        differentiates the whole loss with torch.func (the plain reference, about 2x slower).
        """
        u_batch = u_batch.detach()
        if self.method != "macer" or backend != "torch_func":
            from .hessian import expand_logit_loss, mixed_vjp
            from .hessian import hvp as hvp_op

            n_clean = self.step.xc.shape[0]
            if self.method == "macer":
                from .losses import macer_inputs, macer_terms

                m = self.margs
                x = torch.cat([self.step.xc, u_batch])
                b, copies = x.shape[0], m["k"]
                inputs = macer_inputs(x, self.sigma, copies, _generator(x.device, self.step.seed, key)).detach()
                with torch.no_grad():
                    logits = self.model(inputs)

                def group_loss(z, yi):  # one input's k copies: its share of the batch loss
                    cls, rob = macer_terms(z[None], yi[None], self.sigma, m["beta"], m["gamma"])
                    return (cls[0] + m["lbd"] * rob[0]) / b

                y, expansion = None, expand_logit_loss(group_loss, logits, self.y, group=copies)
            else:
                inputs, y, expansion, copies = self.noisy_inputs(u_batch, key).detach(), self.y, None, 1

            def hvp(v):
                return hvp_op(self.model, inputs, y, v, backend=backend, expansion=expansion).hv_flat

            def mixed(p):  # the input gradient of each copy, summed per image (one copy: unchanged)
                r = mixed_vjp(self.model, inputs, y, p, backend=backend, expansion=expansion)
                return r.reshape((-1, copies) + tuple(r.shape[1:])).sum(1)[n_clean:]

            return hvp, mixed
        params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

        def loss_fn(prm, u):
            return self.loss(_Functional(self.model, prm), u, key)

        fl = bilevel.FuncLower(loss_fn, params, u_batch)
        return fl.hvp, fl.mixed


class _PhaseClock:
    """Seconds of the phases of one outer step (the device is synchronised at each lap)."""

    def __init__(self, device: torch.device):
        self.device, self.laps = device, {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 6)
        self.last = now


class _RowAdam:
    """Adam on the rows of a tensor, each row with its own step count (only the batch rows move)."""

    def __init__(self, like: torch.Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = torch.zeros(like.shape[0], dtype=torch.int64)
        self.betas, self.eps = betas, eps

    def step(self, x: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
        b1, b2 = self.betas
        self.t[rows] += 1
        t = self.t[rows].to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        m = self.m[rows] * b1 + (1 - b1) * grad
        v = self.v[rows] * b2 + (1 - b2) * grad * grad
        self.m[rows], self.v[rows] = m, v
        update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
        return x[rows] - lr * update


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def _solve_advice(solver: str, lr_p: float, damping: float) -> str:
    """What to change when a solve ends above the residual of p = 0 (the warning in :func:`poison`)."""
    if solver == "cg":  # no step size: CG stops at a non-positive curvature and its residual need not fall
        return (f"H + sI is not positive definite along the solve or CG's residual rose before it converged; "
                f"raise damping (now {damping:g}) or use approxgrad with a small lr_p")
    if solver == "neumann":
        return (f"the iteration diverges when lr_p >= 2 / lambda_max(H + sI) or H + sI has a negative eigenvalue; "
                f"lower lr_p (now {lr_p:g}) or raise damping (now {damping:g})")
    return f"ApproxGrad diverges on this lower level's Hessian; lower lr_p (now {lr_p:g})"


def _history_summary(history: list[dict]) -> dict:
    """What a poison set keeps of its run's per-step log: the last 20 entries, the upper objective at
    every step and the seconds of all steps (over every invocation of a resumed run)."""
    return {
        "history_tail": history[-20:],
        "upper_by_step": [round(float(e["upper"]), 6) for e in history],
        "step_seconds_total": float(sum(e["seconds"] for e in history)),
    }


def _save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"engine_poison_checkpoint": json.dumps(meta)})
    publish(tmp, path)


def _load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a poisoning checkpoint; a PoisonError naming ``path`` unless the metadata is a JSON
    object with the fields (and types) and the tensors the run writes (``save_state`` in :func:`poison`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("engine_poison_checkpoint")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise PoisonError(f"{path}: unreadable poisoning checkpoint ({exc})") from exc
    if raw is None:
        raise PoisonError(f"{path}: not a poisoning checkpoint")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PoisonError(f"{path}: unreadable poisoning checkpoint metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise PoisonError(f"{path}: unreadable poisoning checkpoint metadata (a JSON {type(meta).__name__}, not an "
                          "object): the file was edited or damaged")

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


def _same_shape(t: torch.Tensor | None, shape, dtype: torch.dtype) -> bool:
    return t is not None and t.dtype == dtype and tuple(t.shape) == tuple(shape)


def _described(t: torch.Tensor | None) -> str:
    return "absent" if t is None else f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for i, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"opt_w/{i}/{key}"] = val if isinstance(val, torch.Tensor) else torch.tensor(val)
    groups = json.loads(json.dumps(sd["param_groups"], default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    return tensors, groups


def _optimizer_from(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if name.startswith("opt_w/"):
            _, i, key = name.split("/", 2)
            state.setdefault(int(i), {})[key] = val
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------------------------
# the attack
# ----------------------------------------------------------------------------------------------


def _float_images(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"{name} images must be a (N, C, H, W) tensor")
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if not images.is_floating_point():
        raise ValueError(f"{name} images must be uint8 or float in [0, 1], got {images.dtype}")
    x = images.to(torch.float32)
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(f"{name} images must lie in [0, 1]")
    return x


def _project(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """x projected onto the L_inf box of radius eps around the originals x0, then onto [0, 1]."""
    return torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp_(0.0, 1.0)


def _positive(name: str, value, allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return value


def _count(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


COMBINE = ("vote", "mean")
# settings that describe one run rather than the crafting (a combined poison keeps them per input in combined_from)
_RUN_KEYS = ("outer_steps", "total_outer_steps", "lower_resets", "seconds", "history_tail", "upper_by_step",
             "step_seconds_total", "wall_seconds_last_invocation", "init", "snapshot_of", "combine", "combined_from",
             "combined_differ")


def combine_poisons(poisons: list[PoisonSet], train_data, how: str = "vote", *,
                    mixed_methods: bool = False) -> PoisonSet:
    """One poison from several crafted for the same training set, class, procedure, sigma and eps (e.g. runs that
    ended at different vertices of the eps box with the same effect), to keep their common direction.

    how="vote": every pixel moves by eps along the sign of the summed perturbations sum_i (u_i - x0) (0 where that
    sum is 0), then onto [0, 1]: a vertex of the feasible set, like a finished run; of a single poison, that poison
    moved out to the vertex along its own signs. how="mean": the average of the poisoned images (a convex
    combination, so inside the box; needs two or more). ``train_data`` must be the training set the poisons
    were crafted from (checked as :meth:`PoisonSet.apply` does). Settings: those all inputs share (less the
    per-run ones: steps, times, logs), ``combined_from`` (each input's :func:`init_record`: sha256, steps, solver,
    damping, method_args), ``combined_differ`` (the settings the inputs do not share), ``combine`` (``how``),
    ``outer_steps`` 0 and ``total_outer_steps`` the largest of the inputs' (so a warm start from it continues
    every input's schedule).

    mixed_methods: also combine poisons crafted against different procedures (e.g. a SmoothAdv and a MACER
    poison of the same images, sigma and eps); the result's ``method`` is their names joined by "+" in sorted
    order (e.g. "macer+smoothadv"), and ``settings["combined_methods"]`` lists each input's. Off by default, so
    that a poison of another procedure given by mistake is refused.
    """
    if how not in COMBINE:
        raise ValueError(f"how must be one of {COMBINE}, got {how!r}")
    poisons = list(poisons)
    least = 1 if how == "vote" else 2
    if len(poisons) < least or not all(isinstance(ps, PoisonSet) for ps in poisons):
        raise TypeError(f"poisons must be {'one' if least == 1 else 'two'} or more PoisonSets for how={how!r}, "
                        f"got {[type(ps).__name__ for ps in poisons]}")
    first = poisons[0]
    for i, ps in enumerate(poisons[1:], 1):
        method_ok = mixed_methods or ps.method == first.method
        same = method_ok and (ps.target_class, ps.sigma, ps.eps, ps.clean_sha256) == (
            first.target_class, first.sigma, first.eps, first.clean_sha256)
        if not same or not torch.equal(ps.indices, first.indices) or ps.images.shape != first.images.shape:
            hint = "" if method_ok else " (mixed_methods=True combines procedures)"
            raise PoisonError(
                f"poisons[{i}] ({ps.method}, class {ps.target_class}, sigma {ps.sigma}, eps {ps.eps}, {len(ps)} images, "
                f"originals {ps.clean_sha256[:12]}) is not a poison of the same images and settings as poisons[0] "
                f"({first.method}, class {first.target_class}, sigma {first.sigma}, eps {first.eps}, {len(first)} images, "
                f"originals {first.clean_sha256[:12]}){hint}"
            )
    x0 = first._originals(train_data)  # refuses another training set
    stack = torch.stack([ps.images.to(torch.float32) for ps in poisons])
    if how == "mean":
        images = _project(stack.to(torch.float64).mean(0).to(torch.float32), x0, first.eps)
    else:
        direction = (stack.to(torch.float64) - x0.to(torch.float64)).sum(0).sign().to(torch.float32)
        images = _vertex(x0, first.eps, direction)  # the arithmetic a sign file decodes with
    records = [init_record(ps) for ps in poisons]
    shared = [k for k in first.settings if k not in _RUN_KEYS and all(
        k in ps.settings and ps.settings[k] == first.settings[k] for ps in poisons)]
    settings = {k: first.settings[k] for k in shared}
    settings.update({
        "combine": how,
        "combined_from": records,  # each input's solver, damping, method_args and steps
        "combined_differ": sorted({k for ps in poisons for k in ps.settings} - set(shared) - set(_RUN_KEYS)),
        "outer_steps": 0,
        "total_outer_steps": max(r["total_outer_steps"] for r in records),
    })
    methods = sorted({ps.method for ps in poisons})
    if len(methods) > 1:
        settings["combined_methods"] = [ps.method for ps in poisons]
    return PoisonSet(first.indices.clone(), images, first.labels.clone(), first.clean_sha256, first.eps, first.sigma,
                     "+".join(methods), first.target_class, json.loads(json.dumps(settings)))


def poison(
    model_fn: Callable[[], torch.nn.Module],
    train_data,
    val_data,
    *,
    target_class: int,
    method: str = "gaussian",
    sigma: float,
    eps: float,
    solver: str = "approxgrad",
    outer_steps: int,
    niter1: int = 10,
    niter2: int = 10,
    lr_u: float = 0.1,
    lr_w: float = 1e-3,
    lr_p: float = 1e-2,
    damping: float = 1e-3,
    reset_every: int = 10,
    batch_clean: int = 900,
    batch_poison: int = 100,
    batch_val: int = 100,
    k: int = 20,
    beta: float = 16.0,
    a: float = 0.001,
    u_update: str = "adam",
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    checkpoint_seconds: float | None = 600.0,
    init: PoisonSet | None = None,
    method_args: dict | None = None,
    device: str | torch.device = "cpu",
    hvp_backend: str = "auto",
    encoding: str = "float32",
    progress: bool | None = None,
    log: Callable[[dict], None] | None = None,
) -> PoisonSet:
    """Craft a PACD poison against ``method``'s training procedure (ApproxGrad bilevel optimisation).

    Args:
        model_fn: a factory building a fresh lower-level model (e.g. ``engine.models.lenet_mnist`` or
            ``lambda: engine.models.build("lenet")``, not a model); called at every re-initialisation
            under a seed derived from ``seed``. Its first model is run once on a training image before
            anything else: a model that does not take the images, or has no output for a label or for
            ``target_class``, is refused then.
        train_data: (images (N, C, H, W) uint8 or float in [0, 1], labels (N,)); every image of
            ``target_class`` is poisoned, the others are the clean data of the lower level.
        val_data: (images, labels); its ``target_class`` images drive the upper objective.
        method: lower-level procedure "gaussian" | "macer" | "smoothadv" (``method_args``: macer k,
            beta, gamma, lbd; smoothadv eps, steps, m).
        sigma: smoothing noise of the procedure and of the upper objective. eps: L_inf radius.
        solver: "approxgrad" | "cg" | "neumann" for (H + damping I) p = dF/dw, ``niter2`` steps with
            step size ``lr_p`` (approxgrad, neumann).
        outer_steps: outer iterations; each runs ``niter1`` Adam(lr_w) steps on the lower model,
            one solve and one poison step (Adam with lr_u, or signed steps with u_update="sign").
        reset_every: re-initialise the lower model every this many epochs (epoch = N / (batch_clean
            + batch_poison) outer steps; 0 = never). A run too short for one re-initialisation warns;
            the PoisonSet's settings give the number done ("lower_resets").
        batch_clean, batch_poison, batch_val: minibatch sizes; k, beta, a: upper objective settings.
        checkpoint: path of a resumable state file written every ``checkpoint_every`` steps, also
            after any step that ends ``checkpoint_seconds`` (None: no time limit) after the last
            write, and at the end; an existing one with the same settings is resumed (``outer_steps``
            may grow).
        init: warm start from an earlier poison of the same training set and target class (e.g. to
            craft further from a finished run whose checkpoint is gone): the poisoned images start at
            ``init``'s, projected onto this run's eps box around the originals, and the step schedule
            (minibatches, noise keys, lower-model re-initialisations) continues after ``init``'s
            ``total_outer_steps`` (its ``outer_steps`` unless it was itself warm-started) instead of
            replaying it; the lower model, p and the optimiser states start afresh (a checkpoint
            resumes exactly, a warm start does not). ``outer_steps`` counts the steps of this run;
            the PoisonSet's ``settings["init"]`` names ``init`` (content sha256, outer steps) and
            ``settings["total_outer_steps"]`` adds them up.
        hvp_backend: second-order backend of :func:`engine.hvp` ("auto": the fused extension op where
            the model is supported, else torch.func); MACER's loss enters through its expansion at the
            logits, or, with "torch_func", as a whole through torch.func (see ``_Lower.products``).
            The Hessian and mixed products run with the model in eval mode (BatchNorm running statistics).
        encoding: "float32" (the crafted images as they are) or "int8": the crafted poison quantised at the end
            (:meth:`PoisonSet.encode`; ``settings["quantized"]`` records the float32 poison it came from), so the
            PoisonSet returned is the one its 4x smaller file holds. The checkpoint keeps the float32 poison (a
            resumed run quantises the same), and the encoding is no checkpoint setting.
        progress: a tqdm bar over the outer steps: None (default) only when stderr is a terminal (never
            under pytest or in a log file), True always, False never.

    Raises:
        :class:`engine.validate.InputError` (a ValueError) for bad arguments, data (as for
        :func:`engine.train`), a model instance passed as ``model_fn``, a model that does not fit the
        images or a ``target_class`` beyond its outputs.

    Returns:
        :class:`PoisonSet` with ||images - originals||_inf <= eps, images in [0, 1], labels unchanged.
    """
    if isinstance(model_fn, torch.nn.Module) or not callable(model_fn):
        what = f"a {describe_module(model_fn)} module" if isinstance(model_fn, torch.nn.Module) else type(model_fn).__name__
        raise InputTypeError(f"poison takes a model factory (e.g. lambda: engine.models.build('lenet')), got {what}")
    if isinstance(target_class, bool) or not hasattr(type(target_class), "__index__"):
        raise InputTypeError(f"target_class must be an integer class index, got {type(target_class).__name__} {target_class!r}")
    target_class = int(target_class)
    if target_class < 0:
        raise InputError(f"target_class must be >= 0, got {target_class}")
    progress = check_progress(progress, allow_callable=False)
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if solver not in bilevel.SOLVERS:
        raise InputError(f"solver must be one of {tuple(bilevel.SOLVERS)}, got {solver!r}")
    from .hessian import BACKENDS as HVP_BACKENDS

    if hvp_backend not in HVP_BACKENDS:
        raise InputError(f"hvp_backend must be one of {HVP_BACKENDS}, got {hvp_backend!r}")
    if u_update not in ("adam", "sign"):
        raise InputError(f"u_update must be 'adam' or 'sign', got {u_update!r}")
    if encoding not in ("float32", "int8"):
        raise InputError(f"encoding must be 'float32' or 'int8' for a crafted poison, got {encoding!r} (sign stores "
                         "vertex poisons: PoisonSet.encode(train_data, 'sign', snap=True) or combine_poisons)")
    sigma = _positive("sigma", sigma)
    eps = _positive("eps", eps, allow_zero=True)
    lr_u, lr_w, lr_p = _positive("lr_u", lr_u), _positive("lr_w", lr_w), _positive("lr_p", lr_p)
    damping = _positive("damping", damping, allow_zero=True)
    outer_steps, niter1, niter2 = _count("outer_steps", outer_steps, 0), _count("niter1", niter1, 0), _count("niter2", niter2, 1)
    reset_every, checkpoint_every = _count("reset_every", reset_every, 0), _count("checkpoint_every", checkpoint_every, 1)
    if checkpoint_seconds is not None:
        checkpoint_seconds = _positive("checkpoint_seconds", checkpoint_seconds, allow_zero=True)
    bc, bp, bv, k = (
        _count(n, v, 1)
        for n, v in (("batch_clean", batch_clean), ("batch_poison", batch_poison), ("batch_val", batch_val), ("k", k))
    )
    if not 0 <= float(a) < 0.5:
        raise InputError(f"a must lie in [0, 0.5), got {a}")
    margs = _method_args(method, dict(method_args or {}))
    device = torch.device(device)

    images, labels = check_dataset(train_data, "train_data")
    val_images, yv_all = check_dataset(val_data, "val_data")
    x_all = _float_images(images, "train_data")
    xv_all = _float_images(val_images, "val_data")

    def build_model(r: int) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, r, 1))
            m = model_fn()
        if not isinstance(m, torch.nn.Module):
            raise InputTypeError(f"model_fn must return a torch.nn.Module, got {type(m).__name__}")
        m = m.to(device)
        if device.type == "cpu" and any(isinstance(c, torch.nn.Conv2d) for c in m.modules()):
            m.to(memory_format=torch.channels_last)  # oneDNN's fast layout (as engine.train); checkpoints store it contiguous
        return m

    def fresh_model(r: int, built: torch.nn.Module | None = None):
        m = build_model(r) if built is None else built
        return m, torch.optim.Adam(flat_params(m), lr=lr_w)

    # the first model (re-initialisation 0), run once on a training image before anything else
    first_model = build_model(0)
    model_name = f"model from model_fn ({describe_module(first_model)})"
    classes = check_model_fits(first_model, images, name=model_name, labels=labels, labels_name="train_data labels")
    if tuple(val_images.shape[1:]) != tuple(images.shape[1:]):
        check_model_fits(first_model, val_images, name=model_name, num_classes=classes)
    if int(yv_all.max()) >= classes:
        raise InputError(f"val_data labels go up to {int(yv_all.max())} but the {model_name} has {classes} outputs "
                         f"(classes 0..{classes - 1})")
    if target_class >= classes:
        raise InputError(f"target_class {target_class} is not a class of the {model_name}: it has {classes} outputs "
                         f"(classes 0..{classes - 1})")
    pool_p = (labels == target_class).nonzero().flatten()
    pool_c = (labels != target_class).nonzero().flatten()
    val_t = xv_all[yv_all == target_class]
    if pool_p.numel() == 0 or val_t.shape[0] == 0 or pool_c.numel() == 0:
        raise InputError(
            f"target_class {target_class}: {pool_p.numel()} training, {val_t.shape[0]} validation images of "
            f"the class and {pool_c.numel()} other training images; all must be > 0"
        )
    clean_hash = _hash_clean(images[pool_p], labels[pool_p])
    x_all, val_t = x_all.to(device), val_t.to(device)
    labels_dev = labels.to(device)
    x0 = x_all[pool_p].clone()
    n_poison = pool_p.numel()
    steps_per_epoch = math.ceil(x_all.shape[0] / (bc + bp))
    reset_period = reset_every * steps_per_epoch
    poison_epoch = math.ceil(n_poison / bp)
    offset, init_info = 0, None
    if init is not None:
        if not isinstance(init, PoisonSet):
            raise TypeError(f"init must be a PoisonSet, got {type(init).__name__}")
        if init.target_class != int(target_class) or init.clean_sha256 != clean_hash or not torch.equal(
            init.indices.to(torch.int64), pool_p
        ):
            raise PoisonError(
                f"init: a poison of class {init.target_class} ({len(init)} images, originals {init.clean_sha256[:12]}) "
                f"is not one of this training set's {n_poison} images of class {target_class} "
                f"(originals {clean_hash[:12]}): warm-start from a poison crafted on the same training split"
            )
        if tuple(init.images.shape[1:]) != tuple(x0.shape[1:]):
            raise PoisonError(f"init: poison images {tuple(init.images.shape[1:])} do not match {tuple(x0.shape[1:])}")
        init_info = init_record(init)
        offset = _count("init's total_outer_steps", init_info["total_outer_steps"], 0)

    if reset_period and outer_steps > 0 and offset // reset_period == (offset + outer_steps - 1) // reset_period:
        warnings.warn(
            f"reset_every={reset_every} epochs is {reset_period} outer steps here, outer_steps={outer_steps}: the lower "
            "model is never re-initialised, so the poison is crafted against a single training run; lower reset_every "
            "to craft against training from scratch several times",
            stacklevel=2,
        )

    settings = {
        "target_class": int(target_class),
        "method": method,
        "sigma": sigma,
        "eps": eps,
        "solver": solver,
        "niter1": niter1,
        "niter2": niter2,
        "lr_u": lr_u,
        "lr_w": lr_w,
        "lr_p": lr_p,
        "damping": damping,
        "reset_every": reset_every,
        "batch_clean": bc,
        "batch_poison": bp,
        "batch_val": bv,
        "k": k,
        "beta": float(beta),
        "a": float(a),
        "u_update": u_update,
        "seed": int(seed),
        "method_args": margs,
        "clean_sha256": clean_hash,
        "train_size": int(x_all.shape[0]),
        "steps_per_epoch": steps_per_epoch,
    }
    if init_info is not None:
        settings["init"] = init_info

    reset_index = offset // reset_period if reset_period else 0
    model, opt_w = fresh_model(reset_index, first_model if reset_index == 0 else None)
    first_model = None
    shapes = [list(p.shape) for p in flat_params(model)]
    settings["param_shapes"] = shapes
    n_params = sum(p.numel() for p in flat_params(model))
    p_vec = torch.zeros(n_params, device=device)
    p_state = AdamState()
    u = x0.clone()
    if init is not None:
        u = _project(init.images.to(device, torch.float32), x0, eps)
    u_opt = _RowAdam(u)
    history: list[dict] = []
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    # one writer per checkpoint; released before returning, or with this frame if an error ends the run
    lock = ExclusiveLock(ckpt).acquire() if ckpt is not None else None

    if ckpt is not None and ckpt.exists():
        tensors, meta = _load_checkpoint(ckpt)
        if meta["settings"] != json.loads(json.dumps(settings)):
            diff = sorted(
                key
                for key in set(meta["settings"]) | set(settings)
                if meta["settings"].get(key) != json.loads(json.dumps(settings)).get(key)
            )
            raise PoisonError(f"{ckpt}: checkpoint of a run with other settings ({', '.join(diff)} differ)")
        start, reset_index, history = meta["step"], meta["reset_index"], meta["history"]
        model, opt_w = fresh_model(reset_index)
        model.load_state_dict({k[2:]: v.to(device) for k, v in tensors.items() if k.startswith("w.")})
        _optimizer_from(opt_w, {k: v.to(device) for k, v in tensors.items() if k.startswith("opt_w/")}, meta["opt_w_groups"])
        u = tensors["u"].to(device)
        p_vec = tensors["p"].to(device)
        p_state = AdamState(m=tensors.get("p_m"), v=tensors.get("p_v"), t=meta["p_t"])
        if p_state.m is not None:
            p_state.m, p_state.v = p_state.m.to(device), p_state.v.to(device)
        u_opt.m, u_opt.v, u_opt.t = tensors["u_m"].to(device), tensors["u_v"].to(device), tensors["u_t"]

    def save_state(step_done: int):
        if ckpt is None:
            return
        tensors = {f"w.{k}": v for k, v in model.state_dict().items()}
        opt_tensors, groups = _optimizer_tensors(opt_w)
        tensors.update(opt_tensors)
        tensors.update({"u": u, "p": p_vec, "u_m": u_opt.m, "u_v": u_opt.v, "u_t": u_opt.t})
        if p_state.m is not None:
            tensors.update({"p_m": p_state.m, "p_v": p_state.v})
        meta = {
            "step": step_done,
            "reset_index": reset_index,
            "p_t": p_state.t,
            "settings": settings,
            "opt_w_groups": groups,
            "history": history,
        }
        _save_checkpoint(ckpt, tensors, json.loads(json.dumps(meta)))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=outer_steps, initial=min(start, outer_steps), desc=f"poison[{method}]", unit="step", dynamic_ncols=True)
    t_start = last_save = time.perf_counter()
    warned_solve = False
    try:
        for local in range(start, outer_steps):
            step = offset + local  # the schedule's step (after init's steps on a warm start)
            r = step // reset_period if reset_period else 0
            if r != reset_index:
                reset_index = r
                model, opt_w = fresh_model(r)
                p_vec = torch.zeros(n_params, device=device)
                p_state = AdamState()
            t0 = time.perf_counter()
            g_sel = _generator("cpu", seed, step, 2)
            ci = pool_c[torch.randperm(pool_c.numel(), generator=g_sel)[:bc]]
            vi = torch.randperm(val_t.shape[0], generator=g_sel)[:bv]
            order = torch.randperm(n_poison, generator=_generator("cpu", seed, step // poison_epoch, 3))
            j = step % poison_epoch
            pos = order[j * bp : (j + 1) * bp]
            batch = _Step(
                xc=x_all[ci.to(device)],
                yc=labels_dev[ci.to(device)],
                pos=pos,
                yp=labels_dev[pool_p[pos].to(device)],
                xv=val_t[vi.to(device)],
                seed=derive_seed(seed, step, 4),
            )
            lower = _Lower(method, model, batch, sigma, margs)
            u_batch = u[pos.to(device)]
            clock = _PhaseClock(device)
            model.train()
            lower.prepare(u_batch)
            lower_loss = float("nan")
            for it in range(niter1):
                loss = lower.loss(lower.forward, u_batch, 100 + it)
                opt_w.zero_grad(set_to_none=True)
                loss.backward()
                opt_w.step()
                lower_loss = float(loss.detach())
            clock.lap("lower")
            model.eval()  # the smoothed classifier (upper level) and the second-order products use eval mode
            params = flat_params(model)
            f_val, counted = soft_radius_objective(
                lower.forward, batch.xv, target_class, sigma=sigma, k=k, beta=beta, a=a,
                generator=_generator(device, batch.seed, 5),
            )
            grads = torch.autograd.grad(f_val, params, allow_unused=True)
            g_w = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1) for gr, p in zip(grads, params)])
            moved, solve_residual = 0.0, None
            clock.lap("upper")
            if float(g_w.abs().max()) > 0:
                hvp, mixed = lower.products(u_batch, 999, hvp_backend)
                kwargs = {"state": p_state} if solver == "approxgrad" else {}
                trace: list[float] = []
                p_vec = bilevel.SOLVERS[solver](hvp, g_w.detach(), p_vec, steps=niter2, lr=lr_p, damping=damping,
                                                trace=trace, **kwargs)  # fmt: skip
                if trace:
                    solve_residual = [trace[0], trace[-1]]
                    if trace[-1] > 1.0 and not warned_solve:
                        warned_solve = True
                        warnings.warn(
                            f"step {local + 1}: the {solver} solve ends with residual ||(H + sI) p - g|| / ||g|| = "
                            f"{trace[-1]:.3g} (from {trace[0]:.3g}), worse than p = 0, so the poison step follows an "
                            f"unreliable direction: {_solve_advice(solver, lr_p, damping)}",
                            stacklevel=2,
                        )
                clock.lap("solve")
                grad_u = -mixed(p_vec)
                if u_update == "adam":
                    new = u_opt.step(u, pos.to(device), grad_u, lr_u)
                else:
                    new = u_batch - lr_u * grad_u.sign()
                x0b = x0[pos.to(device)]
                new = _project(new, x0b, eps)
                moved = float((new - u_batch).abs().max())
                u[pos.to(device)] = new
                clock.lap("poison")
            for name in ("solve", "poison"):  # no hypergradient this step (no validation image counted)
                clock.laps.setdefault(name, 0.0)
            entry = {
                "step": local + 1,
                "upper": float(f_val.detach()),
                "counted": counted,
                "lower_loss": lower_loss,
                "linf": float((u - x0).abs().max()),
                "moved": moved,
                "solve_residual": solve_residual,
                "seconds": time.perf_counter() - t0,
                "phases": clock.laps,
            }
            history.append(entry)
            if log is not None:
                log(entry)
            if bar is not None:
                bar.set_postfix(upper=f"{entry['upper']:.4f}", linf=f"{entry['linf']:.3f}", lower=f"{lower_loss:.3f}")
                bar.update(1)
            overdue = checkpoint_seconds is not None and time.perf_counter() - last_save >= checkpoint_seconds
            if (local + 1) % checkpoint_every == 0 or overdue:
                save_state(local + 1)
                last_save = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
    steps_done = max(start, outer_steps)
    save_state(steps_done)
    if lock is not None:
        lock.release()
    final = dict(settings)
    final.update(
        {
            "outer_steps": steps_done,
            "total_outer_steps": offset + steps_done,
            "lower_resets": reset_index,  # the re-initialisation of the last step done (0: none)
            "seconds": time.perf_counter() - t_start,
            **_history_summary(history),
        }
    )
    crafted = PoisonSet(
        indices=pool_p.clone(),
        images=u.detach().to("cpu", torch.float32),
        labels=labels[pool_p].clone(),
        clean_sha256=clean_hash,
        eps=eps,
        sigma=sigma,
        method=method,
        target_class=int(target_class),
        settings=json.loads(json.dumps(final)),
    )
    return crafted if encoding == "float32" else crafted.encode(train_data, encoding)


from .controls import CONTROLS, random_poison  # noqa: E402  (controls build PoisonSets)
from .presets import PRESETS, preset  # noqa: E402,F401  (crafting settings of published runs)
