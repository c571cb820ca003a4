"""The partition sampler: assignment formula, one sample per partition per volume, tags, slabs."""

import numpy as np
import pytest
import torch

from fedcontrast.methods.partitions import PartitionSampler, partition_of, partition_slices, site_tag


def volume_with_slice_index(depth: int, size: int = 4) -> torch.Tensor:
    """(1, size, size, depth) volume whose voxels of slice z all equal z."""
    return torch.arange(depth, dtype=torch.float32).expand(1, size, size, depth).clone()


def test_assignment_formula_by_hand():
    # D = 10, S = 4: floor(4z/10) for z = 0..9 -> 0 0 0 1 1 2 2 2 3 3
    assert partition_of(np.arange(10), 10, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    # D = 6, S = 4: floor(4z/6) -> 0 0 1 2 2 3
    assert [s.tolist() for s in partition_slices(6, 4)] == [[0, 1], [2], [3, 4], [5]]
    # D = S: one slice per partition
    assert [s.tolist() for s in partition_slices(4, 4)] == [[0], [1], [2], [3]]
    assert int(partition_of(7, 8, 4)) == 3


def test_partitions_are_contiguous_and_cover_the_volume():
    for depth in range(4, 20):
        slices = partition_slices(depth, 4)
        assert np.concatenate(slices).tolist() == list(range(depth))
        sizes = [len(s) for s in slices]
        assert max(sizes) - min(sizes) <= 1


def test_too_few_slices_is_an_error():
    with pytest.raises(ValueError, match="3 slices"):
        partition_slices(3, 4)


def test_2d_one_slice_per_partition_per_volume_with_tags():
    depths = [10, 8, 6]
    sampler = PartitionSampler(num_partitions=4, spatial_dims=2)
    batch = sampler.sample(
        [volume_with_slice_index(d) for d in depths], [5, 7, 9], site_tag("site-3"), np.random.default_rng(0)
    )
    assert batch.images.shape == (12, 1, 4, 4)
    assert len(batch) == 12
    assert batch.volumes.tolist() == [5] * 4 + [7] * 4 + [9] * 4
    assert batch.partitions.tolist() == [0, 1, 2, 3] * 3
    assert batch.sites.tolist() == [site_tag("site-3")] * 12
    # each slice really comes from its partition: the voxel value is the slice index
    for i in range(12):
        depth = depths[i // 4]
        z = int(batch.images[i, 0, 0, 0])
        assert int(partition_of(z, depth, 4)) == int(batch.partitions[i])


def test_3d_slabs_are_centred_in_their_partition_and_clamped_at_the_borders():
    sampler = PartitionSampler(num_partitions=4, spatial_dims=3, slab_slices=3)
    depth = 6
    for seed in range(5):
        batch = sampler.sample([volume_with_slice_index(depth)], [0], 1, np.random.default_rng(seed))
        assert batch.images.shape == (4, 1, 4, 4, 3)
        for i in range(4):
            slab = batch.images[i, 0, 0, 0].long().tolist()
            centre = slab[1]
            assert int(partition_of(centre, depth, 4)) == i
            expected = np.clip([centre - 1, centre, centre + 1], 0, depth - 1).tolist()
            assert slab == expected


def test_sampling_is_deterministic_for_a_seed_and_varies_with_it():
    sampler = PartitionSampler(4, 2)
    vols = [volume_with_slice_index(12)]
    a = sampler.sample(vols, [0], 0, np.random.default_rng(1)).images[:, 0, 0, 0]
    b = sampler.sample(vols, [0], 0, np.random.default_rng(1)).images[:, 0, 0, 0]
    assert torch.equal(a, b)
    draws = {
        tuple(sampler.sample(vols, [0], 0, np.random.default_rng(s)).images[:, 0, 0, 0].tolist())
        for s in range(8)
    }
    assert len(draws) > 1


def test_site_tag_is_stable_and_distinct():
    assert site_tag("site-1") == site_tag("site-1")
    assert len({site_tag(f"site-{k}") for k in range(1, 50)}) == 49
    assert site_tag("site-1") == 1944301349  # CRC-32 of b"site-1": fixed across processes and machines
