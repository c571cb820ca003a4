"""Linear CKA of the encoder-similarity diagnostic against cases computed by hand."""

from __future__ import annotations

import encoder_similarity
import pytest
import torch


def test_linear_cka_is_one_up_to_rotation_scale_and_shift_and_matches_a_hand_computed_case():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    assert encoder_similarity.linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0)
    # two features: y keeps x's first feature only; centred, orthogonal, variances 1 and 4
    x = torch.tensor([[1.0, 2.0], [-1.0, 2.0], [1.0, -2.0], [-1.0, -2.0]])
    y = x[:, :1]
    # ||y'x||^2 = 16, ||x'x|| = sqrt(4^2 + 16^2), ||y'y|| = 4
    assert encoder_similarity.linear_cka(x, y) == pytest.approx(16 / (4 * (16 + 256) ** 0.5))


def test_stage_features_are_one_row_per_pixel_and_channels_as_features():
    from fedcontrast.nets.bundle import build_network
    from fedcontrast.nets.presets import network_preset

    encoder = build_network(None, {"spatial_dims": 2, **network_preset("tiny", roi_size=[32, 32])}).encoder
    images = torch.randn(3, 1, 32, 32)
    maps = encoder(images)
    rows = encoder_similarity.stage_features(encoder, images)
    assert [r.shape for r in rows] == [(3 * m.shape[2] * m.shape[3], m.shape[1]) for m in maps]
