"""``local_decoder``: local contrastive pre-training of the decoder on a frozen encoder (SPEC §4).

The second stage of the three-stage pipeline *global -> local -> fine-tune* of
Chaitanya et al., runnable after any encoder pre-training (``fcl``, ``local_cl``,
``fedsimclr``, ...):

1. an encoder pre-training method writes an encoder file (``pretrained_encoder.pt``);
2. ``local_decoder`` loads it into the bundle network, freezes it (no gradients, eval-mode
   BatchNorm: it leaves the stage bit-identical), truncates the network after its first
   ``decoder_levels`` up-sampling levels (:class:`~fedcontrast.nets.decoder.DecoderTrunk`),
   adds the local projection g2 (two 1x1 convs, then one embedding per region of a
   ``grid x grid`` grid of ``window x window`` windows,
   :class:`~fedcontrast.nets.heads.LocalProjectionHead`) and trains the decoder blocks and g2
   with :func:`~fedcontrast.methods.losses.local_contrastive_loss` on two intensity-only
   views of each partition batch (``"L^R"``: positive = same region, other view; ``"L^D"``:
   plus same region of same-partition images of other volumes; negatives = other regions);
3. fine-tuning (``supervised`` with ``pretrained_decoder``) loads the encoder AND the
   decoder blocks strictly; the rest of the decoder and the output head start random.

Per site (``federated=False``: ``--local`` in the job) or federated (FedAvg of the decoder
blocks and g2; the encoder never travels: every site loads the same file). A 3D network is
handled slice-wise: each slice of a slab's decoder map is an image with in-plane windows.

Outputs: a self-describing checkpoint (:mod:`fedcontrast.nets.decoder`) with the encoder, the
decoder blocks and the stages' provenance, written by :meth:`DecoderPretrainer.save_checkpoint`
(the NVFlare controller calls it: ``pretrained_decoder.pt``) or by :func:`pretrain_decoder`
(the in-process entry the benchmark calls).

Configuration (:data:`DEFAULTS`): the common pre-training keys of
:mod:`~fedcontrast.methods.pretrain` plus

- ``pretrained_encoder``: the encoder file (required); ``{site}`` in it is replaced by the site
  name (per-site encoders such as ``local_cl``'s; not allowed when federated);
- ``encoder_method``: name of the method that pre-trained the encoder (provenance only);
- ``decoder_levels``: up-sampling levels pre-trained (None: all but the full-resolution one);
- ``loss_strategy``: ``"L^R"`` (default, the authors' run) or ``"L^D"``;
- ``local_negatives``: ``"image"`` (other regions of the same image, both views; default) or
  ``"batch"`` (every other region in the batch);
- ``grid``, ``window``: regions per side and window side in feature-map pixels;
- ``augment``: intensity-only by default (brightness ±0.3, contrast ±0.3, gamma, noise); any
  spatial option is refused, since regions must correspond between the views.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedcontrast.methods.base import (
    Message,
    ServerStrategy,
    check_choice,
    merge_config,
    message_to_state_dict,
)
from fedcontrast.methods.losses import LOCAL_NEGATIVES, LOCAL_STRATEGIES, local_contrastive_loss
from fedcontrast.methods.partitions import PartitionBatch
from fedcontrast.methods.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from fedcontrast.methods.pretrain import ContrastivePretrainer
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.methods.runner import RunResult, run_in_process
from fedcontrast.nets.bundle import (
    build_network,
    encoder_options,
    load_pretrained_encoder,
    read_encoder,
    state_mismatch,
)
from fedcontrast.nets.decoder import (
    DecoderWithLocalHead,
    build_checkpoint,
    resolve_levels,
    save_decoder_checkpoint,
)

logger = logging.getLogger(__name__)

#: File the controller writes (next to ``global_model.pt`` / ``pretrained_encoder.pt``).
DECODER_FILE = "pretrained_decoder.pt"

#: Intensity-only augmentation (brightness and contrast as in the authors' local stage).
INTENSITY_ONLY: dict[str, Any] = {
    "flip_prob": 0.0,
    "rot90_prob": 0.0,
    "rotate_prob": 0.0,
    "crop_scale": (1.0, 1.0),
    "brightness": 0.3,
    "contrast": 0.3,
}

#: The keys of every trainer of the local (region) loss: this stage's and ``feddense``'s.
REGION_DEFAULTS: dict[str, Any] = {
    **PRETRAIN_DEFAULTS,
    "probe_volumes": 0,  # the per-round diagnostics read global embeddings; these are region maps
    "loss_strategy": "L^R",
    "local_negatives": "image",
    "grid": 4,
    "window": 3,
    "augment": INTENSITY_ONLY,
}

DEFAULTS: dict[str, Any] = {
    **REGION_DEFAULTS,
    "pretrained_encoder": "",
    "encoder_method": "",
    "decoder_levels": None,
}


def encoder_path(config: Mapping[str, Any], site: str | None) -> str:
    """``config["pretrained_encoder"]`` with ``{site}`` replaced (left as is when ``site`` is None)."""
    path = str(config.get("pretrained_encoder") or "")
    return path.replace("{site}", site) if site is not None else path


def check_intensity_only(augment: Mapping[str, Any]) -> None:
    """Refuse spatial augmentation: the two views' regions must be the same places."""
    spatial = {k: augment[k] for k in ("flip_prob", "rot90_prob", "rotate_prob") if float(augment[k]) > 0}
    if tuple(float(s) for s in augment["crop_scale"]) != (1.0, 1.0):
        spatial["crop_scale"] = augment["crop_scale"]
    if spatial:
        raise ValueError(
            f"local_decoder needs intensity-only views (regions must correspond); spatial options {spatial}"
        )


