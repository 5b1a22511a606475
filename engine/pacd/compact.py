"""Compact poisoning checkpoints: a crafting run's state small enough to keep in version control or carry between
machines, and expanded again into a checkpoint that :func:`engine.pacd.poison` resumes from.

A poisoning checkpoint (``poison(checkpoint=...)``) stores everything in float32: for LeNet on MNIST's class 8 that is
about 61 MB, most of it the poison ``u`` and its per-pixel Adam moments. The compact file keeps

- ``u`` as the int8 codes of its perturbation, the encoding of an int8 poison file (:meth:`PoisonSet.encode`): the
  precision every finished int8 poison has (a unit of about eps/127; a code's image is the nearest to ``u``);
- the Adam moments (of the poison, of the lower model's weights and of the solver's warm start) in bfloat16: 8
  significant bits and the float32 exponent range (only values below about 1e-40 flush to zero);
- everything else as it is (the lower model's weights, the solver's warm start ``p``, the step counts, the metadata);

the whole compressed with LZMA (the codes of a poison at the box's edges compress well). The file is ``.xz`` of a
safetensors file whose metadata entry ``engine_poison_checkpoint_compact`` holds the checkpoint's metadata and how
it was made; nothing is unpickled.

A run resumed from an expanded compact checkpoint is therefore not the run that would have gone on from the original
(as a run resumed on another CPU is not): the poison is rounded to its codes and the moments to bfloat16 once, at the
resume. :func:`expand_checkpoint` returns the step it resumes from; record it beside the poison.
"""

from __future__ import annotations

import json
import lzma
import os
import struct
import tempfile
from pathlib import Path

import torch

from ..fileio import publish

try:
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # older safetensors
    _SafetensorError = RuntimeError
from .poisonset import (
    PoisonError,
    _int8_decode,
    _int8_encode,
    _run_originals,
    _save_checkpoint,
    read_checkpoint,
)

__all__ = ["COMPACT_KEY", "compact_checkpoint", "expand_checkpoint", "read_compact_checkpoint"]

COMPACT_KEY = "engine_poison_checkpoint_compact"  # the safetensors metadata entry of a compact checkpoint
_FORMAT = 1
_MOMENTS = ("u_m", "u_v", "p_m", "p_v")  # the poison's and the solver's Adam moments (the optimiser's: by suffix)


def _is_moment(name: str) -> bool:
    return name in _MOMENTS or (name.startswith("opt_w/") and name.rsplit("/", 1)[-1] in ("exp_avg", "exp_avg_sq"))


def _originals(settings: dict, shape: torch.Size, train_data, where) -> torch.Tensor:
    """The clean target-class images (float32 in [0, 1], in the run's order, of the poison's ``shape``) the
    checkpoint's poison perturbs; a PoisonError naming ``where`` unless ``train_data`` holds the run's originals."""
    idx, _ = _run_originals(settings, shape[0], train_data, where)
    x = train_data[0][idx]
    if x.numel() != shape.numel():
        raise PoisonError(f"{where}: the poison's images are {tuple(shape)[1:]}, the training set's {tuple(x.shape)[1:]}")
    x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
    return x.reshape(shape)


