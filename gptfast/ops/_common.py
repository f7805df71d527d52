"""Input checks and autocast handling shared by the three ops.

Every error names the op and the argument, so a user can tell which tensor is wrong without
reading a kernel's stack trace.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

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


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None when autocast is off."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_floats(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t
            for t in tensors]


@contextlib.contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Run launchers with the dtypes they were given: the op already applied autocast's policy."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield
