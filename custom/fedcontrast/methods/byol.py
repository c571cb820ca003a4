"""BYOL-style pre-training: negative-cosine losses, the online network with a predictor, the site trainer.

BYOL (Grill et al., 2020) needs no negatives. An online network (encoder f,
projection head g, predictor h) predicts, from one view, the target network's
projection of the other view; the target network (f_t, g_t) is an EMA of the
online one (momentum m, updated after every step) and gets no gradient. With
``p = h(g(f(x1)))`` and ``z = g_t(f_t(x2))`` the loss is the negative cosine
``2 - 2 cos(p, z)``, symmetrised over the two views (:func:`byol_loss`). FCLOpt
adds a negative-free global structural matching term on the same function
(:func:`structural_matching_loss`, :mod:`fedcontrast.methods.fclopt`).

:class:`BYOLTrainer` is the site side of federated BYOL
(:mod:`fedcontrast.methods.fedbyol`) and the base of FCLOpt. How the sites' targets
are kept in step (averaged both ways, PTNU, PTNU + DP) is the ``target_update`` option,
defined in :mod:`fedcontrast.methods.target_sync`.

Messages:

- down: ``weights/encoder.*``, ``weights/head.*``, ``weights/predictor.*`` (the global online
  network θ); under ``"average"`` also ``target/encoder.*``, ``target/head.*`` (the averaged
  target ξ); under PTNU/DP, from round 1, ``stats/ema_factor`` (μ, float64 scalar) and, only
  after a DP correction, the ``target/`` entries;
- up: the site's ``weights/`` and its target ``target/`` (under ``"ptnu"`` only with
  ``ptnu_upload``, under ``"ptnu_dp"`` only when the upload rule says so); under PTNU/DP also
  ``stats/steps`` (int64 scalar, local steps taken).

Configuration: :data:`DEFAULTS` = the common keys of :mod:`fedcontrast.methods.pretrain`,
:data:`~fedcontrast.methods.target_sync.SYNC_DEFAULTS` (``momentum`` 0.99, ``target_update``
``"average"``, ``delta`` (δ) 1e-3, ``sync_every`` (T) 5, ``ptnu_upload`` False), plus
``predictor_hidden`` (256), the predictor's hidden width. Metrics beyond the loss terms under
PTNU/DP: ``predicted_distance`` (d_k of the DP rule) and ``target_uploaded`` (1 or 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedcontrast.methods.base import Message, SiteUpdate, pack, select
from fedcontrast.methods.device import float32_loss
from fedcontrast.methods.partitions import PartitionBatch
from fedcontrast.methods.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from fedcontrast.methods.pretrain import ContrastivePretrainer
from fedcontrast.methods.target_sync import (
    EMA_FACTOR_ENTRY,
    STEPS_ENTRY,
    SYNC_DEFAULTS,
    check_sync_config,
    ema_factor,
    predict_target,
    predicted_distance,
    should_upload,
    target_part,
)
from fedcontrast.nets.encoder import EncoderWithHead, ema_update, momentum_copy
from fedcontrast.nets.heads import PredictionHead

DEFAULTS: dict[str, Any] = {**PRETRAIN_DEFAULTS, **SYNC_DEFAULTS, "predictor_hidden": 256}

#: State-name prefixes of the target network's entries (the online network's f and g).
TARGET_PREFIXES: tuple[str, ...] = ("encoder.", "head.")


def negative_cosine(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(p, z)`` along the last axis (in [0, 4]; 0 when aligned); shapes broadcast.

    Args:
        predictions: ``(..., C)`` predictor outputs p (any norm).
        targets: ``(..., C)`` target projections z (any norm).

    Returns:
        ``(...)`` the loss of every pair.
    """
    cosine = (F.normalize(predictions, dim=-1) * F.normalize(targets, dim=-1)).sum(dim=-1)
    return 2.0 - 2.0 * cosine


@float32_loss
def byol_loss(
    predictions1: torch.Tensor, predictions2: torch.Tensor, targets1: torch.Tensor, targets2: torch.Tensor
) -> torch.Tensor:
    """BYOL's symmetrised loss: the mean of ``2 - 2 cos(p1, z2)`` and ``2 - 2 cos(p2, z1)``.

    Args:
        predictions1, predictions2: ``(B, C)`` online predictions of view 1 and view 2.
        targets1, targets2: ``(B, C)`` target projections of view 1 and view 2 (no gradient).

    Returns:
        Scalar in [0, 4]: the two directions averaged over the batch, then over each other.
    """
    forward = negative_cosine(predictions1, targets2).mean()
    backward = negative_cosine(predictions2, targets1).mean()
    return (forward + backward) / 2


@float32_loss
def structural_matching_loss(
    predictions: torch.Tensor,
    partitions: torch.Tensor,
    remote: torch.Tensor,
    remote_partitions: torch.Tensor,
) -> torch.Tensor:
    """Negative-free global structural matching: ``2 - 2 cos(p, r)`` over same-partition remote features.

    Args:
        predictions: ``(B, C)`` online predictions p.
        partitions: ``(B,)`` partition of each prediction.
        remote: ``(R, C)`` target features (or prototypes) of other sites; may be empty.
        remote_partitions: ``(R,)`` their partitions.

    Returns:
        Scalar: for each prediction, the mean of the loss over the remote features of its
        partition; averaged over the predictions that have at least one. 0 (still
        differentiable) when none has.
    """
    same = partitions[:, None] == remote_partitions[None, :]  # (B, R)
    counts = same.sum(dim=1)
    has_remote = counts > 0
    if not bool(has_remote.any()):
        return predictions.sum() * 0.0
    per_pair = negative_cosine(predictions[:, None, :], remote[None, :, :]) * same  # (B, R)
    return (per_pair.sum(dim=1)[has_remote] / counts[has_remote]).mean()


