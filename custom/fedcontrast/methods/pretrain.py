"""Site-side machinery shared by the contrastive pre-training methods.

:class:`ContrastivePretrainer` is a :class:`~fedcontrast.methods.base.SiteTrainer`
that owns what every contrastive method needs: the site's volumes (loaded once,
:mod:`~fedcontrast.methods.volumes`), the partition sampler, the two-view
augmentation, the bundle encoder with its projection head, the weights in and
out of messages, and the local training loop. A method subclasses it and
writes :meth:`~ContrastivePretrainer.training_step` (plus, where needed, the
round and step hooks and the upload).

Configuration (:data:`DEFAULTS`; a method's config is merged over them, nested
dicts key by key):

- ``bundle_dir``: bundle folder (None: the repository's bundle);
- ``bundle``: bundle config overrides, one dict for the network and the preprocessing
  (any id of the train config, e.g. ``{"init_filters": 8, "roi_size": [64, 64]}``);
- ``seed``: seeds the head/network initialisation, the sampling and the augmentation;
- ``initial_encoder``: an encoder file (:func:`~fedcontrast.nets.bundle.save_encoder`) the
  round-0 encoder starts from instead of its seeded initialisation ("" for none; the heads stay
  seeded); ``{seed}`` in the path is replaced by ``seed``. Refused when the file was written
  for other encoder options (voxel grid, network widths);
- ``device``: torch device; None uses the device the trainer was built with (a CUDA device
  this machine lacks is an error, :func:`~fedcontrast.methods.device.resolve_device`);
- ``amp``: ``"bf16"`` (default), ``"fp16"`` or ``"off"``: the precision of the training step's
  forward pass on a CUDA device (autocast; losses in float32; off on the CPU,
  :mod:`fedcontrast.methods.device`);
- ``local_epochs``: E, passes over the site's volumes per round (when ``local_steps`` is 0);
- ``local_steps``: optimiser steps per round (0: ``local_epochs`` passes); the budget of a
  run is ``rounds * local_steps`` steps per site, whatever the number of volumes;
- ``batch_size``: m, volumes per batch (a batch holds m * S samples);
- ``lr``, ``weight_decay``: Adam, re-created every round;
- ``rounds``: the run's number of rounds; when set (> 0) the learning rate warms up linearly
  over the first ``warmup_fraction`` of the run's steps, then decays to 0 along a cosine
  (:func:`lr_factor`); 0 keeps ``lr`` constant;
- ``head_norm``: ``"batch"`` (BatchNorm in the heads' hidden layer, as the SimCLR, MoCo v2
  and BYOL heads) or ``"none"``;
- ``probe_volumes``: volumes of the fixed probe set on which every round reports the
  representation diagnostics (:mod:`~fedcontrast.methods.diagnostics`; 0: none);
- ``partitions``: S; ``slab_slices``: T, slab thickness of 3D samples;
- ``temperature``: τ of InfoNCE;
- ``head_hidden``, ``embedding_dim``: projection head widths (embeddings are ``embedding_dim``-d);
- ``augment``: overrides of :data:`~fedcontrast.methods.augment.AUGMENT_DEFAULTS`.

Weights travel as ``weights/encoder.<key>`` (the segmentation network's encoder,
``<key>`` as in ``network.encoder.state_dict()``) and ``weights/head.<key>``.
"""

from __future__ import annotations

import itertools
import math
import time
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedcontrast.methods.augment import TwoViewAugment
from fedcontrast.methods.base import (
    Message,
    SiteTrainer,
    SiteUpdate,
    merge_config,
    message_to_state_dict,
    pack,
)
from fedcontrast.methods.device import amp_dtype, autocast, grad_scaler
from fedcontrast.methods.diagnostics import alignment, partition_accuracy, uniformity
from fedcontrast.methods.outbound import OutboundSchema
from fedcontrast.methods.partitions import PartitionBatch, PartitionSampler, site_tag
from fedcontrast.methods.volumes import load_volumes
from fedcontrast.nets.bundle import encoder_options, load_pretrained_encoder
from fedcontrast.nets.encoder import build_encoder_with_head

