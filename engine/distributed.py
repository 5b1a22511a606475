"""torch.distributed for the engine's data-parallel work: who this process is, and starting from torchrun's environment.

The engine runs on the process groups users already know: ``torchrun --nproc-per-node=G -m engine certify ...``
(or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``), NCCL on
GPUs and gloo on CPUs. Library functions such as :func:`engine.certify_dataset` split their work over the ranks
of an initialised default process group (the caller's) and give every rank the whole result.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os

import torch

__all__ = ["world", "env_world_size", "init_from_env", "check_same", "first_error", "DEFAULT_TIMEOUT"]

# ranks wait for each other at the end of a run (the slowest share decides): a day, not torch's 10-30 minutes
DEFAULT_TIMEOUT = datetime.timedelta(hours=24)


def world(distributed: bool | None = None) -> tuple[int, int]:
    """(rank, world size) of this process: the default process group's when it is initialised and ``distributed``
    is None or True, else (0, 1). ``distributed=True`` without an initialised group is a ValueError."""
    import torch.distributed as dist

    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    up = dist.is_available() and dist.is_initialized()
    if distributed and not up:
        raise ValueError("distributed=True needs an initialised default process group (torch.distributed."
                         "init_process_group, e.g. under torchrun)")
    if distributed is False or not up:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def env_world_size() -> int:
    """WORLD_SIZE of a torchrun-style launch (1 when unset); a value that is not a positive integer is a ValueError."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"WORLD_SIZE={text!r} is not a positive integer")
    return size


def init_from_env(device: torch.device, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> torch.device:
    """Join the default process group of a torchrun-style launch (WORLD_SIZE > 1) and return this rank's device.

    ``device``: the device asked for; CUDA becomes ``cuda:LOCAL_RANK`` with NCCL, anything else stays with gloo.
    Does nothing (returns ``device``) for a single process or when a group is already initialised.
    """
    import torch.distributed as dist

    if env_world_size() == 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed, but WORLD_SIZE > 1")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {', '.join(missing)} unset: start the processes with torchrun")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return device


def check_same(what: str, value) -> None:
    """Refuse (ValueError on every rank) unless every rank of the default group passes the same ``value`` (anything
    JSON can write; compared by digest): data-parallel work summed over ranks that run different calls would be
    silently wrong. A collective: every rank must call it."""
    import torch.distributed as dist

    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"{what} differ between the ranks (rank 0 and ranks {differ}): every rank must make the same "
                         "call with the same arguments (or pass distributed=False to run alone)")


def first_error(error: BaseException | None) -> str | None:
    """Every rank's outcome of a step that may fail on some ranks only: the first failure's message (with its rank),
    or None when all succeeded. A collective that also stands for a barrier."""
    import torch.distributed as dist

    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    return next((f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None), None)
