"""The aim_kernels torch.library namespace and how an op is registered in it.

Each op module (topdown_merge.py, gumbel_binarize.py) declares its schemas through `define`,
which also registers the op's plain-PyTorch fallback as the CompositeExplicitAutograd kernel:
the dispatcher uses it only for a device that has no backend kernel (e.g. when _C failed to
build). Compiled kernels (aim_kernels._C) add CPU and CUDA implementations with
TORCH_LIBRARY_IMPL; Triton launchers are swapped in by _cuda_backend.py.

Autograd is an autograd.Function with setup_context, which torch.func (grad, vjp, jacrev)
requires and the Function torch.library.register_autograd generates lacks. The public
functions call Function.apply directly (under torch.func a Function applied from inside the
dispatcher's Autograd kernel has no rule); `register_function` also makes it the op's
Autograd kernel, for direct torch.ops calls.
"""
import torch

lib = torch.library.Library("aim_kernels", "DEF")


def define(schema, fallback_impl):
    """Define an op from its schema and register its plain-PyTorch fallback kernel."""
    lib.define(schema)
    name = schema.split("(", 1)[0]
    lib.impl(name, fallback_impl, "CompositeExplicitAutograd")
    return getattr(torch.ops.aim_kernels, name).default


def with_eager_variant(function):
    """Class decorator: attach `function.eager`, the same Function written the old way (setup
    inside forward). Function.apply binds the call to forward's signature whenever
    setup_context is defined (about 10 us a call, measurable on AIM's small stages); the old
    form skips that, and serves every call made outside torch.func transforms."""

    def forward(ctx, *args):
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return output

    function.eager = type(function.__name__ + "Eager", (torch.autograd.Function,),
                          {"forward": staticmethod(forward), "backward": staticmethod(function.backward)})
    return function


def apply(function, *args):
    """function.apply under a torch.func transform (which needs setup_context), else the
    eager variant's."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return function.apply(*args)
    return function.eager.apply(*args)


def register_function(op, function):
    """Make autograd.Function `function` (forward taking exactly op's arguments, decorated
    with_eager_variant) the op's Autograd kernel. The forward must call the op below
    autograd (`call_below_autograd`)."""
    lib.impl(op._opname, function.eager.apply, "Autograd")


def call_below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def register_autocast(op, device_type, cast):
    """Autocast rule: `cast(*args)` -> args to run op with, autocast off (as
    torch.library.register_autocast does, with a rule of our own instead of one fixed dtype)."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def kernel(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*cast(*args))

    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key)
    op.py_impl(key)(kernel)  # the Python dispatcher (torch.compile, export) reads py_impl
    lib.impl(op._opname, lambda _keyset, *args: kernel(*args), key_name, with_keyset=True)


def memory_format_of(t):
    """The layout an op's output takes from its main input: channels_last only when the
    input is channels_last-dense and not also plain-contiguous (the C++ kernels use the
    same rule, csrc/layout.h, so fake and real outputs have the same strides)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def has_backend_kernel(op, dispatch_key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), dispatch_key)
