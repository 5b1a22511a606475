"""Model zoo and safetensors checkpoints.

Every model takes pixels in [0, 1] and carries its input normalisation as its first layer, so that
smoothing noise is added in pixel space (Cohen et al. 2019).

- :func:`lenet_mnist`: Normalize - conv 20@5x5 - ReLU - maxpool 2 - conv 50@5x5 - ReLU - maxpool 2 -
  fc 500 - ReLU - fc 10 (an ``nn.Sequential``).
- :func:`mlp_mnist`: Normalize - Flatten - fc 1024 - ReLU - fc 1024 - ReLU - fc 10 (a second
  MNIST architecture, also sequential).
- :func:`resnet_cifar`: He et al.'s CIFAR ResNet (depth 6n+2: 20, 110, ...), basic blocks, 16-32-64
  channels, 1x1-conv + BatchNorm projection shortcuts.

:func:`save` / :func:`load` write and read safetensors files with JSON metadata (architecture,
classes, normalisation, training settings); no pickle is ever involved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .fileio import publish

__all__ = [
    "Normalize",
    "lenet_mnist",
    "mlp_mnist",
    "resnet_cifar",
    "build",
    "ARCHITECTURES",
    "save",
    "load",
    "read_meta",
    "count_macs",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CheckpointError",
]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
FORMAT = "engine.model/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or does not match its architecture."""


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on (B, C, H, W) pixels in [0, 1]; the model's first layer."""

    def __init__(self, mean, std):
        super().__init__()
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.dim() != 1 or mean.shape != std.shape or bool((std <= 0).any()):
            raise ValueError(f"Normalize needs 1-D mean and positive std of equal length, got {mean} and {std}")
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _tag(model: nn.Module, name: str, **kwargs) -> nn.Module:
    model.engine_arch = {"name": name, "kwargs": kwargs}
    return model


def lenet_mnist(num_classes: int = 10) -> nn.Sequential:
    """LeNet for (B, 1, 28, 28) MNIST pixels in [0, 1] -> (B, num_classes) logits."""
    model = nn.Sequential(
        Normalize(MNIST_MEAN, MNIST_STD),
        nn.Conv2d(1, 20, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )
    return _tag(model, "lenet_mnist", num_classes=num_classes)


def mlp_mnist(num_classes: int = 10, hidden: int = 1024) -> nn.Sequential:
    """Two-hidden-layer MLP for (B, 1, 28, 28) MNIST pixels in [0, 1] -> (B, num_classes)."""
    model = nn.Sequential(
        Normalize(MNIST_MEAN, MNIST_STD),
        nn.Flatten(),
        nn.Linear(784, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    return _tag(model, "mlp_mnist", num_classes=num_classes, hidden=hidden)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet body for 32x32 inputs (after normalisation)."""

    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for b in range(blocks):
                layers.append(BasicBlock(c_in, c_out, 2 if (stage > 0 and b == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_cifar(depth: int = 110, num_classes: int = 10) -> nn.Sequential:
    """CIFAR ResNet of ``depth`` = 6n + 2 layers for (B, 3, 32, 32) pixels in [0, 1]."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet_cifar depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
    model = nn.Sequential(Normalize(CIFAR10_MEAN, CIFAR10_STD), CifarResNet(depth, num_classes))
    return _tag(model, "resnet_cifar", depth=depth, num_classes=num_classes)


ARCHITECTURES = {
    "lenet_mnist": lenet_mnist,
    "mlp_mnist": mlp_mnist,
    "resnet_cifar": resnet_cifar,
}
# Short names used on the command line -> (constructor name, kwargs)
SHORT_NAMES = {
    "lenet": ("lenet_mnist", {}),
    "mlp": ("mlp_mnist", {}),
    "resnet20": ("resnet_cifar", {"depth": 20}),
    "resnet110": ("resnet_cifar", {"depth": 110}),
}


def build(name: str, **kwargs) -> nn.Module:
    """Build an architecture by constructor name or short name (lenet, mlp, resnet20, resnet110)."""
    if name in SHORT_NAMES:
        base, extra = SHORT_NAMES[name]
        return ARCHITECTURES[base](**{**extra, **kwargs})
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES) + sorted(SHORT_NAMES)}")
    return ARCHITECTURES[name](**kwargs)


def _normalization(model: nn.Module) -> dict | None:
    for m in model.modules():
        if isinstance(m, Normalize):
            return {"mean": m.mean.flatten().tolist(), "std": m.std.flatten().tolist()}
    return None


def save(model: nn.Module, path: str | os.PathLike, **meta) -> None:
    """Save ``model`` to a safetensors file with JSON metadata, atomically.

    The model must come from this module's constructors (it carries ``engine_arch``). ``meta`` holds
    any JSON-serialisable extras (``classes``, training settings, ...).
    """
    from safetensors.torch import save_file

    arch = getattr(model, "engine_arch", None)
    if arch is None:
        raise ValueError("save(): model has no engine_arch; build it with engine.models (lenet_mnist, resnet_cifar, ...)")
    header = {
        "format": FORMAT,
        "arch": arch["name"],
        "arch_kwargs": arch["kwargs"],
        "normalization": _normalization(model),
        "meta": meta,
    }
    try:
        header_json = json.dumps(header)
    except TypeError as exc:
        raise ValueError(f"save(): metadata must be JSON-serialisable: {exc}") from exc
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"engine": header_json})
    publish(tmp, path)


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON header of a checkpoint written by :func:`save` (arch, arch_kwargs, normalization, meta)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("engine")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file without engine metadata")
    header = json.loads(raw)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {header.get('format')!r}")
    return header


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save`; its header is available as ``model.engine_meta``."""
    from safetensors.torch import load_file

    header = read_meta(path)
    try:
        model = build(header["arch"], **header["arch_kwargs"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild architecture {header['arch']!r}: {exc}") from exc
    state = load_file(str(path), device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match {header['arch']}: {exc}") from exc
    model.engine_meta = header
    return model.to(device)


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one input of shape (C, H, W)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters(), None)
            model(torch.zeros((1,) + tuple(input_shape), device=p.device if p is not None else "cpu"))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
