"""Access to the bundle network's encoder for pre-training, and momentum (EMA) copies.

Pre-training trains the segmentation network's encoder f with a projection
head g on top (SPEC §0). :class:`EncoderWithHead` holds the two under the
attribute names ``encoder`` and ``head``, so its state dict has exactly the
message weight names of docs/architecture.md: ``encoder.<key>`` (``<key>`` as in
``network.encoder.state_dict()``) and ``head.<key>``. The encoder module is the
one of a network built by :func:`fedcontrast.nets.bundle.build_network`; no
second network is defined here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.heads import ProjectionHead


def deepest_channels(encoder: nn.Module) -> int:
    """Channels of the deepest feature map of a MONAI ``SegResEncoder``.

    The encoder doubles its width at every level: ``init_filters * 2 ** (levels - 1)``.
    """
    return stage_channels(encoder, -1)


def stage_channels(encoder: nn.Module, stage: int) -> int:
    """Channels of the feature map ``encoder(x)[stage]`` of a MONAI ``SegResEncoder`` (``init_filters``
    doubled at every level; ``stage`` indexes the list of maps, -1 the deepest)."""
    levels = len(encoder.blocks_down)
    return int(encoder.init_filters) * 2 ** (stage % levels)


class EncoderWithHead(nn.Module):
    """Encoder f and projection head g: ``x -> g(f(x)[stage])``.

    Args:
        encoder: the segmentation network's encoder; ``encoder(x)`` returns a list of
            feature maps, the last the deepest.
        head: maps the stage's feature map to an embedding.
        stage: which of the encoder's maps the head reads (-1, the deepest, by default).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, stage: int = -1):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.stage = stage

    @property
    def spatial_dims(self) -> int:
        """2 for a slice-wise encoder, 3 for a volumetric one."""
        return int(self.encoder.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W[, T])`` images -> ``(B, dim)`` embeddings."""
        return self.head(self.encoder(x)[self.stage])


def build_encoder_with_head(
    bundle_dir: str | None = None,
    network_overrides: Mapping[str, Any] | None = None,
    hidden_channels: int = 256,
    out_channels: int = 128,
    head_norm: str = "batch",
) -> EncoderWithHead:
    """The bundle network's encoder with a fresh :class:`ProjectionHead`.

    Args:
        bundle_dir: bundle folder (None: the default bundle).
        network_overrides: bundle config overrides (e.g. ``{"init_filters": 8}``).
        hidden_channels: head MLP hidden width.
        out_channels: embedding dimension.
        head_norm: the head's hidden-layer normalisation (``"batch"`` or ``"none"``).
    """
    encoder = build_network(bundle_dir, dict(network_overrides or {})).encoder
    head = ProjectionHead(deepest_channels(encoder), hidden_channels, out_channels, head_norm)
    return EncoderWithHead(encoder, head)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of ``module`` to be updated by :func:`ema_update` only."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` for every floating-point state entry.

    Parameters and floating-point buffers (BatchNorm running statistics) are averaged;
    integer buffers (BatchNorm batch counters) are copied from ``source``.
    """
    source_state = source.state_dict()
    for name, value in target.state_dict().items():
        if value.is_floating_point():
            value.mul_(momentum).add_(source_state[name], alpha=1.0 - momentum)
        else:
            value.copy_(source_state[name])