class RegionContrastivePretrainer(ContrastivePretrainer):
    """Base of the trainers of the local (region) loss: a model that maps images to region
    embeddings ``(B[*T], R, D)``, trained on two intensity-only views of each partition batch
    with :func:`~fedcontrast.methods.losses.local_contrastive_loss`.

    Raises:
        ValueError: a spatial augmentation option, or an unknown ``loss_strategy`` / ``local_negatives``.
    """

    DEFAULTS = REGION_DEFAULTS

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        cfg = merge_config(self.DEFAULTS, config)
        check_choice(cfg, "loss_strategy", LOCAL_STRATEGIES)
        check_choice(cfg, "local_negatives", LOCAL_NEGATIVES)
        check_intensity_only(cfg["augment"])
        super().__init__(cfg, datalist, site, device)

    def region_embeddings(self, batch: PartitionBatch) -> torch.Tensor:
        """``(2 * B * T, R, D)`` region embeddings of both views of the batch, view 1 first; region
        ``r`` of a sample is the same place in both views."""
        return self.model(self.two_views(batch))

    def training_step(self, batch: PartitionBatch) -> dict[str, torch.Tensor]:
        """The local contrastive loss of the regions of both views of the batch."""
        embeddings = self.region_embeddings(batch)  # (2 * B * T, R, D)
        per_sample = embeddings.shape[0] // (2 * len(batch))  # T slices a slab (1 in 2D)
        loss = local_contrastive_loss(
            embeddings,
            batch.volumes.repeat_interleave(per_sample).to(self.device),
            batch.partitions.repeat_interleave(per_sample).to(self.device),
            str(self.config["loss_strategy"]),
            float(self.config["temperature"]),
            str(self.config["local_negatives"]),
        )
        return {"loss": loss}


