"""FedMoCo: MoCo v2 per site, metadata transfer, RSA-based aggregation (Dong & Voiculescu, 2021; SPEC §3).

Each site trains MoCo v2: a query network (the bundle encoder f with the projection
head g, from the shared builder) and a key network (f', g'), an EMA of the query
network (momentum m, updated after every step; keys use batch statistics, the key
network stays in training mode), and a FIFO queue of ``queue_size`` negative keys
(:class:`~fedcontrast.methods.banks.KeyQueue`). For a query ``q = g(f(x1))`` the
positive is the key ``k = g'(f'(x2))`` of the other view of the same sample and the
negatives are the queue (and, with ``batch_negatives``, the other samples' keys of
the step; :func:`~fedcontrast.methods.losses.moco_loss`, the project's one InfoNCE).
Both views serve as queries in turn; the first view's keys are then enqueued. The
server averages the query network (``weights/encoder.*``, ``weights/head.*``); the key
network and the queue stay at the site.

Two modules on top, each switchable:

- **metadata transfer** (``metadata``, :mod:`fedcontrast.methods.metadata`): the site uploads
  its volume set's intensity statistics every round (``stats/meta_mean``, ``meta_std``,
  ``meta_range``, ``meta_hist``; ``metadata_bins`` <= 64 bins); the server sends each site the
  other sites' statistics stacked (one row per site, plus ``stats/meta_sites`` tags); before
  the two-view augmentation each view of a sample is, with probability ``metadata_prob``,
  re-mapped to a random other site's statistics (``metadata_mode`` ``"histogram"`` or
  ``"meanstd"``, ``metadata_strength``);
- **RSA aggregation** (``rsa``, :mod:`fedcontrast.methods.rsa`): the site embeds a fixed probe
  set (one un-augmented sample per partition of up to ``rsa_probe_volumes`` volumes) with the
  received global model and, after training, with its own, and uploads the Spearman
  correlation of the two RDMs as ``stats/rsa_rho`` (float64 scalar); the server weights the
  sites by ``softmax(∓rho/rsa_temperature) · samples`` (``rsa_direction``) and reports the
  weights and rho as its round metrics (``metrics.json``, TensorBoard). Off: plain FedAvg by
  samples.

Messages:

- down: ``weights/encoder.*``, ``weights/head.*`` and, with metadata transfer and from round 1,
  ``stats/meta_*`` of the other sites (no entry for a site's own statistics);
- up: ``weights/``; ``stats/meta_*`` (metadata on); ``stats/rsa_rho`` (RSA on). Nothing else.

Configuration (:data:`DEFAULTS` = the common keys of :mod:`fedcontrast.methods.pretrain` plus the
keys below). Every value beyond "MoCo v2 + metadata transfer + RSA aggregation" is this
project's choice (the paper's could not be read, SPEC §3):

- ``temperature`` (0.2, MoCo v2's τ), ``momentum`` (0.99), ``momentum_init`` (``"keep"``: the key
  network keeps its own EMA across rounds; ``"global"``: it restarts from the received weights),
  ``queue_size`` (1024), ``batch_negatives`` (True);
- ``metadata`` (True), ``metadata_mode`` (``"histogram"``), ``metadata_bins`` (32),
  ``metadata_clip`` (0.005: the histogram spans the 0.5%-99.5% quantiles), ``metadata_prob``
  (0.5), ``metadata_strength`` (1.0);
- ``rsa`` (True), ``rsa_temperature`` (0.1), ``rsa_direction`` (``"dissimilar"``),
  ``rsa_probe_volumes`` (8), ``rsa_layer`` (``"head"``: the 128-d projections; ``"encoder"``: the
  globally pooled deepest encoder feature map).

Registered: ``fedmoco`` (both modules), ``fedmoco_nometa`` (no metadata transfer),
``fedmoco_norsa`` (FedAvg by samples instead of RSA weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedcontrast.methods.banks import KeyQueue
from fedcontrast.methods.base import (
    Message,
    ServerStrategy,
    SiteUpdate,
    check_choice,
    merge_config,
    message_key,
    pack,
    select,
    weighted_average,
)
from fedcontrast.methods.fcl import MOMENTUM_INITS
from fedcontrast.methods.losses import moco_loss
from fedcontrast.methods.metadata import (
    MAX_BINS,
    MODES,
    SITES_ENTRY,
    STATS_ENTRIES,
    IntensityStats,
    IntensityTransfer,
    intensity_stats,
    stack_entries,
    stats_from_download,
)
from fedcontrast.methods.outbound import OutboundSchema
from fedcontrast.methods.partitions import PartitionBatch, site_tag
from fedcontrast.methods.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from fedcontrast.methods.pretrain import ContrastivePretrainer
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.methods.rsa import DIRECTIONS, rsa_similarity, rsa_weights
from fedcontrast.nets.encoder import ema_update, momentum_copy

DEFAULTS: dict[str, Any] = {
    **PRETRAIN_DEFAULTS,
    "temperature": 0.2,
    "momentum": 0.99,
    "momentum_init": "keep",
    "queue_size": 1024,
    "batch_negatives": True,
    "metadata": True,
    "metadata_mode": "histogram",
    "metadata_bins": 32,
    "metadata_clip": 0.005,
    "metadata_prob": 0.5,
    "metadata_strength": 1.0,
    "rsa": True,
    "rsa_temperature": 0.1,
    "rsa_direction": "dissimilar",
    "rsa_probe_volumes": 8,
    "rsa_layer": "head",
}

#: Name of the site's RSA entry (``stats/rsa_rho``).
RHO_ENTRY = "rsa_rho"
#: Values of ``rsa_layer``.
RSA_LAYERS: tuple[str, ...] = ("head", "encoder")


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the key on a FedMoCo option out of range."""
    check_choice(config, "momentum_init", MOMENTUM_INITS)
    check_choice(config, "metadata_mode", MODES)
    check_choice(config, "rsa_direction", DIRECTIONS)
    check_choice(config, "rsa_layer", RSA_LAYERS)
    if not 0.0 <= float(config["momentum"]) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {config['momentum']}")
    if int(config["queue_size"]) < 1:
        raise ValueError(f"queue_size must be >= 1, got {config['queue_size']}")
    if not 1 <= int(config["metadata_bins"]) <= MAX_BINS:
        raise ValueError(f"metadata_bins must be in [1, {MAX_BINS}], got {config['metadata_bins']}")
    for key in ("metadata_prob", "metadata_strength"):
        if not 0.0 <= float(config[key]) <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {config[key]}")
    if float(config["rsa_temperature"]) <= 0:
        raise ValueError(f"rsa_temperature must be > 0, got {config['rsa_temperature']}")
    if int(config["rsa_probe_volumes"]) < 1:
        raise ValueError(f"rsa_probe_volumes must be >= 1, got {config['rsa_probe_volumes']}")


