"""Memory banks of key features organised by partition (SPEC §1).

One class serves both banks of FCL:

- the *local* bank: a FIFO of this site's recent key features, at most
  ``capacity`` per partition (:meth:`PartitionBank.push` after every step);
- the *remote* bank: the features received from the other sites, replaced
  wholesale every round (:meth:`PartitionBank.replace`); built with
  ``exclude_site`` set to the owning site's tag, it refuses that site's own
  features, so they can never be used as remote positives or negatives.

:meth:`PartitionBank.sample` draws a fixed number of features from every
non-empty partition, so every training step sees the same number of
positives and negatives whatever the bank holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class BankSample:
    """Features drawn from a bank.

    Attributes:
        features: ``(n, C)`` float features.
        partitions: ``(n,)`` int64 partition of each feature.
        sites: ``(n,)`` int64 site tag of each feature.
    """

    features: torch.Tensor
    partitions: torch.Tensor
    sites: torch.Tensor


class PartitionBank:
    """Tagged features kept per partition.

    Args:
        num_partitions: S.
        dim: feature dimension C.
        capacity: most features kept per partition (the oldest are dropped first); None keeps all.
        exclude_site: a site tag this bank must never hold (the owner of a remote bank).
    """

    def __init__(
        self, num_partitions: int, dim: int, capacity: int | None = None, exclude_site: int | None = None
    ):
        self.num_partitions = num_partitions
        self.dim = dim
        self.capacity = capacity
        self.exclude_site = exclude_site
        self._features: list[torch.Tensor] = []
        self._sites: list[torch.Tensor] = []
        self.clear()

    def clear(self) -> None:
        """Remove every feature."""
        self._features = [torch.empty(0, self.dim) for _ in range(self.num_partitions)]
        self._sites = [torch.empty(0, dtype=torch.int64) for _ in range(self.num_partitions)]

    def count(self, partition: int) -> int:
        """Number of features held for ``partition``."""
        return int(self._features[partition].shape[0])

    def __len__(self) -> int:
        return sum(self.count(s) for s in range(self.num_partitions))

    def push(self, features: torch.Tensor, partitions: torch.Tensor, sites: torch.Tensor) -> None:
        """Append features (detached, moved to CPU), keeping the newest ``capacity`` per partition.

        Args:
            features: ``(n, C)``.
            partitions: ``(n,)`` values in ``[0, S)``.
            sites: ``(n,)`` site tags.

        Raises:
            ValueError: on a partition out of range or a feature of ``exclude_site``.
        """
        features = features.detach().to("cpu", torch.float32)
        partitions = torch.as_tensor(partitions, dtype=torch.int64).cpu()
        sites = torch.as_tensor(sites, dtype=torch.int64).cpu()
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (n, {self.dim}), got {tuple(features.shape)}")
        if partitions.numel() and (partitions.min() < 0 or partitions.max() >= self.num_partitions):
            raise ValueError(
                f"partition ids must be in [0, {self.num_partitions}), got {partitions.unique().tolist()}"
            )
        if self.exclude_site is not None and bool((sites == self.exclude_site).any()):
            raise ValueError(
                f"refusing features of site tag {self.exclude_site}: "
                "a site's own features never enter its remote bank"
            )
        for s in range(self.num_partitions):
            keep = partitions == s
            feats = torch.cat([self._features[s], features[keep]])
            tags = torch.cat([self._sites[s], sites[keep]])
            if self.capacity is not None:
                feats, tags = feats[-self.capacity :], tags[-self.capacity :]
            self._features[s], self._sites[s] = feats, tags

    def replace(self, features: torch.Tensor, partitions: torch.Tensor, sites: torch.Tensor) -> None:
        """Drop everything held and :meth:`push` the given features (the per-round remote refresh)."""
        self.clear()
        self.push(features, partitions, sites)

    def sample(
        self, per_partition: int, rng: np.random.Generator, device: torch.device | str = "cpu"
    ) -> BankSample:
        """Draw ``per_partition`` features from every non-empty partition.

        Without replacement when the partition holds enough features, with replacement
        otherwise, so the count is fixed; empty partitions contribute nothing.

        Returns:
            A :class:`BankSample` of ``per_partition * (non-empty partitions)`` features on ``device``.
        """
        empty_tags = torch.empty(0, dtype=torch.int64)
        feats, parts, tags = [torch.empty(0, self.dim)], [empty_tags], [empty_tags]
        for s in range(self.num_partitions):
            n = self.count(s)
            if n == 0 or per_partition == 0:
                continue
            index = torch.as_tensor(rng.choice(n, size=per_partition, replace=n < per_partition))
            feats.append(self._features[s][index])
            parts.append(torch.full((per_partition,), s, dtype=torch.int64))
            tags.append(self._sites[s][index])
        return BankSample(
            torch.cat(feats).to(device), torch.cat(parts).to(device), torch.cat(tags).to(device)
        )


class KeyQueue(PartitionBank):
    """MoCo's queue of negative keys: a FIFO of at most ``capacity`` features, oldest first.

    A :class:`PartitionBank` with one partition, so the FIFO code is the bank's; it adds
    :meth:`enqueue` (no tags needed) and :meth:`keys` (everything held, oldest first).

    Args:
        dim: feature dimension C.
        capacity: queue length (the oldest keys are dropped first).
    """

    def __init__(self, dim: int, capacity: int):
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        super().__init__(1, dim, capacity=capacity)

    def enqueue(self, keys: torch.Tensor) -> None:
        """Append ``(n, C)`` keys (detached, on CPU), dropping the oldest beyond the capacity."""
        n = int(keys.shape[0])
        zeros = torch.zeros(n, dtype=torch.int64)
        self.push(keys, zeros, zeros)

    def keys(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every key held, ``(len(self), C)``, oldest first, on ``device``."""
        return self._features[0].to(device)
