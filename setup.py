"""Builds aim_kernels._C: C++ CPU kernels always, CUDA kernels when the toolkit is there.

Environment:
  AIM_KERNELS_CUDA=1|0     force the CUDA build on or off (default: on when torch has CUDA
                           and nvcc is found; no GPU is needed to build)
  CUDA_HOME                CUDA toolkit (default: /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST     default "8.0;9.0"
  MAX_JOBS                 parallel compile jobs (ninja), honoured by torch's BuildExtension
  NVCC_THREADS             nvcc --threads (default 2)
"""
import glob
import os

from setuptools import setup



def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


# torch.utils.cpp_extension reads CUDA_HOME once, at import: set it first, or it may settle on
# a directory holding only an nvcc wrapper (e.g. /usr/local) and fail to link libcudart.
if _find_cuda_home():
    os.environ["CUDA_HOME"] = _find_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    forced = os.environ.get("AIM_KERNELS_CUDA")
    if forced is not None and forced not in ("0", "1"):
        raise ValueError(f"AIM_KERNELS_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    available = torch.version.cuda is not None and _find_cuda_home() is not None
    if forced == "1" and not available:
        raise RuntimeError(
            "AIM_KERNELS_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc under CUDA_HOME={_find_cuda_home()!r}"
        )
    return available


def _extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: a fused multiply-add would make feat*mask+prev differ from the
    # reference's two roundings, and fp32 outputs are promised bit-identical.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++20"]
    if not _want_cuda():
        return CppExtension(
            "aim_kernels._C", cpu_sources,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc_flags = [
        "-O3", "-std=c++20", "--fmad=false", "--expt-relaxed-constexpr",
        "-Xptxas=-v", f"--threads={os.environ.get('NVCC_THREADS', '2')}",
    ]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return CUDAExtension(
        "aim_kernels._C", cpu_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags + ["-DAIM_KERNELS_WITH_CUDA"], "nvcc": nvcc_flags + ["-DAIM_KERNELS_WITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
