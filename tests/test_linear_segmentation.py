"""The per-stage linear segmentation probe diagnostic: Dice by hand, the probe on separable and on
uninformative features, one feature row per pixel."""

from __future__ import annotations

import linear_segmentation
import pytest
import torch


def test_mean_dice_by_hand():
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    predicted = torch.tensor([0, 1, 0, 2, 2, 2])
    # class 1: 2*1 / (1 + 2); class 2: 2*2 / (3 + 2); class 3 absent from both: 1
    expected = (2 / 3 + 4 / 5 + 1.0) / 3
    assert linear_segmentation.mean_dice(predicted, labels, 4) == pytest.approx(expected)


def test_probe_reads_separable_features_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = {f"p{i}": torch.randint(0, 4, (3000,), generator=generator) for i in range(3)}
    separable = {
        p: torch.eye(4)[y] * 3 + 0.1 * torch.randn(len(y), 4, generator=generator) for p, y in labels.items()
    }
    noise = {p: torch.randn(len(y), 4, generator=generator) for p, y in labels.items()}
    assert linear_segmentation.leave_one_patient_out(separable, labels, 0) > 0.99
    assert linear_segmentation.leave_one_patient_out(noise, labels, 0) < 0.4


def test_stage_pixels_are_one_row_per_pixel_at_the_slice_resolution():
    from fedcontrast.nets.bundle import build_network
    from fedcontrast.nets.presets import network_preset

    encoder = build_network(None, {"spatial_dims": 2, **network_preset("tiny", roi_size=[32, 32])}).encoder
    images = torch.randn(3, 1, 32, 32)
    rows = linear_segmentation.stage_pixels(encoder, images)
    assert [r.shape for r in rows] == [(3 * 32 * 32, m.shape[1]) for m in encoder(images)]
    (pixels,) = linear_segmentation.stage_pixels(None, images)
    assert torch.equal(pixels[:, 0], images.movedim(1, -1).reshape(-1))


def test_summary_averages_over_the_seeds_that_have_each_encoder():
    per_seed = {0: {"random encoder": [0.2, 0.4], "fcl": [0.3, 0.5]}, 1: {"random encoder": [0.4, 0.6]}}
    summary = linear_segmentation.summary(per_seed)
    assert summary["random encoder"] == {"mean": [0.3, 0.5], "std": [0.1, 0.1], "seeds": 2}
    assert summary["fcl"] == {"mean": [0.3, 0.5], "std": [0.0, 0.0], "seeds": 1}
    table = linear_segmentation.markdown(
        {"command": "x", "what": "y", "patients": ["a", "b"], "summary": summary}
    )
    assert "| random encoder | 2 | 0.300 ± 0.100 | 0.500 ± 0.100 |" in table