class DecoderPretrainer(RegionContrastivePretrainer):
    """Local contrastive pre-training of the decoder blocks at one site (see the module docstring).

    Raises:
        ValueError: no ``pretrained_encoder``, a spatial augmentation option, or an unknown
            ``loss_strategy`` / ``local_negatives``; the encoder file's mismatching keys are listed.
    """

    DEFAULTS = DEFAULTS

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        cfg = merge_config(self.DEFAULTS, config)
        path = encoder_path(cfg, site)
        if not path:
            raise ValueError(f"{site}: local_decoder needs pretrained_encoder (the frozen encoder's file)")
        if not Path(path).is_file():
            raise ValueError(f"{site}: pretrained encoder file not found: {path}")
        super().__init__(cfg, datalist, site, device)
        options = encoder_options(cfg["bundle_dir"], cfg["bundle"])
        load_pretrained_encoder(self.model, path, options, cfg["bundle_dir"])
        self.encoder_file = path

    @classmethod
    def build_model(cls, config: Mapping[str, Any]) -> nn.Module:
        """The bundle network truncated after ``decoder_levels`` levels, with the local head g2."""
        network = build_network(config["bundle_dir"], config["bundle"])
        return DecoderWithLocalHead(
            network,
            config["decoder_levels"],
            int(config["grid"]),
            int(config["window"]),
            int(config["embedding_dim"]),
        )

    @classmethod
    def exchanged_state(cls, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Only the decoder blocks and g2 travel; the encoder never does."""
        return model.exchanged_state_dict()

    def load_weights(self, incoming: Message) -> None:
        """Load the decoder blocks and g2; the keys and shapes must be exactly the exchanged ones."""
        state = message_to_state_dict(incoming, "weights")
        problem = state_mismatch(self.model.exchanged_state_dict(), state)
        if problem:
            raise ValueError(f"{self.site}: decoder weights do not match: {problem}")
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False)

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The decoder blocks' state (network keys ``up_layers.*``), CPU copies."""
        return self.model.decoder_state_dict()

    @classmethod
    def checkpoint(cls, weights: Message, config: Mapping[str, Any], site: str | None) -> dict[str, Any]:
        """The decoder-stage checkpoint of a final ``weights`` message (see :mod:`fedcontrast.nets.decoder`).

        Args:
            weights: the stage's final weights (the global message, or a site's own upload).
            config: the stage's configuration.
            site: the site whose model it is; None for the federated (global) model.

        The encoder is read from ``pretrained_encoder`` (``{site}`` resolved); when that file
        cannot be read here (e.g. a server without the sites' files) the checkpoint holds the
        decoder blocks only and says so in ``contains``.
        """
        cfg = merge_config(cls.DEFAULTS, config)
        state = message_to_state_dict(weights, "weights")
        decoder = {k: v for k, v in state.items() if k.startswith("up_layers.")}
        if not decoder:
            raise ValueError("the decoder stage's weights hold no 'up_layers.*' entry")
        network = build_network(cfg["bundle_dir"], cfg["bundle"])
        levels = resolve_levels(network, cfg["decoder_levels"])
        path = encoder_path(cfg, site)
        encoder = None
        if path and "{site}" not in path and Path(path).is_file():
            encoder, _ = read_encoder(path, cfg["bundle_dir"])
        else:
            logger.warning("encoder file %r not readable here: the decoder checkpoint holds no encoder", path)
        stages = [
            {"stage": "encoder", "method": str(cfg["encoder_method"]), "file": path},
            {
                "stage": "decoder",
                "method": "local_decoder",
                "loss_strategy": str(cfg["loss_strategy"]),
                "local_negatives": str(cfg["local_negatives"]),
                "federated": site is None,
                "site": site or "",
                "decoder_levels": levels,
                "grid": int(cfg["grid"]),
                "window": int(cfg["window"]),
                "temperature": float(cfg["temperature"]),
                "seed": int(cfg["seed"]),
            },
        ]
        return build_checkpoint(decoder, levels, encoder, stages, cfg["bundle"])

    @classmethod
    def save_checkpoint(
        cls, weights: Message, out_dir: Path, config: Mapping[str, Any], site: str | None
    ) -> list[Path]:
        """Write ``out_dir/pretrained_decoder.pt`` (:meth:`checkpoint`); the controller's result hook."""
        path = Path(out_dir) / DECODER_FILE
        save_decoder_checkpoint(cls.checkpoint(weights, config, site), path)
        return [path]


class DecoderFedAvg(ServerStrategy):
    """FedAvg of the decoder blocks and g2; refuses per-site encoders (``{site}`` in the encoder path)."""

    def __init__(self, config: Mapping[str, Any], initial: Message):
        if "{site}" in str(config.get("pretrained_encoder", "")):
            raise ValueError(
                "federated decoder pre-training needs one encoder for every site; "
                f"pretrained_encoder {config['pretrained_encoder']!r} is per site (use --local)"
            )
        super().__init__(config, initial)


register(
    MethodSpec(
        name="local_decoder",
        trainer=DecoderPretrainer,
        strategy=DecoderFedAvg,
        federated=True,
        pretraining=False,  # it produces decoder blocks on a given encoder, not an encoder
        description="Local contrastive (L^R / L^D) pre-training of the decoder on a frozen encoder",
    )
)


@dataclass
class DecoderStageResult:
    """Outcome of :func:`pretrain_decoder`.

    Attributes:
        checkpoints: site -> its checkpoint dict (federated: every site maps to the one global checkpoint).
        paths: site -> the checkpoint file (when ``out`` was given; federated: one shared file).
        runs: the in-process runs (one federated run, or one per site).
    """

    checkpoints: dict[str, dict[str, Any]]
    paths: dict[str, Path] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)