DEFAULTS: dict[str, Any] = {
    "bundle_dir": None,
    "bundle": {},
    "seed": 0,
    "initial_encoder": "",
    "device": None,
    "local_epochs": 1,
    "local_steps": 0,
    "batch_size": 4,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "rounds": 0,
    "warmup_fraction": 0.1,
    "head_norm": "batch",
    "probe_volumes": 8,
    "partitions": 4,
    "slab_slices": 2,
    "temperature": 0.1,
    "head_hidden": 256,
    "embedding_dim": 128,
    "augment": {},
    "amp": "bf16",
}


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based) of ``total``.

    Linear warm-up from ``1 / warmup`` to 1 over the first ``warmup`` steps, then a cosine
    from 1 down to 0 at step ``total``; 1 everywhere when ``total`` is 0 (no schedule).
    """
    if total <= 0:
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ContrastivePretrainer(SiteTrainer):
    """Base of the contrastive site trainers: data, model, weights and the local loop.

    Args:
        config: merged over the class's ``DEFAULTS`` (see the module docstring).
        datalist: the site's pre-training entries (``{"image": path}``;
            :func:`~fedcontrast.methods.volumes.pretraining_entries` builds them from a site datalist).
        site: the site's name; its :func:`~fedcontrast.methods.partitions.site_tag` tags its samples.
        device: torch device when ``config["device"]`` is None.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = DEFAULTS

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        super().__init__(config, datalist, site, device)
        cfg = self.config
        self.tag = site_tag(site)
        self.rng = np.random.default_rng([int(cfg["seed"]), self.tag])
        amp_dtype(self.device, cfg["amp"])  # checks the setting
        # kept on the training device: batches are sliced there, never copied per step
        volumes = [v.to(self.device) for v in load_volumes(datalist, cfg["bundle_dir"], cfg["bundle"])]
        short = [e["image"] for e, v in zip(datalist, volumes) if v.shape[-1] < int(cfg["partitions"])]
        if short:
            raise ValueError(f"{site}: fewer slices than partitions={cfg['partitions']} in {short}")
        self.volumes = volumes
        self.model = self.build_model(cfg).to(self.device)
        spatial_dims = self.model.spatial_dims
        self.sampler = PartitionSampler(int(cfg["partitions"]), spatial_dims, int(cfg["slab_slices"]))
        self.augment = TwoViewAugment(spatial_dims, int(self.rng.integers(2**31)), cfg["augment"])
        self.diagnostic_probe = self._probe_set(int(cfg["probe_volumes"]))
        self.steps_per_round = int(cfg["local_steps"]) or int(cfg["local_epochs"]) * math.ceil(
            len(self.volumes) / int(cfg["batch_size"])
        )

    def _probe_set(self, num_volumes: int) -> tuple[PartitionBatch, torch.Tensor] | None:
        """A fixed batch of up to ``num_volumes`` volumes and its two views ``(2B, C, ...)``, drawn once.

        Its own random streams, so the training's sampling and augmentation do not depend on it.
        """
        count = min(num_volumes, len(self.volumes))
        if count < 2:
            return None
        rng = np.random.default_rng([int(self.config["seed"]), self.tag, 1])
        batch = self.sampler.sample(self.volumes[:count], list(range(count)), self.tag, rng)
        augment = TwoViewAugment(self.model.spatial_dims, int(rng.integers(2**31)), self.config["augment"])
        return batch, torch.cat(augment(batch.images))

    @torch.no_grad()
    def representation_metrics(self) -> dict[str, float]:
        """Alignment, uniformity and partition accuracy of the model's embeddings of the probe set."""
        if self.diagnostic_probe is None:
            return {}
        batch, views = self.diagnostic_probe
        self.model.eval()
        z1, z2 = (
            torch.nn.functional.normalize(self.model(views.to(self.device)).float(), dim=1).cpu().chunk(2)
        )
        self.model.train()
        return {
            "alignment": alignment(z1, z2),
            "uniformity": uniformity(z1),
            "partition_accuracy": partition_accuracy(z1, batch.partitions, batch.volumes),
        }

    @classmethod
    def build_model(cls, config: Mapping[str, Any]) -> nn.Module:
        """The network trained and exchanged (the encoder with its projection head)."""
        return build_encoder_with_head(
            config["bundle_dir"],
            config["bundle"],
            int(config["head_hidden"]),
            int(config["embedding_dim"]),
            config["head_norm"],
        )

    @classmethod
    def initial_message(cls, config: Mapping[str, Any]) -> Message:
        """Round-0 global weights, deterministic for ``config["seed"]`` (the global RNG is left as it
        was), the encoder loaded from ``initial_encoder`` when one is given."""
        cfg = merge_config(cls.DEFAULTS, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]))
            model = cls.build_model(cfg)
        if cfg["initial_encoder"]:
            path = str(cfg["initial_encoder"]).format(seed=cfg["seed"])
            options = encoder_options(cfg["bundle_dir"], cfg["bundle"])
            load_pretrained_encoder(model, path, options, cfg["bundle_dir"])
        return pack("weights", cls.exchanged_state(model))

    @classmethod
    def exchanged_state(cls, model: nn.Module) -> dict[str, torch.Tensor]:
        """The part of ``model``'s state that travels as ``weights/`` (the default: all of it)."""
        return model.state_dict()

    @classmethod
    def outbound_schema(cls, config: Mapping[str, Any]) -> OutboundSchema:
        """The weights (and heads) of :meth:`initial_message`, scalar ``stats/``, and for a method
        with ``features_per_partition`` K > 0 its ``embedding_dim``-wide features, K per partition."""
        cfg = merge_config(cls.DEFAULTS, config)
        per_partition = int(cfg.get("features_per_partition") or 0)
        return OutboundSchema.from_message(
            cls.initial_message(config),
            feature_width=int(cfg["embedding_dim"]) if per_partition else 0,
            features_per_partition=per_partition,
            partitions=int(cfg["partitions"]),
        )

    def load_weights(self, incoming: Message) -> None:
        """Load the message's ``weights/`` entries into the model (every key must match)."""
        self.model.load_state_dict(message_to_state_dict(incoming, "weights"))

    def weights_message(self) -> Message:
        """The model's exchanged state (:meth:`exchanged_state`) as ``weights/`` entries."""
        return pack("weights", self.exchanged_state(self.model))

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's state dict (keys without ``encoder.``), CPU copies."""
        return {k: v.detach().cpu().clone() for k, v in self.model.encoder.state_dict().items()}

    def batches(self) -> Iterator[PartitionBatch]:
        """One epoch: the volumes in a random order, m at a time, one sample per partition each."""
        order = self.rng.permutation(len(self.volumes))
        m = int(self.config["batch_size"])
        for start in range(0, len(order), m):
            ids = order[start : start + m].tolist()
            yield self.sampler.sample([self.volumes[i] for i in ids], ids, self.tag, self.rng)

    def round_batches(self) -> Iterator[PartitionBatch]:
        """One round's batches: ``local_steps`` of them (epochs repeated), else ``local_epochs`` epochs."""
        remaining = int(self.config["local_steps"])
        for _ in range(int(self.config["local_epochs"])) if remaining <= 0 else itertools.count():
            for batch in self.batches():
                yield batch
                remaining -= 1
                if remaining == 0:
                    return

    def two_views(self, batch: PartitionBatch) -> torch.Tensor:
        """Both augmented views of a batch, made on the device, stacked: ``(2B, C, ...)``, view 1 first."""
        view1, view2 = self.augment(batch.images.to(self.device, non_blocking=True))
        return torch.cat([view1, view2])

    def begin_round(self, incoming: Message) -> None:
        """Called after the global weights are loaded, before training; the default does nothing."""

    @abstractmethod
    def training_step(self, batch: PartitionBatch) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; ``"loss"`` is minimised, every term is logged as a metric."""

    def after_step(self) -> None:
        """Called after every optimiser step; the default does nothing."""

    def upload(self) -> Message:
        """What leaves the site after training; the default is the weights only."""
        return self.weights_message()

    def local_round(self, incoming: Message, round_num: int) -> SiteUpdate:
        """Load the global weights, train one round (:meth:`round_batches`), return the upload.

        ``num_samples`` counts the samples (slices or slabs) seen; metrics are the mean
        loss terms over the round's steps, the step count, ``lr`` (at the round's last step),
        ``samples_per_s`` (training throughput) and :meth:`representation_metrics`.
        """
        self.load_weights(incoming)
        self.begin_round(incoming)
        optimizer = torch.optim.Adam(
            self.model.parameters(),
            lr=float(self.config["lr"]),
            weight_decay=float(self.config["weight_decay"]),
        )
        self.model.train()
        amp = str(self.config["amp"])
        scaler = grad_scaler(self.device, amp)
        sums: dict[str, torch.Tensor] = defaultdict(float)
        total = int(self.config["rounds"]) * self.steps_per_round
        warmup = round(float(self.config["warmup_fraction"]) * total)
        steps = samples = 0
        lr = float(self.config["lr"])
        start = time.perf_counter()
        for batch in self.round_batches():
            lr = float(self.config["lr"]) * lr_factor(round_num * self.steps_per_round + steps, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(self.device, amp):  # off on the CPU; the losses run in float32
                terms = self.training_step(batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            self.after_step()
            for name, value in terms.items():
                sums[name] = sums[name] + value.detach()
            steps += 1
            samples += len(batch)
        metrics = {name: float(total_) / max(steps, 1) for name, total_ in sums.items()}
        metrics["steps"] = float(steps)
        metrics["lr"] = lr
        metrics["samples_per_s"] = samples / max(time.perf_counter() - start, 1e-9)
        metrics.update(self.representation_metrics())
        return SiteUpdate(message=self.upload(), num_samples=samples, metrics=metrics)
