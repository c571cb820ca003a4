"""FedMoCo's metadata transfer: a site's intensity statistics, and re-mapping images to another site's.

Each site summarises the intensities of its whole volume set (:func:`intensity_stats`):
mean, standard deviation, and a coarse histogram of at most :data:`MAX_BINS` bins over the
range between two quantiles (``clip`` and ``1 - clip``). Nothing per volume and no voxel
leaves the site: the upload is ``bins + 4`` numbers. The server forwards every other
site's statistics (:class:`~fedcontrast.methods.fedmoco.FedMoCoStrategy`), and
:class:`IntensityTransfer` re-maps a local sample's intensities to one of them, so local
views imitate the other scanners.

Statistics are taken in the units the network sees: the bundle's preprocessed volumes
(z-scored per volume, then cropped or padded). After the z-score the sites' means and
standard deviations are nearly equal, so re-standardisation (``"meanstd"``) changes
little; the histogram's shape still differs between scanners, which is why histogram
matching (``"histogram"``) is the default (a project choice, SPEC §3).

Histogram matching maps ``x -> Q_target(F_source(x))``, where ``F_source`` is the
piecewise-linear CDF of the *site's own* volume-set histogram (one monotone map for every
local sample, like a scanner change) and ``Q_target`` the piecewise-linear quantile
function of the target histogram. Outside its histogram range the map continues as the
straight line of slope (target range / source range), so it is strictly increasing:
voxel order, hence every label boundary drawn by intensity order, is kept.

Message entries (``stats/`` kind; names :data:`STATS_ENTRIES`), all float:
``meta_mean`` and ``meta_std`` scalars, ``meta_range`` ``(2,)`` (low, high), ``meta_hist``
``(bins,)`` float32 frequencies summing to 1. Downloads stack them over the other sites
(first axis one row per site) and add ``meta_sites`` ``(K,)`` int64 site tags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: Most histogram bins a site may share.
MAX_BINS = 64
#: The ``stats/`` entry names of one site's statistics.
STATS_ENTRIES: tuple[str, ...] = ("meta_mean", "meta_std", "meta_range", "meta_hist")
#: Name of the server-added site tags of forwarded statistics.
SITES_ENTRY = "meta_sites"
#: Re-mapping modes.
MODES: tuple[str, ...] = ("histogram", "meanstd")
#: Added to every bin before the CDF is built, so the CDF is strictly increasing.
_BIN_FLOOR = 1e-6


@dataclass(frozen=True)
class IntensityStats:
    """Intensity statistics of one site's volume set.

    Attributes:
        mean: mean intensity (bundle units).
        std: standard deviation.
        low, high: the histogram's range (the ``clip`` and ``1 - clip`` quantiles), ``low < high``.
        hist: ``(bins,)`` frequencies over ``[low, high]`` in equal bins, summing to 1.
    """

    mean: float
    std: float
    low: float
    high: float
    hist: np.ndarray

    def __post_init__(self) -> None:
        hist = np.asarray(self.hist, dtype=np.float64)
        if hist.ndim != 1 or not 1 <= hist.size <= MAX_BINS:
            raise ValueError(f"histogram must be 1-D with 1..{MAX_BINS} bins, got shape {hist.shape}")
        if not (np.isfinite([self.mean, self.std, self.low, self.high]).all() and np.isfinite(hist).all()):
            raise ValueError("intensity statistics must be finite")
        if not self.high > self.low or self.std < 0 or (hist < 0).any() or hist.sum() <= 0:
            raise ValueError(
                f"invalid intensity statistics: range ({self.low}, {self.high}), std {self.std}, "
                f"histogram sum {hist.sum()}"
            )

    def to_entries(self) -> dict[str, np.ndarray]:
        """The ``stats/`` entries (without the kind prefix) of these statistics."""
        return {
            "meta_mean": np.float64(self.mean),
            "meta_std": np.float64(self.std),
            "meta_range": np.array([self.low, self.high], dtype=np.float64),
            "meta_hist": np.asarray(self.hist, dtype=np.float32),
        }

    @classmethod
    def from_entries(cls, entries: Mapping[str, np.ndarray], row: int | None = None) -> IntensityStats:
        """Statistics from :meth:`to_entries` entries, or from row ``row`` of a stacked download."""

        def take(name: str) -> np.ndarray:
            value = np.asarray(entries[name])
            return value if row is None else value[row]

        low, high = (float(v) for v in take("meta_range"))
        return cls(float(take("meta_mean")), float(take("meta_std")), low, high, take("meta_hist"))

    def _edges_and_cdf(self) -> tuple[np.ndarray, np.ndarray]:
        """Bin edges ``(bins + 1,)`` and the strictly increasing CDF at them (0 to 1)."""
        hist = np.asarray(self.hist, dtype=np.float64)
        hist = hist / hist.sum() + _BIN_FLOOR
        cdf = np.concatenate([[0.0], np.cumsum(hist)])
        return np.linspace(self.low, self.high, hist.size + 1), cdf / cdf[-1]

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """Piecewise-linear CDF at ``x`` (0 below ``low``, 1 above ``high``)."""
        edges, cdf = self._edges_and_cdf()
        return np.interp(x, edges, cdf)

    def quantile(self, p: np.ndarray) -> np.ndarray:
        """Piecewise-linear quantile function (inverse of :meth:`cdf`) at ``p`` in [0, 1]."""
        edges, cdf = self._edges_and_cdf()
        return np.interp(p, cdf, edges)


def intensity_stats(volumes: Sequence[torch.Tensor], bins: int = 32, clip: float = 0.005) -> IntensityStats:
    """The statistics of a site's volume set (every voxel of every volume together).

    Args:
        volumes: preprocessed volumes, any shapes.
        bins: histogram bins, 1 to :data:`MAX_BINS`.
        clip: quantile of the histogram's lower end (the upper end is ``1 - clip``), in [0, 0.5).

    Raises:
        ValueError: no volumes, bad ``bins``/``clip``, or constant intensities.
    """
    if not volumes:
        raise ValueError("no volumes to take intensity statistics of")
    if not 1 <= bins <= MAX_BINS:
        raise ValueError(f"histogram bins must be in [1, {MAX_BINS}], got {bins}")
    if not 0.0 <= clip < 0.5:
        raise ValueError(f"clip must be in [0, 0.5), got {clip}")
    values = torch.cat([torch.as_tensor(v).flatten() for v in volumes]).double().numpy()
    low, high = (float(q) for q in np.quantile(values, [clip, 1.0 - clip]))
    if not high > low:
        raise ValueError(f"intensities are constant between the {clip} quantiles ({low}); nothing to share")
    hist, _ = np.histogram(np.clip(values, low, high), bins=bins, range=(low, high))
    return IntensityStats(float(values.mean()), float(values.std()), low, high, hist / hist.sum())


def remap(
    x: np.ndarray,
    source: IntensityStats,
    target: IntensityStats,
    mode: str = "histogram",
    strength: float = 1.0,
) -> np.ndarray:
    """Re-map intensities ``x`` from ``source``'s statistics to ``target``'s (see the module docstring).

    Args:
        x: intensities, any shape.
        source: statistics of the data ``x`` comes from (the site's own).
        target: the statistics to imitate.
        mode: ``"histogram"`` (histogram matching) or ``"meanstd"`` (re-standardisation).
        strength: s in [0, 1]; the result is ``(1 - s) x + s map(x)``.

    Returns:
        float64 array of ``x``'s shape; a strictly increasing function of ``x`` (for s > 0 and a
        positive source std).
    """
    if mode not in MODES:
        raise ValueError(f"metadata_mode must be one of {MODES}, got {mode!r}")
    x = np.asarray(x, dtype=np.float64)
    if mode == "meanstd":
        mapped = (x - source.mean) / max(source.std, 1e-12) * target.std + target.mean
    else:
        mapped = target.quantile(source.cdf(x))
        slope = (target.high - target.low) / (source.high - source.low)
        mapped = np.where(x < source.low, target.low + (x - source.low) * slope, mapped)
        mapped = np.where(x > source.high, target.high + (x - source.high) * slope, mapped)
    return (1.0 - strength) * x + strength * mapped


def stack_entries(per_site: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several sites' :data:`STATS_ENTRIES` stacked (one row per site, in the mapping's order)."""
    return {name: np.stack([np.asarray(e[name]) for e in per_site.values()]) for name in STATS_ENTRIES}


