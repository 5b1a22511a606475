"""Model zoo, user architectures and checkpoints.

Every model takes pixels in [0, 1] and carries its input normalisation as its first layer
(:class:`Normalize`), so that smoothing noise is added in pixel space (Cohen et al. 2019).

- :func:`lenet_mnist`: Normalize - conv 20@5x5 - ReLU - maxpool 2 - conv 50@5x5 - ReLU - maxpool 2 -
  fc 500 - ReLU - fc 10 (an ``nn.Sequential``).
- :func:`mlp_mnist`: Normalize - Flatten - fc 1024 - ReLU - fc 1024 - ReLU - fc 10 (a second
  MNIST architecture, also sequential).
- :func:`resnet_cifar`: He et al.'s CIFAR ResNet (depth 6n+2: 20, 110, ...), basic blocks, 16-32-64
  channels, 1x1-conv + BatchNorm projection shortcuts.
- ``"torchvision.<name>"`` (e.g. ``torchvision.resnet50``; needs the optional torchvision,
  ``pip install pacd-engine[vision]``): a classification network of ``torchvision.models`` built with
  ``weights=None`` (nothing is ever downloaded) behind ImageNet's mean/std: ``nn.Sequential(normalize=
  Normalize, net=<the torchvision network>)``. ``num_classes`` defaults to 10 as for every constructor
  here; pass ``num_classes=1000`` to load ImageNet weights as torchvision publishes them.
- :func:`register` (name, constructor): a user's own architecture under a name that :func:`build`,
  :func:`save`, :func:`load` and the command line's ``--arch`` understand.

:func:`build` makes any of them by name (short names ``lenet``, ``mlp``, ``resnet20``, ``resnet110``);
:func:`architectures` lists the names.

:func:`save` writes a zoo model as a safetensors file with JSON metadata (architecture, classes,
normalisation, training settings). :func:`load` reads those, and also, given the architecture
(``arch=``), weights saved elsewhere: a safetensors file without the engine's metadata, or a PyTorch
``state_dict`` file (``torch.save(model.state_dict(), path)``), read only through
``torch.load(..., weights_only=True)``: a file that would need unpickling code is refused and nothing in
it runs. No pickle is ever executed.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
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
    "register",
    "unregister",
    "architectures",
    "ARCHITECTURES",
    "save",
    "load",
    "read_meta",
    "count_macs",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CheckpointError",
]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FORMAT = "engine.model/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or does not match its architecture."""


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on (B, C, H, W) pixels in [0, 1]; the model's first layer."""

    def __init__(self, mean, std):
        super().__init__()
        # checked on the CPU, then put where modules are being built (also the meta device: see load)
        mean = torch.as_tensor(mean, dtype=torch.float32, device="cpu")
        std = torch.as_tensor(std, dtype=torch.float32, device="cpu")
        if mean.dim() != 1 or mean.shape != std.shape or bool((std <= 0).any()):
            raise ValueError(f"Normalize needs 1-D mean and positive std of equal length, got {mean} and {std}")
        device = torch.get_default_device()
        self.register_buffer("mean", mean.view(1, -1, 1, 1).to(device))
        self.register_buffer("std", std.view(1, -1, 1, 1).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _size(owner: str, name: str, value) -> None:
    """ValueError unless ``value`` is an integer >= 1 (a layer width or a number of classes of ``owner``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")


def _tag(model: nn.Module, name: str, **kwargs) -> nn.Module:
    model.engine_arch = {"name": name, "kwargs": kwargs}
    return model


def lenet_mnist(num_classes: int = 10) -> nn.Sequential:
    """LeNet for (B, 1, 28, 28) MNIST pixels in [0, 1] -> (B, num_classes) logits."""
    _size("lenet_mnist", "num_classes", num_classes)
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
    _size("mlp_mnist", "num_classes", num_classes)
    _size("mlp_mnist", "hidden", hidden)
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
    _size("resnet_cifar", "num_classes", num_classes)
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
TORCHVISION_PREFIX = "torchvision."
VISION_EXTRA = "pip install pacd-engine[vision]"
_REGISTERED: dict[str, Callable[..., nn.Module]] = {}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def register(name: str, constructor: Callable[..., nn.Module], *, replace: bool = False) -> None:
    """Make ``constructor(**kwargs) -> nn.Module`` an architecture called ``name``.

    :func:`build`, :func:`save` / :func:`load` (the name and the JSON-serialisable kwargs go into the
    checkpoint's header) and the command line's ``--arch name`` then know it; a process loading such a
    checkpoint must register the same name first (from the command line: a small launcher script that
    calls ``register`` and then ``engine.cli.main()``). The model must keep the engine's convention:
    pixels in [0, 1] in, ``Normalize`` as its first layer, logits out (checked on every build).
    ``name`` is a letter or ``_`` followed by letters, digits, ``_`` or ``-``; the zoo's names and
    ``torchvision.*`` are taken, and an earlier registration is replaced only with ``replace=True``.
    :func:`load` calls the constructor on the meta device first (``with torch.device("meta")``: names and shapes,
    no memory) to check a file's shapes before building the model for real; one that cannot run there (it computes
    with its weights) is then only built for real.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"register(): name must be a letter or '_' then letters, digits, '_' or '-', got {name!r}")
    if name in ARCHITECTURES or name in SHORT_NAMES:
        raise ValueError(f"register(): {name!r} is a built-in architecture of engine.models")
    if not callable(constructor):
        raise ValueError(f"register(): constructor of {name!r} must be callable, got {type(constructor).__name__}")
    if name in _REGISTERED and not replace and _REGISTERED[name] is not constructor:
        raise ValueError(f"register(): {name!r} is already registered; pass replace=True to replace it")
    _REGISTERED[name] = constructor


