"""FedRestore (issue 10's restoration ablation): the Models Genesis corruptions against hand-written
cases, and a federated run that learns to restore and averages the whole network; the decoder
handover of every whole-network pretext (FedRestore, FedPseudoSeg, FedMotion)."""

import math

import pytest
import torch

from fedcontrast.methods.base import message_to_state_dict, pack
from fedcontrast.methods.corruptions import RestorationCorruption, box_mask, intensity_curve, shuffle_blocks
from fedcontrast.methods.fedpseudoseg import PseudoSegTrainer
from fedcontrast.methods.fedrestore import RestorationTrainer
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.decoder import load_pretrained_decoder
from fedcontrast.nets.presets import network_preset

CONFIG = {"bundle": {**network_preset("tiny"), "roi_size": [32, 32]}, "batch_size": 2, "seed": 5}


def test_intensity_curve_follows_its_knots_on_the_sample_range():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])  # range [0, 4]: u = 0, 0.25, 0.5, 0.75, 1
    knots = torch.tensor([[[0.5], [0.1]]])  # (0, 0) -> (0.5, 0.1) -> (1, 1)
    rising = intensity_curve(x, knots, torch.tensor([False]))
    assert torch.allclose(rising, 4 * torch.tensor([[0.0, 0.05, 0.1, 0.55, 1.0]]))
    falling = intensity_curve(x, knots, torch.tensor([True]))
    assert torch.allclose(falling, 4 - rising)


def test_shuffle_blocks_reorders_pixels_inside_the_chosen_blocks_only():
    x = torch.arange(2 * 5 * 4 * 3, dtype=torch.float32).view(1, 2, 5, 4, 3)  # C=2, H=5, W=4, T=3
    chosen = torch.tensor([[True, False, False, True]])  # 2 x 2 blocks of 2 x 2; row 4 is left out
    keys = torch.tensor([[[3.0, 2.0, 1.0, 0.0]] * 4])  # reverse each chosen block
    out = shuffle_blocks(x, 2, chosen, keys)
    assert torch.equal(out[:, :, 4], x[:, :, 4])
    assert torch.equal(out[:, :, :2, 2:], x[:, :, :2, 2:]) and torch.equal(
        out[:, :, 2:4, :2], x[:, :, 2:4, :2]
    )
    for rows, cols in ((slice(0, 2), slice(0, 2)), (slice(2, 4), slice(2, 4))):
        block, moved = x[0, :, rows, cols], out[0, :, rows, cols]
        assert torch.equal(moved, block.flip(1, 2))  # reversed row-major order = a half turn
    assert torch.equal(out[..., 0] - x[..., 0], out[..., 2] - x[..., 2])  # slices and channels alike


def test_box_mask_covers_each_box_and_ignores_empty_ones():
    boxes = torch.tensor([[[1, 2, 2, 3], [0, 0, 0, 5]]])  # the second box has height 0
    mask = box_mask(4, 6, boxes)
    expected = torch.zeros(1, 4, 6, dtype=torch.bool)
    expected[0, 1:3, 2:5] = True
    assert torch.equal(mask, expected)


def test_corruption_is_seeded_and_keeps_shape_and_slices_alike():
    images = torch.randn(4, 1, 16, 16, 2)
    first = RestorationCorruption(7)(images)
    assert first.shape == images.shape and torch.equal(first, RestorationCorruption(7)(images))
    assert not torch.equal(first, RestorationCorruption(8)(images))
    changed = RestorationCorruption(7, {"curve_prob": 0.0})(images) != images
    assert changed.any() and torch.equal(changed[..., 0], changed[..., 1])  # painted and shuffled alike
    off = {"curve_prob": 0.0, "shuffle_prob": 0.0, "paint_prob": 0.0}
    assert torch.equal(RestorationCorruption(7, off)(images), images)
    with pytest.raises(ValueError, match="unknown corruption options"):
        RestorationCorruption(0, {"blur": 1.0})


def test_fedrestore_learns_to_restore_and_averages_the_whole_network(phantom_images):
    datalists = phantom_images(1)
    spec = get_method("fedrestore")
    assert spec.federated and spec.pretraining
    result = run_in_process("fedrestore", {**CONFIG, "local_steps": 10}, datalists, rounds=3)
    assert all(math.isfinite(r["metrics"]["loss"]) for r in result.history)
    for site in datalists:
        first, *_, last = (r["metrics"] for r in result.history if r["site"] == site)
        assert last["loss"] < first["loss"] and last["loss"] < last["corrupted_error"]
    weights = message_to_state_dict(result.global_message)
    assert {k.split(".")[0] for k in weights} == {"encoder", "up_layers"}  # the whole network travels
    assert weights["up_layers.1.head.weight"].shape[0] == 1  # one output channel: the restored image
    encoders = [result.encoders[s]["conv_init.weight"] for s in datalists]
    assert torch.allclose(weights["encoder.conv_init.weight"], sum(encoders) / len(encoders), atol=1e-6)
    model = RestorationTrainer.build_model(RestorationTrainer.DEFAULTS | CONFIG)
    assert model(torch.randn(2, 1, 32, 32, 2)).shape == (2, 1, 32, 32, 2)


@pytest.mark.parametrize("trainer", [RestorationTrainer, PseudoSegTrainer])
def test_decoder_handover_writes_a_checkpoint_the_segmentation_network_loads(tmp_path, trainer):
    model = trainer.build_model(trainer.DEFAULTS | CONFIG)
    weights = pack("weights", model.state_dict())
    assert trainer.save_checkpoint(weights, tmp_path, CONFIG, None) == []  # off by default
    (path,) = trainer.save_checkpoint(weights, tmp_path, {**CONFIG, "decoder_handover": True}, None)
    assert torch.load(path)["stages"][0]["method"] == trainer.METHOD
    network = build_network(overrides=CONFIG["bundle"])
    head = {k: v.clone() for k, v in network.state_dict().items() if ".head." in k}
    loaded = load_pretrained_decoder(network, path)
    state = network.state_dict()
    assert loaded and all(k.startswith(("encoder.", "up_layers.")) and ".head." not in k for k in loaded)
    assert {k for k in state if ".head." not in k} == set(loaded)  # every level's blocks, and the encoder
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in loaded)
    assert all(torch.equal(state[k], v) for k, v in head.items())  # the segmentation head stays its own
