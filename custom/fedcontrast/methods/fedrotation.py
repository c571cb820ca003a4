"""FedRotation: rotation prediction at each site, FedAvg of the encoder (SPEC §6 baseline).

The pretext task of RotNet (Gidaris et al., 2018): every sample of a partition batch
(slice, or slab rotated in-plane) is shown at the four in-plane rotations 0, 90, 180
and 270 degrees, and the encoder with a classification head (global average pool, MLP,
4 logits; :class:`~fedcontrast.nets.heads.ClassificationHead`) predicts which one
(cross-entropy). Every sample appears at all four angles, so the classes are balanced.
Before rotating, one random view of each sample is drawn from the shared augmentation
with its quarter turns and flips switched off (they would make the label ambiguous); its
crop, small rotation and intensity changes stay. The server averages ``encoder.*`` and
``head.*`` weighted by samples seen (the default :class:`~fedcontrast.methods.base.ServerStrategy`).

Configuration (:data:`DEFAULTS`): the common pre-training keys of
:mod:`~fedcontrast.methods.pretrain` (``head_hidden`` sizes the classifier's hidden layer;
``embedding_dim`` and ``temperature`` are unused). In-plane sizes must be square (the
bundle's ``roi_size``), since a quarter turn swaps height and width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedcontrast.methods.base import ServerStrategy
from fedcontrast.methods.partitions import PartitionBatch
from fedcontrast.methods.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from fedcontrast.methods.pretrain import ContrastivePretrainer
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.encoder import EncoderWithHead, deepest_channels
from fedcontrast.nets.heads import ClassificationHead

#: Number of rotation classes: 0, 90, 180, 270 degrees.
ROTATIONS = 4

DEFAULTS: dict[str, Any] = {
    **PRETRAIN_DEFAULTS,
    "augment": {"flip_prob": 0.0, "rot90_prob": 0.0},
}


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample at the four in-plane rotations.

    Args:
        images: ``(B, C, H, W)`` slices or ``(B, C, H, W, T)`` slabs, ``H == W``.

    Returns:
        ``(rotated, labels)``: ``(4B, C, H, W[, T])``, rotation-major (rows ``k*B .. k*B+B-1``
        are turned ``k`` quarter turns counter-clockwise in the (H, W) plane), and ``(4B,)``
        int64 labels ``k``.
    """
    if images.shape[2] != images.shape[3]:
        raise ValueError(
            f"rotation prediction needs square slices, got in-plane size {tuple(images.shape[2:4])}"
        )
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


class RotationTrainer(ContrastivePretrainer):
    """Rotation prediction at one site (see the module docstring)."""

    DEFAULTS = DEFAULTS

    @classmethod
    def build_model(cls, config: Mapping[str, Any]) -> nn.Module:
        """The bundle encoder with a 4-way :class:`ClassificationHead` (keys ``encoder.*``, ``head.*``)."""
        encoder = build_network(config["bundle_dir"], config["bundle"]).encoder
        head = ClassificationHead(deepest_channels(encoder), int(config["head_hidden"]), ROTATIONS)
        return EncoderWithHead(encoder, head)

    def training_step(self, batch: PartitionBatch) -> dict[str, torch.Tensor]:
        """Cross-entropy of the rotation of every sample at every angle; ``accuracy`` is logged too."""
        view = self.augment.view(batch.images)
        images, labels = rotate_batch(view.to(self.device))
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "accuracy": accuracy}


register(
    MethodSpec(
        name="fedrotation",
        trainer=RotationTrainer,
        strategy=ServerStrategy,
        federated=True,
        pretraining=True,
        description="FedRotation: rotation prediction (0/90/180/270 in-plane) per site, FedAvg of encoder",
    )
)