def unregister(name: str) -> None:
    """Forget an architecture registered with :func:`register` (KeyError if there is none)."""
    if name not in _REGISTERED:
        raise KeyError(f"no registered architecture {name!r}")
    del _REGISTERED[name]


def _torchvision_models(name: str):
    try:
        import torchvision.models as tvm
    except Exception as exc:  # not installed, or installed for another torch (its C++ ops fail to load)
        raise ValueError(
            f"architecture {name!r} needs torchvision, which is an optional dependency: {VISION_EXTRA} "
            f"(importing it failed: {type(exc).__name__}: {exc})"
        ) from exc
    return tvm


def _torchvision_names(tvm) -> list[str]:
    return sorted(tvm.list_models(module=tvm))  # classification networks only


def _torchvision_check(name: str):
    tvm = _torchvision_models(name)
    short = name[len(TORCHVISION_PREFIX) :]
    names = _torchvision_names(tvm)
    if short not in names:
        raise ValueError(
            f"unknown torchvision architecture {name!r}: torchvision.models has no classification model "
            f"{short!r} (it has {len(names)}, e.g. {', '.join(TORCHVISION_PREFIX + n for n in names[:6])})"
        )
    return tvm


def _torchvision_model(name: str, num_classes: int = 10, **kwargs) -> nn.Sequential:
    """torchvision's ``name`` (``torchvision.<model>``) with ``weights=None`` behind ImageNet's Normalize."""
    if "weights" in kwargs or "pretrained" in kwargs:
        raise ValueError(
            f"{name}: the engine builds torchvision models without weights and never downloads any; load "
            f"published weights from a file with engine.models.load(path, arch={name!r}, num_classes=...)"
        )
    tvm = _torchvision_check(name)
    net = tvm.get_model(name[len(TORCHVISION_PREFIX) :], weights=None, num_classes=num_classes, **kwargs)
    model = nn.Sequential(OrderedDict(normalize=Normalize(IMAGENET_MEAN, IMAGENET_STD), net=net))
    return _tag(model, name, num_classes=num_classes, **kwargs)


def architectures(torchvision: bool = True) -> list[str]:
    """Every name :func:`build` knows: the zoo's constructors and short names, registered ones, and
    (with ``torchvision`` and torchvision importable) ``torchvision.<name>`` for its classification models."""
    names = sorted(ARCHITECTURES) + sorted(SHORT_NAMES) + sorted(_REGISTERED)
    if torchvision:
        try:
            tvm = _torchvision_models(TORCHVISION_PREFIX + "*")
        except ValueError:
            return names
        names += [TORCHVISION_PREFIX + n for n in _torchvision_names(tvm)]
    return names


