"""Which kernels serve the aim_kernels ops on CUDA tensors: the C++ CUDA kernels ("cuda") or
the Triton kernels ("triton").

Setting:
  AIM_KERNELS_CUDA_BACKEND=cuda|triton   read once, when aim_kernels is imported
  aim_kernels.set_cuda_backend("cuda"|"triton")   at any time, for every op at once
  aim_kernels.get_cuda_backend(), aim_kernels.backends()   show the choice

Default: "cuda" when aim_kernels._C was built with its CUDA kernels, else "triton". Both
move the same bytes (each input read once, each output written once), so on a GPU their
kernel times should be close; the C++ path is the default because it launches from C++
with no Python launcher in between (small AIM stages are launch-bound), needs no JIT
compilation on first use, and does not need triton at run time.

Mechanism: the C++ CUDA kernels are the ops' CUDA dispatch entries (TORCH_LIBRARY_IMPL in
csrc/cuda). Choosing "triton" registers every entry of TRITON_IMPLS on the CUDA dispatch
key through one torch.library.Library("aim_kernels", "IMPL"); the dispatcher puts those in
front of the C++ kernels. Choosing "cuda" destroys that Library and the dispatcher goes
back to the C++ kernels. An op with no entry in TRITON_IMPLS keeps its C++ CUDA kernel
under either setting.

Plug-in point for a new op: in its module, call
    register_triton_impl("op_name", "aim_kernels.triton.op_module", "launcher_function")
where launcher_function takes exactly the op's schema arguments and returns its outputs.
The launcher module is imported on first use, so importing aim_kernels never imports triton.
"""
import importlib
import importlib.util
import os
import warnings

import torch

CHOICES = ("cuda", "triton")
ENV_VAR = "AIM_KERNELS_CUDA_BACKEND"

# op name in the aim_kernels namespace -> (launcher module, function name)
TRITON_IMPLS = {}

_selected = None
_triton_library = None  # the Library holding the Triton CUDA registrations while "triton" is selected


def register_triton_impl(op_name, module, function):
    """Declare the Triton launcher of aim_kernels::op_name (see the module docstring)."""
    TRITON_IMPLS[op_name] = (module, function)
    if _triton_library is not None:
        _triton_library.impl(op_name, _lazy_launcher(module, function), "CUDA")


def _lazy_launcher(module, function):
    def launcher(*args):
        return getattr(importlib.import_module(module), function)(*args)

    launcher.__name__ = f"{module}.{function}"
    return launcher


def unavailable_reason(name):
    """Why backend `name` cannot serve CUDA tensors in this build, or None if it can."""
    if name == "cuda":
        from aim_kernels import _extension  # not at module level: _C must load after the schemas exist

        if not _extension.EXT_LOADED:
            return _extension.EXT_ERROR
        if not _extension.ext_has_cuda():
            return "aim_kernels._C was built without CUDA kernels (torch without CUDA, nvcc not found, or AIM_KERNELS_CUDA=0)"
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        return None
    raise ValueError(f"CUDA backend must be one of {CHOICES}, got {name!r}")


def set_cuda_backend(name: str) -> None:
    """Serve every aim_kernels op on CUDA tensors with `name` ("cuda" or "triton")."""
    global _selected, _triton_library
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"CUDA backend {name!r} is unavailable: {reason}")
    if name == "triton" and _triton_library is None:
        _triton_library = torch.library.Library("aim_kernels", "IMPL")
        for op_name, (module, function) in TRITON_IMPLS.items():
            _triton_library.impl(op_name, _lazy_launcher(module, function), "CUDA")
    elif name == "cuda" and _triton_library is not None:
        _triton_library._destroy()
        _triton_library = None
    _selected = name


def get_cuda_backend() -> "str | None":
    """The backend serving aim_kernels ops on CUDA tensors: "cuda", "triton", or None when
    neither is usable (the plain-PyTorch reference then runs)."""
    return _selected


def select_at_import():
    """Apply AIM_KERNELS_CUDA_BACKEND, else the default. A name that is not a backend is an
    error; a backend that is unusable here is a warning, and the other one is used."""
    requested = os.environ.get(ENV_VAR) or None  # set but empty counts as unset
    if requested is not None and requested not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {CHOICES}, got {requested!r}")
    order = [requested] if requested else []
    order += [name for name in CHOICES if name not in order]
    for name in order:
        reason = unavailable_reason(name)
        if reason is None:
            set_cuda_backend(name)
            return
        if name == requested:
            warnings.warn(f"{ENV_VAR}={requested} is unavailable ({reason}); trying the other CUDA backend",
                          RuntimeWarning, stacklevel=2)
