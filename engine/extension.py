"""The compiled extension ``engine._C``: whether it loaded, why not, and what it was built with.

The public face of the loader :mod:`engine._ext` (importing :mod:`engine` tries the extension once; without it every
op runs on its pure-PyTorch path).
"""

from ._ext import available, cpu_isa, has_cuda_ops, load_error, require

__all__ = ["available", "require", "load_error", "has_cuda_ops", "cpu_isa"]