def _resolve(name) -> tuple[str, Callable[..., nn.Module], dict]:
    """(the name its checkpoints record, constructor, the name's fixed kwargs); ValueError if unknown."""
    if not isinstance(name, str):
        raise ValueError(f"architecture name must be a string, got {type(name).__name__}")
    if name in SHORT_NAMES:
        base, extra = SHORT_NAMES[name]
        return base, ARCHITECTURES[base], dict(extra)
    if name in ARCHITECTURES:
        return name, ARCHITECTURES[name], {}
    if name in _REGISTERED:
        return name, _REGISTERED[name], {}
    if name.startswith(TORCHVISION_PREFIX):
        _torchvision_check(name)
        return name, lambda **kw: _torchvision_model(name, **kw), {}
    raise ValueError(
        f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES) + sorted(SHORT_NAMES) + sorted(_REGISTERED)}, "
        f"torchvision.<model> (with {VISION_EXTRA}), or one registered with engine.models.register(name, constructor)"
    )


def _first_leaf(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if next(m.children(), None) is None), None)


def build(name: str, **kwargs) -> nn.Module:
    """Build an architecture by name: a zoo constructor (lenet_mnist, mlp_mnist, resnet_cifar), a short
    name (lenet, mlp, resnet20, resnet110), ``torchvision.<model>`` or a name given to :func:`register`;
    ``kwargs`` go to the constructor (e.g. ``num_classes``)."""
    _, constructor, extra = _resolve(name)
    model = constructor(**{**extra, **kwargs})
    if name in _REGISTERED:
        if not isinstance(model, nn.Module):
            raise ValueError(f"the constructor registered as {name!r} returned {type(model).__name__}, not an nn.Module")
        if not isinstance(_first_leaf(model), Normalize):
            raise ValueError(
                f"the model registered as {name!r} must take pixels in [0, 1] and carry its input normalisation as "
                "its first layer: make engine.models.Normalize(mean, std) its first module, e.g. "
                "nn.Sequential(Normalize(mean, std), net)"
            )
        _tag(model, name, **kwargs)
    return model


def _normalization(model: nn.Module) -> dict | None:
    for m in model.modules():
        if isinstance(m, Normalize):
            return {"mean": m.mean.flatten().tolist(), "std": m.std.flatten().tolist()}
    return None


def save(model: nn.Module, path: str | os.PathLike, **meta) -> None:
    """Save ``model`` to a safetensors file with JSON metadata, atomically.

    The model must be one :func:`build` can make again (a zoo constructor, ``torchvision.<model>`` or a
    registered architecture: it carries ``engine_arch``, its name and kwargs). ``meta`` holds any
    JSON-serialisable extras (``classes``, training settings, ...). For any other ``nn.Module`` save its
    weights yourself (``torch.save(model.state_dict(), path)`` or safetensors) and read them with
    ``load(path, arch=NAME)``, NAME an architecture that builds the same module (e.g. after
    :func:`register`).
    """
    from safetensors.torch import save_file

    arch = getattr(model, "engine_arch", None)
    if arch is None:
        raise ValueError(
            f"save(): this {type(model).__name__} has no engine_arch, so its checkpoint could not say how to rebuild it; "
            "engine.models.save takes models made by engine.models.build (zoo, torchvision.<model>, registered). "
            "Either register its constructor (engine.models.register('mynet', make_mynet)) and build it with "
            "engine.models.build('mynet'), or save its weights with torch.save(model.state_dict(), path) (or "
            "safetensors.torch.save_file) and load them with engine.models.load(path, arch=NAME)"
        )
    try:
        _resolve(arch["name"])
    except ValueError as exc:
        raise ValueError(f"save(): cannot save architecture {arch['name']!r}: {exc}") from exc
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


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file (8-byte header length, then a JSON object); a CheckpointError
    where it does but ends inside the header it announces (a file cut short)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n, size = int.from_bytes(head[:8], "little"), path.stat().st_size
    if 0 < n <= size - 8:
        return True
    if size - 8 < n <= 100_000_000:  # (safetensors' largest header)
        raise CheckpointError(f"{path}: a safetensors file cut short: its header is to take {n} bytes, the file ends after "
                              f"{size - 8}; copy or download it again")
    return False


