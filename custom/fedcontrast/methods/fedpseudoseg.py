"""FedPseudoSeg: segmentation of intensity clusters per site, FedAvg of the whole network.

The label-free pretext nearest to the supervised ceiling's (ablations README sections 11 and
14: an encoder pre-trained with labels gains, and its gain sits in the shallow and middle
stages). Each site derives a per-pixel pseudo-label from every unlabelled sample and trains
the bundle's whole segmentation network to predict it, as self-supervised few-shot medical
segmentation trains on superpixels (Ouyang et al., SSL-ALPNet, ECCV 2020); here the segments
are the sample's tissue classes by intensity
(:func:`~fedcontrast.methods.pseudo_labels.intensity_clusters`: k-means of the in-plane
smoothed intensities, ordered dark to bright), which on cine MRI separate blood
pool, myocardium and surrounding tissue. The network sees a copy whose intensities
:class:`~fedcontrast.methods.corruptions.RestorationCorruption` has remapped along a random
monotone curve (by default; its other corruptions by option), so it must find the classes by
their shape and context rather than by a fixed threshold. Loss: Dice plus cross-entropy
(MONAI's :class:`~monai.losses.DiceCELoss`), the fine-tuning loss. The server averages every
weight; only weights leave a site. Fine-tuning takes the encoder, or with
``decoder_handover`` the decoder blocks of every level too
(:class:`~fedcontrast.methods.whole_network.WholeNetworkPretrainer`).

It is the project's ablation (issue 10), not a published method. Its validation run chose
curves inverted half the time, ``{"input_corruption": {"decreasing_prob": 0.5}}`` (ablations
README section 16); the default keeps the increasing curves of the run it was compared with,
so that run's command still reproduces it.

Configuration (:data:`DEFAULTS`): the common pre-training keys of
:mod:`~fedcontrast.methods.pretrain` (the heads' and the contrastive keys are unused; no
per-round embedding diagnostics), ``clusters`` (4), ``smooth_sigma`` (in-plane Gaussian
sigma before clustering, pixels), ``kmeans_iterations``, ``input_corruption`` (overrides of
:data:`~fedcontrast.methods.corruptions.CORRUPTION_DEFAULTS` for the network's input) and
``decoder_handover`` (False).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedcontrast.methods.base import ServerStrategy
from fedcontrast.methods.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from fedcontrast.methods.pseudo_labels import intensity_clusters, smooth_in_plane
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.methods.whole_network import SegmentationPretextTrainer

#: The input's corruption by default: an increasing intensity curve, nothing else.
INPUT_CORRUPTION: dict[str, Any] = {"decreasing_prob": 0.0, "shuffle_prob": 0.0, "paint_prob": 0.0}

DEFAULTS: dict[str, Any] = {
    **PRETRAIN_DEFAULTS,
    "probe_volumes": 0,
    "augment": {"intensity_prob": 0.0, "noise_prob": 0.0},
    "clusters": 4,
    "smooth_sigma": 1.0,
    "kmeans_iterations": 10,
    "input_corruption": INPUT_CORRUPTION,
    "decoder_handover": False,
}


class PseudoSegTrainer(SegmentationPretextTrainer):
    """Intensity-cluster segmentation at one site (see the module docstring)."""

    DEFAULTS = DEFAULTS
    METHOD = "fedpseudoseg"
    STAGE = "pseudo_segmentation"
    CORRUPTION_KEY = "input_corruption"

    @classmethod
    def output_channels(cls, config: Mapping[str, Any]) -> int:
        """One channel per intensity class."""
        return int(config["clusters"])

    @classmethod
    def pretext_provenance(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        keys = ("clusters", "smooth_sigma", "kmeans_iterations", "input_corruption")
        return {k: config[k] for k in keys}

    def input_and_target(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The views and their intensity classes (k-means of the in-plane smoothed intensities)."""
        cfg = self.config
        smoothed = smooth_in_plane(views, float(cfg["smooth_sigma"]))
        return views, intensity_clusters(smoothed, int(cfg["clusters"]), int(cfg["kmeans_iterations"]))


register(
    MethodSpec(
        name="fedpseudoseg",
        trainer=PseudoSegTrainer,
        strategy=ServerStrategy,
        federated=True,
        pretraining=True,
        description="FedPseudoSeg (ablation): intensity-cluster segmentation per site, FedAvg of the network",
    )
)
