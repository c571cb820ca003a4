"""Heads put on top of the segmentation network's encoder during pre-training.

Heads are kept apart from losses (:mod:`fedcontrast.methods.losses`) and memory
banks (:mod:`fedcontrast.methods.banks`): a method combines one of each.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Sequential):
    """Two-layer perceptron ``Linear -> ReLU -> Linear`` on vectors ``(B, in) -> (B, out)``.

    Args:
        in_channels: input width.
        hidden_channels: hidden width.
        out_channels: output width.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int):
        super().__init__(
            nn.Linear(in_channels, hidden_channels),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_channels, out_channels),
        )


class ProjectionHead(nn.Module):
    """Projection head g: global average pool, :class:`MLP`, L2 normalisation (SPEC §0).

    Args:
        in_channels: channels of the feature map it receives (the encoder's deepest level).
        hidden_channels: MLP hidden width.
        out_channels: embedding dimension (128 by default).
    """

    def __init__(self, in_channels: int, hidden_channels: int = 256, out_channels: int = 128):
        super().__init__()
        self.mlp = MLP(in_channels, hidden_channels, out_channels)

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
    """

    def __init__(self, dim: int = 128, hidden_channels: int = 256):
        super().__init__(dim, hidden_channels, dim)
