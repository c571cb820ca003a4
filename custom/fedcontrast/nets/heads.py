"""Heads put on top of the segmentation network's encoder during pre-training.

Heads are kept apart from losses (:mod:`fedcontrast.methods.losses`) and memory
banks (:mod:`fedcontrast.methods.banks`): a method combines one of each.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: ``norm`` choices of the heads: BatchNorm in the hidden layer, as the SimCLR, MoCo v2 and BYOL
#: projectors (and BYOL's predictor) have it, or none.
HEAD_NORMS: tuple[str, ...] = ("batch", "none")


class MLP(nn.Sequential):
    """Two-layer perceptron ``Linear -> [BatchNorm1d] -> ReLU -> Linear``, ``(B, in) -> (B, out)``.

    Args:
        in_channels: input width.
        hidden_channels: hidden width.
        out_channels: output width.
        norm: ``"batch"`` (BatchNorm in the hidden layer; the hidden Linear then has no bias)
            or ``"none"``.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, norm: str = "batch"):
        if norm not in HEAD_NORMS:
            raise ValueError(f"head norm must be one of {HEAD_NORMS}, got {norm!r}")
        batch_norm = norm == "batch"
        hidden = [nn.Linear(in_channels, hidden_channels, bias=not batch_norm)]
        if batch_norm:
            hidden.append(nn.BatchNorm1d(hidden_channels))
        super().__init__(*hidden, nn.ReLU(inplace=True), nn.Linear(hidden_channels, out_channels))


class ProjectionHead(nn.Module):
    """Projection head g: global average pool, :class:`MLP`, L2 normalisation (SPEC §0).

    Args:
        in_channels: channels of the feature map it receives (the encoder's deepest level).
        hidden_channels: MLP hidden width.
        out_channels: embedding dimension (128 by default).
        norm: hidden-layer normalisation, see :class:`MLP`.
    """

    def __init__(
        self, in_channels: int, hidden_channels: int = 256, out_channels: int = 128, norm: str = "batch"
    ):
        super().__init__()
        self.mlp = MLP(in_channels, hidden_channels, out_channels, norm)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` feature map -> ``(B, out_channels)`` unit-norm embeddings."""
        pooled = feature_map.flatten(2).mean(dim=2)
        return F.normalize(self.mlp(pooled), dim=1)


class PredictionHead(MLP):
    """Predictor h of the BYOL-style methods (SPEC §2): an :class:`MLP` ``(B, dim) -> (B, dim)``.

    Its output is not normalised: the negative-cosine loss compares directions only.

    Args:
        dim: embedding dimension (the projection head's ``out_channels``).
        hidden_channels: MLP hidden width.
        norm: hidden-layer normalisation, see :class:`MLP`.
    """

    def __init__(self, dim: int = 128, hidden_channels: int = 256, norm: str = "batch"):
        super().__init__(dim, hidden_channels, dim, norm)


class ClassificationHead(nn.Module):
    """Pretext classifier on the encoder's deepest map: global average pool, :class:`MLP`, logits.

    FedRotation's head (4 classes: 0, 90, 180, 270 degrees).

    Args:
        in_channels: channels of the feature map it receives.
        hidden_channels: MLP hidden width.
        num_classes: number of classes.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 256, num_classes: int = 4):
        super().__init__()
        self.mlp = MLP(in_channels, hidden_channels, num_classes)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` feature map -> ``(B, num_classes)`` logits (not normalised)."""
        return self.mlp(feature_map.flatten(2).mean(dim=2))


def region_grid(height: int, width: int, grid: int, window: int) -> list[tuple[int, int]]:
    """Top-left corners of the ``grid x grid`` regions of a ``height x width`` feature map.

    Region ``(i, j)`` (row-major, ``r = i * grid + j``) is the ``window x window`` square
    centred on the centre of grid cell ``(i, j)`` (cells of ``height / grid`` by
    ``width / grid`` pixels), shifted inside the map where it would overlap the border.

    Raises:
        ValueError: the map is smaller than the window, or has fewer pixels than grid cells
            along a side (the message gives the sizes).
    """
    if grid < 1 or window < 1:
        raise ValueError(f"grid and window must be >= 1, got grid={grid}, window={window}")
    if height < max(window, grid) or width < max(window, grid):
        raise ValueError(
            f"a {height}x{width} feature map is too small for a {grid}x{grid} grid of "
            f"{window}x{window} regions (use fewer decoder levels, a smaller grid or window)"
        )
    corners = []
    for i in range(grid):
        for j in range(grid):
            cy = int((i + 0.5) * height / grid)
            cx = int((j + 0.5) * width / grid)
            y0 = min(max(cy - window // 2, 0), height - window)
            x0 = min(max(cx - window // 2, 0), width - window)
            corners.append((y0, x0))
    return corners


def extract_regions(feature_map: torch.Tensor, grid: int, window: int) -> torch.Tensor:
    """The :func:`region_grid` windows of a 2D feature map, flattened.

    Args:
        feature_map: ``(B, C, H, W)``.
        grid, window: see :func:`region_grid`.

    Returns:
        ``(B, grid * grid, C * window * window)``, regions row-major, each window flattened
        channel-major (``C, window, window``).
    """
    if feature_map.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(feature_map.shape)}")
    height, width = feature_map.shape[2:]
    windows = [
        feature_map[:, :, y0 : y0 + window, x0 : x0 + window].flatten(1)
        for y0, x0 in region_grid(height, width, grid, window)
    ]
    return torch.stack(windows, dim=1)


class LocalProjectionHead(nn.Module):
    """Local projection g2 of Chaitanya et al. (SPEC §4): 1x1 convs, then one embedding per region.

    Two 1x1 convolutions with the map's channel count (BatchNorm + ReLU after the first
    only), then the :func:`region_grid` windows, each flattened and mapped by one shared
    linear layer to ``out_channels``, L2-normalised. A 3D slab map ``(B, C, h, w, T)`` is
    embedded slice by slice (windows in-plane): its output has ``B * T`` rows, slab-major
    (row ``b * T + t``).

    Args:
        in_channels: channels of the feature map (a decoder level's, or an encoder stage's).
        grid: regions per side (``grid * grid`` regions).
        window: side of each region's window in feature-map pixels.
        out_channels: embedding dimension.
    """

    def __init__(self, in_channels: int, grid: int = 4, window: int = 3, out_channels: int = 128):
        super().__init__()
        self.grid = grid
        self.window = window
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size=1),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, in_channels, kernel_size=1),
        )
        self.linear = nn.Linear(in_channels * window * window, out_channels)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W[, T])`` map -> ``(B[*T], grid * grid, out_channels)`` unit-norm region embeddings."""
        if feature_map.ndim == 5:  # (B, C, h, w, T) -> (B*T, C, h, w), slab-major
            feature_map = feature_map.permute(0, 4, 1, 2, 3).flatten(0, 1)
        regions = extract_regions(self.convs(feature_map), self.grid, self.window)
        return F.normalize(self.linear(regions), dim=-1)
