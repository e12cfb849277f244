"""Ahead-of-time compilation of the Triton kernels for a GPU that is not here (sm_80, sm_90).

A launcher's LaunchPlan holds the exact arguments it would launch with; `specialize` turns
them into the signature, constants and divisibility attributes Triton's JIT would derive
(integers equal to 1 become constants, pointers and integers divisible by 16 get the
divisibility attribute), so the AOT compile is the compile the GPU would run.
Register use and spills come from the cubin via cuobjdump (local memory and stack bytes per
thread: what Triton reads as n_spills when it loads a kernel on a GPU).
"""
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import native_specialize_impl

from aim_kernels.triton import topdown_merge as merge

ARCHS = (80, 90)


@dataclasses.dataclass
class KernelResources:
    kernel: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    ptx: str


def specialize(plan):
    """(signature, constexprs, attrs) of plan.kernel for plan's arguments, as the JIT makes them."""
    fn = plan.kernel
    names = fn.arg_names
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, value) in enumerate(zip(names[: len(plan.args)], plan.args)):
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = spec
        elif spec is not None and "D" in spec:
            attrs[(index,)] = [["tt.divisibility", 16]]
    for name, value in plan.constexprs.items():
        signature[name] = "constexpr"
        constexprs[(names.index(name),)] = value
    return signature, constexprs, attrs


def cuobjdump():
    """cuobjdump from triton's bundled CUDA tools, else from PATH (None if neither)."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def resource_usage(path):
    """[(function symbol, arch, registers, spill bytes)] of every kernel in a cubin or shared
    library, from cuobjdump --dump-resource-usage. Spill bytes are STACK + LOCAL: ptxas puts
    plain spills in local memory and the registers it saves around a called subroutine (e.g.
    64-bit division) in the stack frame."""
    text = subprocess.run([cuobjdump(), "--dump-resource-usage", path], check=True, capture_output=True, text=True).stdout
    rows, arch = [], None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            symbol = m.group(1)
        m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)
        if m:
            rows.append((symbol, arch, int(m.group(1)), int(m.group(2)) + int(m.group(3))))
    return rows


def cubin_resources(cubin):
    """{function name: (registers, spill bytes)} of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return {symbol: (regs, spill) for symbol, _, regs, spill in resource_usage(f.name)}


def compile_plan(plan, arch):
    signature, constexprs, attrs = specialize(plan)
    src = ASTSource(fn=plan.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=plan.options())
    (registers, spill), = cubin_resources(compiled.asm["cubin"]).values()
    return KernelResources(plan.kernel.__name__, arch, registers, spill, compiled.metadata.shared, compiled.asm["ptx"])


def _tensor(shape, dtype, channels_last):
    t = torch.empty(shape, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


# Spatial/channel shapes that make the forward launcher pick each of its tiles (see
# merge._pick_forward_tile): NCHW by H*W, channels_last by C.
_FORWARD_SHAPES = {"nchw": ((4, 7, 7), (4, 14, 14), (4, 32, 32)), "channels_last": ((16, 6, 6), (64, 6, 6), (256, 6, 6))}
# prev sizes for an 8x8 feature map giving footprints of 1, 2, 4, 6, 9 and 64 slots, so the
# backward launcher picks every BLOCK_K (the last needs several footprint tiles).
_BACKWARD_PREV = ((8, 8), (8, 4), (4, 4), (4, 3), (3, 3), (1, 1))
_BACKWARD_CHANNELS = {"nchw": (4,), "channels_last": (8, 40)}
_CHUNKED_CHANNELS = 128  # with N=1 and an 8x8 map, enough for several channel chunks in both layouts
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def topdown_merge_plans():
    """(label, plan) for every kernel configuration the topdown_merge launchers can pick:
    each tile, for every dtype, both layouts, both mask shapes, with and without prev."""
    plans = []
    for dtype in DTYPES:
        for layout, shapes in _FORWARD_SHAPES.items():
            cl = layout == "channels_last"
            for c, h, w in shapes:
                for mask_c in (1, c):
                    for prev_hw in (None, (h // 2 + 1, w // 2 + 1)):
                        feat = _tensor((2, c, h, w), dtype, cl)
                        prev = None if prev_hw is None else _tensor((2, c, *prev_hw), dtype, cl)
                        plan, _ = merge.plan_forward(feat, _tensor((2, mask_c, h, w), dtype, cl), prev)
                        plans.append((f"forward {layout} {dtype} C={c} {h}x{w} mask_c={mask_c} prev={prev_hw}", plan))
        for layout, channels in _BACKWARD_CHANNELS.items():
            cl = layout == "channels_last"
            for c in channels:
                for mask_c in (1, c):
                    for prev_size in ([], *map(list, _BACKWARD_PREV)):
                        feat = _tensor((2, c, 8, 8), dtype, cl)
                        mask = _tensor((2, mask_c, 8, 8), dtype, cl)
                        plan = merge.plan_backward(feat, feat, mask, mask_c, prev_size)[0]
                        plans.append((f"backward {layout} {dtype} C={c} mask_c={mask_c} prev_size={prev_size}", plan))
                        # only some gradients asked for (autograd's needs_input_grad): float32, one prev,
                        # broadcast mask, the fewest channels of each layout (AOT compiles are slow)
                        if dtype == torch.float32 and prev_size == [4, 4] and mask_c == 1 and c == channels[0]:
                            for given in ("feat", "mask", "neither"):
                                plan = merge.plan_backward(feat, feat if given == "feat" else None,
                                                           mask if given == "mask" else None, mask_c, prev_size)[0]
                                plans.append((f"backward {layout} {dtype} C={c} mask_c={mask_c} prev_size={prev_size} "
                                              f"only {given}", plan))
            # channels split over programs: a broadcast mask's gradient goes to a float32 buffer
            feat, mask = _tensor((1, _CHUNKED_CHANNELS, 8, 8), dtype, cl), _tensor((1, 1, 8, 8), dtype, cl)
            plan = merge.plan_backward(feat, feat, mask, 1, [4, 4])[0]
            assert plan.grid[1] > 1, plan.grid
            plans.append((f"backward {layout} {dtype} C={_CHUNKED_CHANNELS} mask_c=1 prev_size=[4, 4] channel chunks", plan))
    return plans


def plan_key(plan):
    """Plans with the same key compile to the same binary."""
    signature, constexprs, attrs = specialize(plan)
    constants = tuple(sorted((k, str(v)) for k, v in constexprs.items()))
    return plan.kernel.__name__, tuple(signature.items()), constants, tuple(sorted(attrs)), tuple(sorted(plan.options().items()))
