"""The Models Genesis corruptions (Zhou et al., 2019/2021) of a batch, on the training device.

:class:`RestorationCorruption` is FedRestore's input (it restores the slice) and FedPseudoSeg's
(it segments the slice's intensity classes through a remapped contrast): a monotone
intensity curve, local pixel shuffling and in- or out-painting, each per sample with its
probability (:data:`CORRUPTION_DEFAULTS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedcontrast.methods.augment import SeededBatchTransform, sample_range

#: Corruption options (the ``corruption`` section of the config); probabilities are per sample.
CORRUPTION_DEFAULTS: dict[str, Any] = {
    "curve_prob": 0.9,  # random monotone intensity curve
    "decreasing_prob": 0.5,  # of a curve, that it is decreasing (inverts the contrast)
    "shuffle_prob": 0.5,  # local pixel shuffling
    "shuffle_block": 4,  # side of a shuffled block, pixels
    "shuffle_fraction": 0.3,  # fraction of the blocks shuffled
    "paint_prob": 0.9,  # in- or out-painting with uniform noise
    "outpaint_prob": 0.5,  # out-painting rather than in-painting, when painting
    "inpaint_boxes": 5,  # at most this many boxes, at least one
    "inpaint_side": (0.15, 0.35),  # a box side, fraction of the slice side
    "outpaint_side": (0.4, 0.7),  # the kept box side, fraction of the slice side
}


def intensity_curve(x: torch.Tensor, knots: torch.Tensor, decreasing: torch.Tensor) -> torch.Tensor:
    """Remap each sample's intensities along a monotone piecewise-linear curve on its own range.

    Args:
        x: ``(B, ...)`` samples.
        knots: ``(B, 2, K)`` the curve's interior points in ``[0, 1]``: row 0 the inputs, row 1 the
            outputs, each sorted ascending; the ends ``(0, 0)`` and ``(1, 1)`` are implied.
        decreasing: ``(B,)`` bool, invert the curve's output (``1 - y``).

    Returns:
        ``x`` remapped, same shape and range per sample.
    """
    low, span = sample_range(x, 1e-6)
    u = ((x - low) / span).flatten(1)
    zeros = x.new_zeros(x.shape[0], 2, 1)
    points = torch.cat([zeros, knots.to(x.device), zeros + 1.0], dim=2)  # (B, 2, K + 2)
    xs, ys = points[:, 0].contiguous(), points[:, 1]
    segment = (torch.searchsorted(xs, u.contiguous(), right=True) - 1).clamp(0, xs.shape[1] - 2)
    x0, x1 = xs.gather(1, segment), xs.gather(1, segment + 1)
    y0, y1 = ys.gather(1, segment), ys.gather(1, segment + 1)
    y = y0 + (u - x0) * (y1 - y0) / (x1 - x0).clamp_min(1e-6)
    y = torch.where(decreasing.to(x.device)[:, None], 1.0 - y, y)
    return y.view_as(x) * span + low


def shuffle_blocks(x: torch.Tensor, block: int, chosen: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Shuffle the pixels inside chosen in-plane blocks (the same order in every channel and slice).

    Args:
        x: ``(B, C, H, W[, T])``; only the ``H // block * block`` by ``W // block * block`` corner
            is cut into blocks, the rest is left as it is.
        block: block side, pixels.
        chosen: ``(B, nH * nW)`` bool, the blocks shuffled (row-major over the block grid).
        keys: ``(B, nH * nW, block * block)`` random keys; a block's pixels are reordered by them.
    """
    b, h, w = x.shape[0], x.shape[2] // block * block, x.shape[3] // block * block
    channels_last = x.movedim((2, 3), (-2, -1))  # (B, C, [T,] H, W)
    lead = channels_last.shape[:-2]
    core = channels_last[..., :h, :w].reshape(b, -1, h // block, block, w // block, block)
    blocks = core.transpose(3, 4).reshape(b, -1, (h // block) * (w // block), block * block)
    order = keys.to(x.device).argsort(dim=-1).unsqueeze(1).expand_as(blocks)
    shuffled = torch.where(chosen.to(x.device)[:, None, :, None], blocks.gather(-1, order), blocks)
    core = shuffled.reshape(b, -1, h // block, w // block, block, block).transpose(3, 4)
    out = channels_last.clone()
    out[..., :h, :w] = core.reshape(*lead, h, w)
    return out.movedim((-2, -1), (2, 3))


def box_mask(height: int, width: int, boxes: torch.Tensor) -> torch.Tensor:
    """Pixels inside any of each sample's boxes.

    Args:
        boxes: ``(B, N, 4)`` ``(top, left, box height, box width)`` in pixels; a box of height 0
            is empty.

    Returns:
        ``(B, H, W)`` bool.
    """
    rows = torch.arange(height)[None, None, :, None]
    cols = torch.arange(width)[None, None, None, :]
    top, left, tall, wide = (boxes[..., i, None, None] for i in range(4))
    inside = (rows >= top) & (rows < top + tall) & (cols >= left) & (cols < left + wide)
    return inside.any(dim=1)


class RestorationCorruption(SeededBatchTransform):
    """Random Models Genesis corruptions of a batch, each applied per sample with its probability:
    an intensity curve, local pixel shuffling, then in-painting (up to ``inpaint_boxes`` boxes)
    or out-painting (all but one box) with noise uniform on the sample's range. Every slice of a
    slab is shuffled and painted in the same places. Random parameters come from a seeded CPU
    generator (a few numbers per sample), the noise field from a generator on the batch's device.

    Args:
        seed: seed of the corruptions.
        options: overrides of :data:`CORRUPTION_DEFAULTS`.
    """

    def __init__(self, seed: int, options: Mapping[str, Any] | None = None):
        unknown = set(options or {}) - set(CORRUPTION_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown corruption options {sorted(unknown)}")
        super().__init__(seed)
        self.options = {**CORRUPTION_DEFAULTS, **dict(options or {})}

    def _applied(self, n: int, key: str) -> torch.Tensor:
        """``n`` draws of whether the corruption with probability option ``key`` happens."""
        return self._happens(n, float(self.options[key]))

    def _boxes(self, n: int, count: int, height: int, width: int, side: tuple[float, float]) -> torch.Tensor:
        """``(n, count, 4)`` boxes with sides in ``side`` fractions of the slice, inside it."""
        low, high = side
        tall = (height * (low + (high - low) * self._rand(n, count))).long().clamp_min(1)
        wide = (width * (low + (high - low) * self._rand(n, count))).long().clamp_min(1)
        top = ((height - tall + 1) * self._rand(n, count)).long()
        left = ((width - wide + 1) * self._rand(n, count)).long()
        return torch.stack([top, left, tall, wide], dim=-1)

    def _paint_mask(self, n: int, height: int, width: int) -> torch.Tensor:
        """``(n, H, W)`` bool, the pixels replaced by noise."""
        opts = self.options
        count = int(opts["inpaint_boxes"])
        inner = self._boxes(n, count, height, width, tuple(opts["inpaint_side"]))
        used = torch.arange(count)[None, :] <= (self._rand(n) * count).long()[:, None]
        inner[..., 2] *= used  # unused boxes get height 0
        kept = self._boxes(n, 1, height, width, tuple(opts["outpaint_side"]))
        outpaint = self._applied(n, "outpaint_prob")[:, None, None]
        mask = torch.where(outpaint, ~box_mask(height, width, kept), box_mask(height, width, inner))
        return mask & self._applied(n, "paint_prob")[:, None, None]

    def _curve(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        knots = self._rand(n, 2, 3).sort(dim=-1).values
        curved = intensity_curve(x, knots, self._applied(n, "decreasing_prob"))
        applied = self._applied(n, "curve_prob").to(x.device).view(-1, *[1] * (x.ndim - 1))
        return torch.where(applied, curved, x)

    def _shuffle(self, x: torch.Tensor) -> torch.Tensor:
        n, block = x.shape[0], int(self.options["shuffle_block"])
        blocks = (x.shape[2] // block) * (x.shape[3] // block)
        chosen = self._rand(n, blocks) < float(self.options["shuffle_fraction"])
        chosen &= self._applied(n, "shuffle_prob")[:, None]
        return shuffle_blocks(x, block, chosen, self._rand(n, blocks, block * block))

    def _paint(self, x: torch.Tensor) -> torch.Tensor:
        n, height, width = x.shape[:1] + x.shape[2:4]
        low, span = sample_range(x, 1e-6)
        noise = torch.rand(x.shape, generator=self._noise_generator(x.device), device=x.device) * span + low
        mask = self._paint_mask(n, height, width).to(x.device)
        return torch.where(mask.view(n, 1, height, width, *[1] * (x.ndim - 4)), noise, x)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Corrupted copies of ``(B, C, H, W[, T])`` samples: same shape and device, float32."""
        return self._paint(self._shuffle(self._curve(images.float())))
