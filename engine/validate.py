"""Checks of what users hand to the API: images, labels, data sets, models that must fit them.

Every public entry point (:func:`engine.certify`, :func:`engine.train`, :func:`engine.poison`,
:func:`engine.evaluate_poison`) runs these once per call, before any work, so that a wrong input is
refused with one line naming the input and saying what was found, instead of a traceback from deep
inside a training loop. Errors are :class:`InputError` (a ``ValueError``); wrong types raise
:class:`InputTypeError`, which is also a ``TypeError``.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

__all__ = [
    "InputError",
    "InputTypeError",
    "check_images",
    "check_labels",
    "check_dataset",
    "check_model_fits",
    "check_progress",
    "describe_module",
]


class InputError(ValueError):
    """A user's input is wrong (data, labels, a model that does not fit them, an argument).

    The message names the input and what was found; the command line prints it as one line.
    """


class InputTypeError(InputError, TypeError):
    """An input of the wrong type (an :class:`InputError` that is also a ``TypeError``)."""


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_images(x, name: str = "images", *, allow_uint8: bool = True) -> torch.Tensor:
    """Validate a batch of images and return it unchanged.

    ``x`` must be a (N, C, H, W) tensor of uint8 pixels (0..255, when ``allow_uint8``) or of finite
    floating pixels in [0, 1]. Raises :class:`InputTypeError` (not a tensor, wrong dtype) or
    :class:`InputError` (wrong rank, NaN / infinite or out-of-range pixels) naming ``name``.
    """
    if not isinstance(x, torch.Tensor):
        hint = " (torch.from_numpy(array) converts a numpy array)" if isinstance(x, np.ndarray) else ""
        raise InputTypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}{hint}")
    if x.dim() != 4:
        raise InputError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)} (rank {x.dim()})")
    if x.dtype == torch.uint8 and allow_uint8:
        return x
    if not x.is_floating_point():
        if allow_uint8:
            raise InputTypeError(f"{name} must be uint8 (0..255) or floating with pixels in [0, 1], got {x.dtype}")
        hint = ": convert uint8 images with engine.data.to_float (divides by 255)" if x.dtype == torch.uint8 else ""
        raise InputTypeError(f"{name} must be a floating tensor with pixels in [0, 1], got {x.dtype}{hint}")
    if x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))  # NaN propagates, +-inf shows as a bound
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = int((~torch.isfinite(x.detach())).sum())
            raise InputError(f"{name}: {bad} of {x.numel()} pixel values are NaN or infinite")
        if lo < 0.0 or hi > 1.0:
            hint = ""
            if lo >= 0.0 and hi <= 255.0:
                hint = ": divide by 255 or pass uint8" if allow_uint8 else ": divide by 255"
            raise InputError(f"{name}: float pixels must lie in [0, 1], got range [{lo:.6g}, {hi:.6g}]{hint}")
    return x


def check_labels(labels, count: int, name: str = "labels", *, num_classes: int | None = None) -> torch.Tensor:
    """Validate class labels: a 1-D integer tensor (or array-like; not float, not bool) of ``count``
    values >= 0, and < ``num_classes`` when given. Returns them as an int64 tensor."""
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputTypeError(f"{name} must be a 1-D integer tensor, got {type(labels).__name__} ({_one_line(exc)})") from exc
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise InputTypeError(f"{name} must be integers (class indices 0, 1, ...), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != count:
        raise InputError(f"{name} must be a 1-D tensor of {count} labels (one per image), got shape {tuple(labels.shape)}")
    labels = labels.to(torch.int64)
    if labels.numel():
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0:
            raise InputError(f"{name} must be >= 0 (class indices), got {lo}")
        if num_classes is not None and hi >= num_classes:
            raise InputError(f"{name} go up to {hi} but there are {num_classes} classes (0..{num_classes - 1})")
    return labels


def check_dataset(data, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``data = (images, labels)``: a pair, non-empty, images as :func:`check_images`, labels as
    :func:`check_labels`. Returns (images unchanged, labels int64)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        found = f"a {type(data).__name__} of {len(data)} items" if isinstance(data, (tuple, list)) else _shape(data)
        raise InputTypeError(f"{name} must be a pair (images (N, C, H, W), labels (N,)), got {found}")
    images = check_images(data[0], f"{name} images")
    if images.shape[0] == 0:
        raise InputError(f"{name} is empty (0 images)")
    labels = check_labels(data[1], images.shape[0], f"{name} labels")
    return images, labels


def describe_module(module) -> str:
    """A short name of a module for messages: its engine architecture, else its class."""
    arch = getattr(module, "engine_arch", None)
    if isinstance(arch, dict) and arch.get("name"):
        return str(arch["name"])
    return type(module).__name__


def _device_of(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _normalized_channels(model: torch.nn.Module) -> int | None:
    """Channels of the per-channel :class:`engine.models.Normalize` the model starts with (None: none)."""
    from .models import Normalize

    first = next((m for m in model.modules() if next(m.children(), None) is None), None)
    if isinstance(first, Normalize) and first.mean.numel() > 1:
        return int(first.mean.numel())
    return None


def check_model_fits(
    model,
    images: torch.Tensor,
    *,
    name: str = "model",
    num_classes: int | None = None,
    labels: torch.Tensor | None = None,
    labels_name: str = "labels",
) -> int:
    """Run ``model`` once on one image of ``images`` and return its number of outputs (classes).

    The image (the first, or zeros of that shape when ``images`` is empty) goes in as float32 in
    [0, 1] on the model's device, in eval mode (the model's mode is restored) without gradients.
    Raises :class:`InputError` when the model fails on it (e.g. a channel or size mismatch, or a model
    starting with a per-channel :class:`engine.models.Normalize` of another number of channels than the
    images, which would broadcast 1-channel images to its channels and run silently), when its
    output is not (1, C) logits, when ``num_classes`` is given and differs from C, or when ``labels``
    (named ``labels_name``) go up to C or more.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"{name} must be a torch.nn.Module returning logits, got {type(model).__name__}")
    shape = tuple(images.shape[1:])
    channels = _normalized_channels(model)
    if channels is not None and channels != shape[0]:
        raise InputError(
            f"{name} does not accept images of shape {shape}: its input normalisation (its first layer) is for "
            f"{channels} channels, the images have {shape[0]}"
            + (f" (they would be broadcast to {channels} copies of the one channel)" if shape[0] == 1 else "")
        )
    device = _device_of(model)
    if images.shape[0]:
        x = images[:1].detach()
        x = x.to(device=device, dtype=torch.float32)
        if images.dtype == torch.uint8:
            x = x / 255.0
    else:
        x = torch.zeros((1, *shape), device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        raise InputError(f"{name} does not accept images of shape {shape}: it failed with: {_one_line(exc)}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1 or out.shape[1] < 1:
        raise InputError(
            f"{name} output must be logits of shape (1, num_classes) for one image of shape {shape}, got {_shape(out)}"
        )
    classes = int(out.shape[1])
    if num_classes is not None and classes != num_classes:
        raise InputError(f"{name} has {classes} outputs but {num_classes} classes are expected")
    if labels is not None and labels.numel():
        hi = int(labels.max())
        if hi >= classes:
            raise InputError(f"{labels_name} go up to {hi} but the {name} has {classes} outputs (classes 0..{classes - 1})")
    return classes


def _stderr_is_terminal() -> bool:
    stream = sys.stderr
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def check_progress(progress, *, allow_callable: bool = True):
    """Resolve a ``progress`` argument: None (the default) -> True when stderr is a terminal, else False
    (tqdm's ``disable=None`` rule); True / False as given; a callable (where ``allow_callable``) as is."""
    if progress is None:
        return _stderr_is_terminal()
    if isinstance(progress, (bool, np.bool_)) or (isinstance(progress, (int, np.integer)) and progress in (0, 1)):
        return bool(progress)
    if allow_callable and callable(progress):
        return progress
    options = "None (a bar when stderr is a terminal), True or False" + (" or a callable" if allow_callable else "")
    raise InputTypeError(f"progress must be {options}, got {type(progress).__name__} {progress!r}")


def check_device(device, name: str = "device") -> torch.device:
    """``device`` as a torch.device this machine has: a malformed name or CUDA where there is none is an InputError
    naming ``name`` (before any work, not an AssertionError from deep inside torch)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"{name} {device!r} is not a device (cpu, cuda, cuda:N): {_one_line(exc)}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise InputError(f"{name} {device}: CUDA is not available here ({why}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{name} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
