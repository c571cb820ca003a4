"""Two-view augmentation for contrastive pre-training, built from MONAI transforms (SPEC §0).

Each view of a sample is drawn independently from one random pipeline, applied
sample by sample to a batch of 2D slices ``(B, C, H, W)`` or 3D slabs
``(B, C, H, W, T)``. Spatial transforms act in-plane only (the slice axis carries
the partition cue, so it is never flipped, rotated or cropped):

1. flips along H and along W (each with ``flip_prob``), an in-plane quarter turn
   (``rot90_prob``) and a small in-plane rotation of up to ``rotate_deg`` degrees
   (``rotate_prob``);
2. random crop-resize: an in-plane crop whose sides are ``crop_scale`` fractions of
   the input, resized back to the input size (so every view has the input's shape);
3. intensity: brightness (additive offset up to ±``brightness``), contrast
   (multiplicative factor ``1 ± contrast``), gamma in ``gamma`` (each with
   ``intensity_prob``), then Gaussian noise of std ``noise_std`` (``noise_prob``).

Intensities are in the units of the bundle's normalisation (z-scores), which
sets the scale of ``brightness`` and ``noise_std``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandFlip,
    RandGaussianNoise,
    RandRotate,
    RandRotate90,
    RandScaleCrop,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
)
from monai.utils import convert_to_tensor

#: Default augmentation options (the ``augment`` section of a method's config).
AUGMENT_DEFAULTS: dict[str, Any] = {
    "flip_prob": 0.5,
    "rot90_prob": 0.5,
    "rotate_deg": 15.0,
    "rotate_prob": 0.5,
    "crop_scale": (0.6, 1.0),
    "brightness": 0.1,
    "contrast": 0.2,
    "gamma": (0.7, 1.5),
    "intensity_prob": 0.8,
    "noise_std": 0.05,
    "noise_prob": 0.5,
}


class TwoViewAugment:
    """Random views of a batch of slices or slabs.

    Args:
        spatial_dims: 2 (slices ``(B, C, H, W)``) or 3 (slabs ``(B, C, H, W, T)``).
        seed: seed of the random pipeline (the views are deterministic for a seed).
        options: overrides of :data:`AUGMENT_DEFAULTS`.
    """

    def __init__(self, spatial_dims: int, seed: int = 0, options: Mapping[str, Any] | None = None):
        unknown = set(options or {}) - set(AUGMENT_DEFAULTS)
        if unknown:
            raise ValueError(
                f"unknown augmentation options {sorted(unknown)}; known: {sorted(AUGMENT_DEFAULTS)}"
            )
        opts = {**AUGMENT_DEFAULTS, **(options or {})}
        self.spatial_dims = spatial_dims
        self.options = opts
        angle = math.radians(opts["rotate_deg"])
        # In-plane rotation: about the only axis in 2D, about the slice axis (range_z) in 3D.
        rotate = {"range_x": angle} if spatial_dims == 2 else {"range_z": angle}
        slice_axis_scale = [] if spatial_dims == 2 else [1.0]
        lo, hi = opts["crop_scale"]
        self._spatial = Compose(
            [
                RandFlip(prob=opts["flip_prob"], spatial_axis=0),
                RandFlip(prob=opts["flip_prob"], spatial_axis=1),
                RandRotate90(prob=opts["rot90_prob"], spatial_axes=(0, 1)),
                RandRotate(prob=opts["rotate_prob"], padding_mode="border", **rotate),
                RandScaleCrop(
                    roi_scale=[lo, lo, *slice_axis_scale],
                    max_roi_scale=[hi, hi, *slice_axis_scale],
                    random_size=True,
                ),
            ]
        )
        self._intensity = Compose(
            [
                RandShiftIntensity(offsets=opts["brightness"], prob=opts["intensity_prob"]),
                RandScaleIntensity(factors=opts["contrast"], prob=opts["intensity_prob"]),
                RandAdjustContrast(gamma=opts["gamma"], prob=opts["intensity_prob"]),
                RandGaussianNoise(std=opts["noise_std"], prob=opts["noise_prob"]),
            ]
        )
        self._spatial.set_random_state(seed)
        self._intensity.set_random_state(seed + 1)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """One random view of every sample: same shape, dtype and device as ``images``."""
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a batch of {self.spatial_dims}D samples, got shape {tuple(images.shape)}"
            )
        in_plane = tuple(images.shape[2:4])
        resize = Resize(
            spatial_size=in_plane if self.spatial_dims == 2 else (*in_plane, -1),
            mode="bilinear" if self.spatial_dims == 2 else "trilinear",
        )
        out = []
        for sample in images.cpu():
            x = resize(self._spatial(sample))
            out.append(convert_to_tensor(self._intensity(x), track_meta=False, dtype=torch.float32))
        return torch.stack(out).to(images.device)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views ``(view1, view2)`` of ``images``."""
        return self.view(images), self.view(images)
