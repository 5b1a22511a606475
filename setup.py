"""Build the extension ``engine._C`` (the package's metadata lives in pyproject.toml).

``csrc/*.cpp`` always build (CppExtension). ``csrc/**/*.cu`` are added (CUDAExtension) only when
torch is a CUDA build and CUDA_HOME is set. ``ENGINE_SKIP_EXTENSION=1`` skips the extension entirely
(the package then runs on its pure-PyTorch paths); ``ENGINE_SKIP_CUDA_BUILD=1`` skips only the CUDA
sources.
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("ENGINE_SKIP_EXTENSION", "0") == "1":
        print("ENGINE_SKIP_EXTENSION=1: not building engine._C")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    use_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("ENGINE_SKIP_CUDA_BUILD", "0") != "1"
    )
    # No FMA contraction: the noise stream must round every multiply and add on its own.
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
    kwargs = dict(
        name="engine._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if use_cuda:
        nvcc = ["-O3", "-std=c++17", "-fmad=false", "--expt-relaxed-constexpr", "-DENGINE_WITH_CUDA"]
        ext = CUDAExtension(
            sources=sources + cuda_sources, extra_compile_args={"cxx": cxx + ["-DENGINE_WITH_CUDA"], "nvcc": nvcc}, **kwargs
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
