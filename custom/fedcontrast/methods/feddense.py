"""FedDense: the local (region) contrastive loss on the encoder's deepest map, FedAvg of the encoder.

Every other pre-training method poses its pretext task on *pooled* slice embeddings (the
projection or classification head starts with a global average pool, SPEC §0). FedDense
keeps the spatial map instead: the encoder's deepest feature map goes through the local
projection g2 of SPEC §4 (:class:`~fedcontrast.nets.heads.LocalProjectionHead`: two 1x1
convs, one embedding per region of a ``grid x grid`` grid of ``window x window`` windows) and
the encoder *and* g2 are trained with the local loss on two intensity-only views of each
partition batch (``"L^R"``: positive = the same region in the other view; ``"L^D"``: plus the
same region of same-partition slices of other volumes; negatives = the other regions). It is
the decoder stage's loss (:mod:`~fedcontrast.methods.local_decoder`) moved onto the encoder,
so that the two pretext families differ in the pooling only. The server averages
``encoder.*`` and ``head.*`` weighted by samples seen (the default
:class:`~fedcontrast.methods.base.ServerStrategy`); only weights leave a site.

It is the project's ablation of the pooled pretext (issue 10, ablations README section 13),
not a published method; it hands over an encoder like any pre-training method, so the
benchmark, the jobs (``jobs/fcl/job.py --method feddense``) and fine-tuning take it as they
take FCL's.

Configuration (:data:`DEFAULTS`): the common pre-training keys of
:mod:`~fedcontrast.methods.pretrain` (``head_hidden`` is unused: g2 keeps the map's width)
plus the decoder stage's ``loss_strategy``, ``local_negatives``, ``grid``, ``window`` and
intensity-only ``augment`` (any spatial option is refused, since regions must correspond
between the views). The deepest map must hold the region grid: the bench network's is
12 x 12 on its 48 x 48 slices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from fedcontrast.methods.base import ServerStrategy
from fedcontrast.methods.local_decoder import REGION_DEFAULTS, RegionContrastivePretrainer
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.encoder import EncoderWithHead, deepest_channels
from fedcontrast.nets.heads import LocalProjectionHead

DEFAULTS: dict[str, Any] = dict(REGION_DEFAULTS)


class DenseEncoderTrainer(RegionContrastivePretrainer):
    """The local loss on the encoder's deepest map at one site (see the module docstring)."""

    DEFAULTS = DEFAULTS

    @classmethod
    def build_model(cls, config: Mapping[str, Any]) -> nn.Module:
        """The bundle encoder with g2 on its deepest map (keys ``encoder.*``, ``head.*``):
        images ``(B, C, H, W[, T])`` -> ``(B[*T'], grid * grid, embedding_dim)`` unit-norm embeddings."""
        encoder = build_network(config["bundle_dir"], config["bundle"]).encoder
        grid, window, dim = int(config["grid"]), int(config["window"]), int(config["embedding_dim"])
        head = LocalProjectionHead(deepest_channels(encoder), grid, window, dim)
        return EncoderWithHead(encoder, head)


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
