"""Hybrid encoders: each state-dict entry comes from the donor exactly when its stage is asked for."""

from __future__ import annotations

import hybrid_encoder
import pytest
import torch

from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.presets import network_preset


def test_stage_of_maps_the_segresencoder_keys():
    assert hybrid_encoder.stage_of("conv_init.weight") == 1
    assert hybrid_encoder.stage_of("layers.0.blocks.0.conv1.weight") == 1
    assert hybrid_encoder.stage_of("layers.2.downsample.weight") == 3


def test_hybrid_takes_the_asked_stages_from_the_donor_and_the_rest_from_random():
    network = {"spatial_dims": 2, **network_preset("tiny", roi_size=[32, 32])}
    torch.manual_seed(0)
    donor = build_network(None, network).encoder.state_dict()
    torch.manual_seed(1)
    random = build_network(None, network).encoder.state_dict()
    mixed = hybrid_encoder.hybrid(donor, random, {1})
    assert mixed.keys() == random.keys()
    weights = [k for k in random if k.endswith("weight")]
    for key in weights:
        source = donor if hybrid_encoder.stage_of(key) == 1 else random
        assert torch.equal(mixed[key], source[key])
    assert any(hybrid_encoder.stage_of(k) == 1 for k in weights)
    assert any(hybrid_encoder.stage_of(k) > 1 for k in weights)
    with pytest.raises(ValueError, match="differ in keys"):
        hybrid_encoder.hybrid({"conv_init.weight": donor["conv_init.weight"]}, random, {1})
