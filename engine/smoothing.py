"""Randomized-smoothing CERTIFY and PREDICT (Cohen, Rosenfeld and Kolter, ICML 2019).

The smoothed classifier is g(x) = argmax_c P[f(x + e) = c], e ~ N(0, sigma^2 I), with the noise
added in pixel space. Noise comes from the keyed stream of :mod:`engine.noise`: sample ``s`` of the
image with id ``i`` is the same for any batch size, any packing of images into forward batches and
any sharding of a data set, so results depend only on (model, x, ids, sigma, n0, n, alpha, seed).
"""

from __future__ import annotations

import collections
import copy
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import _ext
from . import accel as _accel
from . import noise as _noise
from .stats import binomial_two_sided_pvalue, certified_radius, clopper_pearson_lower
from .validate import InputError, InputTypeError, check_model_fits, check_progress
from .validate import check_images as _check_images

__all__ = ["certify", "predict", "CertifyResult", "sample_counts", "ABSTAIN"]

ABSTAIN = -1
BACKENDS = ("auto", "torch", "cpp", "triton")


@dataclass
class CertifyResult:
    """Per-image outcome of :func:`certify` (all tensors on the CPU).

    prediction: (B,) int64, the certified class, -1 = abstain.
    radius: (B,) float64, certified L2 radius (0 when abstaining).
    counts_selection: (B, num_classes) int64, top-1 counts of the n0 selection samples.
    counts_estimation: (B, num_classes) int64, top-1 counts of the n estimation samples.
    p_lower: (B,) float64, one-sided Clopper-Pearson lower bound on p_A (adaptive sampling: at alpha / L,
        from the samples drawn).
    seconds: (B,) float64, wall time of the call shared by the images in proportion to the samples each
        drew (with one image per call it is that image's time).
    samples: (B,) int64, samples drawn per image, selection plus estimation (n0 + n for fixed sampling).
    """

    prediction: torch.Tensor
    radius: torch.Tensor
    counts_selection: torch.Tensor
    counts_estimation: torch.Tensor
    p_lower: torch.Tensor
    seconds: torch.Tensor
    samples: torch.Tensor

    def __len__(self) -> int:
        return int(self.prediction.shape[0])


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InputError(f"{name} must be {bound}, got {value}")
    return value


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.floating, np.integer)):
        raise InputTypeError(f"sigma must be a number, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not np.isfinite(sigma) or sigma <= 0:
        raise InputError(f"sigma must be a finite number > 0, got {sigma}")
    return sigma


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)):
        raise InputTypeError(f"alpha must be a number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}")
    return alpha


def check_images(x) -> torch.Tensor:
    """Validate x: a (B, C, H, W) floating tensor of finite pixels in [0, 1] (:func:`engine.validate.check_images`
    named "x", uint8 refused); returns it unchanged. Raises :class:`engine.validate.InputError`."""
    return _check_images(x, "x", allow_uint8=False)


