"""The bundle network's decoder blocks for local contrastive pre-training, and their checkpoint.

The bundle network is MONAI ``SegResNetDS``: ``encoder`` returns one feature map per
level, and ``up_layers[i]`` (``upsample``, ``blocks``, ``head``) climbs one level, adding
the encoder's skip connection. Local contrastive pre-training (SPEC §4) trains the
**decoder blocks** of the first ``levels`` up-sampling levels on a frozen encoder: the
``up_layers.<i>.upsample.*`` and ``up_layers.<i>.blocks.*`` entries for ``i < levels``
(:func:`decoder_block_keys`). The levels' ``head`` entries (the segmentation and
deep-supervision heads), the remaining levels and the output head are not pre-trained:
fine-tuning starts them random, as in the authors' code.

:class:`DecoderTrunk` is the network truncated after those levels: the same modules as a
network built by :func:`fedcontrast.nets.bundle.build_network`, so its state-dict keys are
the network's own (``encoder.*``, ``up_layers.*``); no second network is defined here.

**Checkpoint** (written by :func:`save_decoder_checkpoint`; read and loaded by the bundle's
``scripts/decoder.py``, which the bundle's train config calls for ``pretrained_decoder`` and
:func:`load_pretrained_decoder` wraps, so that the bundle needs no fedcontrast): a
``torch.save``-d dict that says what it holds; its keys are described once, in that script's
docstring.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedcontrast.nets.bundle import bundle_scripts

logger = logging.getLogger(__name__)

#: The bundle's ``scripts/decoder.py``: the checkpoint's format, its decoder keys and its loader
#: (one implementation, shared with the bundle's train config).
_scripts = bundle_scripts("decoder")
CHECKPOINT_FORMAT: str = _scripts.CHECKPOINT_FORMAT
CHECKPOINT_VERSION: int = _scripts.CHECKPOINT_VERSION
num_levels = _scripts.num_levels
decoder_block_keys = _scripts.decoder_block_keys
read_decoder_checkpoint = _scripts.read_decoder_checkpoint


def resolve_levels(network: nn.Module, levels: int | None) -> int:
    """``levels`` checked against the network; None: all levels but the last (full-resolution) one, >= 1.

    Raises:
        ValueError: ``levels`` outside ``[1, num_levels(network)]``.
    """
    total = num_levels(network)
    if levels is None:
        return max(total - 1, 1)
    if not 1 <= int(levels) <= total:
        raise ValueError(f"decoder_levels must be in [1, {total}] for this network, got {levels}")
    return int(levels)


def level_channels(network: nn.Module, levels: int) -> int:
    """Channels of the feature map after ``levels`` up-sampling levels (the last conv's output channels)."""
    convs = [
        m for m in network.up_layers[levels - 1]["blocks"].modules() if isinstance(m, nn.modules.conv._ConvNd)
    ]
    if not convs:
        convs = [m for m in network.up_layers[levels - 1].modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return int(convs[-1].out_channels)


class DecoderTrunk(nn.Module):
    """The bundle network truncated after its first ``levels`` up-sampling levels.

    ``forward`` mirrors ``SegResNetDS``: encoder maps, deepest first; each level
    up-samples, adds the skip connection and runs its blocks. The encoder is frozen:
    no gradients, always in eval mode (its BatchNorm statistics never change).

    Args:
        network: a bundle network (its modules are shared, not copied).
        levels: up-sampling levels kept (see :func:`resolve_levels`).
    """

    def __init__(self, network: nn.Module, levels: int | None = None):
        super().__init__()
        if getattr(network, "preprocess", None) is not None:
            raise ValueError(
                "the bundle network has an input preprocess module; DecoderTrunk does not run it"
            )
        self.levels = resolve_levels(network, levels)
        self.encoder = network.encoder
        self.encoder.requires_grad_(False)
        self.up_layers = nn.ModuleList(list(network.up_layers)[: self.levels])
        self.out_channels = level_channels(network, self.levels)

    @property
    def spatial_dims(self) -> int:
        """2 for a slice-wise network, 3 for a volumetric one."""
        return int(self.encoder.spatial_dims)

    def train(self, mode: bool = True) -> DecoderTrunk:
        """Set the decoder blocks' mode; the frozen encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W[, T])`` images -> ``(B, out_channels, h, w[, T'])`` decoder feature map."""
        with torch.no_grad():
            skips = list(self.encoder(x))
        skips.reverse()
        out = skips.pop(0)
        for level in self.up_layers:
            out = level["upsample"](out) + skips.pop(0)
            out = level["blocks"](out)
        return out

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The decoder blocks' state (network keys, ``head`` entries excluded), CPU copies."""
        return {
            f"up_layers.{k}": v.detach().cpu().clone()
            for k, v in self.up_layers.state_dict().items()
            if k.split(".")[1] in ("upsample", "blocks")
        }


def build_checkpoint(
    decoder: Mapping[str, torch.Tensor],
    levels: int,
    encoder: Mapping[str, torch.Tensor] | None,
    stages: Sequence[Mapping[str, Any]] = (),
    bundle: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The self-describing checkpoint dict (see the module docstring); ``encoder`` None leaves it out."""
    contains = (["encoder"] if encoder is not None else []) + ["decoder_blocks"]
    checkpoint: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "contains": contains,
        "decoder_levels": int(levels),
        "decoder": {k: torch.as_tensor(v).detach().cpu().clone() for k, v in decoder.items()},
        "stages": [dict(s) for s in stages],
        "bundle": dict(bundle or {}),
    }
    if encoder is not None:
        checkpoint["encoder"] = {k: torch.as_tensor(v).detach().cpu().clone() for k, v in encoder.items()}
    return checkpoint


def save_decoder_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` a :func:`build_checkpoint` dict (parent folders created)."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(checkpoint), path)


def load_pretrained_decoder(
    network: nn.Module,
    path: str | os.PathLike,
    load_encoder: bool = True,
    bundle_dir: str | os.PathLike | None = None,
) -> list[str]:
    """The bundle's ``scripts.decoder.load_pretrained_decoder`` (what its train config calls; its
    docstring gives the strict key check and the arguments) for the bundle at ``bundle_dir``
    (None: the repository's bundle); returns the loaded network keys, sorted."""
    return bundle_scripts("decoder", bundle_dir).load_pretrained_decoder(network, path, load_encoder)


class DecoderWithLocalHead(DecoderTrunk):
    """:class:`DecoderTrunk` plus the local projection g2: images -> region embeddings.

    State-dict keys: ``encoder.*`` and ``up_layers.*`` (the network's own names) and
    ``local_head.*``. A 3D network's slab map ``(B, C, h, w, T)`` is embedded slice by slice
    (windows in-plane): the output has ``B * T`` rows, slab-major (row ``b * T + t``).

    Args:
        network: a bundle network (modules shared).
        levels: up-sampling levels kept (see :func:`resolve_levels`).
        grid, window: the region grid (:func:`~fedcontrast.nets.heads.region_grid`).
        embedding_dim: region embedding size.
    """

    def __init__(
        self,
        network: nn.Module,
        levels: int | None = None,
        grid: int = 4,
        window: int = 3,
        embedding_dim: int = 128,
    ):
        from fedcontrast.nets.heads import LocalProjectionHead

        super().__init__(network, levels)
        self.local_head = LocalProjectionHead(self.out_channels, grid, window, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W[, T])`` images -> ``(B[*T], grid*grid, embedding_dim)`` unit-norm embeddings."""
        return self.local_head(super().forward(x))

    def exchanged_state_dict(self) -> dict[str, torch.Tensor]:
        """What the decoder stage trains and exchanges: the decoder blocks and ``local_head.*``."""
        head = {f"local_head.{k}": v.detach().cpu().clone() for k, v in self.local_head.state_dict().items()}
        return {**self.decoder_state_dict(), **head}
