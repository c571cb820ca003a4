"""Reduced-precision transfer of the networks in a message: what goes on the wire, and back.

A method's ``transfer`` setting (config key ``"transfer"``, default ``"float32"``) says how
the entries that carry a network (:data:`NETWORK_KINDS`: ``weights/`` and ``target/``) travel;
features and stats always travel as they are. Floating-point network entries become:

- ``"float32"``: unchanged (full precision);
- ``"float16"``: IEEE half precision, clamped to its range (relative error at most 2**-11 for
  values above 6e-5 in magnitude; smaller values lose relative precision, absolute error at most
  about 3e-8), half the bytes;
- ``"blockwise8"``: the flattened entry in blocks of :data:`BLOCK` values, each block stored as
  int8 codes ``round(127 * x / absmax)`` plus its float32 ``absmax``: absolute error at most
  ``absmax / 254`` per value, about 0.27x the bytes. The same absmax-scaled 8-bit blockwise
  scheme as NVFlare's ``blockwise8`` (which uses bitsandbytes' non-linear code map and needs a
  GPU); this one runs on any machine.

Integer entries (BatchNorm counters) are never touched. :func:`encode` gives the message as sent,
:func:`decode` the message as received (float32 again, original shapes), and
:func:`round_trip` = ``decode(encode(m))``, bit for bit what every receiver holds, so a sender
that must track the receivers' state (PTNU's predicted target) round-trips what it sends.
A blockwise entry ``k`` travels as ``k`` (int8 codes, flat, padded to whole blocks),
``k#absmax`` (float32, one per block) and ``k#shape`` (int64), all of ``k``'s kind, so
:func:`~fedcontrast.methods.base.count_bytes` counts what is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcontrast.methods.base import Message, kind_of

#: Values of the ``transfer`` setting.
PRECISIONS: tuple[str, ...] = ("float32", "float16", "blockwise8")
#: Message kinds that carry a network.
NETWORK_KINDS: tuple[str, ...] = ("weights", "target")
#: Values per block of ``blockwise8``.
BLOCK = 256
#: Key suffixes of a blockwise entry's scale and shape.
ABSMAX_SUFFIX = "#absmax"
SHAPE_SUFFIX = "#shape"


def transfer_precision(config: Mapping[str, Any]) -> str:
    """The ``transfer`` setting of a method configuration (``"float32"`` when absent), checked."""
    precision = str(config.get("transfer", "float32"))
    if precision not in PRECISIONS:
        raise ValueError(f"transfer must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _is_network_float(key: str, value: np.ndarray) -> bool:
    return kind_of(key) in NETWORK_KINDS and np.issubdtype(value.dtype, np.floating)


def encode(message: Mapping[str, np.ndarray], precision: str) -> Message:
    """``message`` as sent with ``precision`` (see the module docstring); other entries unchanged.

    Raises:
        ValueError: unknown ``precision``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"transfer must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return dict(message)
    out: Message = {}
    half = np.finfo(np.float16)
    for key, value in message.items():
        value = np.asarray(value)
        if not _is_network_float(key, value):
            out[key] = value
        elif precision == "float16":
            out[key] = np.clip(value, half.min, half.max).astype(np.float16)
        else:
            flat = value.astype(np.float32).ravel()
            blocks = np.zeros(-(-flat.size // BLOCK) * BLOCK, dtype=np.float32)
            blocks[: flat.size] = flat
            blocks = blocks.reshape(-1, BLOCK)
            absmax = np.abs(blocks).max(axis=1)
            scale = np.where(absmax > 0, 127.0 / np.maximum(absmax, np.finfo(np.float32).tiny), 0.0)
            out[key] = np.clip(np.rint(blocks * scale[:, None]), -127, 127).astype(np.int8).ravel()
            out[key + ABSMAX_SUFFIX] = absmax.astype(np.float32)
            out[key + SHAPE_SUFFIX] = np.asarray(value.shape, dtype=np.int64)
    return out


def decode(message: Mapping[str, np.ndarray]) -> Message:
    """The message as the receiver uses it: network entries back to float32 and their shapes.

    Raises:
        ValueError: a blockwise entry without its scale or shape.
    """
    out: Message = {}
    for key, value in message.items():
        if key.endswith((ABSMAX_SUFFIX, SHAPE_SUFFIX)):
            continue
        value = np.asarray(value)
        if kind_of(key) not in NETWORK_KINDS:
            out[key] = value
        elif key + SHAPE_SUFFIX in message:
            if key + ABSMAX_SUFFIX not in message:
                raise ValueError(f"blockwise entry {key!r} has no {key + ABSMAX_SUFFIX!r}")
            shape = tuple(int(n) for n in message[key + SHAPE_SUFFIX])
            absmax = np.asarray(message[key + ABSMAX_SUFFIX], dtype=np.float32)
            blocks = value.astype(np.float32).reshape(-1, BLOCK) * (absmax / 127.0)[:, None]
            out[key] = blocks.ravel()[: int(np.prod(shape))].reshape(shape)
        elif value.dtype == np.float16:
            out[key] = value.astype(np.float32)
        else:
            out[key] = value
    return out


def round_trip(message: Mapping[str, np.ndarray], precision: str) -> Message:
    """``decode(encode(message, precision))``: what a receiver holds (``message`` itself for float32)."""
    return dict(message) if precision == "float32" else decode(encode(message, precision))
