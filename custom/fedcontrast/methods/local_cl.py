"""Local contrastive learning: the global contrastive loss of Chaitanya et al. at each site alone (SPEC §4).

Each site pre-trains the bundle encoder f with a projection head g on its own
volumes; nothing is exchanged (``MethodSpec.federated`` is False). Every step
takes a two-view batch of m volumes x S partitions, embeds both views with
g(f(.)) and minimises :func:`~fedcontrast.methods.losses.global_contrastive_loss`
with ``loss_strategy``:

- ``"G^R"``: SimCLR, the other view is the only positive, all else negatives;
- ``"G^D-"``: positives as G^R, no sample of the query's partition is a negative;
- ``"G^D"`` (default): as G^D-, plus positives: the same partition of the other volumes.

:class:`GlobalContrastiveTrainer` is also the site trainer of FedSimCLR
(:mod:`fedcontrast.methods.fedsimclr`). Configuration: :data:`DEFAULTS` = the common
keys of :mod:`fedcontrast.methods.pretrain` plus ``loss_strategy``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedcontrast.methods.base import check_choice
from fedcontrast.methods.losses import GLOBAL_STRATEGIES, global_contrastive_loss
from fedcontrast.methods.partitions import PartitionBatch
from fedcontrast.methods.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from fedcontrast.methods.pretrain import ContrastivePretrainer
from fedcontrast.methods.registry import MethodSpec, register

DEFAULTS: dict[str, Any] = {**PRETRAIN_DEFAULTS, "loss_strategy": "G^D"}


class GlobalContrastiveTrainer(ContrastivePretrainer):
    """Global contrastive pre-training (G^R, G^D- or G^D) at one site."""

    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        super().__init__(config, datalist, site, device)
        check_choice(self.config, "loss_strategy", GLOBAL_STRATEGIES)

    def training_step(self, batch: PartitionBatch) -> dict[str, torch.Tensor]:
        """The global contrastive loss of both views of the batch."""
        embeddings = self.model(self.two_views(batch))
        loss = global_contrastive_loss(
            embeddings,
            batch.partitions.to(self.device),
            batch.volumes.to(self.device),
            str(self.config["loss_strategy"]),
            float(self.config["temperature"]),
        )
        return {"loss": loss}


register(
    MethodSpec(
        name="local_cl",
        trainer=GlobalContrastiveTrainer,
        federated=False,
        pretraining=True,
        description="Local contrastive learning (global loss G^D by default) at each site alone",
    )
)