def compact_checkpoint(checkpoint, train_data, out) -> dict:
    """Write the compact form of the poisoning checkpoint ``checkpoint`` to ``out`` (atomically; read while a run
    writes the checkpoint, it takes one whole snapshot: checkpoints are replaced atomically). ``train_data``: the
    training set the run was started on (checked against the run's hash of its clean originals).

    Returns ``{"step", "bytes", "checkpoint_bytes", "u_max_error"}``: the step of the snapshot, the sizes of both
    files and the largest difference between the poison and its codes' images (at most about eps/254)."""
    checkpoint = Path(checkpoint)
    tensors, meta = read_checkpoint(checkpoint)
    settings, u = meta["settings"], tensors["u"]  # (read_checkpoint checks the settings and u's shape and dtype)
    if not bool(torch.isfinite(u).all()):
        raise PoisonError(f"{checkpoint}: the poison u is not finite (a diverged run?)")
    x0 = _originals(settings, u.shape, train_data, checkpoint)
    codes, decoded = _int8_encode(u, x0, float(settings["eps"]))
    kept = {}
    for name, t in tensors.items():
        if name == "u":
            kept["u_codes"] = codes
        elif _is_moment(name) and t.is_floating_point():
            kept[name] = t.to(torch.bfloat16)
        else:
            kept[name] = t
    info = {"format": _FORMAT, "checkpoint": meta, "u": "int8 codes", "bfloat16": sorted(
        n for n, t in kept.items() if t.dtype == torch.bfloat16)}
    from safetensors.torch import save

    payload = lzma.compress(save({k: v.contiguous() for k, v in kept.items()},
                                 metadata={COMPACT_KEY: json.dumps(info)}), preset=6)
    out = Path(out)
    _publish_bytes(payload, out)
    return {"step": int(meta["step"]), "bytes": len(payload), "checkpoint_bytes": checkpoint.stat().st_size,
            "u_max_error": float((decoded - u).abs().max()) if u.numel() else 0.0}


def read_compact_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored tensors (codes and bfloat16 as stored) and the metadata entry of a compact checkpoint; a
    PoisonError naming ``path`` for a file that is none (absent, not LZMA, damaged, or another kind of file)."""
    path = Path(path)
    if not path.is_file():
        raise PoisonError(f"{path}: no such compact poisoning checkpoint")
    try:
        raw = lzma.decompress(path.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        info = json.loads(header["__metadata__"][COMPACT_KEY])
        from safetensors.torch import load

        tensors = load(raw)
    except (lzma.LZMAError, struct.error, ValueError, KeyError, TypeError, RuntimeError, MemoryError,
            _SafetensorError) as exc:
        raise PoisonError(f"{path}: not a compact poisoning checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(info, dict) or info.get("format") != _FORMAT or not isinstance(info.get("checkpoint"), dict):
        raise PoisonError(f"{path}: not a compact poisoning checkpoint of format {_FORMAT}")
    codes = tensors.get("u_codes")
    if codes is None or codes.dtype != torch.int8 or codes.dim() != 4:
        raise PoisonError(f"{path}: a compact poisoning checkpoint without its int8 (N, C, H, W) poison codes")
    for name in ("u_m", "u_v"):
        if name not in tensors or tensors[name].shape != codes.shape:
            raise PoisonError(f"{path}: a compact poisoning checkpoint whose {name} is missing or not the poison's shape")
    return tensors, info


def expand_checkpoint(compact, train_data, out) -> dict:
    """Write the poisoning checkpoint that the compact checkpoint ``compact`` holds to ``out`` (atomically):
    the poison decoded from its codes, the moments back in float32, the rest as stored. ``train_data``: the training
    set the run was started on. Returns ``{"step", "reset_index"}`` of the snapshot, the step a run resumes from.
    The checkpoint is read back as :func:`poison` reads it (PoisonError if it is not one)."""
    tensors, info = read_compact_checkpoint(compact)
    meta = info["checkpoint"]
    settings = meta.get("settings")
    if not isinstance(settings, dict) or any(k not in settings for k in ("target_class", "clean_sha256", "eps")):
        raise PoisonError(f"{compact}: a compact poisoning checkpoint without the run's settings")
    codes = tensors.pop("u_codes")
    x0 = _originals(settings, codes.shape, train_data, compact)
    full = {"u": _int8_decode(codes, x0, float(settings["eps"]))}
    full.update({k: v.to(torch.float32) if v.dtype == torch.bfloat16 else v for k, v in tensors.items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:  # checked as a run resuming from it checks it before it takes the checkpoint's name
        _save_checkpoint(tmp, full, meta)
        read_checkpoint(tmp)
        publish(Path(tmp), out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"step": int(meta["step"]), "reset_index": int(meta["reset_index"])}


def _publish_bytes(payload: bytes, out: Path) -> None:
    """``payload`` as the file ``out``, atomically, through a temporary file of its own beside it (two processes
    writing the same ``out`` at once never share one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        publish(Path(tmp), out)
    finally:
        Path(tmp).unlink(missing_ok=True)
