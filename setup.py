"""Builds tdiff._C (the C++ CPU kernels in csrc/) and packages kernels/ as tdiff.kernels.

  MAX_JOBS=2 pip install --no-build-isolation -e .    (torch must already be installed: build isolation would
                                                       fetch a different torch into the build environment)
  TDIFF_NO_EXT=1       skip the extension; the library then runs on its pure-PyTorch reference ops
  TDIFF_FORCE_CUDA=1   build csrc/cuda/*.cu even when torch has no CUDA (needs CUDA headers in torch)
"""
import glob
import os
import sys

from setuptools import find_packages, setup


def extensions():
    if os.environ.get("TDIFF_NO_EXT") == "1":
        print("tdiff: TDIFF_NO_EXT=1, not building tdiff._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("tdiff: torch is not importable in the build environment; not building tdiff._C "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    build_cuda = bool(cuda_sources) and (torch.version.cuda is not None or os.environ.get("TDIFF_FORCE_CUDA") == "1")
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], include_dirs=[os.path.abspath("csrc")])
    if build_cuda:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3"]
        ext = CUDAExtension("tdiff._C", sources + cuda_sources, **kwargs)
    else:
        ext = CppExtension("tdiff._C", sources, **kwargs)
    # ninja honours MAX_JOBS
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(
    packages=find_packages(include=["tdiff", "tdiff.*"]) + ["tdiff.kernels"],
    package_dir={"tdiff.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
