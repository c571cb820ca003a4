"""Privacy filter for exchanged features: clip each feature vector, add Gaussian noise.

Attached as a task-result filter on the sites, scoped to the pre-training task, so
it acts on what leaves a site and on nothing else. Only the floating-point
``features/`` entries are touched (the 128-d projections; integer entries are tags);
weights pass unchanged. Each row (the last axis is the feature) is scaled to norm
at most ``clip_norm``, then ``N(0, noise_std^2)`` noise is added to every value: the
Gaussian mechanism with L2 sensitivity ``clip_norm`` per feature. Both are off by
default (0).
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedcontrast.methods.base import Message, kind_of


def privatize_features(
    message: Message, clip_norm: float, noise_std: float, rng: np.random.Generator
) -> Message:
    """``message`` with its floating-point ``features/`` rows clipped to ``clip_norm`` and noised.

    Args:
        message: any message; entries of other kinds, and integer entries, are returned as they are.
        clip_norm: largest L2 norm of a feature vector (0: no clipping).
        noise_std: standard deviation of the added Gaussian noise (0: none).
        rng: the noise source.
    """
    if clip_norm < 0 or noise_std < 0:
        raise ValueError(f"clip_norm and noise_std must be >= 0, got {clip_norm} and {noise_std}")
    out = dict(message)
    for key, value in message.items():
        if kind_of(key) != "features" or not np.issubdtype(value.dtype, np.floating):
            continue
        rows = value.astype(np.float64)
        if clip_norm > 0:
            norms = np.linalg.norm(rows, axis=-1, keepdims=True)
            rows = rows * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
        if noise_std > 0:
            rows = rows + rng.normal(0.0, noise_std, size=rows.shape)
        out[key] = rows.astype(value.dtype)
    return out


class FeaturePrivacyFilter(DXOFilter):
    """Clip and noise the ``features/`` entries of a site's result (see the module docstring).

    Args:
        clip_norm: largest L2 norm of a feature vector (0: no clipping).
        noise_std: standard deviation of the Gaussian noise (0: none).
        seed: seed of the noise (None: fresh entropy, what a real deployment wants).
    """

    def __init__(self, clip_norm: float = 0.0, noise_std: float = 0.0, seed: int | None = None):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])
        if clip_norm < 0 or noise_std < 0:
            raise ValueError(f"clip_norm and noise_std must be >= 0, got {clip_norm} and {noise_std}")
        self.clip_norm = clip_norm
        self.noise_std = noise_std
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        """The DXO with its features privatized; None (unchanged) when the filter is off."""
        if self.clip_norm == 0 and self.noise_std == 0:
            return None
        dxo.data = privatize_features(dxo.data, self.clip_norm, self.noise_std, self._rng)
        return dxo
