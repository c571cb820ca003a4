"""``supervised``: fine-tune the bundle's segmentation network on a site's labelled volumes.

Every round the site loads the global network, trains ``local_epochs`` epochs
through the bundle's own train workflow (``bundles/cardiac_seg/configs/train.json``
run by MONAI's ``ConfigWorkflow``: its transforms, Dice+CE loss, optimiser and
validation), and uploads the full network state dict. FedAvg of these uploads is
federated fine-tuning; ``federated=False`` is local fine-tuning.

Datalist convention: the trainer gets the site's labelled entries
(``{"image", "label", ...}``). Entries tagged ``"split": "validation"`` are held
out and measured after every round (validation Dice); :func:`supervised_entries`
builds such a list from a site datalist (its ``training`` part to train, its
``test`` part to validate).

Configuration (:data:`DEFAULTS`, merged under the config given):

- ``bundle_dir``: bundle folder (None: the repository's bundle);
- ``bundle``: bundle config overrides (any id of the train config, e.g.
  ``{"init_filters": 8, "spatial_dims": 2, "roi_size": [64, 64]}``);
- ``pretrained_encoder``: encoder file loaded into the round-0 network ("" for none); refused
  when it was pre-trained with other ``encoder_options`` (voxel grid, network widths);
- ``pretrained_decoder``: a decoder-stage checkpoint (``local_decoder``'s ``pretrained_decoder.pt``,
  :mod:`fedcontrast.nets.decoder`) whose decoder blocks, and encoder, are loaded into the
  round-0 network with a strict key check ("" for none). With ``pretrained_encoder`` also
  given, the checkpoint's encoder must equal that one;
- ``local_steps``: optimiser steps per round (the bundle's ``epoch_length``, one epoch a
  round; the data loader restarts as often as needed); 0 trains ``local_epochs`` epochs;
- ``freeze_encoder``: train the decoder only (the encoder's parameters get no gradient;
  its BatchNorm statistics still follow the data): the frozen-encoder probe of SPEC §7;
- ``local_epochs``, ``lr``, ``batch_size``, ``seed``: the bundle's ``epochs`` (per round),
  ``learning_rate``, ``batch_size``, ``seed``;
- ``device``: torch device; None uses the device the trainer was built with;
- ``num_workers``: data-loading worker processes;
- ``workdir``: folder for the bundle's checkpoints and TensorBoard logs (None: a temporary folder).

Weights travel as ``weights/<key>`` with the network's own state-dict keys
(``encoder.*``, ``up_layers.*``), so the server's global model is a plain
network state dict that the bundle's evaluation and inference load.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.data import get_track_meta, set_track_meta
from monai.handlers import from_engine

from fedcontrast.data.datalist import held_out, split_validation
from fedcontrast.methods.base import (
    Message,
    SiteTrainer,
    SiteUpdate,
    merge_config,
    message_to_state_dict,
    pack,
    site_folder,
)
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.nets.bundle import build_network, bundle_workflow, encoder_options, load_pretrained_encoder
from fedcontrast.nets.decoder import load_pretrained_decoder

DEFAULTS: dict[str, Any] = {
    "bundle_dir": None,
    "bundle": {},
    "pretrained_encoder": "",
    "pretrained_decoder": "",
    "local_steps": 0,
    "freeze_encoder": False,
    "local_epochs": 1,
    "lr": 1e-3,
    "batch_size": 2,
    "seed": 0,
    "device": None,
    "num_workers": 0,
    "workdir": None,
}


def supervised_entries(site_datalist: Mapping[str, Any], validation_key: str = "test") -> list[dict]:
    """A site datalist's ``training`` entries plus its ``validation_key`` entries tagged for validation."""
    return [dict(e) for e in site_datalist["training"]] + held_out(site_datalist.get(validation_key, []))


def image_label(entries: list[dict]) -> list[dict[str, str]]:
    """Only the ``image`` and ``label`` paths of labelled entries (what the bundle's loaders read)."""
    unlabelled = [e.get("image") for e in entries if "label" not in e]
    if unlabelled:
        raise ValueError(f"supervised training needs labelled volumes; no 'label' for {unlabelled}")
    return [{"image": str(e["image"]), "label": str(e["label"])} for e in entries]


def labelled_workflow(
    cfg: Mapping[str, Any],
    datalist: list[dict],
    site: str,
    device: str,
    workdir: Path,
    bundle: Mapping[str, Any],
    local_epochs: int,
    **overrides: Any,
) -> tuple[ConfigWorkflow, list[dict[str, str]], list[dict[str, str]]]:
    """The bundle's train workflow, initialised, on a site's labelled entries.

    Args:
        cfg: the trainer's merged config (``bundle_dir``, ``lr``, ``batch_size``, ``seed``,
            ``num_workers``).
        datalist: labelled entries; those tagged :data:`~fedcontrast.data.datalist.VALIDATION`
            are validation only.
        site: the site's name (in the error).
        device: the torch device.
        workdir: the site's folder for the bundle's checkpoints (``models``) and logs (``logs``).
        bundle: bundle config overrides of the network and grid.
        local_epochs: epochs per round (validation after the last).
        overrides: further bundle config overrides.

    Returns:
        ``(workflow, train, validation)``: the workflow and its :func:`image_label` lists.

    Raises:
        ValueError: no labelled training entry (the site is named).
    """
    train, validation = split_validation(datalist)
    train, validation = image_label(train), image_label(validation)
    if not train:
        raise ValueError(f"site {site}: no labelled training volume to train on")
    workflow = bundle_workflow(
        cfg["bundle_dir"],
        "train",
        {
            **bundle,
            "train_datalist": train,
            "val_datalist": validation,
            "pretrained_encoder": "",  # the round-0 global weights already carry it
            "device": device,
            "epochs": local_epochs,
            "val_interval": local_epochs,
            "learning_rate": float(cfg["lr"]),
            "batch_size": int(cfg["batch_size"]),
            "seed": int(cfg["seed"]),
            "num_workers": int(cfg["num_workers"]),
            "ckpt_dir": str(workdir / "models"),
            "log_dir": str(workdir / "logs"),
            **overrides,
        },
    )
    workflow.initialize()
    return workflow, train, validation


