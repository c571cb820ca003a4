"""Diagnostics of a pre-trained representation, logged every round (SPEC §7, issue: pre-training that learns).

All take L2-normalised embeddings ``(B, C)``:

- :func:`alignment`: mean squared distance between the two views of a sample (Wang & Isola
  2020, alpha = 2); lower is better, 0 when views coincide, 4 at most;
- :func:`uniformity`: log of the mean Gaussian potential ``exp(-t ||zi - zj||²)`` over
  distinct pairs (t = 2); lower is better, 0 when every embedding is the same point
  (collapse), about -4 for points spread over the sphere;
- :func:`partition_accuracy`: nearest-mean classification of each sample's partition
  (SPEC §0), the means taken over the *other* volumes' samples (leave one volume out), so it
  measures whether the structural cue generalises across patients; chance is 1/S.
"""

from __future__ import annotations

import torch


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Mean ``||z1 - z2||²`` of paired unit embeddings ``(B, C)``."""
    return float((z1 - z2).pow(2).sum(dim=1).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """``log mean_{i<j} exp(-t ||zi - zj||²)`` over unit embeddings ``(B, C)``, B >= 2."""
    return float(torch.pdist(z).pow(2).mul(-t).exp().mean().log())


def partition_accuracy(z: torch.Tensor, partitions: torch.Tensor, volumes: torch.Tensor) -> float:
    """Leave-one-volume-out nearest-mean accuracy of the partition label.

    Args:
        z: ``(B, C)`` unit embeddings.
        partitions: ``(B,)`` partition of each sample.
        volumes: ``(B,)`` volume of each sample.

    Returns:
        The fraction of samples whose most similar (cosine) partition mean, computed from
        the samples of every other volume, is their own partition. Samples for which no other
        volume holds their partition are left out; NaN when none is left.
    """
    num = int(partitions.max()) + 1
    one_hot = torch.nn.functional.one_hot(partitions, num).to(z.dtype)  # (B, S)
    totals, counts = one_hot.T @ z, one_hot.sum(0)  # (S, C), (S,)
    correct = scored = 0
    for volume in volumes.unique():
        own = volumes == volume
        sums = totals - one_hot[own].T @ z[own]
        others = counts - one_hot[own].sum(0)
        if not bool((others[partitions[own]] > 0).any()):
            continue
        means = torch.nn.functional.normalize(sums, dim=1)
        similarity = (z[own] @ means.T).masked_fill(others[None, :] == 0, float("-inf"))
        has_mean = others[partitions[own]] > 0
        correct += int((similarity.argmax(1) == partitions[own])[has_mean].sum())
        scored += int(has_mean.sum())
    return correct / scored if scored else float("nan")
