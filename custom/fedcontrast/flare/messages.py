"""Conversion between the methods' :data:`~fedcontrast.methods.base.Message` and NVFlare's ``FLModel``.

A message travels as the ``params`` of an ``FLModel`` with ``params_type`` FULL
(with DIFF, NVFlare drops keys the server did not send, and the ``features/``
entries would vanish). An upload also carries ``meta["num_samples"]`` (the
aggregation weight) and the site's ``metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedcontrast.methods.base import Message, SiteUpdate, kind_of

#: ``FLModel.meta`` key of an upload's sample count.
NUM_SAMPLES = "num_samples"
#: ``FLModel.meta`` key of the seconds the site's ``local_round`` took (set by the executor).
TRAIN_SECONDS = "train_s"


def as_message(params: Mapping[str, Any] | None) -> Message:
    """Check that ``params`` is a message (every key ``"<kind>/<name>"``) and return it as numpy arrays."""
    message: Message = {}
    for key, value in (params or {}).items():
        kind_of(key)  # raises on a key without a known kind
        message[key] = np.asarray(value)
    return message


def message_to_flmodel(message: Message, round_num: int, total_rounds: int) -> FLModel:
    """The task data for one site: ``message`` as a FULL ``FLModel`` of round ``round_num``."""
    return FLModel(
        params=dict(message),
        params_type=ParamsType.FULL,
        current_round=round_num,
        total_rounds=total_rounds,
    )


def update_to_flmodel(update: SiteUpdate, round_num: int) -> FLModel:
    """A site's upload: its message as FULL params, ``num_samples`` in meta, its metrics."""
    return FLModel(
        params=dict(update.message),
        params_type=ParamsType.FULL,
        metrics={k: float(v) for k, v in update.metrics.items()},
        current_round=round_num,
        meta={NUM_SAMPLES: int(update.num_samples)},
    )


def flmodel_to_update(model: FLModel) -> SiteUpdate:
    """The server's view of a site's upload (inverse of :func:`update_to_flmodel`)."""
    if model.params_type != ParamsType.FULL:
        raise ValueError(f"expected a FULL update, got params_type {model.params_type}")
    meta = model.meta or {}
    if NUM_SAMPLES not in meta:
        raise ValueError(f"update has no meta[{NUM_SAMPLES!r}]")
    return SiteUpdate(
        message=as_message(model.params),
        num_samples=int(meta[NUM_SAMPLES]),
        metrics={k: float(v) for k, v in (model.metrics or {}).items()},
    )
