"""Reduced-precision transfer of the networks: a quantising and a dequantising NVFlare filter.

The pair of :mod:`fedcontrast.methods.transfer` as ``DXOFilter`` s, placed where NVFlare's
own ``ModelQuantizer``/``ModelDequantizer`` go: the server quantises every task's data and the
sites dequantise it (task data filters); the sites quantise their results and the server
dequantises them (task result filters). Only ``weights/`` and ``target/`` entries change;
features and stats pass as they are. NVFlare's pair (``nvflare.app_opt.pt.quantization``)
is not used because it imports ``bitsandbytes`` even for float16 and runs its 8-bit mode on a
GPU only; this pair needs neither and produces the same float16 bytes.
:func:`fedcontrast.flare.jobs.build_job` attaches the pair when the method's ``transfer``
setting is not ``"float32"``, and the server's byte ledger counts the encoded messages.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedcontrast.methods.transfer import PRECISIONS, decode, encode


class NetworkQuantizer(DXOFilter):
    """Encode the network entries of a WEIGHTS DXO with ``precision`` (see the module docstring).

    Args:
        precision: one of :data:`~fedcontrast.methods.transfer.PRECISIONS`.
    """

    def __init__(self, precision: str):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        """The DXO with its network entries encoded; None (unchanged) at float32."""
        if self.precision == "float32":
            return None
        dxo.data = encode(dxo.data, self.precision)
        return dxo


class NetworkDequantizer(DXOFilter):
    """Decode what :class:`NetworkQuantizer` encoded: network entries back to float32 and their shapes."""

    def __init__(self):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        """The DXO with its network entries decoded."""
        dxo.data = decode(dxo.data)
        return dxo
