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
    sources = sorted(glob.glob("csrc/*.cpp"))  # csrc/isa/*.cpp are compiled apart, with their own flags
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    build_cuda = bool(cuda_sources) and (torch.version.cuda is not None or os.environ.get("TDIFF_FORCE_CUDA") == "1")
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    if x86_64():
        cxx.append("-DTDIFF_X86_ISA")
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"], include_dirs=[os.path.abspath("csrc")])
    if build_cuda:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3"]
        ext = CUDAExtension("tdiff._C", sources + cuda_sources, **kwargs)
    else:
        ext = CppExtension("tdiff._C", sources, **kwargs)
    # ninja honours MAX_JOBS

    class BuildWithInstructionSets(BuildExtension):
        """Compiles each csrc/isa/<isa>.cpp with that instruction set's flags and links it into tdiff._C, after
        the baseline objects (so the linker keeps the baseline copy of any inline function they share). The
        extension still loads on any x86-64 machine: csrc/cpu_kernels.cpp picks the table at run time."""

        def build_extension(self, ext):
            flags = ext.extra_compile_args["cxx"]
            for isa, isa_flags in instruction_sets().items():
                ext.extra_objects += self.compiler.compile(
                    [f"csrc/isa/{isa.lower()}.cpp"], output_dir=self.build_temp, include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": flags + [f"-DCPU_CAPABILITY={isa}"] + isa_flags + QUIET}, depends=ext.depends)
            super().build_extension(ext)

    ext.depends = sorted(glob.glob("csrc/**/*.h", recursive=True)) + sorted(glob.glob("csrc/isa/*.cpp"))
    return [ext], {"build_ext": BuildWithInstructionSets.with_options(use_ninja=True)}


def x86_64() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


# ATen's vector headers trip these under the AVX-512 flags (intrinsics' masked-off lanes, #pragma unroll)
QUIET = ["-Wno-uninitialized", "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas"]


def instruction_sets() -> dict:
    """The instruction sets the CPU kernels are compiled for, with ATen's flags for each (its CPU_CAPABILITY)."""
    isas = {"DEFAULT": []}
    if x86_64():
        isas["AVX2"] = ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c", "-mbmi2"]
        isas["AVX512"] = ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2",
                          "-mfma", "-mf16c", "-mbmi2"]
    return isas


ext_modules, cmdclass = extensions()
setup(
    packages=find_packages(include=["tdiff", "tdiff.*"]) + ["tdiff.kernels"],
    package_dir={"tdiff.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
