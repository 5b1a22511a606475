"""Loading of the compiled extension ``engine._C`` with a pure-PyTorch fallback, and of the Triton kernels
(``engine.kernels``) from an uninstalled source tree.

Importing :mod:`engine` tries to load the extension once. When it is missing (not built, or built
for another torch) the engine warns once and every op runs on its plain-PyTorch path.
"""

from __future__ import annotations

import os
import warnings

__all__ = ["available", "require", "load_error", "has_cuda_ops", "cpu_isa"]

_state: dict = {"tried": False, "ok": False, "error": None}


def _load() -> None:
    if _state["tried"]:
        return
    _state["tried"] = True
    if os.environ.get("ENGINE_DISABLE_EXTENSION", "0") == "1":
        _state["error"] = "disabled by ENGINE_DISABLE_EXTENSION=1"
        return
    try:
        from . import _C  # noqa: F401  (loading the library registers the torch.ops.engine ops)
    except ImportError as exc:  # not built, or built against another torch
        _state["error"] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "engine._C is not available (" + _state["error"] + "); using the pure-PyTorch paths. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    from . import ops  # noqa: F401  (fake kernels for torch.compile / opcheck)

    _state["ok"] = True


def available() -> bool:
    """True when ``engine._C`` loaded and its ops are registered under ``torch.ops.engine``."""
    _load()
    return _state["ok"]


def load_error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    _load()
    return _state["error"]


def require(what: str) -> None:
    """Raise a clear error naming ``what`` when the extension is missing."""
    if not available():
        raise RuntimeError(f"{what} needs the compiled extension engine._C, which is unavailable: {_state['error']}")


def has_cuda_ops() -> bool:
    """True when the extension was built with its CUDA sources."""
    if not available():
        return False
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("engine::noisy_batch", "CUDA")


CPU_ISAS = ("avx512", "avx2", "generic")  # the variants of engine::conv_pool_relu, best first


def cpu_isa(supported: bool = False) -> str | None:
    """The variant of the CPU op ``engine::conv_pool_relu`` that runs now: "avx512", "avx2" or "generic".

    ``ENGINE_CPU_ISA=avx512|avx2|generic`` (read at every call) asks for a variant; a request above what the CPU
    supports is lowered to the best it runs, so this says which one runs (``native`` or unset: the best;
    any other value raises). ``supported=True``: the best variant this CPU can run, whatever is requested.
    None when the extension is unavailable.
    """
    if not available():
        return None
    import torch

    return str(torch.ops.engine.cpu_isa(supported))


def kernels_from_the_source_tree() -> None:
    """``engine.kernels`` is the repository's top-level ``kernels/`` folder, which installs (editable or not) map
    under this package. Imported from a source tree that was not installed (``PYTHONPATH=.``), register it here."""
    import importlib.util
    import os
    import sys

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")  # beside engine/
    if "engine.kernels" in sys.modules or not os.path.isfile(os.path.join(src, "__init__.py")):
        return
    if importlib.util.find_spec("engine.kernels") is None:
        spec = importlib.util.spec_from_file_location("engine.kernels", os.path.join(src, "__init__.py"),
                                                      submodule_search_locations=[src])
        module = importlib.util.module_from_spec(spec)
        sys.modules["engine.kernels"] = module
        spec.loader.exec_module(module)
        setattr(sys.modules["engine"], "kernels", module)
