"""Two-view augmentation: shapes kept, views differ, deterministic for a seed, slice axis untouched."""

import pytest
import torch

from fedcontrast.methods.augment import TwoViewAugment


@pytest.mark.parametrize("shape", [(3, 1, 24, 20), (3, 1, 24, 20, 2)])
def test_views_keep_shape_and_differ(shape):
    images = torch.randn(*shape)
    view1, view2 = TwoViewAugment(spatial_dims=len(shape) - 2, seed=0)(images)
    assert view1.shape == view2.shape == images.shape
    assert view1.dtype == torch.float32 and type(view1) is torch.Tensor
    assert not torch.allclose(view1, view2)


def test_views_are_deterministic_for_a_seed():
    images = torch.randn(2, 1, 16, 16, 3)
    a = TwoViewAugment(3, seed=4)(images)
    b = TwoViewAugment(3, seed=4)(images)
    c = TwoViewAugment(3, seed=5)(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_slab_slices_are_never_mixed():
    # Spatial transforms act in-plane: with intensity changes off, a slab whose slices are
    # constant 0 and 1 keeps slice 0 at 0 and slice 1 at 1 everywhere.
    slab = torch.stack([torch.zeros(16, 16), torch.ones(16, 16)], dim=-1)[None, None]
    options = {"intensity_prob": 0.0, "noise_prob": 0.0, "rotate_prob": 1.0, "rot90_prob": 1.0}
    view = TwoViewAugment(3, seed=0, options=options).view(slab)
    assert torch.allclose(view[0, 0, ..., 0], torch.zeros(16, 16), atol=1e-5)
    assert torch.allclose(view[0, 0, ..., 1], torch.ones(16, 16), atol=1e-5)


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="unknown augmentation options"):
        TwoViewAugment(2, options={"flip": 0.5})


def test_quarter_turns_and_flips_are_exact():
    # With crop and small rotations off, a view is an exact quarter turn or flip of the input.
    images = torch.arange(2 * 16 * 16.0).view(2, 1, 16, 16)
    turns = {"crop_scale": (1.0, 1.0), "rotate_prob": 0.0, "flip_prob": 0.0, "rot90_prob": 1.0}
    off = {"intensity_prob": 0.0, "noise_prob": 0.0}
    view = TwoViewAugment(2, seed=0, options={**turns, **off}).view(images)
    for sample, out in zip(images, view):
        assert any(torch.allclose(out, torch.rot90(sample, k, dims=(1, 2)), atol=1e-3) for k in (1, 2, 3))
    flips = {**turns, "rot90_prob": 0.0, "flip_prob": 1.0}
    view = TwoViewAugment(2, seed=0, options={**flips, **off}).view(images)
    assert torch.allclose(view, images.flip(2).flip(3), atol=1e-3)


def test_a_batch_is_augmented_sample_by_sample():
    # The same slab repeated: every copy gets its own draw, so the copies' views differ.
    slab = torch.randn(1, 1, 16, 16, 2).expand(4, -1, -1, -1, -1)
    view = TwoViewAugment(3, seed=1).view(slab)
    assert all(not torch.allclose(view[0], view[i]) for i in range(1, 4))
