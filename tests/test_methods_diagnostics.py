"""Representation diagnostics on hand-made embeddings."""

import math

import torch

from fedcontrast.methods.diagnostics import alignment, partition_accuracy, uniformity


def test_alignment_of_identical_and_opposite_views():
    z = torch.eye(3)
    assert alignment(z, z) == 0.0
    assert math.isclose(alignment(z, -z), 4.0)


def test_uniformity_of_collapse_and_of_orthogonal_points():
    assert math.isclose(uniformity(torch.ones(4, 2) / math.sqrt(2)), 0.0, abs_tol=1e-6)
    # orthonormal points: every squared distance is 2, so log exp(-2 * 2) = -4
    assert math.isclose(uniformity(torch.eye(4)), -4.0, rel_tol=1e-6)


def test_partition_accuracy_leaves_the_own_volume_out():
    # Two volumes, two partitions; partition 0 points along x, partition 1 along y, except
    # volume 1's partition-1 sample, which points along x: it is misclassified.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    partitions = torch.tensor([0, 1, 0, 1])
    volumes = torch.tensor([0, 0, 1, 1])
    # volume 0's samples: means from volume 1 are p0 = x, p1 = x -> ties go to p0: 1 of 2 right.
    # volume 1's samples: means from volume 0 are p0 = x, p1 = y -> x-sample right, x-sample of p1 wrong.
    assert partition_accuracy(z, partitions, volumes) == 2 / 4


def test_partition_accuracy_needs_other_volumes():
    z = torch.eye(2)
    assert math.isnan(partition_accuracy(z, torch.tensor([0, 1]), torch.tensor([0, 0])))
