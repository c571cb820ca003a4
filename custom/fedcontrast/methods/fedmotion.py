"""FedMotion: segmentation of what moves over the cardiac cycle, FedAvg of the whole network.

The supervised ceiling keeps nearly all its gain when its labels are merged into one heart
class against the background (ablations README section 17): an encoder that knows *where
the heart is* is what helps fine-tuning here. Cine MRI says where it is without labels: the
heart is what moves between the frames of one breath-hold, the classic cue of automatic
heart localisation (the temporal variance or first-harmonic image of a cine series). Each
site takes, per patient, the voxel-wise standard deviation over the patient's frames (ED
and ES in ACDC and M&Ms; more frames where a datalist gives them), smooths it in-plane and splits its voxels
into moving and still by 2-class k-means
(:func:`~fedcontrast.methods.pseudo_labels.intensity_clusters`). Every frame of the patient
gets that mask as its target, and the bundle's whole network learns to predict it from one
frame whose contrast a random monotone curve remapped
(:class:`~fedcontrast.methods.corruptions.RestorationCorruption`), so that a frame alone
must show where the heart is. Loss: Dice plus cross-entropy (MONAI's
:class:`~monai.losses.DiceCELoss`). The server averages every weight; only weights leave a
site. Fine-tuning takes the encoder, or with ``decoder_handover`` the decoder blocks too
(:class:`~fedcontrast.methods.whole_network.WholeNetworkPretrainer`).

A volume needs another frame of its patient (datalist entries with the same ``"patient"``
and the same preprocessed shape); one without is left out with a warning that names it,
and a site where no patient has two frames is refused.

It is the project's ablation (issue 10), not a published method. Its runs (ablations README
section 18: 96 and 480 steps, with the decoder handed over, with learning rate 3e-3 and no
contrast curve) gain nothing over random init on validation; the defaults are the first run's.

Configuration (:data:`DEFAULTS`): the common pre-training keys of
:mod:`~fedcontrast.methods.pretrain` (the heads' and the contrastive keys are unused; no
per-round embedding diagnostics), ``smooth_sigma`` (in-plane Gaussian sigma of the motion
map, pixels), ``kmeans_iterations``, ``input_corruption`` (overrides of
:data:`~fedcontrast.methods.corruptions.CORRUPTION_DEFAULTS` for the network's input) and
``decoder_handover`` (False).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from fedcontrast.methods.base import ServerStrategy
from fedcontrast.methods.fedpseudoseg import INPUT_CORRUPTION
from fedcontrast.methods.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from fedcontrast.methods.pseudo_labels import intensity_clusters, smooth_in_plane
from fedcontrast.methods.registry import MethodSpec, register
from fedcontrast.methods.volumes import frames_by_patient
from fedcontrast.methods.whole_network import SegmentationPretextTrainer

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    **PRETRAIN_DEFAULTS,
    "probe_volumes": 0,
    "augment": {"intensity_prob": 0.0, "noise_prob": 0.0},
    "smooth_sigma": 2.0,
    "kmeans_iterations": 10,
    "input_corruption": INPUT_CORRUPTION,
    "decoder_handover": False,
}


def motion_mask(frames: torch.Tensor, sigma: float, iterations: int) -> torch.Tensor:
    """Where a patient's frames differ: 1 where the in-plane smoothed voxel-wise standard deviation
    over the frames falls in the brighter of two k-means classes, else 0.

    Args:
        frames: ``(F, 1, H, W, D)`` preprocessed frames of one patient, F >= 2.

    Returns:
        ``(1, H, W, D)`` float mask.
    """
    spread = frames.float().std(dim=0, keepdim=True)  # (1, 1, H, W, D)
    return intensity_clusters(smooth_in_plane(spread, sigma), 2, iterations)[0].float()


class MotionSegTrainer(SegmentationPretextTrainer):
    """Motion-mask segmentation at one site (see the module docstring)."""

    DEFAULTS = DEFAULTS
    METHOD = "fedmotion"
    STAGE = "motion_segmentation"
    CORRUPTION_KEY = "input_corruption"

    @classmethod
    def output_channels(cls, config: Mapping[str, Any]) -> int:
        """Still and moving."""
        return 2

    @classmethod
    def pretext_provenance(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        return {k: config[k] for k in ("smooth_sigma", "kmeans_iterations", "input_corruption")}

    def site_volumes(self, datalist: list[dict], volumes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each paired frame with its patient's motion mask as a second channel: ``(2, H, W, D)``.

        Raises:
            ValueError: no patient of the site has two frames of one shape (the site named).
        """
        sigma, iterations = float(self.config["smooth_sigma"]), int(self.config["kmeans_iterations"])
        paired, masked = set(), []
        for indices in frames_by_patient(datalist).values():
            if len(indices) < 2 or len({volumes[i].shape for i in indices}) > 1:
                continue
            mask = motion_mask(torch.stack([volumes[i] for i in indices]), sigma, iterations)
            paired.update(indices)
            masked += [torch.cat([volumes[i], mask]) for i in indices]
        left_out = [entry["image"] for i, entry in enumerate(datalist) if i not in paired]
        if not masked:
            raise ValueError(
                f"{self.site}: fedmotion needs two frames (e.g. ED and ES) of one shape for a patient "
                f"(datalist entries with the same 'patient'); none of its {len(datalist)} volumes has one"
            )
        if left_out:
            logger.warning(
                "%s: %d volume(s) without another frame of their patient left out, e.g. %s",
                self.site,
                len(left_out),
                left_out[0],
            )
        return masked

    def input_and_target(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frame and its motion mask, the views' two channels (the augmentation moved them
        together; its interpolation is undone by thresholding the mask at 0.5)."""
        return views[:, :1], (views[:, 1:] > 0.5).long()


register(
    MethodSpec(
        name="fedmotion",
        trainer=MotionSegTrainer,
        strategy=ServerStrategy,
        federated=True,
        pretraining=True,
        description="FedMotion (ablation): segmentation of what moves between a patient's frames, FedAvg",
    )
)
