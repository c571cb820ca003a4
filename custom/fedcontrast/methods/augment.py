"""Two-view augmentation for contrastive pre-training, batched on the training device (SPEC §0).

Each view of a sample is drawn independently from one random pipeline, applied to a
whole batch of 2D slices ``(B, C, H, W)`` or 3D slabs ``(B, C, H, W, T)`` at once with
tensor operations on the batch's own device (no host round-trip, no per-sample loop).
Spatial transforms act in-plane only (the slice axis carries the partition cue, so it is
never flipped, rotated or cropped: every slice of a slab gets the same in-plane transform,
and no output slice mixes input slices):

1. flips along H and along W (each with ``flip_prob``), an in-plane quarter turn by 90, 180
   or 270 degrees (``rot90_prob``) and a small in-plane rotation of up to ``rotate_deg``
   degrees (``rotate_prob``);
2. random crop-resize: an in-plane crop whose sides are ``crop_scale`` fractions of the
   input, resized back to the input size (so every view has the input's shape).

   The steps compose into one affine map per sample, applied by a single bilinear
   ``grid_sample`` (border padding), so the image is resampled once;
3. intensity: brightness (additive offset up to ±``brightness``), contrast (multiplicative
   factor ``1 ± contrast``), gamma in ``gamma`` on the sample's own intensity range (each
   with ``intensity_prob``), then Gaussian noise whose std is drawn from ``[0, noise_std]``
   (``noise_prob``), as MONAI's ``RandShiftIntensity``, ``RandScaleIntensity``,
   ``RandAdjustContrast`` and ``RandGaussianNoise`` define them.

Intensities are in the units of the bundle's normalisation (z-scores), which sets the
scale of ``brightness`` and ``noise_std``. Random parameters come from a seeded CPU
generator (a few numbers per sample, sent to the device once per view); the noise field
from a generator on the batch's device, so views are deterministic for a seed on a device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

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


def sample_range(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample minimum and span (at least ``eps``) of ``(B, ...)`` samples, shaped to broadcast."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    low = x.flatten(1).amin(1).view(shape)
    return low, (x.flatten(1).amax(1).view(shape) - low).clamp_min(eps)


class SeededBatchTransform:
    """Base of the random batch transforms: a seeded CPU generator for the few parameters drawn
    per sample, and one generator per device (seeded ``seed + 1``) for batch-sized noise fields.

    Args:
        seed: seed of both streams.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._params = torch.Generator().manual_seed(seed)
        self._noise: dict[torch.device, torch.Generator] = {}

    def _rand(self, *shape: int) -> torch.Tensor:
        """U(0, 1) draws of ``shape`` on the CPU generator."""
        return torch.rand(shape, generator=self._params)

    def _happens(self, n: int, prob: float) -> torch.Tensor:
        """``n`` Bernoulli(prob) draws as a bool tensor."""
        return self._rand(n) < prob

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._noise:
            self._noise[device] = torch.Generator(device=device).manual_seed(self.seed + 1)
        return self._noise[device]


class TwoViewAugment(SeededBatchTransform):
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
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        super().__init__(seed)
        self.spatial_dims = spatial_dims
        self.options = {**AUGMENT_DEFAULTS, **(options or {})}

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        """``n`` draws from U(low, high) on the CPU generator."""
        return low + (high - low) * self._rand(n)

    def _in_plane_affine(self, n: int, height: int, width: int) -> torch.Tensor:
        """``(n, 2, 3)`` maps from output to input normalised coordinates ``(x: W, y: H)``.

        Output point -> crop window (scale, offset) -> undo rotation (quarter turns plus the
        small angle, in pixel units so non-square planes are not sheared) -> undo flips.
        """
        o = self.options
        lo, hi = o["crop_scale"]
        scale = torch.stack([self._uniform(n, lo, hi), self._uniform(n, lo, hi)], dim=1)
        offset = (1 - scale) * self._uniform(2 * n, -1.0, 1.0).view(n, 2)
        turns = torch.randint(1, 4, (n,), generator=self._params) * self._happens(n, o["rot90_prob"])
        small = (
            self._uniform(n, -1.0, 1.0) * math.radians(o["rotate_deg"]) * self._happens(n, o["rotate_prob"])
        )
        angle = turns * (math.pi / 2) + small
        cos, sin = torch.cos(angle), torch.sin(angle)
        aspect = torch.tensor([width / 2, height / 2])
        rotation = torch.stack([cos, -sin, sin, cos], dim=1).view(n, 2, 2)
        rotation = rotation * aspect[None, None, :] / aspect[None, :, None]  # A^-1 R A
        flips = torch.where(self._happens(2 * n, o["flip_prob"]).view(n, 2), -1.0, 1.0)
        linear = flips[:, :, None] * rotation * scale[:, None, :]
        translation = (flips[:, :, None] * rotation @ offset[:, :, None])[..., 0]
        return torch.cat([linear, translation[:, :, None]], dim=2)

    def _spatial(self, images: torch.Tensor) -> torch.Tensor:
        """Flips, rotations and crop-resize of every sample, in-plane only."""
        b, c, h, w = images.shape[:4]
        planes = images if self.spatial_dims == 2 else images.permute(0, 1, 4, 2, 3).reshape(b, -1, h, w)
        theta = self._in_plane_affine(b, h, w).to(images.device, images.dtype)
        grid = F.affine_grid(theta, list(planes.shape), align_corners=False)
        out = F.grid_sample(planes, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.spatial_dims == 2:
            return out
        return out.view(b, c, -1, h, w).permute(0, 1, 3, 4, 2)

    def _intensity(self, images: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, gamma and noise, each sample with its own draws."""
        o, n = self.options, images.shape[0]
        shape = (n,) + (1,) * (images.ndim - 1)

        def per_sample(values: torch.Tensor, neutral: float, prob: float) -> torch.Tensor:
            return (
                torch.where(self._happens(n, prob), values, neutral)
                .to(images.device, images.dtype)
                .view(shape)
            )

        shift = per_sample(self._uniform(n, -o["brightness"], o["brightness"]), 0.0, o["intensity_prob"])
        factor = per_sample(1 + self._uniform(n, -o["contrast"], o["contrast"]), 1.0, o["intensity_prob"])
        gamma = per_sample(self._uniform(n, *o["gamma"]), 1.0, o["intensity_prob"])
        sigma = per_sample(self._uniform(n, 0.0, o["noise_std"]), 0.0, o["noise_prob"])
        x = (images + shift) * factor
        low, span = sample_range(x, 1e-7)
        x = ((x - low) / span).clamp_min(0) ** gamma * span + low
        noise = torch.randn(
            x.shape, generator=self._noise_generator(x.device), device=x.device, dtype=x.dtype
        )
        return x + sigma * noise

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """One random view of every sample: same shape and device as ``images``, float32."""
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a batch of {self.spatial_dims}D samples, got shape {tuple(images.shape)}"
            )
        return self._intensity(self._spatial(images.float()))

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent views ``(view1, view2)`` of ``images``."""
        return self.view(images), self.view(images)