class OnlineNetwork(EncoderWithHead):
    """BYOL's online network: encoder f, projection head g and predictor h.

    ``forward`` gives the projection ``g(f(x))`` as :class:`EncoderWithHead` does; the
    predictor is applied separately (``network.predictor(z)``). State names: ``encoder.*``,
    ``head.*``, ``predictor.*``.

    Args:
        encoder: the segmentation network's encoder.
        head: the projection head g.
        predictor: the predictor h.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, predictor: nn.Module):
        super().__init__(encoder, head)
        self.predictor = predictor

    def target_copy(self) -> EncoderWithHead:
        """A frozen copy of (f, g), without the predictor: a fresh target network."""
        return momentum_copy(EncoderWithHead(self.encoder, self.head))


class BYOLTrainer(ContrastivePretrainer):
    """BYOL at one site, with the target kept in step as ``config["target_update"]`` says.

    Attributes:
        momentum_model: the target network (f_t, g_t) (named like FCL's momentum encoder).
        held_target: the target this site started the round from (``{name: ndarray}``); under
            PTNU/DP bit-identical at every site.
    """

    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        super().__init__(config, datalist, site, device)
        check_sync_config(self.config)
        self.momentum_model = self.model.target_copy().to(self.device)
        self.held_target: dict[str, np.ndarray] | None = None
        self.global_online: dict[str, np.ndarray] = {}
        self.round_num = 0
        self.steps = 0
        self.sync_metrics: dict[str, float] = {}

    @classmethod
    def build_model(cls, config: Mapping[str, Any]) -> OnlineNetwork:
        """The bundle encoder with a projection head and a :class:`PredictionHead`."""
        base = super().build_model(config)
        predictor = PredictionHead(
            int(config["embedding_dim"]), int(config["predictor_hidden"]), config["head_norm"]
        )
        return OnlineNetwork(base.encoder, base.head, predictor)

    @classmethod
    def initial_message(cls, config: Mapping[str, Any]) -> Message:
        """Round-0 online weights and the target: a copy of their encoder and head."""
        weights = super().initial_message(config)
        target = {k: v for k, v in select(weights, "weights").items() if k.startswith(TARGET_PREFIXES)}
        return {**weights, **pack("target", target)}

    def local_round(self, incoming: Message, round_num: int) -> SiteUpdate:
        """One round (see :class:`ContrastivePretrainer`); adds the target-sync metrics."""
        self.round_num = round_num
        update = super().local_round(incoming, round_num)
        update.metrics.update(self.sync_metrics)
        return update

    def begin_round(self, incoming: Message) -> None:
        """Set the target network to the received, corrected or predicted global target."""
        mode = self.config["target_update"]
        received = select(incoming, "target")
        self.global_online = target_part(select(incoming, "weights"), self.momentum_model.state_dict())
        if received:
            self.held_target = received
        elif mode == "average":
            raise ValueError(f"{self.site}: target_update 'average' needs target/ entries in every download")
        elif self.held_target is None:
            self.held_target = dict(self.global_online)
        else:
            factor = select(incoming, "stats").get(EMA_FACTOR_ENTRY)
            if factor is None:
                raise ValueError(f"{self.site}: PTNU needs stats/{EMA_FACTOR_ENTRY} after round 0")
            self.held_target = predict_target(self.held_target, self.global_online, float(factor))
        state = {k: torch.as_tensor(np.array(v)) for k, v in self.held_target.items()}
        self.momentum_model.load_state_dict(state)
        self.momentum_model.train()
        self.steps = 0

    def predict_views(self, batch: PartitionBatch) -> tuple[torch.Tensor, ...]:
        """``(p1, p2, z1, z2)``: online predictions and target projections of both views, each ``(B, C)``."""
        views = self.two_views(batch)
        p1, p2 = self.model.predictor(self.model(views)).chunk(2)
        with torch.no_grad():
            z1, z2 = self.momentum_model(views).chunk(2)
        return p1, p2, z1, z2

    def training_step(self, batch: PartitionBatch) -> dict[str, torch.Tensor]:
        """The symmetrised BYOL loss."""
        return {"loss": byol_loss(*self.predict_views(batch))}

    def after_step(self) -> None:
        """EMA update of the target network; counts the round's steps."""
        ema_update(self.momentum_model, self.model, float(self.config["momentum"]))
        self.steps += 1

    def target_message(self) -> Message:
        """The round's ``target/`` upload (if any) and, under PTNU/DP, ``stats/steps``."""
        target = pack("target", self.momentum_model.state_dict())
        mode = self.config["target_update"]
        if mode == "average":
            self.sync_metrics = {}
            return target
        online = target_part(select(self.weights_message(), "weights"), self.global_online)
        distance = predicted_distance(
            online, self.global_online, ema_factor(float(self.config["momentum"]), self.steps)
        )
        upload = (
            bool(self.config["ptnu_upload"])
            if mode == "ptnu"
            else should_upload(
                distance, float(self.config["delta"]), self.round_num, int(self.config["sync_every"])
            )
        )
        self.sync_metrics = {"predicted_distance": distance, "target_uploaded": float(upload)}
        stats = pack("stats", {STEPS_ENTRY: np.int64(self.steps)})
        return {**(target if upload else {}), **stats}

    def upload(self) -> Message:
        """The online weights plus :meth:`target_message`."""
        return {**self.weights_message(), **self.target_message()}
