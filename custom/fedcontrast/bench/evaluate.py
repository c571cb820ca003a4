"""Scoring a segmentation network on a site's test volumes with the bundle's own pieces.

The network, the deterministic preprocessing and the inferer come from the bundle's
``train.json`` (the same ones its ``evaluate.json`` uses); Dice and HD95 are MONAI's
metrics. Volumes are preprocessed once and kept in memory as plain tensors (their spacing
kept beside them), and scoring runs with MONAI's metadata tracking off, so scoring a model
costs its forward passes and metrics without the per-operation cost of MetaTensor metadata
(the same values). Scores are computed in the preprocessed space (RAS, ``inplane_spacing``
mm in-plane, native slice spacing); HD95 is in millimetres.

BatchNorm (SPEC §7): before a model is scored at a site, its BatchNorm running statistics
are re-estimated on that site's *labelled training* volumes (the fine-tuning data), run
through the same sliding-window inferer as at test time (:func:`reestimate_batchnorm`).
The same rule holds for every method, so statistics inherited from pre-training, or
averaged across sites by FedAvg, never decide a score; no test or validation volume is
ever seen by it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot
from torch.nn.modules.batchnorm import _BatchNorm

from fedcontrast.methods.supervised import untracked_meta
from fedcontrast.nets.bundle import bundle_parser


@torch.no_grad()
def reestimate_batchnorm(network: torch.nn.Module, images: list[torch.Tensor], inferer: Any) -> None:
    """Replace every BatchNorm layer's running statistics by those of ``images``.

    The statistics are reset and recomputed as a cumulative average (``momentum=None``)
    over the batches the ``inferer`` feeds the network, i.e. exactly the windows the network
    sees when it segments these images; parameters are unchanged and the network is left in
    eval mode.

    Args:
        network: the segmentation network.
        images: preprocessed images ``(C, X, Y, Z)``.
        inferer: the bundle's inferer (sliding window or slice-wise).
    """
    layers = [m for m in network.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    network.train()
    for image in images:
        inferer(image[None].float(), network)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    network.eval()


class BundleScorer:
    """Dice per class and HD95 of a network state dict on each site's test (or validation) volumes.

    Args:
        test_sets: site -> labelled entries (``{"image", "label"}``) scored as ``split="test"``.
        overrides: bundle config overrides (network size, geometry, ``labels``: the label set,
            which sets the classes scored and their names).
        bundle_dir: the bundle (default: the repository's).
        calibration_sets: site -> the site's labelled *training* entries; when given, the
            BatchNorm statistics are re-estimated on them before every score at that site.
        validation_sets: site -> labelled entries scored as ``split="validation"``.
        device: where the network runs (BatchNorm re-estimation and inference); the metrics
            are computed on the CPU, so scores do not depend on it beyond floating-point noise.
    """

    def __init__(
        self,
        test_sets: Mapping[str, list[dict]],
        overrides: Mapping[str, Any] | None = None,
        bundle_dir: str | None = None,
        calibration_sets: Mapping[str, list[dict]] | None = None,
        validation_sets: Mapping[str, list[dict]] | None = None,
        device: str | torch.device = "cpu",
    ):
        parser = bundle_parser(bundle_dir, "train", overrides)
        self.device = torch.device(device)
        self.network: torch.nn.Module = parser.get_parsed_content("network_def").to(self.device).eval()
        self.inferer = parser.get_parsed_content("inferer")
        preprocessing = parser.get_parsed_content("preprocessing")

        def plain(volume: dict) -> dict:
            """``image`` and ``label`` as plain tensors, ``spacing`` (mm) from the image's metadata."""
            image = volume["image"]
            spacing = [float(s) for s in image.pixdim]
            return {"image": image.as_tensor(), "label": volume["label"].as_tensor(), "spacing": spacing}

        def load(sets: Mapping[str, list[dict]] | None) -> dict[str, list[dict]]:
            return {
                site: [plain(preprocessing({"image": e["image"], "label": e["label"]})) for e in entries]
                for site, entries in (sets or {}).items()
            }

        self.splits = {"test": load(test_sets), "validation": load(validation_sets)}
        self.volumes = self.splits["test"]
        self.calibration = {
            site: [v["image"].to(self.device) for v in vols] for site, vols in load(calibration_sets).items()
        }
        self.class_names: list[str] = list(parser.get_parsed_content("class_names"))
        self.num_classes = int(parser.get_parsed_content("num_classes"))

    def load(self, state_dict: Mapping[str, torch.Tensor], site: str) -> None:
        """Load ``state_dict`` for scoring at ``site``: BatchNorm re-estimated on its training volumes."""
        self.network.load_state_dict(state_dict)
        if site in self.calibration:
            with untracked_meta():
                reestimate_batchnorm(self.network, self.calibration[site], self.inferer)
        self.network.eval()

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Class indices ``(1, 1, X, Y, Z)`` of a preprocessed image ``(1, X, Y, Z)`` (loaded model)."""
        with untracked_meta():
            logits = self.inferer(image[None].float().to(self.device), self.network)
            return logits.argmax(dim=1, keepdim=True).cpu()

    def score(self, state_dict: Mapping[str, torch.Tensor], site: str, split: str = "test") -> dict[str, Any]:
        """Mean over ``site``'s ``split`` volumes: ``{"dice": {class: d}, "dice_mean", "hd95_mean"}``,
        with the BatchNorm statistics re-estimated on ``site``'s training volumes.

        A class absent from both prediction and label is left out of the means (NaN-safe).
        """
        self.load(state_dict, site)
        return self.evaluate(site, split)

    def score_elsewhere(
        self, state_dict: Mapping[str, torch.Tensor], trained_site: str
    ) -> dict[str, dict[str, Any]]:
        """Cross-site generalisation (SPEC §7): every *other* site's test scores of the model that
        ``trained_site`` fine-tuned, as that site deploys it (BatchNorm statistics re-estimated on
        ``trained_site``'s training volumes; the tested site lends nothing but its test volumes).

        Returns: tested site -> the :meth:`score` dict.
        """
        self.load(state_dict, trained_site)
        return self.evaluate_elsewhere(trained_site)

    def evaluate_elsewhere(self, trained_site: str) -> dict[str, dict[str, Any]]:
        """:meth:`score_elsewhere` of the model loaded last (loaded for ``trained_site``)."""
        return {site: self.evaluate(site, "test") for site in self.volumes if site != trained_site}

    def evaluate(self, site: str, split: str = "test") -> dict[str, Any]:
        """:meth:`score` of the model loaded last, on ``site``'s ``split`` volumes."""
        dice, hd95 = [], []
        for volume in self.splits[split][site]:
            with untracked_meta():
                pred = one_hot(self.predict(volume["image"]), self.num_classes)
                label = one_hot(volume["label"][None].long(), self.num_classes)
                dice.append(compute_dice(pred, label, include_background=False)[0].numpy())
                hd = compute_hausdorff_distance(
                    pred, label, include_background=False, percentile=95, spacing=volume["spacing"]
                )
            hd95.append(hd[0].numpy())
        with np.errstate(invalid="ignore"):
            per_class = np.nanmean(np.stack(dice), axis=0)
            hd_classes = np.nanmean(np.where(np.isinf(np.stack(hd95)), np.nan, np.stack(hd95)), axis=0)
        hd_mean = float(np.nanmean(hd_classes)) if np.isfinite(hd_classes).any() else None
        return {
            "dice": {name: float(v) for name, v in zip(self.class_names, per_class)},
            "dice_mean": float(np.nanmean(per_class)),
            "hd95_mean": hd_mean,
        }

    def example(self, state_dict: Mapping[str, torch.Tensor], site: str) -> dict[str, np.ndarray]:
        """Image, ground truth and prediction of ``site``'s first test volume, ``(X, Y, Z)`` arrays."""
        volume = self.volumes[site][0]
        self.load(state_dict, site)
        return {
            "image": volume["image"][0].numpy(),
            "label": volume["label"][0].numpy(),
            "prediction": self.predict(volume["image"])[0, 0].numpy().astype(np.uint8),
        }