def _check_ids(image_ids, batch: int) -> torch.Tensor:
    if image_ids is None:
        return torch.arange(batch, dtype=torch.int64)
    ids = torch.as_tensor(image_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1 or ids.shape[0] != batch:
        raise InputError(
            f"image_ids must be a 1-D integer tensor with one id per image ({batch}), got {tuple(ids.shape)} {ids.dtype}"
        )
    ids = ids.to(torch.int64).cpu()
    if batch and (int(ids.min()) < 0 or int(ids.max()) > _noise.MAX_INDEX):
        raise InputError("image_ids must lie in [0, 2^32)")
    return ids


def model_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    """Device of the model's first parameter or buffer (``fallback`` for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


def default_batch_size(pixels: int, device: torch.device) -> int:
    """Noisy samples per forward pass: about 1 MiB (CPU, cache-sized) or 64 MiB (GPU) of float32 input."""
    budget = 2**18 if device.type == "cpu" else 2**24
    return max(1, budget // max(1, pixels))


class _ChannelsLast(torch.nn.Module):
    """Runs a channels-last copy of a conv net (oneDNN's fast layout on CPU); same math in fp32."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous(memory_format=torch.channels_last))


def fast_forward_model(model: torch.nn.Module, device: torch.device, backend: str) -> torch.nn.Module:
    """The module certification runs: with backend "auto" on CPU, a channels-last copy of a conv net
    with its conv / pool / ReLU stages fused (:class:`ConvPoolReLU`; about 2.5x faster for LeNet in
    fp32 than the plain model); otherwise ``model`` itself. The caller's model is untouched."""
    if backend != "auto" or device.type != "cpu":
        return model
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return model
    try:
        clone = copy.deepcopy(model)
    except Exception:  # a model that cannot be copied runs as it is
        return model
    _pool_before_relu(clone)
    _fast_pools(clone)
    if _accel.fused_kernels_enabled():  # ENGINE_FUSED=0: oneDNN's layers only (comparisons)
        _fuse_conv_stages(clone)
    return _ChannelsLast(clone.to(memory_format=torch.channels_last)).eval()


class ConvPoolReLU(torch.nn.Module):
    """``[Normalize,] Conv2d, MaxPool2d(2), ReLU`` as one op on the CPU (``engine::conv_pool_relu``).

    A convolution stage of LeNet-style networks, fused per sample so that the full-resolution
    convolution output stays in cache and only the pooled values reach memory (oneDNN writes the
    whole convolution output before the pool reads it back, and runs LeNet's small convolutions well
    below the FMA rate). Equal to the unfused layers up to float32 rounding of the convolution's sums.
    Inputs the op does not take (not a CPU float32 batch, autograd, no extension) run through the
    original layers, kept as ``self.layers``. ``normalize``: a scalar :class:`~engine.models.Normalize`
    in front (the first layer), or None.
    """

    def __init__(self, normalize: torch.nn.Module | None, conv: torch.nn.Conv2d, pool: torch.nn.Module,
                 relu: torch.nn.Module):
        super().__init__()
        parts = [conv, pool, relu] if normalize is None else [normalize, conv, pool, relu]
        self.layers = torch.nn.Sequential(*parts)
        if normalize is None:
            self.mean, self.std = 0.0, 1.0
        else:
            self.mean, self.std = float(normalize.mean.flatten()[0]), float(normalize.std.flatten()[0])

    @staticmethod
    def fusable(normalize, conv, pool, relu) -> bool:
        from .models import Normalize

        return (
            (normalize is None or (type(normalize) is Normalize and normalize.mean.numel() == 1
                                   and normalize.std.numel() == 1))
            and type(conv) is torch.nn.Conv2d
            and conv.groups == 1
            and conv.padding_mode == "zeros"
            and torch.nn.modules.utils._pair(conv.stride) == (1, 1)
            and torch.nn.modules.utils._pair(conv.dilation) == (1, 1)
            and torch.nn.modules.utils._pair(conv.padding) == (0, 0)
            and conv.bias is not None
            and isinstance(pool, MaxPool2x2)
            and type(relu) is torch.nn.ReLU
        )

    @property
    def conv(self) -> torch.nn.Conv2d:
        return self.layers[-3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or conv.weight.dtype != torch.float32
            or x.dim() != 4
            or x.shape[1] != conv.in_channels
            or x.shape[2] < conv.kernel_size[0] + 1
            or x.shape[3] < conv.kernel_size[1] + 1
            or (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
            or not _ext.available()
        ):
            return self.layers(x)
        return torch.ops.engine.conv_pool_relu(x, conv.weight, conv.bias, self.mean, self.std)


def _fuse_conv_stages(model: torch.nn.Module) -> None:
    """Replace (in place) every ``[Normalize,] Conv2d, MaxPool2x2, ReLU`` run of a Sequential (after
    :func:`_pool_before_relu` and :func:`_fast_pools`) by :class:`ConvPoolReLU`, in nested ones too."""
    for child in model.children():
        _fuse_conv_stages(child)
    if not isinstance(model, torch.nn.Sequential):
        return
    keys = list(model._modules.keys())
    i = 0
    while i < len(keys):
        mods = [model._modules[k] for k in keys[i : i + 4]]
        for width, parts in ((4, mods), (3, [None] + mods[:3])):
            if len(mods) >= width and ConvPoolReLU.fusable(*parts):
                model._modules[keys[i]] = ConvPoolReLU(*parts)  # keeps its place; the rest keep their order
                for k in keys[i + 1 : i + width]:
                    del model._modules[k]
                i += width
                break
        else:
            i += 1


class MaxPool2x2(torch.nn.Module):
    """``nn.MaxPool2d(2)`` for channels-last CPU inputs, without the indices oneDNN's pooling computes.

    Three elementwise maxima over the channels-last storage seen as (B, H/2, 2, W/2, 2C): the row
    pairs, then the column pairs (adjacent C-blocks). Exactly the same values as ``F.max_pool2d``
    (max picks one of its inputs), about 2x faster for LeNet's pools on one CPU thread; other inputs
    (odd sizes, other layouts, autograd) go to ``F.max_pool2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dim() != 4
            or x.shape[2] % 2
            or x.shape[3] % 2
            or not x.is_contiguous(memory_format=torch.channels_last)
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return torch.nn.functional.max_pool2d(x, 2)
        b, c, h, w = x.shape
        y = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2 * c)
        y = torch.maximum(y[:, :, 0], y[:, :, 1])
        return torch.maximum(y[..., :c], y[..., c:]).permute(0, 3, 1, 2)


def _fast_pools(module: torch.nn.Module) -> None:
    """Replace (in place) every plain 2x2, stride-2 ``MaxPool2d`` by :class:`MaxPool2x2`."""
    for name, child in module.named_children():
        if (
            type(child) is torch.nn.MaxPool2d
            and torch.nn.modules.utils._pair(child.kernel_size) == (2, 2)
            and torch.nn.modules.utils._pair(child.stride or child.kernel_size) == (2, 2)
            and torch.nn.modules.utils._pair(child.padding) == (0, 0)
            and torch.nn.modules.utils._pair(child.dilation) == (1, 1)
            and not child.ceil_mode
            and not child.return_indices
        ):
            module._modules[name] = MaxPool2x2()
        else:
            _fast_pools(child)


def _commutes(relu, pool) -> bool:
    """``relu, pool`` may run as ``pool, relu``: a plain ReLU before a MaxPool2d without indices.

    The two commute exactly (ReLU is monotone and max selects one of its inputs; every pooling
    window holds at least one real pixel), gradients included (where the pooled maximum is not
    positive both orders pass zero), and the ReLU then touches a quarter of the values.
    """
    return type(relu) is torch.nn.ReLU and type(pool) is torch.nn.MaxPool2d and not pool.return_indices


def _pool_before_relu(module: torch.nn.Module) -> None:
    """Swap every ``ReLU, MaxPool2d`` pair of a Sequential (in place) to ``MaxPool2d, ReLU``."""
    for child in module.children():
        _pool_before_relu(child)
    if not isinstance(module, torch.nn.Sequential):
        return
    keys = list(module._modules.keys())
    for a, b in zip(keys, keys[1:]):
        if _commutes(module._modules[a], module._modules[b]):
            module._modules[a], module._modules[b] = module._modules[b], module._modules[a]


def pool_first_view(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every ``ReLU, MaxPool2d`` pair of its (nested) ``nn.Sequential`` containers run
    as ``MaxPool2d, ReLU``, sharing every layer object with ``module``.

    The view computes the same values and gradients (:func:`_commutes`), its parameters *are* those of
    ``module`` (an optimizer built on ``module.parameters()`` trains both), and train / eval mode set on
    either reaches the layers of both. Training a LeNet on the CPU is about 1.25x faster this way
    (channels-last weights, batch 1000). A module with nothing to swap is returned itself.
    """
    if type(module) is not torch.nn.Sequential:
        return module
    items = list(module._modules.items())
    out, i, changed = [], 0, False
    while i < len(items):
        if i + 1 < len(items) and _commutes(items[i][1], items[i + 1][1]):
            out += [items[i + 1], items[i]]
            i, changed = i + 2, True
            continue
        view = pool_first_view(items[i][1])
        changed |= view is not items[i][1]
        out.append((items[i][0], view))
        i += 1
    if not changed:
        return module
    view = torch.nn.Sequential(collections.OrderedDict(out))
    view.training = module.training  # the container's own flag only; the layers keep theirs
    return view


class _EvalMode:
    """Context manager: model in eval mode (BatchNorm statistics fixed), original mode restored."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        return False


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------


def sample_counts(
    model: torch.nn.Module,
    x: torch.Tensor,
    image_ids: torch.Tensor,
    num: int,
    stream: int,
    *,
    sigma: float,
    seed: int,
    batch_size: int,
    backend: str = "auto",
    progress: Callable[[int], None] | None = None,
    noise: str = "gaussian",
) -> torch.Tensor:
    """Top-1 class counts of ``model`` on ``num`` keyed noisy copies of each image (``noise``: see
    :func:`engine.noise.noisy_batch`).

    The B * num (image, sample) rows are laid out image-major and cut into forward batches of
    ``batch_size`` rows, so samples of several images share a batch when num < batch_size. The
    model must be in the mode the caller wants (certification uses eval mode). Returns (B, K) int64
    on the model's device; ``progress(rows_done)`` is called after every batch.
    """
    batch = x.shape[0]
    device = x.device
    ids = image_ids.to(device)
    total = batch * num
    counts = None
    num_classes = None
    for start in range(0, total, batch_size):
        stop = min(total, start + batch_size)
        rows = torch.arange(start, stop, dtype=torch.int64, device=device)
        row_image = torch.div(rows, num, rounding_mode="floor")
        row_sample = rows - row_image * num
        noisy = _noise.noisy_batch(x, row_image, row_sample, ids, seed=seed, stream=stream, sigma=sigma, backend=backend,
                                   noise=noise)
        logits = model(noisy)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != stop - start:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputError(f"model output must be logits of shape ({stop - start}, num_classes), got {shape}")
        if num_classes is None:
            num_classes = logits.shape[1]
            if num_classes < 1:
                raise InputError("model output has no classes")
            counts = torch.zeros(batch * num_classes, dtype=torch.int64, device=device)
        elif logits.shape[1] != num_classes:
            raise InputError(f"model output changed from {num_classes} to {logits.shape[1]} classes between batches")
        if not bool(torch.isfinite(logits).all()):
            raise InputError("model output contains NaN or infinite logits")
        pred = logits.argmax(dim=1)  # ties -> lowest class index
        counts.index_add_(0, row_image * num_classes + pred, torch.ones_like(pred))
        if progress is not None:
            progress(stop - start)
    if counts is None:
        return torch.zeros((batch, 0), dtype=torch.int64, device=device)
    return counts.view(batch, num_classes)


def _prepare(model, x, image_ids, batch_size, seed, backend, precision="auto"):
    if not isinstance(model, torch.nn.Module):
        raise InputTypeError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
    x = check_images(x)
    ids = _check_ids(image_ids, x.shape[0])
    _check_int("seed", seed, 0, _noise.MAX_SEED)
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if precision not in _accel.PRECISIONS:
        raise InputError(f"precision must be one of {_accel.PRECISIONS}, got {precision!r}")
    check_model_fits(model, x)  # one forward of one image: a model that does not take x fails here, in one line
    device = model_device(model, x.device)
    if backend == "triton":
        from engine.kernels._launch import can_run

        if not can_run(device):
            raise InputError(f"backend 'triton' needs a CUDA model (or TRITON_INTERPRET=1 for the slow CPU interpreter); "
                             f"the model is on {device}")
    x = x.detach().to(device=device, dtype=torch.float32)
    pixels = int(np.prod(x.shape[1:])) if x.dim() == 4 else 1
    if batch_size is None:
        batch_size = default_batch_size(pixels, device)
    batch_size = _check_int("batch_size", batch_size, 1)
    return x, ids, batch_size


def _progress_bar(enabled, total: int, desc: str):
    """(update, bar) for ``progress``: None -> a bar only when stderr is a terminal, True / False, or a
    callable receiving rows done."""
    enabled = check_progress(enabled)
    if enabled is False:
        return None, None
    if enabled is not True:
        return enabled, None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="samples", unit_scale=True, dynamic_ncols=True)
    return bar.update, bar


def certify(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int | None = None,
    seed: int = 0,
    image_ids=None,
    backend: str = "auto",
    progress=None,
    precision: str = "auto",
    sampling: str = "fixed",
    radii=None,
    radius_tol: float | None = None,
    noise: str = "gaussian",
) -> CertifyResult:
    """Certify the smoothed classifier of ``model`` at each image of ``x`` (Cohen et al., CERTIFY).

    Args:
        model: any ``nn.Module`` mapping (N, C, H, W) pixels in [0, 1] to (N, num_classes) logits,
            input normalisation inside the model. Run in eval mode (restored afterwards).
        x: (B, C, H, W) float pixels in [0, 1].
        sigma: noise standard deviation (pixel units), > 0.
        n0: selection samples per image; n: estimation samples per image (fresh, independent).
        alpha: failure probability in (0, 1).
        batch_size: noisy samples per forward pass (None: :func:`default_batch_size`).
        seed: key of the noise stream, in [0, 2^64).
        image_ids: (B,) ids keying the noise of each image (default 0..B-1); pass data-set indices
            so that results do not depend on how a data set is split into calls or shards.
        backend: "auto" (fastest correct path: on CUDA the "triton" backend; on CPU the C++ noise op
            and a channels-last copy of conv nets), "torch" (plain PyTorch throughout), "cpp" (C++
            noise op, model as given), "triton" (fused Triton kernels, CUDA graphs; CUDA or the
            CPU interpreter). See :mod:`engine.accel`. On CUDA the "auto" / "triton" backends run
            forward passes of a fixed shape chosen by the engine, so ``batch_size`` does not apply.
        progress: a tqdm bar over samples: None (default) draws it only when stderr is a terminal
            (never under pytest or in a log file), True always, False never; or a callable
            receiving rows done after every forward batch.
        precision: "fp32", "bf16", "fp16" or "auto" (bf16 for "auto" / "triton" on CUDA, fp32
            otherwise). Lower precision changes the base classifier slightly, not the guarantee.
        sampling: "fixed" (Cohen et al.: n estimation samples per image) or "adaptive": the
            estimation samples come in looks at a fixed schedule up to n and an image stops once its
            answer is settled, with the same guarantee (:mod:`engine.adaptive`).
        radii: adaptive decision mode: grid radii; ``radius`` is then the largest one certified.
        radius_tol: adaptive radius mode (no ``radii``): stop when the certified radius cannot grow by
            more than this by sampling up to n (default 0.05).
        noise: "gaussian" (Cohen et al.'s float noise) or "discrete": sound noise on the 8-bit grid
            (Voracek and Hein, ICLR 2023; docs/sound_noise.md): x must be on the grid (multiples of 1/255,
            e.g. ``data.to_float`` of uint8 images), every noisy input is float32(j / 255) for an integer j,
            and the radius is :func:`engine.noise.discrete_certified_radius`, which holds for perturbations
            on the grid under the noise the engine actually draws, whatever the float rounding.

    Raises:
        :class:`engine.validate.InputError` (a ValueError; TypeError too for wrong types) for bad
        arguments, images that are not (B, C, H, W) floats in [0, 1], or a model that fails on one of
        the images or does not return (1, num_classes) logits for it (checked once, before sampling).

    Returns:
        :class:`CertifyResult`. Guarantee: for each image, with probability at least 1 - alpha over
        the sampling, if the prediction is a class c_A (not -1) then the smoothed classifier g
        predicts c_A at every x + d with ||d||_2 < radius.
    """
    sigma = _check_sigma(sigma)
    n0 = _check_int("n0", n0, 1, _noise.MAX_INDEX + 1)
    n = _check_int("n", n, 1, _noise.MAX_INDEX + 1)
    alpha = _check_alpha(alpha)
    plan = sampling_plan(sampling, n, alpha, radii, radius_tol)
    x, ids, batch_size = _prepare(model, x, image_ids, batch_size, seed, backend, precision)
    noise = _check_noise(noise, x)
    batch = x.shape[0]
    radius_of = radius_function(noise, sigma, x)
    update, bar = _progress_bar(progress, batch * (n0 + n), "certify")
    start = time.perf_counter()
    try:
        with _EvalMode(model), torch.inference_mode():
            sampler = _accel.make_sampler(model, x, backend=backend, precision=precision, batch_size=batch_size,
                                          noise=noise)
            common = dict(sigma=sigma, seed=seed, progress=update)
            counts0 = sampler(x, ids, n0, _noise.STREAM_SELECTION, **common).cpu()
            c_a = counts0.argmax(dim=1) if batch else torch.zeros(0, dtype=torch.int64)  # ties -> lowest class
            if plan is None:
                counts = sampler(x, ids, n, _noise.STREAM_ESTIMATION, **common).cpu()
            else:
                from .adaptive import adaptive_counts

                counts, used, p_lower, radius = adaptive_counts(sampler, x, ids, c_a, plan, radius_of=radius_of, **common)
                if bar is not None:  # the images stopped early: the bar ends at the samples drawn
                    bar.total = bar.n
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    if batch == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return CertifyResult(torch.zeros(0, dtype=torch.int64), empty, counts0, counts, empty.clone(), empty.clone(),
                             torch.zeros(0, dtype=torch.int64))
    if plan is None:
        n_a = counts.gather(1, c_a[:, None])[:, 0]
        p_lower = torch.from_numpy(np.asarray(clopper_pearson_lower(n_a.numpy(), n, alpha), dtype=np.float64))
        used = torch.full((batch,), n, dtype=torch.int64)
        radius = torch.from_numpy(np.asarray(radius_of(np.maximum(p_lower.numpy(), 0.5)), dtype=np.float64))
        abstain = p_lower < 0.5
    else:
        abstain = ~torch.isfinite(radius)
    radius = torch.where(abstain, torch.zeros_like(radius), radius).to(torch.float64)
    prediction = torch.where(abstain, torch.full_like(c_a, ABSTAIN), c_a)
    samples = used + n0
    return CertifyResult(
        prediction=prediction,
        radius=radius,
        counts_selection=counts0,
        counts_estimation=counts,
        p_lower=p_lower,
        seconds=elapsed * samples.double() / samples.sum().double(),
        samples=samples,
    )


def _check_noise(noise, x) -> str:
    """The noise kind, and for "discrete" images on the 8-bit grid (InputError naming x otherwise)."""
    noise = _noise._check_noise(noise)
    if noise == "discrete":
        _noise.grid_indices(x, "x")
    return noise


def radius_function(noise: str, sigma: float, x: torch.Tensor):
    """p_lower -> certified radius (float64) of the noise kind, for p_lower >= 1/2: Cohen et al.'s sigma Phi^-1(p)
    for "gaussian", :func:`engine.noise.discrete_certified_radius` (which depends on the pixels per image) for
    "discrete"."""
    if noise == "discrete":
        pixels = int(np.prod(x.shape[1:])) if x.dim() > 1 else 1
        return lambda p: np.asarray(_noise.discrete_certified_radius(np.asarray(p, dtype=np.float64), sigma, pixels),
                                    dtype=np.float64)
    return lambda p: np.asarray(certified_radius(p, sigma), dtype=np.float64)


def sampling_plan(sampling, n: int, alpha: float, radii=None, radius_tol=None):
    """None for ``sampling="fixed"`` (CERTIFY as published), else the :class:`engine.adaptive.SamplingPlan` of
    ``"adaptive"``; an :class:`InputError` names a bad setting."""
    from .adaptive import SAMPLING_MODES, make_plan

    if sampling not in SAMPLING_MODES:
        raise InputError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if sampling == "fixed":
        if radii is not None or radius_tol is not None:
            raise InputError("radii and radius_tol apply to sampling='adaptive' only (fixed sampling certifies "
                             "every image with n samples)")
        return None
    return make_plan(n, alpha, radii, radius_tol)


def predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int | None = None,
    seed: int = 0,
    image_ids=None,
    backend: str = "auto",
    progress=None,
    precision: str = "auto",
    noise: str = "gaussian",
) -> torch.Tensor:
    """Predict with the smoothed classifier (Cohen et al., PREDICT): (B,) int64, -1 = abstain.

    Counts the top-1 classes of n noisy samples per image; with top counts c1 >= c2 it abstains
    when the two-sided binomial test of c1 against Binomial(c1 + c2, 1/2) has p-value > alpha.
    Guarantee: the probability of returning a class other than g(x) is at most alpha.
    Arguments as in :func:`certify` (the samples come from a stream of their own).
    """
    sigma = _check_sigma(sigma)
    n = _check_int("n", n, 1, _noise.MAX_INDEX + 1)
    alpha = _check_alpha(alpha)
    x, ids, batch_size = _prepare(model, x, image_ids, batch_size, seed, backend, precision)
    noise = _check_noise(noise, x)
    update, bar = _progress_bar(progress, x.shape[0] * n, "predict")
    try:
        with _EvalMode(model), torch.inference_mode():
            sampler = _accel.make_sampler(model, x, backend=backend, precision=precision, batch_size=batch_size,
                                          noise=noise)
            counts = sampler(x, ids, n, _noise.STREAM_PREDICT, sigma=sigma, seed=seed, progress=update).cpu()
    finally:
        if bar is not None:
            bar.close()
    out = torch.full((x.shape[0],), ABSTAIN, dtype=torch.int64)
    for b in range(x.shape[0]):
        row = counts[b].tolist()
        top = sorted(range(len(row)), key=lambda c: (-row[c], c))[:2]  # ties -> lowest class index
        c1 = int(row[top[0]])
        c2 = int(row[top[1]]) if len(top) > 1 else 0
        if binomial_two_sided_pvalue(c1, c1 + c2, 0.5) <= alpha:
            out[b] = top[0]
    return out
