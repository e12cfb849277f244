"""Builds aim_kernels._C: C++ CPU kernels always, CUDA kernels when the toolkit is there.

Environment:
  AIM_KERNELS_CUDA=1|0     force the CUDA build on or off (default: on when torch has CUDA
                           and nvcc is found; no GPU is needed to build)
  CUDA_HOME                CUDA toolkit (default: /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST     default "8.0;9.0"
  MAX_JOBS                 parallel compile jobs (ninja), honoured by torch's BuildExtension
  NVCC_THREADS             nvcc --threads (default 2)
  AIM_KERNELS_DEBUG=1      debug build: -O0 -g (host), -G -lineinfo (device), asserts kept
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


def _flag(name):
    value = os.environ.get(name)
    if value is not None and value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value


def _want_cuda():
    """(build the CUDA kernels?, why), the reason printed by the build."""
    forced = _flag("AIM_KERNELS_CUDA")
    if forced == "0":
        return False, "AIM_KERNELS_CUDA=0"
    available = torch.version.cuda is not None and _find_cuda_home() is not None
    found = f"torch.version.cuda={torch.version.cuda!r}, nvcc under CUDA_HOME={_find_cuda_home()!r}"
    if forced == "1" and not available:
        raise RuntimeError(f"AIM_KERNELS_CUDA=1 but CUDA cannot be built: {found}")
    return available, ("AIM_KERNELS_CUDA=1: " if forced else "") + found


def _say(message):
    print(f"aim_kernels build: {message}", flush=True)


def _extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: a fused multiply-add would make feat*mask+prev differ from the
    # reference's two roundings, and fp32 outputs are promised bit-identical.
    debug = _flag("AIM_KERNELS_DEBUG") == "1"
    optimize = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = [*optimize, "-fopenmp", "-ffp-contract=off", "-std=c++20"]
    with_cuda, reason = _want_cuda()
    _say(f"{'debug' if debug else 'release'} build (AIM_KERNELS_DEBUG={'1' if debug else '0'}); "
         f"C++ CPU kernels from {len(cpu_sources)} files")
    if not with_cuda:
        _say(f"CUDA kernels: off ({reason})")
        return CppExtension(
            "aim_kernels._C", cpu_sources,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc_flags = [
        *(["-O0", "-G", "-lineinfo"] if debug else ["-O3"]), "-std=c++20", "--fmad=false", "--expt-relaxed-constexpr",
        "-Xptxas=-v", f"--threads={os.environ.get('NVCC_THREADS', '2')}",
    ]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    _say(f"CUDA kernels: on ({reason}), {len(cuda_sources)} files for TORCH_CUDA_ARCH_LIST="
         f"{os.environ['TORCH_CUDA_ARCH_LIST']!r}")
    return CUDAExtension(
        "aim_kernels._C", cpu_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags + ["-DAIM_KERNELS_WITH_CUDA"], "nvcc": nvcc_flags + ["-DAIM_KERNELS_WITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
