"""Input checks and autocast handling shared by the three ops.

Every error names the op and the argument, so a user can tell which tensor is wrong without
reading a kernel's stack trace.
"""
from __future__ import annotations

import contextlib
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t: object, *, ndim: int | None = None, min_ndim: int = 0,
                 optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"gptfast.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"gptfast.{op}: {name} has dtype {t.dtype}; supported dtypes are "
                        "float16, bfloat16 and float32 (float64 on the reference backend)")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"gptfast.{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dim() < min_ndim:
        raise ValueError(f"gptfast.{op}: {name} must have at least {min_ndim} dimension(s), "
                         f"got shape {tuple(t.shape)}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """``others`` must share ``ref``'s dtype and device."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"gptfast.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"gptfast.{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_shape(op: str, name: str, t: torch.Tensor | None, shape: tuple[int, ...], what: str) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"gptfast.{op}: {name} must have shape {tuple(shape)} ({what}), "
                         f"got {tuple(t.shape)}")


# torch.is_autocast_enabled(device_type) parses its string argument (~1.2 us, twice per op
# call); whether any autocast is on at all is one flag read (~0.3 us) and almost always False.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off."""
    if not _any_autocast() or device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_floats(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t
            for t in tensors]


_NO_CONTEXT = contextlib.nullcontext()


def autocast_off(device_type: str):
    """Run launchers with the dtypes they were given: the op already applied autocast's policy.
    (A shared no-op context when autocast is off: this sits on every op call's path.)"""
    if _any_autocast() and device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


# ------------------------------------------------------------------- eager and compiled paths

# Under torch.compile every op is its torch.library custom op (fake implementation, registered
# autograd), which dynamo traces. In eager mode the same implementation and the same autograd
# formula run through a plain torch.autograd.Function instead: torch.library's dispatch (autograd
# redispatch, the dynamo-disable wrapper, alias checks) costs several times the kernel on small
# inputs. Both paths call one implementation function, so they give identical results; the
# tests flip this switch to run the custom ops in eager mode too and compare.
EAGER_FUNCTIONS = True


def autograd_function(name: str, impl, setup_context, backward) -> type:
    """A torch.autograd.Function running ``impl`` with a custom op's ``setup_context`` and
    ``backward`` (the ones given to ``register_autograd``)."""
    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter, bool, int, float, str, type(None)})


def _plain_eager(args) -> bool:
    """True when ``args`` can skip torch.library: eager mode (no torch.compile, no FX/AOT tracing
    dispatch mode, no functorch transform) and every tensor a plain tensor or Parameter (fake,
    functional and other subclass tensors -- DTensor, ... -- take the custom op)."""
    # is_compiling first: dynamo folds it to True and must not trace the two C queries after it
    if (not EAGER_FUNCTIONS or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._functorch.maybe_current_level() is not None):
        return False
    for a in args:
        if type(a) not in _PLAIN and isinstance(a, torch.Tensor):
            return False
    return True


def run_op(custom_op, function: type, impl, *args):
    """``custom_op(*args)`` unless :func:`_plain_eager`; then the same implementation without
    torch.library's dispatch: through ``function`` when a tensor argument needs a gradient,
    called directly when none does."""
    if not _plain_eager(args):
        return custom_op(*args)
    if torch.is_grad_enabled():
        for a in args:
            if isinstance(a, torch.Tensor) and a.requires_grad:
                return function.apply(*args)
    return impl(*args)


def run_plain(custom_op, impl, *args):
    """A backward (or forward-only) op: ``impl(*args)`` under :func:`_plain_eager`, else the custom op."""
    return impl(*args) if _plain_eager(args) else custom_op(*args)