def _engine_header(path: Path) -> dict | None:
    """The engine header of a safetensors file (None: a safetensors file without one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("engine")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if raw is None:
        return None
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: damaged engine metadata ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged engine metadata (a JSON {type(header).__name__}, not an object)")
    fmt = header.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {_brief(fmt)}")
    _check_header(header, path)
    return header


def _brief(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_header(header: dict, path: Path) -> None:
    """CheckpointError naming ``path`` unless the engine header has the fields and types :func:`save` writes: ``arch`` a
    name, ``arch_kwargs`` an object (or absent), ``normalization`` an object or null, ``meta`` an object. (The values
    of ``arch_kwargs`` are the constructor's to check, when :func:`load` builds the architecture without memory.)"""
    checks = {
        "arch": lambda v: isinstance(v, str) and v != "",
        "arch_kwargs": lambda v: v is None or isinstance(v, dict),
        "normalization": lambda v: v is None or isinstance(v, dict),
        "meta": lambda v: isinstance(v, dict),
    }
    bad = [k for k, ok in checks.items() if not ok(header.get(k))]
    if bad:
        raise CheckpointError(
            f"{path}: engine metadata missing or malformed: {', '.join(f'{k}={_brief(header.get(k))}' for k in bad)} "
            "(engine.models.save writes arch a name, arch_kwargs and meta JSON objects); the file was edited or damaged"
        )


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON header of a checkpoint written by :func:`save` (arch, arch_kwargs, normalization, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not _is_safetensors(path):
        raise CheckpointError(f"{path}: not a safetensors file")
    header = _engine_header(path)
    if header is None:
        raise CheckpointError(f"{path}: safetensors file without engine metadata")
    return header


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def _torch_load(path: Path):
    """``torch.load(path, map_location="cpu", weights_only=True)``; a refusal becomes a CheckpointError."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused or not a pickle), RuntimeError (damaged zip), EOFError
        text = str(exc)
        found = _GLOBAL.search(text)
        if found:
            raise CheckpointError(
                f"{path}: refused: it is a pickle that would run code to load (it calls or builds the global "
                f"{found.group(1)}, which torch.load(weights_only=True) does not allow); nothing in it was run. Save "
                "the weights alone (torch.save(model.state_dict(), path), tensors only) or as safetensors"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        detail = " ".join((detail.group(1) if detail else text.strip().splitlines()[0] if text.strip() else
                           type(exc).__name__).split())
        raise CheckpointError(
            f"{path}: neither a safetensors file nor a PyTorch weights file that torch.load(weights_only=True) "
            f"accepts ({detail}); nothing in it was run"
        ) from None


def _state_dict_of(obj, path: Path) -> dict:
    """The tensors of a loaded file: a state_dict, or one under 'state_dict' / 'model_state_dict' / 'model'."""
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            keys = [k for k in obj if not isinstance(obj[k], torch.Tensor)][:5]
            raise CheckpointError(
                f"{path}: not a state_dict: a dict with non-tensor entries ({', '.join(map(repr, keys))}, ...) and no "
                f"weights under {' / '.join(map(repr, _WRAPPER_KEYS))}"
            )
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: not a state_dict (a dict of parameter names to tensors): found {type(obj).__name__}"
                              f"{' (empty)' if isinstance(obj, Mapping) else ''}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state_dict: {len(bad)} entries are not named tensors (e.g. {bad[0]!r})")
    return dict(obj)


def _body_prefix(model: nn.Module) -> str | None:
    """For ``Sequential(Normalize, body)`` the prefix of the body's keys ("net." for torchvision models)."""
    if not isinstance(model, nn.Sequential) or len(model) != 2 or not isinstance(model[0], Normalize):
        return None
    return list(model._modules)[1] + "."


def _short(keys, k: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:k]) + (f" and {len(keys) - k} more" if len(keys) > k else "")


def _fit(model: nn.Module, state: dict, path: Path, label: str, *, tolerant: bool, check_only: bool = False) -> None:
    """Load ``state`` into ``model`` (strict); one CheckpointError listing missing, unexpected and wrongly shaped keys.

    ``check_only``: compare the names and shapes alone, e.g. of a model built on the meta device with the tensors a
    safetensors header describes (:func:`_stored_shapes`), before anything of their size exists.

    ``tolerant`` (files from elsewhere): a ``module.`` prefix on every key (DataParallel) is dropped; for a
    ``Sequential(Normalize, body)`` the state_dict of the body alone is accepted (torchvision's published
    weights for the ``net`` of a torchvision model), the normalisation then being the architecture's; and
    BatchNorm's ``num_batches_tracked`` counters may be absent."""
    expected = model.state_dict()
    state = dict(state)  # the caller's dict stays as it was (a check is followed by the load of the same state)
    if tolerant:
        if all(k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}
        body = _body_prefix(model)
        if body is not None and not any(k.startswith(body) for k in state):
            as_body = {body + k: v for k, v in state.items()}
            if len(as_body.keys() & expected.keys()) > len(state.keys() & expected.keys()):
                norm = list(model._modules)[0] + "."
                state = {**{k: v for k, v in expected.items() if k.startswith(norm)}, **as_body}
        for k, v in expected.items():
            if k.endswith(".num_batches_tracked") and k not in state:
                state[k] = v
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {list(state[k].shape)} (model {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_short(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_short(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape ({_short(wrong, 3)})")
        raise CheckpointError(f"{path}: weights do not match {label}: {'; '.join(parts)}")
    if check_only:
        return
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match {label}: {exc}") from exc


def _arch_label(name: str, kwargs: dict) -> str:
    return name + (f" {json.dumps(kwargs, sort_keys=True)}" if kwargs else "")


def _label_of(model: nn.Module, arch: str) -> str:
    """How messages name the architecture of a built model (its engine_arch name and kwargs)."""
    tag = getattr(model, "engine_arch", None)
    return _arch_label(tag["name"], tag["kwargs"]) if tag else arch


def _stored_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors of their shapes, from its header: nothing is read or allocated."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _build(name, kwargs: dict, path: Path | None = None, *, meta: bool = False) -> nn.Module | None:
    """:func:`build` for :func:`load`. ``meta``: on the meta device, i.e. names and shapes without memory, so that a
    file's shapes are checked before anything of its architecture's size is allocated; None where the constructor
    does not run there (a registered one that computes with its weights), which is then built for real after all.

    What cannot be built is, for the architecture a checkpoint records (``path`` given), a CheckpointError naming the
    file; for the caller's ``arch``, a ValueError (an unknown name as :func:`build` words it)."""
    try:
        if not meta:
            return build(name, **kwargs)
        with torch.device("meta"):
            return build(name, **kwargs)
    except (ValueError, TypeError) as exc:
        if path is not None:
            raise CheckpointError(f"{path}: cannot rebuild architecture {_brief(name)}: {exc}") from exc
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"cannot build {_arch_label(name, kwargs)}: {exc}") from exc
    except (RuntimeError, MemoryError, OverflowError, NotImplementedError) as exc:
        if meta:
            return None
        if path is not None:
            raise CheckpointError(f"{path}: cannot rebuild architecture {_arch_label(name, kwargs)}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        raise ValueError(f"cannot build {_arch_label(name, kwargs)}: {type(exc).__name__}: {exc}") from exc


def load(path: str | os.PathLike, arch: str | None = None, device: str | torch.device = "cpu", **arch_kwargs) -> nn.Module:
    """Read a model: a checkpoint written by :func:`save`, or weights from elsewhere given ``arch``.

    Args:
        path: one of
            - a checkpoint of :func:`save` (safetensors with the engine's header): rebuilt as recorded;
              ``arch`` / ``arch_kwargs`` may be left out and, if given, must agree with the header;
            - a safetensors file without the engine's header, or a PyTorch ``state_dict`` file
              (``torch.save(model.state_dict(), path)``), read with ``torch.load(path, map_location="cpu",
              weights_only=True)`` only: a file that would need unpickling code (a pickled module or any
              other object) is refused with a CheckpointError naming the global it needs, and none of it is
              run. Accepted as well: the state_dict under "state_dict" / "model_state_dict" / "model" of a
              dict, a "module." prefix on every key (DataParallel), for ``Sequential(Normalize, body)`` models
              (torchvision.*, resnet_cifar) the state_dict of the body alone (its normalisation then the
              architecture's), and absent BatchNorm ``num_batches_tracked`` counters.
        arch: architecture name for :func:`build` (needed for files without the engine's header).
        device: where the model goes.
        **arch_kwargs: constructor arguments, e.g. ``num_classes=1000`` for ImageNet weights.

    Returns:
        the model; ``model.engine_meta`` holds the header (for other files: arch, arch_kwargs,
        normalization, empty meta and ``source`` "safetensors" or "state_dict").

    Raises:
        CheckpointError: a missing, unreadable, truncated or refused file, a header with missing or malformed
            fields or an architecture it cannot be rebuilt from, no ``arch`` for a file without the engine's
            header, an ``arch`` that disagrees with the header, or weights that do not fit (one message
            listing missing, unexpected and wrongly shaped keys). The architecture is built on the meta device
            first (no memory) and its shapes compared with the file's, so that a header or arguments asking
            for a huge model are refused before anything of its size is allocated.
        ValueError: an unknown ``arch``, or ``arch_kwargs`` its constructor refuses.
    """
    from safetensors.torch import load_file

    path = Path(path)
    from .validate import check_device

    device = check_device(device)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    header = None
    if _is_safetensors(path):
        header = _engine_header(path)  # its fields and types checked
        source = "safetensors"
    else:
        source = "state_dict"
    # Every architecture is first built on the meta device (no memory) and its names and shapes checked against the
    # file's, so that metadata or arguments asking for a huge model fail on the weights before anything is allocated.
    if header is not None:
        stored = header.get("arch_kwargs") or {}
        skeleton = _build(header["arch"], stored, path, meta=True)
        model = None if skeleton is not None else _build(header["arch"], stored, path)  # (no meta build: for real)
        if arch is not None:  # the architecture asked for, with its constructor's defaults, must be the one recorded
            requested = _build(arch, arch_kwargs, meta=True)
            if requested is None:
                requested = _build(arch, arch_kwargs)
            recorded = (skeleton if skeleton is not None else model).engine_arch
            asked = getattr(requested, "engine_arch", {"name": arch, "kwargs": arch_kwargs})
            if json.dumps([asked["name"], asked["kwargs"]], sort_keys=True) != json.dumps(
                    [recorded["name"], recorded["kwargs"]], sort_keys=True):
                raise CheckpointError(
                    f"{path} is an engine checkpoint of {_arch_label(header['arch'], stored)}, not of "
                    f"{_arch_label(asked['name'], asked['kwargs'])}; leave out arch (CLI: --arch) to use the "
                    f"architecture it records"
                )
        if skeleton is not None:
            _fit(skeleton, _stored_shapes(path), path, header["arch"], tolerant=False, check_only=True)
            model = _build(header["arch"], stored, path)
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensors ({exc})") from exc
        _fit(model, state, path, header["arch"], tolerant=False)
        model.engine_meta = header
        return model.to(device)
    state = _stored_shapes(path) if source == "safetensors" else _state_dict_of(_torch_load(path), path)
    if arch is None:
        what = "a safetensors file without the engine's metadata" if source == "safetensors" else "a PyTorch state_dict"
        raise CheckpointError(
            f"{path}: {what} does not say which architecture its weights are for: pass arch=NAME "
            f"(CLI: --arch NAME), e.g. lenet, mlp, resnet20, resnet110, torchvision.<model> or a registered name"
        )
    skeleton = _build(arch, arch_kwargs, meta=True)
    if skeleton is not None:
        _fit(skeleton, state, path, _label_of(skeleton, arch), tolerant=True, check_only=True)
    model = _build(arch, arch_kwargs)
    if source == "safetensors":
        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensors ({exc})") from exc
    name = model.engine_arch["name"] if hasattr(model, "engine_arch") else arch
    _fit(model, state, path, _label_of(model, arch), tolerant=True)
    model.engine_meta = {
        "format": None,
        "arch": name,
        "arch_kwargs": getattr(model, "engine_arch", {}).get("kwargs", dict(arch_kwargs)),
        "normalization": _normalization(model),
        "meta": {},
        "source": source,
    }
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
