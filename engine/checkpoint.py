"""Checkpoint files: safetensors tensors with JSON metadata, written atomically, and optimizer state inside them.

Shared by the training checkpoints of :mod:`engine.train` and the poisoning checkpoints of :mod:`engine.pacd`.
Each keeps its own layout on disk (the metadata entry, the tensor names, the metadata fields and their checks);
this module holds the mechanics both use:

- :func:`save`: tensors (detached, on the CPU, contiguous) and a JSON object under one metadata entry, written to a
  temporary file and published atomically (:func:`engine.fileio.publish`: fsync, rename).
- :func:`read`: the JSON object (and optionally the tensors) of a file, with one error per way a file can be
  unreadable, worded by the :class:`Layout` of its kind.
- :func:`optimizer_to_tensors` / :func:`optimizer_from_tensors`: an optimizer's ``state_dict`` as named tensors plus
  JSON (its param_groups, and its non-tensor state where a layout keeps that in the metadata), and back.

No pickle is involved.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .fileio import publish

__all__ = ["Layout", "save", "read", "read_tensors", "optimizer_to_tensors", "optimizer_from_tensors",
           "restore_tuples"]


@dataclass(frozen=True)
class Layout:
    """One kind of checkpoint file: the safetensors metadata entry holding its JSON object, and the errors it raises.

    The messages are format strings of ``path`` (and ``exc``, the underlying error; ``kind``, the JSON type found).
    ``missing``: the message where the entry is absent; None reads an absent or empty entry as {} (the caller's
    checks of the fields then say what is missing). ``no_file``: the message for a path that is no file; None
    leaves that to ``unreadable``.
    """

    key: str
    error: type[Exception]
    unreadable: str
    bad_json: str
    not_object: str
    missing: str | None = None
    no_file: str | None = None


def save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, key: str) -> None:
    """Write ``tensors`` and the JSON object ``meta`` (under the metadata entry ``key``) to ``path`` atomically: a
    temporary file beside it, fsync, rename. Tensors are stored detached, on the CPU, contiguous (copies, so that
    tensors sharing memory store apart)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={key: json.dumps(meta)})
    publish(tmp, path)


def read(path: str | os.PathLike, layout: Layout, *, tensors: bool = False) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """(metadata, tensors) of a checkpoint of ``layout``: the JSON object under ``layout.key`` and, with ``tensors``,
    every tensor (on the CPU; else None). A file that cannot be read, has no such entry (where ``layout.missing``
    is set), or whose entry is not a JSON object raises ``layout.error`` naming ``path``."""
    from safetensors import safe_open

    path = Path(path)
    if layout.no_file is not None and not path.is_file():
        raise layout.error(layout.no_file.format(path=path))
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(layout.key)
            loaded = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else None
    except Exception as exc:  # safetensors raises its own error types
        raise layout.error(layout.unreadable.format(path=path, exc=exc)) from exc
    if raw is None and layout.missing is not None:
        raise layout.error(layout.missing.format(path=path))
    try:
        meta = json.loads(raw) if raw or layout.missing is not None else {}
    except ValueError as exc:
        raise layout.error(layout.bad_json.format(path=path, exc=exc)) from None
    if not isinstance(meta, dict):
        raise layout.error(layout.not_object.format(path=path, kind=type(meta).__name__))
    return meta, loaded


def read_tensors(path: str | os.PathLike, error: type[Exception]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU); ``error`` naming ``path`` if they cannot be read."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise error(f"{path}: cannot read tensors ({exc})") from exc


def _json_safe(value):
    return list(value) if isinstance(value, tuple) else str(value)


def optimizer_to_tensors(
    state_dict: dict, prefix: str, sep: str, *, scalars_as_tensors: bool
) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[dict]]:
    """(tensors, scalars, param_groups) of an optimizer ``state_dict``.

    The state value ``key`` of parameter ``i`` is the tensor ``f"{prefix}{i}{sep}{key}"``; a value that is no tensor
    becomes a 0-d tensor there (``scalars_as_tensors``) or goes to ``scalars[str(i)][key]`` (JSON). The param_groups
    come back as JSON values (tuples as lists, anything JSON has no type for as its str)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for i, state in state_dict["state"].items():
        for key, val in state.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{prefix}{i}{sep}{key}"] = val
            elif scalars_as_tensors:
                tensors[f"{prefix}{i}{sep}{key}"] = torch.tensor(val)
            else:
                scalars.setdefault(str(i), {})[key] = val
    groups = json.loads(json.dumps(state_dict["param_groups"], default=_json_safe))
    return tensors, scalars, groups


def optimizer_from_tensors(
    tensors: dict[str, torch.Tensor], param_groups: list[dict], prefix: str, sep: str, *, scalars: dict | None = None
) -> dict:
    """The optimizer state_dict that :func:`optimizer_to_tensors` took apart: the tensors whose names start with
    ``prefix`` (others are ignored) and ``scalars``, with ``param_groups`` as given (see :func:`restore_tuples`).
    A malformed name or parameter index raises ValueError."""
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if name.startswith(prefix):
            i, key = name[len(prefix):].split(sep, 1)
            state.setdefault(int(i), {})[key] = val
    for i, values in (scalars or {}).items():
        state.setdefault(int(i), {}).update(values)
    return {"state": state, "param_groups": param_groups}


def restore_tuples(param_groups: list[dict], like: list[dict]) -> list[dict]:
    """``param_groups`` read from JSON, with a list turned back into a tuple wherever the optimizer's own groups
    (``like``, e.g. ``opt.param_groups``) hold a tuple (Adam's betas); changed in place and returned."""
    for group, current in zip(param_groups, like):
        for key, val in current.items():
            if isinstance(val, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    return param_groups
