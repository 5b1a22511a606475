"""Launch helpers shared by the Triton kernels: where they can run, block sizes, argument checks."""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "gpu_sizing", "recording_for_gpu", "can_run", "require_runnable", "next_pow2", "as_index"]

GPU_SIZING_ENV = "ENGINE_TRITON_GPU_SIZING"


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def recording_for_gpu() -> bool:
    """True when the interpreter runs with the GPU's launch parameters (``ENGINE_TRITON_GPU_SIZING=1``):
    :mod:`engine.kernels.compile_check` records launches that way to compile them for a GPU target."""
    return interpreting() and os.environ.get(GPU_SIZING_ENV, "0") not in ("", "0")


def gpu_sizing() -> bool:
    """Whether launches use the GPU's block sizes, warps and operand types (CUDA, or recording)."""
    return not interpreting() or recording_for_gpu()


def can_run(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of ``device`` (CUDA, or any device when interpreting)."""
    return torch.device(device).type == "cuda" or interpreting()


def require_runnable(device: torch.device, what: str) -> None:
    """Raise a clear error when Triton cannot run ``what`` on ``device``."""
    if not can_run(device):
        raise RuntimeError(
            f"{what}: Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for the slow CPU interpreter); "
            f"got tensors on {torch.device(device)}"
        )


def next_pow2(n: int) -> int:
    n = max(1, int(n))
    return 1 << (n - 1).bit_length()


def as_index(name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Check that ``t`` is a 1-D int64 tensor; return it contiguous on ``device``."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
        raise ValueError(f"{name} must be a 1-D int64 tensor, got {getattr(t, 'shape', type(t))} {getattr(t, 'dtype', '')}")
    return t.to(device).contiguous()
