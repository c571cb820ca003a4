"""Encoder access, projection head and momentum (EMA) update."""

import torch

from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.encoder import build_encoder_with_head, deepest_channels, ema_update, momentum_copy
from fedcontrast.nets.heads import ProjectionHead
from fedcontrast.nets.presets import network_preset

TINY = network_preset("tiny")


def test_projection_head_gives_unit_embeddings():
    head = ProjectionHead(in_channels=16, hidden_channels=8, out_channels=128)
    z = head(torch.randn(3, 16, 4, 4, 2))
    assert z.shape == (3, 128)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-6)


def test_encoder_with_head_uses_the_bundle_encoder_and_message_names():
    model = build_encoder_with_head(network_overrides=TINY, hidden_channels=8, out_channels=16)
    assert deepest_channels(model.encoder) == 16
    assert model.spatial_dims == 3
    keys = list(model.state_dict())
    assert all(k.startswith(("encoder.", "head.")) for k in keys)
    # the encoder part loads straight into a fresh bundle network's encoder
    network = build_network(overrides=TINY)
    network.encoder.load_state_dict(model.encoder.state_dict())
    z = model(torch.randn(2, 1, 16, 16, 2))
    assert z.shape == (2, 16)


def test_ema_update_averages_floats_and_copies_counters():
    model = build_encoder_with_head(network_overrides=TINY, hidden_channels=8, out_channels=16)
    target = momentum_copy(model)
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    model(torch.randn(2, 1, 16, 16, 2))  # bumps BatchNorm counters and running stats
    ema_update(target, model, momentum=0.9)
    source = model.state_dict()
    for name, value in target.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.9 * before[name] + 0.1 * source[name], atol=1e-6), name
        else:
            assert torch.equal(value, source[name]), name