class FedMoCoTrainer(ContrastivePretrainer):
    """MoCo v2 with metadata transfer and the RSA report at one site (see the module docstring)."""

    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        super().__init__(config, datalist, site, device)
        cfg = self.config
        check_config(cfg)
        self.queue = KeyQueue(int(cfg["embedding_dim"]), int(cfg["queue_size"]))
        self.momentum_model: torch.nn.Module | None = None
        self.stats: IntensityStats | None = None
        self.transfer: IntensityTransfer | None = None
        if cfg["metadata"]:
            self.stats = intensity_stats(self.volumes, int(cfg["metadata_bins"]), float(cfg["metadata_clip"]))
            self.transfer = IntensityTransfer(
                self.stats,
                cfg["metadata_mode"],
                float(cfg["metadata_prob"]),
                float(cfg["metadata_strength"]),
                seed=int(self.rng.integers(2**31)),
            )
        self.probe: torch.Tensor | None = self.probe_set() if cfg["rsa"] else None
        self.global_probe: np.ndarray | None = None
        self.rsa_metrics: dict[str, float] = {}

    def probe_set(self) -> torch.Tensor:
        """The fixed RSA probe: one un-augmented sample per partition of up to ``rsa_probe_volumes`` volumes.

        Drawn once, from a generator of its own (seed, site), so training draws do not move it.

        Returns:
            ``(n * S, C, ...)`` samples, n = min(``rsa_probe_volumes``, volumes); at least 3.
        """
        rng = np.random.default_rng([int(self.config["seed"]), self.tag, 1])
        n = min(int(self.config["rsa_probe_volumes"]), len(self.volumes))
        ids = sorted(rng.choice(len(self.volumes), size=n, replace=False).tolist())
        images = self.sampler.sample([self.volumes[i] for i in ids], ids, self.tag, rng).images
        if len(images) < 3:
            raise ValueError(f"{self.site}: the RSA probe needs >= 3 samples, got {len(images)}")
        return images

    @torch.no_grad()
    def embed_probe(self) -> np.ndarray:
        """The probe embedded by the current model in eval mode: ``(n, C)`` float64."""
        was_training = self.model.training
        self.model.eval()
        out = []
        for chunk in self.probe.split(int(self.config["batch_size"]) * int(self.config["partitions"])):
            x = chunk.to(self.device)
            if self.config["rsa_layer"] == "head":
                out.append(self.model(x).cpu())
            else:
                out.append(self.model.encoder(x)[-1].flatten(2).mean(dim=2).cpu())
        self.model.train(was_training)
        return torch.cat(out).double().numpy()

    def begin_round(self, incoming: Message) -> None:
        """(Re)start the key network; embed the probe with the global model; take others' statistics."""
        if self.momentum_model is None or self.config["momentum_init"] == "global":
            self.momentum_model = momentum_copy(self.model)
        self.momentum_model.train()
        if self.probe is not None:
            self.global_probe = self.embed_probe()
        if self.transfer is not None:
            self.transfer.set_targets(stats_from_download(select(incoming, "stats")))

    def two_views(self, batch: PartitionBatch) -> torch.Tensor:
        """Two views, each re-mapped to another site's statistics (metadata transfer), then augmented."""
        if self.transfer is None:
            return super().two_views(batch)
        views = [self.augment.view(self.transfer(batch.images)) for _ in range(2)]
        return torch.cat(views).to(self.device)

    def training_step(self, batch: PartitionBatch) -> dict[str, torch.Tensor]:
        """Symmetrised MoCo loss against the queue; the first view's keys are enqueued afterwards."""
        views = self.two_views(batch)
        q1, q2 = self.model(views).chunk(2)
        with torch.no_grad():
            k1, k2 = self.momentum_model(views).chunk(2)
        queue = self.queue.keys(self.device)
        tau, in_batch = float(self.config["temperature"]), bool(self.config["batch_negatives"])
        loss = (moco_loss(q1, k2, queue, tau, in_batch) + moco_loss(q2, k1, queue, tau, in_batch)) / 2
        self.queue.enqueue(k1)
        return {"loss": loss}

    def after_step(self) -> None:
        """EMA update of the key network."""
        ema_update(self.momentum_model, self.model, float(self.config["momentum"]))

    def local_round(self, incoming: Message, round_num: int) -> SiteUpdate:
        """One round (:class:`ContrastivePretrainer`); adds ``rsa_rho`` and ``queue_len`` to the metrics."""
        update = super().local_round(incoming, round_num)
        update.metrics.update(self.rsa_metrics)
        update.metrics["queue_len"] = float(len(self.queue))
        return update

    @classmethod
    def outbound_schema(cls, config: Mapping[str, Any]) -> OutboundSchema:
        """The default (weights, scalar ``stats/``: mean, std, rho) plus, with ``metadata``,
        ``stats/meta_range`` float64 ``(2,)`` and ``stats/meta_hist`` float32 ``(metadata_bins,)``."""
        schema = super().outbound_schema(config)
        cfg = merge_config(cls.DEFAULTS, config)
        if not cfg["metadata"]:
            return schema
        declared = {
            "stats/meta_range": ((2,), "float64"),
            "stats/meta_hist": ((int(cfg["metadata_bins"]),), "float32"),
        }
        return dataclasses.replace(schema, entries={**schema.entries, **declared})

    def upload(self) -> Message:
        """Weights, plus the site's intensity statistics and its RSA rho where switched on."""
        stats: dict[str, np.ndarray] = {}
        if self.stats is not None:
            stats.update(self.stats.to_entries())
        self.rsa_metrics = {}
        if self.probe is not None:
            rho = rsa_similarity(self.embed_probe(), self.global_probe)
            stats[RHO_ENTRY] = np.float64(rho)
            self.rsa_metrics = {RHO_ENTRY: rho}
        return {**self.weights_message(), **pack("stats", stats)}