@contextmanager
def untracked_meta() -> Iterator[None]:
    """Run the block with MONAI's metadata tracking off (restored after).

    The bundle's random augmentations then work on plain tensors: the same values, without
    the per-operation cost of carrying MetaTensor metadata, which training never reads.
    """
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


class SupervisedBundleTrainer(SiteTrainer):
    """Site trainer that runs the bundle's train workflow on the site's labelled volumes.

    Args:
        config: merged over :data:`DEFAULTS` (see the module docstring).
        datalist: labelled entries; those with ``"split": "validation"`` are validation only.
        site: the site's name.
        device: torch device when ``config["device"]`` is None.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = DEFAULTS

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        super().__init__(config, datalist, site, device)
        cfg = self.config
        workdir, self._tmp = site_folder(cfg["workdir"], site)
        local_steps = int(cfg["local_steps"])
        local_epochs = 1 if local_steps else int(cfg["local_epochs"])
        self.epochs_per_round = local_epochs
        self.workflow, train, val = labelled_workflow(
            cfg,
            datalist,
            site,
            self.device,
            workdir,
            cfg["bundle"],
            local_epochs,
            pretrained_decoder="",  # the round-0 global weights already carry it
            epoch_length=local_steps or None,
        )
        self.num_train = len(train)
        self.has_validation = bool(val)
        self.network: torch.nn.Module = self.workflow.parser.get_parsed_content("network")
        if cfg["freeze_encoder"]:
            self.network.encoder.requires_grad_(False)
        self.trainer: Engine = self.workflow.trainer
        self._losses: list[float] = []
        self.trainer.add_event_handler(Events.ITERATION_COMPLETED, self._record_loss)

    def _record_loss(self, engine: Engine) -> None:
        self._losses.append(float(from_engine(["loss"], first=True)(engine.state.output)))

    @classmethod
    def initial_message(cls, config: Mapping[str, Any]) -> Message:
        """The bundle network for ``config["seed"]`` (global RNG untouched), with the optional
        ``pretrained_encoder`` and ``pretrained_decoder`` loaded, as ``weights/`` entries.

        Raises:
            ValueError: a checkpoint whose keys or shapes do not match the network (the message
                lists them), or a decoder trained against another encoder than ``pretrained_encoder``.
        """
        cfg = merge_config(cls.DEFAULTS, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]))
            network = build_network(cfg["bundle_dir"], cfg["bundle"])
        if cfg["pretrained_encoder"]:
            options = encoder_options(cfg["bundle_dir"], cfg["bundle"])
            load_pretrained_encoder(network, cfg["pretrained_encoder"], options, cfg["bundle_dir"])
        if cfg["pretrained_decoder"]:
            load_pretrained_decoder(
                network, cfg["pretrained_decoder"], not cfg["pretrained_encoder"], cfg["bundle_dir"]
            )
        return pack("weights", network.state_dict())

    def local_round(self, incoming: Message, round_num: int) -> SiteUpdate:
        """Load the global network, train one round with the bundle, upload the network.

        Metrics: ``train_loss`` (mean over the round's iterations), ``steps``, and when the
        site has validation volumes the bundle validator's ``val_dice`` and ``val_dice_<class>``.
        """
        state = message_to_state_dict(incoming, "weights")
        self.network.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        self._losses.clear()
        self.trainer.state.max_epochs = self.trainer.state.epoch + self.epochs_per_round
        with untracked_meta():
            self.trainer.run()
        metrics = {
            "train_loss": sum(self._losses) / max(len(self._losses), 1),
            "steps": float(len(self._losses)),
        }
        if self.has_validation:
            metrics.update({k: float(v) for k, v in self.workflow.evaluator.state.metrics.items()})
        return SiteUpdate(
            message=pack("weights", self.network.state_dict()),
            num_samples=self.num_train * self.epochs_per_round,
            metrics=metrics,
        )

    def restorable_state(self) -> dict[str, Any]:
        """The bundle trainer's epoch and iteration counters and its optimiser (the network
        comes from the server every round; the workflow is rebuilt from the bundle)."""
        state = self.trainer.state
        return {
            "epoch": state.epoch,
            "iteration": state.iteration,
            "optimizer": self.trainer.optimizer.state_dict(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back :meth:`restorable_state`."""
        self.trainer.state.epoch = int(state["epoch"])
        self.trainer.state.iteration = int(state["iteration"])
        self.trainer.optimizer.load_state_dict(state["optimizer"])

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The network encoder's state dict (keys without ``encoder.``), CPU copies."""
        return {k: v.detach().cpu().clone() for k, v in self.network.encoder.state_dict().items()}


SPEC = register(
    MethodSpec(
        name="supervised",
        trainer=SupervisedBundleTrainer,
        pretraining=False,
        description="supervised fine-tuning of the bundle network through the bundle's train workflow",
    )
)
