"""Loads the compiled kernels (aim_kernels._C) if they were built; records why not otherwise.

Importing _C runs its TORCH_LIBRARY_IMPL registrations against the schemas the op modules
(aim_kernels/topdown_merge.py, gumbel_binarize.py) declared through _library.define. Set AIM_KERNELS_DISABLE_EXT=1 to skip it and run every
op on the plain-PyTorch reference path.
"""
import logging
import os
import warnings

log = logging.getLogger("aim_kernels")

EXT_LOADED = False
EXT_ERROR = None  # why _C is not in use, as a sentence

if os.environ.get("AIM_KERNELS_DISABLE_EXT") == "1":
    EXT_ERROR = "disabled by AIM_KERNELS_DISABLE_EXT=1"
else:
    try:
        from aim_kernels import _C  # noqa: F401

        EXT_LOADED = True
    except ImportError as exc:  # not built, or built against another torch
        EXT_ERROR = f"aim_kernels._C failed to import: {exc}"
        _package_dir = os.path.dirname(os.path.abspath(__file__))
        if os.path.exists(os.path.join(os.path.dirname(_package_dir), "setup.py")):
            EXT_ERROR += (f" [imported from the source tree {_package_dir}: build in place with "
                          "`python setup.py build_ext --inplace`, or run from outside the repository "
                          "to use the installed package]")

if not EXT_LOADED:
    warnings.warn(
        f"aim_kernels: compiled kernels unavailable ({EXT_ERROR}); ops run on the plain-PyTorch reference path.",
        RuntimeWarning,
        stacklevel=2,
    )


def ext_has_cuda():
    """True when _C was compiled with the CUDA kernels (independent of a GPU being present)."""
    if not EXT_LOADED:
        return False
    from aim_kernels import _C

    return bool(_C.WITH_CUDA)