def pretrain_decoder(
    encoder: str | os.PathLike | Mapping[str, str | os.PathLike],
    config: Mapping[str, Any],
    datalists: Mapping[str, list[dict]],
    rounds: int = 1,
    federated: bool = True,
    out: str | os.PathLike | None = None,
    device: str = "cpu",
) -> DecoderStageResult:
    """Run the decoder stage in this process (plain PyTorch, no NVFlare): the benchmark's entry.

    Args:
        encoder: the saved encoder state dict file (``pretrained_encoder.pt`` / the bench's
            ``global.pt``), one for every site; or site -> file (per-site encoders, local only);
            a path with ``{site}`` also gives per-site files.
        config: ``local_decoder`` configuration (:data:`DEFAULTS`; e.g. the bench's
            pre-training config: ``bundle``, ``seed``, ``local_epochs``,
            ``batch_size``); its ``pretrained_encoder`` is set from ``encoder``.
        datalists: site -> pre-training entries (``{"image": path}``, e.g.
            :func:`~fedcontrast.methods.volumes.pretraining_entries`).
        rounds: rounds of ``local_epochs`` epochs.
        federated: True: FedAvg of the decoder over the sites, one checkpoint; False: every site
            alone on its own encoder, one checkpoint per site.
        out: folder to write to: ``out/pretrained_decoder.pt`` (federated) or
            ``out/<site>/pretrained_decoder.pt`` (per site); None writes nothing.
        device: torch device.

    Returns:
        The checkpoints (and their files), each holding the encoder and the decoder blocks:
        pass a file to ``supervised`` as ``pretrained_decoder`` (no ``pretrained_encoder`` needed).
    """
    runs: list[RunResult] = []
    checkpoints: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    if federated:
        if isinstance(encoder, Mapping) or "{site}" in str(encoder):
            raise ValueError("federated decoder pre-training needs one encoder file for every site")
        cfg = {**config, "pretrained_encoder": str(encoder)}
        run = run_in_process("local_decoder", cfg, datalists, rounds, federated=True, device=device)
        runs.append(run)
        checkpoint = DecoderPretrainer.checkpoint(run.global_message, cfg, None)
        checkpoints = dict.fromkeys(datalists, checkpoint)
        if out is not None:
            path = Path(out) / DECODER_FILE
            save_decoder_checkpoint(checkpoint, path)
            paths = dict.fromkeys(datalists, path)
    else:
        for site, entries in datalists.items():
            own = encoder[site] if isinstance(encoder, Mapping) else str(encoder).replace("{site}", site)
            cfg = {**config, "pretrained_encoder": str(own)}
            run = run_in_process(
                "local_decoder", cfg, {site: entries}, rounds, federated=False, device=device
            )
            runs.append(run)
            checkpoints[site] = DecoderPretrainer.checkpoint(run.final_messages[site], cfg, site)
            if out is not None:
                paths[site] = Path(out) / site / DECODER_FILE
                save_decoder_checkpoint(checkpoints[site], paths[site])
    return DecoderStageResult(checkpoints, paths, runs)
