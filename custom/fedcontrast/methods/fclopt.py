"""FCLOpt: negative-free federated contrastive learning, with PTNU and DP (Wu et al., 2022; SPEC §2).

Each site trains BYOL (:class:`~fedcontrast.methods.byol.BYOLTrainer`: online network
f, g, predictor h; target network f_t, g_t, an EMA of f, g with momentum m) and adds
a global structural matching term without negatives. For an online prediction
p = h(g(f(x))) of partition s::

    L = byol_loss(p1, p2, z1, z2) + mean over both views of structural_matching_loss(p, R_s)

where ``R_s`` are ``remote_samples`` features of partition s drawn every step from the
remote bank (:class:`~fedcontrast.methods.banks.PartitionBank`, refreshed every round
with the other sites' target features of the previous round) and
:func:`~fedcontrast.methods.byol.structural_matching_loss` averages ``2 - 2 cos(p, r)``
over them. No negatives, so nothing but same-partition target features is exchanged:

- ``exchange: "features"``: the target network's features of one augmented sample per
  partition of up to ``features_per_partition`` (K) volumes, as FCL sends its keys
  (``features/embeddings`` ``(n*S, C)`` float32 unit vectors, ``features/partitions``);
- ``exchange: "prototypes"``: only their per-partition means (:func:`partition_prototypes`,
  ``(S, C)`` float32, not re-normalised, and ``(S,)`` partition ids).

The server exchanges the features as FCL's does
(:class:`~fedcontrast.methods.exchange.FeatureExchange`: a site receives the other sites'
rows, tagged ``features/sites``) and keeps the targets in step
(:class:`~fedcontrast.methods.target_sync.TargetSync`). Three registered variants differ
only in ``target_update`` (:data:`VARIANTS`): ``fclopt`` (targets averaged and sent both
ways, like federated BYOL), ``fclopt_ptnu`` (no target download) and ``fclopt_ptnu_dp``
(no target download, target uploads only past δ or every T rounds, corrections past δ).

Configuration: :data:`DEFAULTS` = :data:`~fedcontrast.methods.byol.DEFAULTS` plus ``exchange``
(``"features"``), ``features_per_partition`` (K, 16) and ``remote_samples`` (8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedcontrast.methods.banks import PartitionBank
from fedcontrast.methods.base import Message, check_choice, pack
from fedcontrast.methods.byol import DEFAULTS as BYOL_DEFAULTS
from fedcontrast.methods.byol import BYOLTrainer, byol_loss, structural_matching_loss
from fedcontrast.methods.exchange import FeatureExchange, refill_remote_bank
from fedcontrast.methods.fcl import FCLTrainer
from fedcontrast.methods.partitions import PartitionBatch
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.methods.target_sync import TargetSync

DEFAULTS: dict[str, Any] = {
    **BYOL_DEFAULTS,
    "exchange": "features",
    "features_per_partition": 16,
    "remote_samples": 8,
}

#: Values of ``exchange``.
EXCHANGES: tuple[str, ...] = ("features", "prototypes")

#: Registered method name -> its ``target_update``.
VARIANTS: dict[str, str] = {"fclopt": "average", "fclopt_ptnu": "ptnu", "fclopt_ptnu_dp": "ptnu_dp"}


def partition_prototypes(embeddings: np.ndarray, partitions: np.ndarray) -> dict[str, np.ndarray]:
    """Per-partition mean features.

    Args:
        embeddings: ``(n, C)`` features.
        partitions: ``(n,)`` their partitions.

    Returns:
        ``{"embeddings": (P, C) float32, "partitions": (P,) int64}``, one row per partition
        present, in increasing partition order.
    """
    present = np.unique(partitions)
    means = [embeddings[partitions == s].mean(axis=0) for s in present]
    return {
        "embeddings": np.stack(means).astype(np.float32),
        "partitions": present.astype(np.int64),
    }


class FCLOptTrainer(BYOLTrainer):
    """FCLOpt at one site (see the module docstring)."""

    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        super().__init__(config, datalist, site, device)
        check_choice(self.config, "exchange", EXCHANGES)
        self.remote_bank = PartitionBank(
            int(self.config["partitions"]), int(self.config["embedding_dim"]), exclude_site=self.tag
        )

    #: The target network's features of one augmented sample per partition of up to K volumes,
    #: exactly as FCL computes its keys (``self.momentum_model`` is the target network).
    key_features = FCLTrainer.key_features

    def begin_round(self, incoming: Message) -> None:
        """Set the target (:class:`BYOLTrainer`) and refill the remote bank with the received features."""
        super().begin_round(incoming)
        refill_remote_bank(self.remote_bank, incoming)

    def training_step(self, batch: PartitionBatch) -> dict[str, torch.Tensor]:
        """BYOL's local term plus the structural matching of both views' predictions."""
        p1, p2, z1, z2 = self.predict_views(batch)
        parts = batch.partitions.to(self.device)
        remote = self.remote_bank.sample(int(self.config["remote_samples"]), self.rng, self.device)
        loss_local = byol_loss(p1, p2, z1, z2)
        loss_global = (
            structural_matching_loss(p1, parts, remote.features, remote.partitions)
            + structural_matching_loss(p2, parts, remote.features, remote.partitions)
        ) / 2
        return {"loss": loss_local + loss_global, "loss_local": loss_local, "loss_global": loss_global}

    def upload(self) -> Message:
        """Weights and target (:class:`BYOLTrainer`) plus target features or their prototypes."""
        features = self.key_features()
        if self.config["exchange"] == "prototypes":
            features = partition_prototypes(features["embeddings"], features["partitions"])
        return {**super().upload(), **pack("features", features)}


class FCLOptStrategy(TargetSync, FeatureExchange):
    """FedAvg of the online weights, target synchronisation and FCL's feature exchange."""

    DEFAULTS = DEFAULTS


PTNU_DEFAULTS: dict[str, Any] = {**DEFAULTS, "target_update": VARIANTS["fclopt_ptnu"]}
PTNU_DP_DEFAULTS: dict[str, Any] = {**DEFAULTS, "target_update": VARIANTS["fclopt_ptnu_dp"]}


class FCLOptPTNUTrainer(FCLOptTrainer):
    """FCLOpt with PTNU at one site."""

    DEFAULTS = PTNU_DEFAULTS


class FCLOptPTNUStrategy(FCLOptStrategy):
    """FCLOpt's server with PTNU."""

    DEFAULTS = PTNU_DEFAULTS


class FCLOptPTNUDPTrainer(FCLOptTrainer):
    """FCLOpt with PTNU and DP at one site."""

    DEFAULTS = PTNU_DP_DEFAULTS


class FCLOptPTNUDPStrategy(FCLOptStrategy):
    """FCLOpt's server with PTNU and DP."""

    DEFAULTS = PTNU_DP_DEFAULTS


for _spec in (
    MethodSpec(
        name="fclopt",
        trainer=FCLOptTrainer,
        strategy=FCLOptStrategy,
        description="FCLOpt: BYOL with negative-free structural matching; targets averaged both ways",
    ),
    MethodSpec(
        name="fclopt_ptnu",
        trainer=FCLOptPTNUTrainer,
        strategy=FCLOptPTNUStrategy,
        description="FCLOpt + PTNU: every site predicts the global target; no target download",
    ),
    MethodSpec(
        name="fclopt_ptnu_dp",
        trainer=FCLOptPTNUDPTrainer,
        strategy=FCLOptPTNUDPStrategy,
        description="FCLOpt + PTNU + DP: target uploads only past δ or every T rounds, corrections past δ",
    ),
):
    register(_spec)
