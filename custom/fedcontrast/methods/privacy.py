"""Feature privacy: clip every shared feature row and add Gaussian noise (plain numpy, no NVFlare).

One implementation for both places it runs:

- the site-side NVFlare result filter :class:`fedcontrast.flare.filters.FeaturePrivacyFilter`
  (a real deployment: on the site's result as it leaves);
- :func:`~fedcontrast.methods.runner.run_in_process` through its ``site_filter`` argument
  (:class:`FeaturePrivacy`; the benchmark's in-process runs, configured by the method
  configuration keys ``feature_clip`` and ``feature_noise``: :func:`feature_privacy_from_config`).

Only the floating-point ``features/`` entries are touched (integer entries are tags, the
weights pass unchanged). Each row (the last axis is the feature) is scaled to L2 norm at most
C (``clip_norm``; 0: C = 1, no clipping, the norm of FCL's unit-norm projections), then
``N(0, (Z C)^2)`` noise is added to every value (``noise_std`` Z, the noise multiplier): the
Gaussian mechanism on one row, whose L2 sensitivity is 2C when one row is replaced by
another. :func:`gaussian_epsilon` gives its (ε, δ). What that does and does not guarantee:
docs/deployment.md, "What leaves a hospital".
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcontrast.methods.base import Message, kind_of

#: ``site_filter(site, round_num, message) -> message``: what a site's result filter does to an upload.
SiteFilter = Callable[[str, int, Message], Message]


def check_privacy_settings(clip_norm: float, noise_std: float) -> None:
    """Raise ``ValueError`` unless both settings are >= 0."""
    if not (clip_norm >= 0 and noise_std >= 0):
        raise ValueError(f"clip_norm and noise_std must be >= 0, got {clip_norm} and {noise_std}")


def privatize_features(
    message: Message, clip_norm: float, noise_std: float, rng: np.random.Generator
) -> Message:
    """``message`` with its floating-point ``features/`` rows clipped to ``clip_norm`` and noised.

    Args:
        message: any message; entries of other kinds, and integer entries, are returned as they
            are (the same objects). A feature entry ``(n, D)`` keeps its shape and dtype.
        clip_norm: C, largest L2 norm of a feature vector (0: no clipping, C = 1 for the noise).
        noise_std: Z, noise multiplier: the added Gaussian noise has standard deviation ``Z * C``.
        rng: the noise source.
    """
    check_privacy_settings(clip_norm, noise_std)
    out = dict(message)
    for key, value in message.items():
        if kind_of(key) != "features" or not np.issubdtype(value.dtype, np.floating):
            continue
        rows = value.astype(np.float64)
        if clip_norm > 0:
            norms = np.linalg.norm(rows, axis=-1, keepdims=True)
            rows = rows * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
        if noise_std > 0:
            rows = rows + rng.normal(0.0, noise_std * (clip_norm or 1.0), size=rows.shape)
        out[key] = rows.astype(value.dtype)
    return out


@dataclass(frozen=True)
class FeaturePrivacy:
    """:func:`privatize_features` as a :data:`SiteFilter`, with reproducible noise.

    The noise of a (site, round) upload is drawn from its own generator, seeded by ``seed``, the
    site's name and the round, so a run (and a resumed run) gives the same noise whatever the
    order in which sites are served.

    Attributes:
        clip_norm: C (0: no clipping).
        noise_std: Z, the noise multiplier (0: none).
        seed: seed of the noise (the run's seed).
    """

    clip_norm: float = 0.0
    noise_std: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_privacy_settings(self.clip_norm, self.noise_std)

    def rng(self, site: str, round_num: int) -> np.random.Generator:
        """The noise generator of ``site``'s upload in ``round_num``."""
        return np.random.default_rng([int(self.seed), zlib.crc32(site.encode()), int(round_num), 0x5052])

    def __call__(self, site: str, round_num: int, message: Message) -> Message:
        """``message`` privatized as ``site``'s upload of ``round_num``."""
        return privatize_features(message, self.clip_norm, self.noise_std, self.rng(site, round_num))


def feature_privacy_from_config(config: Mapping[str, Any]) -> FeaturePrivacy | None:
    """The site filter a method configuration asks for, or None when it asks for none.

    Reads ``feature_clip`` (C) and ``feature_noise`` (Z), both 0 by default (the names of
    ``jobs/fcl/job.py --feature-clip/--feature-noise``), and ``seed`` for the noise.
    """
    clip, noise = float(config.get("feature_clip", 0.0)), float(config.get("feature_noise", 0.0))
    if clip == 0 and noise == 0:
        return None
    return FeaturePrivacy(clip, noise, int(config.get("seed", 0)))


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism with sensitivity-to-noise ratio ``mu`` = Δ/sigma.

    The exact (analytic) curve of Balle & Wang (ICML 2018, Theorem 8), which is also the
    (ε, δ) curve of μ-Gaussian differential privacy (Dong, Roth & Su 2022):
    ``δ = Φ(μ/2 - ε/μ) - e^ε Φ(-μ/2 - ε/μ)``.
    """
    if mu <= 0:
        return 0.0
    first = _normal_cdf(mu / 2 - epsilon / mu)
    second = math.exp(epsilon) * _normal_cdf(-mu / 2 - epsilon / mu) if epsilon < 700 else 0.0
    return max(first - second, 0.0)


def gaussian_epsilon(sensitivity: float, sigma: float, delta: float = 1e-5) -> float:
    """Smallest ε for which the Gaussian mechanism (L2 ``sensitivity`` Δ, noise std ``sigma``) is (ε, δ)-DP.

    The analytic Gaussian mechanism (Balle & Wang 2018): the exact ε for ``delta``, found by
    bisection on :func:`gaussian_delta` with μ = Δ/sigma (``inf`` without noise; 0 when even ε = 0
    meets ``delta``).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if sigma <= 0:
        return math.inf
    mu = sensitivity / sigma
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gaussian_delta(high, mu) > delta:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if gaussian_delta(mid, mu) > delta else (low, mid)
    return high
