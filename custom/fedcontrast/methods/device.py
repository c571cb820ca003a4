"""The trainers' device and mixed precision: one place that decides both.

A method's ``device`` (config key, or the device the trainer was built with) is checked once
(:func:`resolve_device`: asking for CUDA on a machine without it is an error naming the
site, never a silent fall-back to the CPU). The pre-training step runs under
:func:`autocast`: with ``amp`` ``"bf16"`` (the default) or ``"fp16"`` the network's forward
pass runs in that precision on a CUDA device; on the CPU, or with ``amp`` ``"off"``, autocast
is disabled and everything stays float32. The losses run in float32 whatever the forward
pass used (:func:`float32_loss` wraps every loss function of :mod:`fedcontrast.methods.losses`
and :mod:`fedcontrast.methods.byol`), and ``"fp16"`` scales the loss for the backward pass
(:func:`grad_scaler`). Fine-tuning runs through the bundle, whose ``amp`` switch is on
exactly on CUDA devices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch

#: Values of the ``amp`` setting.
AMP_MODES: tuple[str, ...] = ("bf16", "fp16", "off")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

F = TypeVar("F", bound=Callable[..., Any])


def resolve_device(device: str | torch.device, site: str = "") -> torch.device:
    """``device`` as a ``torch.device``, checked to exist on this machine.

    Raises:
        ValueError: a CUDA device on a machine without one (or with fewer), naming ``site``.
    """
    resolved = torch.device(device)
    if resolved.type == "cuda":
        index = resolved.index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            where = f"{site}: " if site else ""
            raise ValueError(f"{where}device {resolved} was asked for; this machine has no such CUDA device")
    return resolved


def amp_dtype(device: torch.device, mode: str) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device``; None (no autocast) on the CPU or with ``"off"``.

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {mode!r}")
    return _DTYPES.get(mode) if device.type == "cuda" else None


def autocast(device: torch.device, mode: str) -> AbstractContextManager:
    """Autocast of ``device``'s type in :func:`amp_dtype`'s precision, disabled when that is None."""
    dtype = amp_dtype(device, mode)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, mode: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for ``"fp16"`` on CUDA (bf16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, mode) == torch.float16)


def float32_loss(fn: F) -> F:
    """Run a loss function in (at least) float32: half-precision tensor arguments are cast up to
    float32, float32 and float64 ones are left as they are, and autocast is off inside."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"

        def up(value: Any) -> Any:  # half and bfloat16 up to float32; float32 and float64 stay
            low = isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16)
            return value.float() if low else value

        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]