def check_site_stats(site: str, entries: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
    """Refuse a site's ``stats/`` upload unless it is exactly what FedMoCo sends (an audit on the server).

    Raises:
        ValueError: naming the site, on an unexpected or missing entry or a wrong shape.
    """
    expected = {*(STATS_ENTRIES if config["metadata"] else ()), *((RHO_ENTRY,) if config["rsa"] else ())}
    if set(entries) != expected:
        raise ValueError(f"{site} sent stats/ entries {sorted(entries)}; FedMoCo expects {sorted(expected)}")
    shapes = {"meta_mean": (), "meta_std": (), "meta_range": (2,), RHO_ENTRY: ()}
    for name, value in entries.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            raise ValueError(f"{site}: stats/{name} must be finite floating point, got {value!r}")
        wanted = shapes.get(name, (int(config["metadata_bins"]),))
        if value.shape != wanted:
            raise ValueError(f"{site}: stats/{name} has shape {value.shape}, expected {wanted}")


class FedMoCoStrategy(ServerStrategy):
    """FedAvg of the query network with RSA weights, and forwarding of the sites' intensity statistics.

    Attributes:
        site_stats: site -> its last uploaded ``meta_*`` entries (prefix stripped).
        rsa_log: one dict per round: ``round``, ``rho`` and ``weights`` (site -> value).
    """

    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any], initial: Message):
        super().__init__(merge_config(self.DEFAULTS, config), initial)
        check_config(self.config)
        self.site_stats: dict[str, dict[str, np.ndarray]] = {}
        self.rsa_log: list[dict[str, Any]] = []

    def message_for(self, site: str, round_num: int) -> Message:
        """Global weights plus the other sites' statistics (none in round 0 or without metadata transfer)."""
        return {**super().message_for(site, round_num), **self.stats_for(site)}

    def stats_for(self, site: str) -> Message:
        """The ``stats/meta_*`` rows of every site but ``site``, tagged ``stats/meta_sites``."""
        others = {s: self.site_stats[s] for s in sorted(self.site_stats) if s != site}
        if not others:
            return {}
        entries = stack_entries(others)
        entries[SITES_ENTRY] = np.array([site_tag(s) for s in others], dtype=np.int64)
        return {message_key("stats", name): value for name, value in entries.items()}

    def aggregate(self, updates: Mapping[str, SiteUpdate], round_num: int) -> None:
        """Average the weights (RSA weights, or by samples); keep the sites' statistics for the next round."""
        stats = {site: select(update.message, "stats") for site, update in updates.items()}
        for site, entries in stats.items():
            check_site_stats(site, entries, self.config)
        weights = None
        if self.config["rsa"]:
            rho = {site: float(entries[RHO_ENTRY]) for site, entries in stats.items()}
            weights = rsa_weights(
                rho,
                {site: update.num_samples for site, update in updates.items()},
                float(self.config["rsa_temperature"]),
                self.config["rsa_direction"],
            )
            self.rsa_log.append({"round": round_num, "rho": rho, "weights": weights})
        self.global_message.update(weighted_average(updates, "weights", weights))
        if self.config["metadata"]:
            for site, entries in stats.items():
                self.site_stats[site] = {name: entries[name] for name in STATS_ENTRIES}

    def round_metrics(self, round_num: int) -> dict[str, float]:
        """The round's RSA weights and rho: ``rsa_weight/<site>``, ``rsa_rho/<site>`` (empty without RSA)."""
        entry = next((e for e in reversed(self.rsa_log) if e["round"] == round_num), None)
        if entry is None:
            return {}
        metrics = {f"rsa_weight/{site}": w for site, w in entry["weights"].items()}
        metrics.update({f"rsa_rho/{site}": r for site, r in entry["rho"].items()})
        return metrics


