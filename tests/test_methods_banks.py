"""Memory banks by partition: fixed-count sampling, FIFO capacity, replacement, own-site exclusion."""

import numpy as np
import pytest
import torch

from fedcontrast.methods.banks import PartitionBank


def features(n: int, dim: int = 4, offset: float = 0.0) -> torch.Tensor:
    """n distinct features whose first coordinate numbers them (offset + 0, 1, ...)."""
    f = torch.zeros(n, dim)
    f[:, 0] = offset + torch.arange(n, dtype=torch.float32)
    return f


def test_sample_draws_a_fixed_count_per_non_empty_partition():
    bank = PartitionBank(num_partitions=3, dim=4)
    # partition 0: 10 features, partition 1: 2 features, partition 2: none
    bank.push(features(12), torch.tensor([0] * 10 + [1] * 2), torch.tensor([7] * 12))
    sample = bank.sample(5, np.random.default_rng(0))
    assert sample.features.shape == (10, 4)
    assert sample.partitions.tolist() == [0] * 5 + [1] * 5
    assert sample.sites.tolist() == [7] * 10
    # without replacement where there are enough, with replacement where there are not
    assert len(set(sample.features[:5, 0].tolist())) == 5
    assert set(sample.features[5:, 0].tolist()) <= {10.0, 11.0}
    # same counts whatever the draw
    for seed in range(5):
        assert bank.sample(3, np.random.default_rng(seed)).partitions.bincount(minlength=3).tolist() == [
            3,
            3,
            0,
        ]


def test_sampled_features_keep_their_partition():
    bank = PartitionBank(num_partitions=2, dim=4)
    part = torch.tensor([0, 1] * 6)
    bank.push(features(12), part, torch.zeros(12, dtype=torch.long))
    sample = bank.sample(4, np.random.default_rng(3))
    # feature i was pushed with partition i % 2
    assert ((sample.features[:, 0].long() % 2) == sample.partitions).all()


def test_empty_bank_samples_nothing():
    sample = PartitionBank(4, 8).sample(6, np.random.default_rng(0))
    assert sample.features.shape == (0, 8)
    assert sample.partitions.shape == (0,)


def test_local_bank_is_a_fifo_of_capacity_per_partition():
    bank = PartitionBank(num_partitions=2, dim=4, capacity=3)
    bank.push(features(4), torch.tensor([0, 0, 0, 1]), torch.zeros(4, dtype=torch.long))
    bank.push(features(2, offset=100), torch.tensor([0, 0]), torch.zeros(2, dtype=torch.long))
    assert (bank.count(0), bank.count(1), len(bank)) == (3, 1, 4)
    kept = sorted(bank.sample(3, np.random.default_rng(0)).features[:3, 0].tolist())
    assert kept == [2.0, 100.0, 101.0]  # the two oldest of partition 0 were dropped


def test_remote_bank_is_replaced_every_round():
    bank = PartitionBank(num_partitions=2, dim=4)
    bank.replace(features(4), torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 2, 2]))
    bank.replace(features(2, offset=50), torch.tensor([1, 1]), torch.tensor([3, 3]))
    assert (bank.count(0), bank.count(1)) == (0, 2)
    assert bank.sample(2, np.random.default_rng(0)).sites.tolist() == [3, 3]


def test_remote_bank_refuses_its_own_site_features():
    bank = PartitionBank(num_partitions=2, dim=4, exclude_site=11)
    bank.replace(features(2), torch.tensor([0, 1]), torch.tensor([12, 13]))
    with pytest.raises(ValueError, match="own features"):
        bank.replace(features(3), torch.tensor([0, 1, 1]), torch.tensor([12, 11, 13]))
    with pytest.raises(ValueError, match="own features"):
        bank.push(features(1), torch.tensor([0]), torch.tensor([11]))
    assert 11 not in bank.sample(5, np.random.default_rng(0)).sites.tolist()


def test_bad_partition_ids_and_shapes_are_refused():
    bank = PartitionBank(num_partitions=2, dim=4)
    with pytest.raises(ValueError, match="partition ids"):
        bank.push(features(1), torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        bank.push(torch.zeros(1, 5), torch.tensor([0]), torch.tensor([0]))
