"""Per-pixel pseudo-labels from unlabelled images, for the whole-network pretexts.

:func:`intensity_clusters` numbers each sample's pixels by intensity class (1-D k-means);
:func:`smooth_in_plane` smooths slices first so that the classes follow regions rather than
noise. :mod:`~fedcontrast.methods.fedpseudoseg` clusters the image itself,
:mod:`~fedcontrast.methods.fedmotion` the temporal spread of a patient's frames.
"""

from __future__ import annotations

import torch
from monai.networks.layers import GaussianFilter


def smooth_in_plane(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of each slice of ``(B, C, H, W[, T])`` samples (``sigma`` in pixels; 0: none)."""
    if sigma <= 0:
        return x
    slices = x.movedim(-1, 1).flatten(0, 1) if x.ndim == 5 else x  # (B * T, C, H, W)
    smoothed = GaussianFilter(2, sigma).to(x.device)(slices)
    if x.ndim == 5:
        smoothed = smoothed.view(x.shape[0], x.shape[-1], *x.shape[1:4]).movedim(1, -1)
    return smoothed


def intensity_clusters(x: torch.Tensor, clusters: int, iterations: int) -> torch.Tensor:
    """Each sample's pixels assigned to ``clusters`` intensity classes by 1-D k-means.

    The centres start at the sample's ``(k + 0.5) / clusters`` quantiles and take ``iterations``
    Lloyd steps; a class left empty keeps its centre. Classes are numbered dark to bright.

    Args:
        x: ``(B, 1, ...)`` samples.

    Returns:
        ``(B, 1, ...)`` int64 labels in ``[0, clusters)``.
    """
    values = x.flatten(1).float()  # (B, N)
    levels = (torch.arange(clusters, device=x.device, dtype=torch.float32) + 0.5) / clusters
    centres = torch.quantile(values, levels, dim=1).T  # (B, K)
    for _ in range(iterations):
        assign = (values[:, :, None] - centres[:, None, :]).abs().argmin(dim=2)  # (B, N)
        members = torch.nn.functional.one_hot(assign, clusters).float()  # (B, N, K)
        counts = members.sum(dim=1)
        sums = (members * values[:, :, None]).sum(dim=1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1.0), centres).sort(dim=1).values
    assign = (values[:, :, None] - centres[:, None, :]).abs().argmin(dim=2)
    return assign.view_as(x).long()
