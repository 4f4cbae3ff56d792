"""Builds tdiff._C (the C++ CPU kernels in csrc/) and packages kernels/ as tdiff.kernels.

  pip install torch==2.13.0 setuptools wheel ninja
  MAX_JOBS=2 pip install --no-build-isolation -e .     (or `.` for a regular install, or a wheel from the sdist)

torch must already be installed: the extension is compiled against the torch it finds, and the wheel then requires
exactly that torch version (its C++ ABI). Build isolation would hide the installed torch, so a build that cannot
import torch stops with an error that says what to do, instead of producing a wheel without the extension.

  TDIFF_NO_EXT=1   build without the extension (a pure-Python wheel); tdiff then warns once at import that the ops
                   run on their pure-PyTorch reference
  MAX_JOBS=N       parallel compile jobs (ninja)

There are no CUDA sources: on a GPU the ops run as Triton kernels (kernels/, installed as tdiff.kernels).
"""
import glob
import os
import re
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HOW_TO = ("install torch first (pip install torch==2.13.0 setuptools wheel ninja), then build against it with "
          "`MAX_JOBS=2 pip install --no-build-isolation .`; or set TDIFF_NO_EXT=1 to install without the "
          "extension (the ops then run on their slower pure-PyTorch reference)")
BASE_REQUIREMENTS = ["triton>=3.0", "numpy>=1.24", "scipy>=1.10", "fvcore>=0.1.5", "tqdm>=4.60",
                     "scikit-learn>=1.2", "matplotlib>=3.6", "safetensors>=0.4",
                     "threadpoolctl>=3.1", "daqp>=0.11"]


def loud(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\ntdiff: {message}\n{bar}\n", file=sys.stderr, flush=True)


class NoTorch(build_ext):
    """Stands in for torch's BuildExtension when torch is not importable: an sdist or the metadata need no torch,
    but building the extension does, so the build stops here rather than ship a wheel without tdiff._C."""

    def run(self):
        loud(f"cannot build the extension tdiff._C: torch is not importable in this build environment "
             f"(build isolation?). To fix: {HOW_TO}.")
        raise SystemExit(1)


def extension_and_requirements():
    if os.environ.get("TDIFF_NO_EXT") == "1":
        loud("TDIFF_NO_EXT=1: building WITHOUT the extension tdiff._C; the CPU ops will run on their pure-PyTorch "
             "reference (tdiff warns once at import).")
        return [], {}, ["torch>=2.4"]
    sources = sorted(glob.glob("csrc/*.cpp"))
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [Extension("tdiff._C", sources)], {"build_ext": NoTorch}, ["torch>=2.4"]

    class Build(BuildExtension):
        """Compiles each csrc/isa/<isa>.cpp with that instruction set's flags and links it into tdiff._C, after
        the baseline objects (so the linker keeps the baseline copy of any inline function they share). The
        extension still loads on any x86-64 machine: csrc/cpu_kernels.cpp picks the table at run time."""

        def run(self):
            try:
                super().run()
            except BaseException:
                loud(f"building the extension tdiff._C failed (see the compiler output above). A C++17 compiler "
                     f"is needed; or set TDIFF_NO_EXT=1 to install without it.")
                raise

        def build_extension(self, ext):
            flags = ext.extra_compile_args["cxx"]
            for isa, isa_flags in instruction_sets().items():
                # a flag this compiler does not know is left out: that file then builds without its extra path
                isa_flags = [f for f in isa_flags if f not in OPTIONAL_FLAGS or accepts(self.compiler, f)]
                ext.extra_objects += self.compiler.compile(
                    [f"csrc/isa/{isa.lower()}.cpp"], output_dir=self.build_temp, include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": flags + [f"-DCPU_CAPABILITY={isa}"] + isa_flags + QUIET},
                    depends=ext.depends)
            super().build_extension(ext)

    cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    if x86_64():
        cxx.append("-DTDIFF_X86_ISA")
    # csrc/isa/*.cpp are compiled apart, with their own flags (Build.build_extension)
    ext = CppExtension("tdiff._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                       include_dirs=[os.path.abspath("csrc")])
    ext.depends = sorted(glob.glob("csrc/**/*.h", recursive=True)) + sorted(glob.glob("csrc/isa/*.cpp"))
    # the extension is tied to the ABI of the torch it is compiled against: require that version
    built_with = torch.__version__.split("+")[0]
    return [ext], {"build_ext": Build.with_options(use_ninja=True)}, [f"torch=={built_with}"]


def x86_64() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


# ATen's vector headers trip these under the AVX-512 flags (intrinsics' masked-off lanes, #pragma unroll)
QUIET = ["-Wno-uninitialized", "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas"]


# flags a compiler may lack: csrc/isa/avx512_bf16.cpp then builds without the hardware bfloat16 narrowing
OPTIONAL_FLAGS = ["-mavx512bf16"]


def accepts(compiler, flag: str) -> bool:
    """Whether the C++ compiler of this build compiles an empty file with `flag`."""
    import subprocess

    try:
        return subprocess.run([compiler.compiler_so[0], flag, "-x", "c++", "-c", "-", "-o", os.devnull],
                              input=b"int f() { return 0; }\n", capture_output=True).returncode == 0
    except OSError:
        return False


def instruction_sets() -> dict:
    """The instruction sets the CPU kernels are compiled for, with ATen's flags for each (its CPU_CAPABILITY)."""
    isas = {"DEFAULT": []}
    if x86_64():
        isas["AVX2"] = ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c", "-mbmi2"]
        isas["AVX512"] = ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2",
                          "-mfma", "-mf16c", "-mbmi2"]
        # the AVX512 table's bfloat16 kernels again, with the hardware narrowing (used where the CPU has it)
        isas["AVX512_BF16"] = isas["AVX512"] + ["-mavx512bf16"]
    return isas


def version() -> str:
    with open(os.path.join("tdiff", "_version.py")) as f:  # setup.py runs in the project root
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


if __name__ == "__main__":  # as pip's build backend runs it (the tests import it to check the decisions above)
    ext_modules, cmdclass, torch_requirement = extension_and_requirements()
    setup(
        version=version(),
        # tdiff.weights holds data only: the shipped weights (default DiT, UNet, metric classifier)
        packages=find_packages(include=["tdiff", "tdiff.*"]) + ["tdiff.kernels", "tdiff.weights"],
        package_dir={"tdiff.kernels": "kernels"},
        package_data={"tdiff": ["py.typed"], "tdiff.weights": ["*.safetensors"]},
        install_requires=torch_requirement + BASE_REQUIREMENTS,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
