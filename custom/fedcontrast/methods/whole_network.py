"""Pre-training of the bundle's whole segmentation network (encoder, decoder and head) at a site.

The dense pretexts (:mod:`~fedcontrast.methods.fedrestore`, :mod:`~fedcontrast.methods.fedpseudoseg`)
train the whole network on a per-pixel target, from a corrupted input, with their own number
of output channels; the server averages every weight (the default
:class:`~fedcontrast.methods.base.ServerStrategy`).
Fine-tuning takes the encoder, as from every pre-training method; with ``decoder_handover``
it takes the decoder blocks of every level too (:meth:`WholeNetworkPretrainer.save_checkpoint`
writes them as a decoder-stage checkpoint, ``pretrained_decoder.pt``, which ``supervised``'s
``pretrained_decoder`` loads). The output head, whose channels are the pretext's, never
transfers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import nn

from fedcontrast.methods.base import Message, merge_config, message_to_state_dict
from fedcontrast.methods.corruptions import RestorationCorruption
from fedcontrast.methods.local_decoder import DECODER_FILE
from fedcontrast.methods.partitions import PartitionBatch
from fedcontrast.methods.pretrain import ContrastivePretrainer
from fedcontrast.nets.bundle import build_network, encoder_state
from fedcontrast.nets.decoder import build_checkpoint, decoder_block_keys, num_levels, save_decoder_checkpoint


def handover_stage(
    stage: str, method: str, site: str | None, config: Mapping[str, Any], provenance: Mapping[str, Any]
) -> dict[str, Any]:
    """A handover checkpoint's provenance record: the stage and method, where it was trained
    (``site`` None: the federation's global model), ``config``'s seed and the pretext's options."""
    return {
        "stage": stage,
        "method": method,
        "federated": site is None,
        "site": site or "",
        "seed": int(config["seed"]),
        **provenance,
    }


def write_handover(
    weights: Message, network: nn.Module, bundle: dict[str, Any], stage: dict[str, Any], out_dir: Path
) -> Path:
    """Write ``out_dir/pretrained_decoder.pt``: the encoder and every level's decoder blocks of the
    ``weights/`` entries of ``weights`` (a state dict of ``network``'s layout), a decoder-stage
    checkpoint with the provenance ``stage`` that ``supervised``'s ``pretrained_decoder`` loads."""
    state = message_to_state_dict(weights, "weights")
    levels = num_levels(network)
    keys = decoder_block_keys(network, levels)
    checkpoint = build_checkpoint({k: state[k] for k in keys}, levels, encoder_state(state), [stage], bundle)
    path = Path(out_dir) / DECODER_FILE
    save_decoder_checkpoint(checkpoint, path)
    return path


class WholeNetworkPretrainer(ContrastivePretrainer):
    """A site trainer whose model is the bundle network with the pretext's output channels, and
    whose input is corrupted by :class:`~fedcontrast.methods.corruptions.RestorationCorruption`
    (``self.corrupt``, seeded from the site's generator, options from the config's
    :attr:`CORRUPTION_KEY` section).

    Subclasses set :attr:`METHOD` and :attr:`STAGE` (the handover checkpoint's provenance) and
    :attr:`CORRUPTION_KEY`, and override :meth:`output_channels` and :meth:`pretext_provenance`;
    their ``DEFAULTS`` hold ``decoder_handover``.
    """

    METHOD = ""
    STAGE = ""
    CORRUPTION_KEY = ""
    #: The network's outputs are the pretext's, never the label set's classes
    #: (:attr:`~fedcontrast.methods.registry.MethodSpec.label_outputs`).
    PRETEXT_OUTPUTS = True

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        super().__init__(config, datalist, site, device)
        seed = int(self.rng.integers(2**31))
        self.corrupt = RestorationCorruption(seed, self.config[self.CORRUPTION_KEY])

    @classmethod
    def output_channels(cls, config: Mapping[str, Any]) -> int:
        """Channels of the pretext's per-pixel output."""
        raise NotImplementedError

    @classmethod
    def pretext_provenance(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The pretext's options recorded in the handover checkpoint."""
        raise NotImplementedError

    @classmethod
    def build_model(cls, config: Mapping[str, Any]) -> nn.Module:
        """The bundle network with :meth:`output_channels` outputs (keys ``encoder.*``, ``up_layers.*``)."""
        overrides = {**dict(config["bundle"]), "num_classes": cls.output_channels(config)}
        return build_network(config["bundle_dir"], overrides)

    @classmethod
    def save_checkpoint(
        cls, weights: Message, out_dir: Path, config: Mapping[str, Any], site: str | None
    ) -> list[Path]:
        """With ``decoder_handover``, write ``out_dir/pretrained_decoder.pt``: the encoder and the
        decoder blocks of every level of the final ``weights`` (the controller's and the bench's
        result hook); otherwise nothing."""
        cfg = merge_config(cls.DEFAULTS, config)
        if not cfg["decoder_handover"]:
            return []
        stage = handover_stage(cls.STAGE, cls.METHOD, site, cfg, cls.pretext_provenance(cfg))
        return [write_handover(weights, cls.build_model(cfg), cfg["bundle"], stage, out_dir)]


class SegmentationPretextTrainer(WholeNetworkPretrainer):
    """A whole-network pretext that segments per-pixel pseudo-labels: Dice plus cross-entropy
    (MONAI's :class:`~monai.losses.DiceCELoss`, the fine-tuning loss) of the classes the network
    predicts from the corrupted input. Subclasses override :meth:`input_and_target`."""

    loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def input_and_target(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's uncorrupted input ``(B, 1, ...)`` and its int64 target classes
        ``(B, 1, ...)``, from a batch's augmented views."""
        raise NotImplementedError

    def training_step(self, batch: PartitionBatch) -> dict[str, torch.Tensor]:
        """Dice + cross-entropy of the corrupted input's predicted classes; ``accuracy`` per pixel."""
        views = self.augment.view(batch.images.to(self.device))
        inputs, labels = self.input_and_target(views)
        logits = self.model(self.corrupt(inputs)).float()
        accuracy = (logits.argmax(dim=1, keepdim=True) == labels).float().mean()
        return {"loss": self.loss(logits, labels), "accuracy": accuracy.detach()}
