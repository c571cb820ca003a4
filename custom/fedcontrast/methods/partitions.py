"""The one partition sampler of every contrastive method (SPEC §0).

A volume of D slices is split along its slice axis into S contiguous partitions:
slice ``z`` is in partition ``floor(S * z / D)``. A contrastive batch takes m
volumes and, from each, one sample per partition: a 2D slice for 2D networks,
or a slab of ``slab_slices`` contiguous slices for 3D networks. Every sample is
tagged ``(site, volume, partition)``.

Conventions: volumes are channel-first tensors ``(C, H, W, D)`` with the slice
axis last (the bundle's preprocessing output); 2D samples are ``(C, H, W)`` and
3D slabs ``(C, H, W, T)``. Sites are tagged with :func:`site_tag`, a stable integer
derived from the site name that every party computes the same way without
coordination (it also tags exchanged features, see :mod:`fedcontrast.methods.exchange`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def site_tag(site: str) -> int:
    """Stable non-negative integer tag of a site name (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(site.encode("utf-8"))


def partition_of(z: int | np.ndarray, depth: int, num_partitions: int) -> np.ndarray:
    """Partition of slice index (or indices) ``z`` in a ``depth``-slice volume: ``floor(S * z / D)``."""
    return num_partitions * np.asarray(z) // depth


def partition_slices(depth: int, num_partitions: int) -> list[np.ndarray]:
    """Slice indices of each partition of a ``depth``-slice volume.

    Raises:
        ValueError: when ``depth < num_partitions`` (some partition would be empty).
    """
    if depth < num_partitions:
        raise ValueError(f"a volume of {depth} slices cannot be split into {num_partitions} partitions")
    parts = partition_of(np.arange(depth), depth, num_partitions)
    return [np.flatnonzero(parts == s) for s in range(num_partitions)]


@dataclass
class PartitionBatch:
    """A contrastive batch: one sample per partition of each of m volumes, volume-major.

    Attributes:
        images: ``(m*S, C, H, W)`` slices or ``(m*S, C, H, W, T)`` slabs.
        sites: ``(m*S,)`` int64 site tags (:func:`site_tag`).
        volumes: ``(m*S,)`` int64 volume index within the site.
        partitions: ``(m*S,)`` int64 partition index in ``[0, S)``.
    """

    images: torch.Tensor
    sites: torch.Tensor
    volumes: torch.Tensor
    partitions: torch.Tensor

    def __len__(self) -> int:
        return int(self.partitions.shape[0])


class PartitionSampler:
    """Draws one slice or slab per partition from each of a set of volumes.

    Args:
        num_partitions: S.
        spatial_dims: 2 (samples are slices) or 3 (samples are slabs).
        slab_slices: T, the slab thickness in slices (3D only). The slab's centre slice
            (index ``T // 2`` of the slab) is drawn uniformly from the partition; slices
            outside the volume are replaced by the nearest border slice.
    """

    def __init__(self, num_partitions: int = 4, spatial_dims: int = 3, slab_slices: int = 2):
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if slab_slices < 1:
            raise ValueError(f"slab_slices must be >= 1, got {slab_slices}")
        self.num_partitions = num_partitions
        self.spatial_dims = spatial_dims
        self.slab_slices = slab_slices

    def sample(
        self,
        volumes: Sequence[torch.Tensor],
        volume_ids: Sequence[int],
        site: int,
        rng: np.random.Generator,
    ) -> PartitionBatch:
        """One sample per partition of every volume.

        Args:
            volumes: m tensors ``(C, H, W, D)``; in-plane sizes must match.
            volume_ids: their indices within the site (the ``volume`` tag).
            site: the site tag of every sample.
            rng: source of the slice choices.
        """
        images, vols, parts = [], [], []
        for volume, vid in zip(volumes, volume_ids, strict=True):
            depth = volume.shape[-1]
            for s, slices in enumerate(partition_slices(depth, self.num_partitions)):
                centre = int(rng.choice(slices))
                if self.spatial_dims == 2:
                    images.append(volume[..., centre])
                else:
                    start = centre - self.slab_slices // 2
                    index = np.clip(np.arange(start, start + self.slab_slices), 0, depth - 1)
                    images.append(volume[..., torch.as_tensor(index)])
                vols.append(vid)
                parts.append(s)
        n = len(parts)
        return PartitionBatch(
            images=torch.stack(images),
            sites=torch.full((n,), site, dtype=torch.int64),
            volumes=torch.as_tensor(vols, dtype=torch.int64),
            partitions=torch.as_tensor(parts, dtype=torch.int64),
        )
