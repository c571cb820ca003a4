"""FedRestore: image restoration per site (the Models Genesis pretext), FedAvg of the whole network.

The contrastive and rotation pretexts pose their task on the encoder's output alone. This one
trains the bundle's *whole* segmentation network, encoder and decoder with its skip
connections, to undo corruptions of the input (Zhou et al., Models Genesis, 2019/2021): a view
of each partition sample (the shared augmentation, spatial only by default) is the target,
:class:`~fedcontrast.methods.corruptions.RestorationCorruption` corrupts it, and the network,
built with one output channel, regresses the target (mean squared error). Restoring a slice
needs its tissue intensities, textures and boundaries at every scale, which is what the
encoder's shallow and middle stages carry in a network trained with labels (ablations README
section 14); that is the question this method answers. The server averages every weight
(``encoder.*`` and ``up_layers.*``, the output head included) weighted by samples seen (the
default :class:`~fedcontrast.methods.base.ServerStrategy`); only weights leave a site.
Fine-tuning takes the encoder, as from every pre-training method; with ``decoder_handover`` it
takes the decoder blocks of every level too, as Models Genesis fine-tunes the whole pre-trained
network (:class:`~fedcontrast.methods.whole_network.WholeNetworkPretrainer`; the output head,
one restored channel, never transfers).

It is the project's ablation (issue 10), not a published method.

Configuration (:data:`DEFAULTS`): the common pre-training keys of
:mod:`~fedcontrast.methods.pretrain` (the heads' and the contrastive keys are unused; no
per-round embedding diagnostics: the model outputs images), ``corruption`` (overrides of
:data:`~fedcontrast.methods.corruptions.CORRUPTION_DEFAULTS`) and ``decoder_handover`` (False).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from fedcontrast.methods.base import ServerStrategy
from fedcontrast.methods.corruptions import CORRUPTION_DEFAULTS
from fedcontrast.methods.partitions import PartitionBatch
from fedcontrast.methods.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.methods.whole_network import WholeNetworkPretrainer

DEFAULTS: dict[str, Any] = {
    **PRETRAIN_DEFAULTS,
    "probe_volumes": 0,
    "augment": {"intensity_prob": 0.0, "noise_prob": 0.0},
    "corruption": CORRUPTION_DEFAULTS,
    "decoder_handover": False,
}


class RestorationTrainer(WholeNetworkPretrainer):
    """Image restoration at one site (see the module docstring)."""

    DEFAULTS = DEFAULTS
    METHOD = "fedrestore"
    STAGE = "restoration"
    CORRUPTION_KEY = "corruption"

    @classmethod
    def output_channels(cls, config: Mapping[str, Any]) -> int:
        """One channel: the restored image."""
        return 1

    @classmethod
    def pretext_provenance(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"corruption": dict(config["corruption"])}

    def training_step(self, batch: PartitionBatch) -> dict[str, torch.Tensor]:
        """Mean squared error of the restored view; ``corrupted_error`` is the corrupted input's own."""
        target = self.augment.view(batch.images.to(self.device))
        corrupted = self.corrupt(target)
        loss = F.mse_loss(self.model(corrupted).float(), target)
        return {"loss": loss, "corrupted_error": F.mse_loss(corrupted, target).detach()}


register(
    MethodSpec(
        name="fedrestore",
        trainer=RestorationTrainer,
        strategy=ServerStrategy,
        federated=True,
        pretraining=True,
        description="FedRestore (ablation): Models Genesis restoration per site, FedAvg of the whole network",
    )
)