def stats_from_download(entries: Mapping[str, np.ndarray]) -> list[IntensityStats]:
    """The other sites' statistics from a download's ``stats/`` entries (empty when none were sent)."""
    if "meta_hist" not in entries:
        return []
    return [IntensityStats.from_entries(entries, row) for row in range(len(entries["meta_hist"]))]


class IntensityTransfer:
    """The metadata-transfer augmentation: re-maps samples to a random other site's statistics.

    Args:
        own: the site's own statistics (the source of every map).
        mode: ``"histogram"`` or ``"meanstd"`` (:func:`remap`).
        prob: probability that a sample is re-mapped.
        strength: s of :func:`remap`.
        seed: seed of the choices (whether, and to which site).
    """

    def __init__(
        self,
        own: IntensityStats,
        mode: str = "histogram",
        prob: float = 0.5,
        strength: float = 1.0,
        seed: int = 0,
    ):
        if mode not in MODES:
            raise ValueError(f"metadata_mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= prob <= 1.0 or not 0.0 <= strength <= 1.0:
            raise ValueError(f"metadata_prob and metadata_strength must be in [0, 1], got {prob}, {strength}")
        self.own = own
        self.mode = mode
        self.prob = prob
        self.strength = strength
        self.targets: list[IntensityStats] = []
        self.rng = np.random.default_rng(seed)

    def set_targets(self, targets: Sequence[IntensityStats]) -> None:
        """The other sites' statistics to draw from (none: samples pass unchanged)."""
        self.targets = list(targets)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, ...)`` samples, each re-mapped with probability ``prob``; same shape, dtype and device."""
        if not self.targets or self.prob == 0.0:
            return images
        out = images.detach().cpu().clone()
        for i in range(out.shape[0]):
            if self.rng.random() >= self.prob:
                continue
            target = self.targets[int(self.rng.integers(len(self.targets)))]
            mapped = remap(out[i].double().numpy(), self.own, target, self.mode, self.strength)
            out[i] = torch.as_tensor(mapped, dtype=out.dtype)
        return out.to(images.device)
