"""Which backends are built and usable here, and for each one that is not, why."""
import torch

from aim_kernels import _extension
from aim_kernels._library import has_backend_kernel


def _status(available, reason=None):
    return {"available": bool(available), "reason": None if available else reason}


def backends() -> dict:
    """Report of every backend: ``{name: {"available": bool, "reason": str | None}}``.

    cpu: the C++ kernels in aim_kernels._C; cuda: its CUDA kernels (built, and a GPU
    present); triton: the Triton kernels (triton importable, and a GPU present);
    reference: the plain-PyTorch path, always usable. The cuda and triton entries also
    carry "selected": whether that backend serves the ops on CUDA tensors (see
    aim_kernels.set_cuda_backend).
    """
    op = torch.ops.aim_kernels.topdown_merge.default
    report = {}
    if not _extension.EXT_LOADED:
        report["cpu"] = _status(False, _extension.EXT_ERROR)
    else:
        report["cpu"] = _status(has_backend_kernel(op, "CPU"), "aim_kernels._C has no CPU kernels registered")

    if not _extension.EXT_LOADED:
        report["cuda"] = _status(False, _extension.EXT_ERROR)
    elif not _extension.ext_has_cuda():  # not the dispatch table: Triton may hold the CUDA key
        report["cuda"] = _status(False, "aim_kernels._C was built without CUDA kernels (torch without CUDA, or nvcc not found, or AIM_KERNELS_CUDA=0)")
    else:
        report["cuda"] = _status(torch.cuda.is_available(), "CUDA kernels are built, but no CUDA device is available")

    try:
        import triton  # noqa: F401

        report["triton"] = _status(torch.cuda.is_available(), "triton is installed, but no CUDA device is available")
    except ImportError as exc:
        report["triton"] = _status(False, f"triton is not importable: {exc}")

    from aim_kernels._cuda_backend import get_cuda_backend

    # "selected": which of the two serves aim_kernels ops on CUDA tensors (set_cuda_backend)
    for name in ("cuda", "triton"):
        report[name]["selected"] = get_cuda_backend() == name
    report["reference"] = _status(True)
    return report