NOMETA_DEFAULTS: dict[str, Any] = {**DEFAULTS, "metadata": False}
NORSA_DEFAULTS: dict[str, Any] = {**DEFAULTS, "rsa": False}


class FedMoCoNoMetaTrainer(FedMoCoTrainer):
    """FedMoCo without metadata transfer, at one site."""

    DEFAULTS = NOMETA_DEFAULTS


class FedMoCoNoMetaStrategy(FedMoCoStrategy):
    """FedMoCo's server without metadata transfer."""

    DEFAULTS = NOMETA_DEFAULTS


class FedMoCoNoRSATrainer(FedMoCoTrainer):
    """FedMoCo without the RSA report, at one site."""

    DEFAULTS = NORSA_DEFAULTS


class FedMoCoNoRSAStrategy(FedMoCoStrategy):
    """FedMoCo's server with plain FedAvg (by samples) instead of RSA weights."""

    DEFAULTS = NORSA_DEFAULTS


for _spec in (
    MethodSpec(
        name="fedmoco",
        trainer=FedMoCoTrainer,
        strategy=FedMoCoStrategy,
        description="FedMoCo: MoCo v2 per site, intensity-statistics transfer, RSA-weighted FedAvg",
    ),
    MethodSpec(
        name="fedmoco_nometa",
        trainer=FedMoCoNoMetaTrainer,
        strategy=FedMoCoNoMetaStrategy,
        description="FedMoCo without metadata transfer (ablation)",
    ),
    MethodSpec(
        name="fedmoco_norsa",
        trainer=FedMoCoNoRSATrainer,
        strategy=FedMoCoNoRSAStrategy,
        description="FedMoCo without RSA aggregation: plain FedAvg by samples (ablation)",
    ),
):
    register(_spec)
