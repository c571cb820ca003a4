"""FCL: federated contrastive learning with feature exchange (Wu et al., MICCAI 2021; SPEC §1).

Each site trains the bundle encoder f with a projection head g, and keeps a
momentum copy (f', g') updated by EMA after every step. Key features come from
the momentum copy and fill two banks organised by partition: the local bank
(this site's recent keys, a FIFO of ``local_bank_size`` per partition) and the
remote bank (the other sites' features of the previous round, replaced every
round). Every step draws ``local_samples`` and ``remote_samples`` features per
partition from them and minimises, for each query q = g(f(x)) of partition s,

    L = l(q, P(q), Q') + l(q, Λ(q), Q')

with :func:`~fedcontrast.methods.losses.fcl_loss`: ``P(q)`` are the local features of
partition s (this step's keys of the other view, among them the query's own other
view, and the local-bank sample), ``Λ(q)`` the remote-bank sample of partition s,
``Q'`` the local and remote features of every other partition. Both views serve
as queries in turn; the loss is the mean of the two directions.

Messages (see :mod:`fedcontrast.methods.exchange` for the feature layout):

- down: ``weights/encoder.*``, ``weights/head.*`` (global f, g) and, from round 1,
  ``features/embeddings`` ``(K, C)`` float32, ``features/partitions`` ``(K,)`` int64 and
  ``features/sites`` ``(K,)`` int64 of the other sites;
- up: the site's ``weights/`` and ``features/embeddings`` + ``features/partitions``:
  the momentum encoder's keys of one augmented sample per partition of up to
  ``features_per_partition`` of its volumes. Nothing else about the data leaves.

Configuration: :data:`DEFAULTS` = the common keys of
:mod:`fedcontrast.methods.pretrain` plus

- ``momentum`` (0.99): EMA factor of the momentum encoder;
- ``momentum_init`` (``"global"``): at the start of every round the momentum encoder is a
  copy of the received global weights (``"global"``), or keeps its own EMA across rounds
  (``"keep"``; initialised from the round-0 weights);
- ``features_per_partition`` (16): K, most features uploaded per partition;
- ``local_bank_size`` (32): local-bank features kept per partition;
- ``local_samples`` (8), ``remote_samples`` (8): features drawn per partition and step from
  the local and remote banks (with replacement when a partition holds fewer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedcontrast.methods.banks import PartitionBank
from fedcontrast.methods.base import Message, check_choice, pack
from fedcontrast.methods.exchange import FeatureExchange, refill_remote_bank
from fedcontrast.methods.losses import fcl_loss
from fedcontrast.methods.partitions import PartitionBatch
from fedcontrast.methods.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from fedcontrast.methods.pretrain import ContrastivePretrainer
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.nets.encoder import ema_update, momentum_copy

DEFAULTS: dict[str, Any] = {
    **PRETRAIN_DEFAULTS,
    "momentum": 0.99,
    "momentum_init": "global",
    "features_per_partition": 16,
    "local_bank_size": 32,
    "local_samples": 8,
    "remote_samples": 8,
}

MOMENTUM_INITS: tuple[str, ...] = ("global", "keep")


class FCLTrainer(ContrastivePretrainer):
    """FCL at one site (see the module docstring)."""

    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        super().__init__(config, datalist, site, device)
        check_choice(self.config, "momentum_init", MOMENTUM_INITS)
        num_partitions, dim = int(self.config["partitions"]), int(self.config["embedding_dim"])
        self.local_bank = PartitionBank(num_partitions, dim, capacity=int(self.config["local_bank_size"]))
        self.remote_bank = PartitionBank(num_partitions, dim, exclude_site=self.tag)
        self.momentum_model: torch.nn.Module | None = None

    def begin_round(self, incoming: Message) -> None:
        """(Re)initialise the momentum encoder and replace the remote bank by the received features.

        The momentum encoder stays in training mode: keys use batch statistics, as in MoCo.
        """
        if self.momentum_model is None or self.config["momentum_init"] == "global":
            self.momentum_model = momentum_copy(self.model)
        self.momentum_model.train()
        refill_remote_bank(self.remote_bank, incoming)

    def training_step(self, batch: PartitionBatch) -> dict[str, torch.Tensor]:
        """Both FCL terms with each view as the query in turn; the first view's keys enter the local bank."""
        views = self.two_views(batch)
        q1, q2 = self.model(views).chunk(2)
        with torch.no_grad():
            k1, k2 = self.momentum_model(views).chunk(2)
        parts = batch.partitions.to(self.device)
        local = self.local_bank.sample(int(self.config["local_samples"]), self.rng, self.device)
        remote = self.remote_bank.sample(int(self.config["remote_samples"]), self.rng, self.device)
        local_parts = torch.cat([parts, local.partitions])
        terms = [
            fcl_loss(
                q,
                parts,
                torch.cat([k, local.features]),
                local_parts,
                remote.features,
                remote.partitions,
                float(self.config["temperature"]),
            )
            for q, k in ((q1, k2), (q2, k1))
        ]
        self.local_bank.push(k1, batch.partitions, batch.sites)
        loss_local = (terms[0][0] + terms[1][0]) / 2
        loss_remote = (terms[0][1] + terms[1][1]) / 2
        return {"loss": loss_local + loss_remote, "loss_local": loss_local, "loss_remote": loss_remote}

    def after_step(self) -> None:
        """EMA update of the momentum encoder."""
        ema_update(self.momentum_model, self.model, float(self.config["momentum"]))

    @torch.no_grad()
    def key_features(self) -> dict[str, np.ndarray]:
        """Fresh keys to share: one augmented sample per partition of up to K random volumes.

        Returns:
            ``{"embeddings": (n*S, C) float32, "partitions": (n*S,) int64}``, n = min(K, volumes).
        """
        n = min(int(self.config["features_per_partition"]), len(self.volumes))
        ids = sorted(self.rng.choice(len(self.volumes), size=n, replace=False).tolist())
        m = int(self.config["batch_size"])
        embeddings, partitions = [], []
        for start in range(0, n, m):
            chunk = ids[start : start + m]
            batch = self.sampler.sample([self.volumes[i] for i in chunk], chunk, self.tag, self.rng)
            embeddings.append(self.momentum_model(self.augment.view(batch.images).to(self.device)).cpu())
            partitions.append(batch.partitions)
        return {
            "embeddings": torch.cat(embeddings).numpy().astype(np.float32),
            "partitions": torch.cat(partitions).numpy().astype(np.int64),
        }

    def upload(self) -> Message:
        """Weights plus the momentum encoder's fresh key features and their partitions."""
        return {**self.weights_message(), **pack("features", self.key_features())}


register(
    MethodSpec(
        name="fcl",
        trainer=FCLTrainer,
        strategy=FeatureExchange,
        federated=True,
        pretraining=True,
        description="FCL: contrastive pre-training with exchanged features and global structural matching",
    )
)
