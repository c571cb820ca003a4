"""Scoring a segmentation network on a site's test volumes with the bundle's own pieces.

The network, the deterministic preprocessing and the inferer come from the bundle's
``train.json`` (the same ones its ``evaluate.json`` uses); Dice and HD95 are MONAI's
metrics. Test volumes are preprocessed once and kept in memory, so scoring a model
costs only its forward passes. Scores are computed in the preprocessed space (RAS,
``inplane_spacing`` mm in-plane, native slice spacing); HD95 is in millimetres.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from fedcontrast.nets.bundle import bundle_parser

CLASS_NAMES: tuple[str, ...] = ("RV", "MYO", "LV")


class BundleScorer:
    """Dice per class and HD95 of a network state dict on each site's test volumes.

    Args:
        test_sets: site -> labelled entries (``{"image", "label"}``).
        overrides: bundle config overrides (network size, geometry).
        bundle_dir: the bundle (default: the repository's).
    """

    def __init__(
        self,
        test_sets: Mapping[str, list[dict]],
        overrides: Mapping[str, Any] | None = None,
        bundle_dir: str | None = None,
    ):
        parser = bundle_parser(bundle_dir, "train", overrides)
        self.network: torch.nn.Module = parser.get_parsed_content("network_def").eval()
        self.inferer = parser.get_parsed_content("inferer")
        preprocessing = parser.get_parsed_content("preprocessing")
        self.volumes = {
            site: [preprocessing({"image": e["image"], "label": e["label"]}) for e in entries]
            for site, entries in test_sets.items()
        }
        self.num_classes = len(CLASS_NAMES) + 1

    @torch.no_grad()
    def predict(self, state_dict: Mapping[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """Class indices ``(1, 1, X, Y, Z)`` of one preprocessed image ``(1, X, Y, Z)``."""
        self.network.load_state_dict(state_dict)
        logits = self.inferer(image[None].float(), self.network)
        return logits.argmax(dim=1, keepdim=True)

    def score(self, state_dict: Mapping[str, torch.Tensor], site: str) -> dict[str, Any]:
        """Mean over ``site``'s test volumes: ``{"dice": {class: d}, "dice_mean", "hd95_mean"}``.

        A class absent from both prediction and label is left out of the means (NaN-safe).
        """
        dice, hd95 = [], []
        for volume in self.volumes[site]:
            pred = one_hot(self.predict(state_dict, volume["image"]), self.num_classes)
            label = one_hot(volume["label"][None].long(), self.num_classes)
            dice.append(compute_dice(pred, label, include_background=False)[0].numpy())
            spacing = [float(s) for s in volume["image"].pixdim]
            hd = compute_hausdorff_distance(
                pred, label, include_background=False, percentile=95, spacing=spacing
            )
            hd95.append(hd[0].numpy())
        with np.errstate(invalid="ignore"):
            per_class = np.nanmean(np.stack(dice), axis=0)
            hd_classes = np.nanmean(np.where(np.isinf(np.stack(hd95)), np.nan, np.stack(hd95)), axis=0)
        hd_mean = float(np.nanmean(hd_classes)) if np.isfinite(hd_classes).any() else None
        return {
            "dice": {name: float(v) for name, v in zip(CLASS_NAMES, per_class)},
            "dice_mean": float(np.nanmean(per_class)),
            "hd95_mean": hd_mean,
        }

    def example(self, state_dict: Mapping[str, torch.Tensor], site: str) -> dict[str, np.ndarray]:
        """Image, ground truth and prediction of ``site``'s first test volume, ``(X, Y, Z)`` arrays."""
        volume = self.volumes[site][0]
        return {
            "image": volume["image"][0].numpy(),
            "label": volume["label"][0].numpy(),
            "prediction": self.predict(state_dict, volume["image"])[0, 0].numpy().astype(np.uint8),
        }
