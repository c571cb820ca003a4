"""FedMotion (issue 10's motion-segmentation ablation): the motion mask against a hand-written
case, the pairing of a patient's frames (and the volumes it cannot pair), and a federated run
that learns to segment the moving region and averages the whole network."""

import logging
import math

import pytest
import torch

from fedcontrast.methods.base import message_to_state_dict
from fedcontrast.methods.fedmotion import MotionSegTrainer, motion_mask
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.nets.presets import network_preset

CONFIG = {"bundle": {**network_preset("tiny"), "roi_size": [32, 32]}, "batch_size": 2, "seed": 5}


def test_the_motion_mask_is_where_the_frames_differ():
    still = torch.rand(1, 1, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    moved = still.clone()
    moved[..., 2:5, 3:6, 1] += 4.0  # a 3 x 3 region of the middle slice changes
    mask = motion_mask(torch.cat([still, moved]), sigma=0.0, iterations=5)
    expected = torch.zeros(1, 8, 8, 3)
    expected[:, 2:5, 3:6, 1] = 1.0
    assert mask.dtype == torch.float32 and torch.equal(mask, expected)
    assert torch.equal(motion_mask(torch.cat([moved, still, still]), 0.0, 5), expected)  # any frame count


def test_frames_pair_by_patient_and_a_lone_frame_is_left_out_by_name(phantom_images, caplog):
    entries = phantom_images(2)["site-1"]  # two patients, an ED and an ES frame each
    lone = {"image": entries[0]["image"], "patient": "nobody-else"}
    with caplog.at_level(logging.WARNING, logger="fedcontrast.methods.fedmotion"):
        trainer = MotionSegTrainer(CONFIG, [*entries, lone], "site-1")
    assert "site-1: 1 volume(s) without another frame" in caplog.text and lone["image"] in caplog.text
    assert len(trainer.volumes) == 4 and all(v.shape[0] == 2 for v in trainer.volumes)
    first, second = trainer.volumes[:2]  # one patient's two frames
    assert torch.equal(first[1], second[1]) and not torch.equal(first[0], second[0])
    assert 0.0 < float(first[1].mean()) < 0.5 and set(first[1].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match=r"site-2: fedmotion needs two frames .* none of its 2 volumes"):
        MotionSegTrainer(CONFIG, [{"image": e["image"]} for e in entries[:2]], "site-2")


def test_fedmotion_learns_the_moving_region_and_averages_the_whole_network(phantom_images):
    datalists = phantom_images(1)
    spec = get_method("fedmotion")
    assert spec.federated and spec.pretraining and not spec.label_outputs
    result = run_in_process("fedmotion", {**CONFIG, "local_steps": 10}, datalists, rounds=3)
    assert all(math.isfinite(r["metrics"]["loss"]) for r in result.history)
    for site in datalists:
        first, *_, last = (r["metrics"] for r in result.history if r["site"] == site)
        assert last["loss"] < first["loss"] and last["accuracy"] > max(first["accuracy"], 0.5)
    weights = message_to_state_dict(result.global_message)
    assert {k.split(".")[0] for k in weights} == {"encoder", "up_layers"}  # the whole network travels
    assert weights["up_layers.1.head.weight"].shape[0] == 2  # still and moving
    encoders = [result.encoders[s]["conv_init.weight"] for s in datalists]
    assert torch.allclose(weights["encoder.conv_init.weight"], sum(encoders) / len(encoders), atol=1e-6)
