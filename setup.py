"""Builds mistral_ext._C, the torch extension, from the same csrc/ sources as the CMake library.

CPU-only when the installed torch has no CUDA; CPU + CUDA when it has. The CUDA architectures
come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"). Build without isolation so the extension
compiles against the torch that is installed:  pip install --no-build-isolation -e .
"""
import glob
import os
import shlex
import subprocess

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    choice = os.environ.get("MISTRAL_EXT_CUDA", "auto").lower()
    if choice in ("0", "off", "false", "no"):
        return False
    available = cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None
    if choice in ("1", "on", "true", "yes") and not available:
        raise RuntimeError("MISTRAL_EXT_CUDA=1 but torch has no CUDA or no CUDA toolkit was found")
    return available


def check_shared_libstdcxx():
    """Refuses a C++ compiler that has no shared libstdc++ to link: it would put a second, static
    copy of the C++ runtime into the extension beside torch's shared one, and the first error
    message that formats a number would crash (seen with one GPU image's /opt/gcc/bin/g++)."""
    cxx = os.environ.get("CXX") or "c++"
    try:
        found = subprocess.run(shlex.split(cxx) + ["-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return  # not a GCC-style driver: nothing to check
    if not os.path.isabs(found):
        raise RuntimeError(f"the C++ compiler {cxx!r} finds no shared libstdc++ (libstdc++.so), so it would "
                           "link the C++ runtime statically next to torch's shared one; set CXX (and CC) to "
                           "a compiler that has it, e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc")


def extension():
    check_shared_libstdcxx()
    cpp_sources = sources("csrc/*.cpp") + ["python/ops.cpp", "python/op_params.cpp"]
    cxx_flags = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "mistral_ext._C", cpp_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    # No --use_fast_math: it would swap sincosf for __sincosf, far off for RoPE's large angles.
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                  "-DMISTRAL_EXT_WITH_CUDA", "-lineinfo"]
    # The Hopper attention kernel exists only in sm_90a machine code: the host may pick it only then.
    if "9.0a" in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";"):
        nvcc_flags.append("-DMISTRAL_EXT_SM90A")
    return cpp_extension.CUDAExtension(
        "mistral_ext._C", cpp_sources + sources("csrc/*.cu") + ["python/ops_cuda.cpp"],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DMISTRAL_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"])


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
