"""FedDense: the local (region) contrastive loss on the encoder's deepest map, FedAvg of the encoder.

Every other pre-training method poses its pretext task on *pooled* slice embeddings (the
projection or classification head starts with a global average pool, SPEC §0). FedDense
keeps the spatial map instead: the encoder's deepest feature map (or the ``feature_stage``
one) goes through the local projection g2 of SPEC §4
(:class:`~fedcontrast.nets.heads.LocalProjectionHead`: two 1x1 convs, one embedding per
region of a ``grid x grid`` grid of ``window x window`` windows) and the encoder *and* g2
are trained with the local loss on two intensity-only views of each
partition batch (``"L^R"``: positive = the same region in the other view; ``"L^D"``: plus the
same region of same-partition slices of other volumes; negatives = the other regions). It is
the decoder stage's loss (:mod:`~fedcontrast.methods.local_decoder`) moved onto the encoder,
so that the two pretext families differ in the pooling only. The server averages
``encoder.*`` and ``head.*`` weighted by samples seen (the default
:class:`~fedcontrast.methods.base.ServerStrategy`); only weights leave a site.

With ``turned_views`` the views also differ by a random in-plane symmetry of the square
(quarter turn, then a flip; one of 8 per sample, :func:`turn`): view 2 is turned before the
encoder and its map turned back before the windows are cut, so a window still faces
the same place of the slice in both views, but its position in the encoder's map no longer
identifies it (zero padding lets a network tell where a window is, which alone solves the
intensity-only task).

It is the project's ablation of the pooled pretext (issue 10, ablations README section 13),
not a published method; it hands over an encoder like any pre-training method, so the
benchmark, the jobs (``jobs/fcl/job.py --method feddense``) and fine-tuning take it as they
take FCL's.

Configuration (:data:`DEFAULTS`): the common pre-training keys of
:mod:`~fedcontrast.methods.pretrain` (``head_hidden`` is unused: g2 keeps the map's width),
``turned_views`` (False), ``feature_stage`` (-1: which encoder map the regions are cut
from, -2 the one above the deepest) and the decoder stage's ``loss_strategy``, ``local_negatives``,
``grid``, ``window`` and intensity-only ``augment`` (the augmentation's own spatial options
are refused: it does not say how it moved a view, so regions could not be matched). The
chosen map must hold the region grid: the bench network's deepest is 12 x 12 on its 48 x 48
slices, the one above it 24 x 24.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedcontrast.methods.base import ServerStrategy
from fedcontrast.methods.local_decoder import REGION_DEFAULTS, RegionContrastivePretrainer
from fedcontrast.methods.partitions import PartitionBatch
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.encoder import EncoderWithHead, stage_channels
from fedcontrast.nets.heads import LocalProjectionHead

DEFAULTS: dict[str, Any] = {**REGION_DEFAULTS, "turned_views": False, "feature_stage": -1}

#: The in-plane symmetries of a square: 4 quarter turns, each with and without a flip.
SYMMETRIES = 8


def turn(images: torch.Tensor, symmetries: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Each sample turned by its symmetry of the square (or turned back, ``inverse``).

    Args:
        images: ``(B, C, H, W[, T])`` slices, slabs or feature maps, ``H == W``.
        symmetries: ``(B,)`` ints in ``[0, 8)``: ``k % 4`` quarter turns counter-clockwise in the
            (H, W) plane, then a flip along W when ``k >= 4``.
        inverse: undo the symmetry (flip back first, then turn back).

    Returns:
        A tensor shaped like ``images``.
    """
    if images.shape[2] != images.shape[3]:
        raise ValueError(f"turned views need square maps, got in-plane size {tuple(images.shape[2:4])}")
    turned = []
    for image, k in zip(images, symmetries.tolist(), strict=True):
        quarter, flip = k % 4, k >= 4
        if inverse:
            image = image.flip(2) if flip else image
            turned.append(torch.rot90(image, -quarter, dims=(1, 2)))
        else:
            image = torch.rot90(image, quarter, dims=(1, 2))
            turned.append(image.flip(2) if flip else image)
    return torch.stack(turned)


class DenseEncoderTrainer(RegionContrastivePretrainer):
    """The local loss on one encoder map at one site (see the module docstring)."""

    DEFAULTS = DEFAULTS

    @classmethod
    def build_model(cls, config: Mapping[str, Any]) -> nn.Module:
        """The bundle encoder with g2 on its ``feature_stage`` map (keys ``encoder.*``, ``head.*``):
        images ``(B, C, H, W[, T])`` -> ``(B[*T'], grid * grid, embedding_dim)`` unit-norm embeddings."""
        encoder = build_network(config["bundle_dir"], config["bundle"]).encoder
        grid, window, dim = int(config["grid"]), int(config["window"]), int(config["embedding_dim"])
        stage = int(config["feature_stage"])
        head = LocalProjectionHead(stage_channels(encoder, stage), grid, window, dim)
        return EncoderWithHead(encoder, head, stage)

    def region_embeddings(self, batch: PartitionBatch) -> torch.Tensor:
        """Both views' region embeddings; with ``turned_views``, view 2 turned and its map turned back."""
        if not self.config["turned_views"]:
            return super().region_embeddings(batch)
        views = self.two_views(batch)
        n = views.shape[0] // 2
        symmetries = torch.from_numpy(self.rng.integers(0, SYMMETRIES, n))
        maps = self.model.encoder(torch.cat([views[:n], turn(views[n:], symmetries)]))[self.model.stage]
        return self.model.head(torch.cat([maps[:n], turn(maps[n:], symmetries, inverse=True)]))


register(
    MethodSpec(
        name="feddense",
        trainer=DenseEncoderTrainer,
        strategy=ServerStrategy,
        federated=True,
        pretraining=True,
        description="FedDense (ablation): region contrast on the encoder's deepest map, FedAvg of encoder",
    )
)
