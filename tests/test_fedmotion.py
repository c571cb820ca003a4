"""FedMotion: the motion mask against a hand-written case, the site's masks (one per patient, on
the heart, from the whole cine series where there is one; a lone frame left out by name, a corrupt
file named), and a federated run that is the supervised recipe on those masks, weight for weight."""

import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedcontrast.methods.base import message_to_state_dict
from fedcontrast.methods.fedmotion import (
    MOTION_LABELS,
    MotionSegTrainer,
    motion_entries,
    motion_spread,
    patient_frames,
    phase_means,
    spread_motion_mask,
)
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.decoder import load_pretrained_decoder
from fedcontrast.nets.presets import network_preset

CONFIG = {
    "bundle": {**network_preset("tiny"), "spatial_dims": 2, "roi_size": [32, 32]},
    "batch_size": 2,
    "seed": 5,
}


def motion_mask(frames: torch.Tensor, sigma: float, iterations: int) -> torch.Tensor:
    """The site's mask of ``(F, 1, H, W, D)`` frames (:func:`spread_motion_mask` of
    :func:`motion_spread`), as a ``(1, H, W, D)`` float tensor."""
    return torch.from_numpy(spread_motion_mask(motion_spread(frames, sigma), iterations))[None].float()


def test_the_motion_mask_is_where_the_frames_differ():
    still = torch.rand(1, 1, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    moved = still.clone()
    moved[..., 2:5, 3:6, 1] += 4.0  # a 3 x 3 region of the middle slice changes
    mask = motion_mask(torch.cat([still, moved]), sigma=0.0, iterations=5)
    expected = torch.zeros(1, 8, 8, 3)
    expected[:, 2:5, 3:6, 1] = 1.0
    assert mask.dtype == torch.float32 and torch.equal(mask, expected)
    assert torch.equal(motion_mask(torch.cat([moved, still, still]), 0.0, 5), expected)  # any frame count


def test_phase_means_average_runs_of_consecutive_frames():
    frames = torch.arange(7.0).view(7, 1)
    assert torch.equal(phase_means(frames, 3), torch.tensor([[1.0], [3.5], [5.5]]))  # runs of 3, 2, 2
    assert phase_means(frames, 0) is frames and phase_means(frames, 7) is frames
    for bins in (1, -2):
        with pytest.raises(ValueError, match="phase_bins must be 0"):
            phase_means(frames, bins)


def test_phases_find_motion_that_the_noise_of_every_frame_hides():
    """A region moving by one noise sigma over a 30-frame cycle: the spread over every frame is
    mostly noise, and k-means takes in nearly the whole field; over 4 phase means the noise is
    averaged down and the region stands out."""
    frames = torch.randn(30, 1, 24, 24, 1, generator=torch.Generator().manual_seed(0))
    frames[:, :, 8:16, 8:16] += torch.cos(2 * math.pi * torch.arange(30) / 30).view(30, 1, 1, 1, 1)
    moving = torch.zeros(1, 24, 24, 1)
    moving[:, 8:16, 8:16] = 1.0

    def dice(mask: torch.Tensor) -> float:
        return float(2 * (mask * moving).sum() / (mask.sum() + moving.sum()))

    assert dice(motion_mask(frames, 1.0, 10)) < 0.3
    assert dice(motion_mask(phase_means(frames, 4), 1.0, 10)) > 0.9


def test_each_patients_mask_lies_on_the_heart_and_a_lone_frame_is_left_out_by_name(
    phantom_images, tmp_path, caplog
):
    entries = phantom_images(2)["site-1"]  # two patients, an ED and an ES frame each
    lone = {"image": entries[0]["image"], "patient": "p-alone"}
    with caplog.at_level(logging.WARNING, logger="fedcontrast.methods.fedmotion"):
        labelled = motion_entries([*entries, lone], "site-1", tmp_path)
    assert "site-1: 1 volume(s) without another frame" in caplog.text and lone["image"] in caplog.text
    assert [e["image"] for e in labelled] == [e["image"] for e in entries]  # in order, lone one out
    assert sorted({Path(e["label"]).name for e in labelled}) == [
        f"{e['patient']}.nii.gz" for e in entries[::2]
    ]
    for entry in labelled:
        mask, frame = nib.load(entry["label"]), nib.load(entry["image"])
        assert mask.shape == frame.shape and np.allclose(mask.affine, frame.affine)
        moving = np.asarray(mask.dataobj)
        heart = np.asarray(nib.load(entry["image"].replace(".nii.gz", "_gt.nii.gz")).dataobj) > 0
        assert set(np.unique(moving)) == {0, 1} and 0 < moving.mean() < 0.5
        assert (heart & (moving == 1)).sum() / moving.sum() > 2 * heart.mean()  # far above chance
    with pytest.raises(
        ValueError, match=r"site-2: fedmotion needs two or more frames .* none of its 2 volumes"
    ):
        motion_entries([{"image": e["image"]} for e in entries[:2]], "site-2", tmp_path / "other")


def test_the_mask_uses_every_frame_of_a_patients_cine_series_and_a_corrupt_one_is_named(tmp_path):
    from fedcontrast.data.phantom import synthesize_dataset
    from fedcontrast.data.readers import read_acdc
    from fedcontrast.data.validation import DataValidationError

    synthesize_dataset(tmp_path / "data", sites=1, patients_per_site=1, seed=0, size="small", cine=True)
    entries = [{k: e[k] for k in ("image", "patient", "cine")} for e in read_acdc(tmp_path / "data")]
    frames, first = patient_frames(entries)
    assert len(frames) == nib.load(entries[0]["cine"]).shape[-1] > 2 and first.shape == frames[0].shape
    without = [{k: v for k, v in e.items() if k != "cine"} for e in entries]
    masks = [
        np.asarray(nib.load(motion_entries(e, "site-1", tmp_path / name)[0]["label"]).dataobj)
        for name, e in (("cine", entries), ("two", without), ("alone", entries[:1]))
    ]
    assert set(np.unique(masks[0])) == {0, 1} and not np.array_equal(masks[0], masks[1])
    assert np.array_equal(masks[2], masks[0])  # with a cine, one stored frame suffices
    every = motion_entries(entries, "site-1", tmp_path / "every", phase_bins=0)[0]["label"]
    assert not np.array_equal(np.asarray(nib.load(every).dataobj), masks[0])  # the default averages phases
    other = {**entries[0], "image": str(Path(entries[0]["image"]).with_name("cropped.nii.gz"))}
    image = nib.load(entries[0]["image"])
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-2], image.affine), other["image"])
    with pytest.raises(ValueError, match=r"_4d.nii.gz: cine frames of shape .*cropped.nii.gz has shape"):
        motion_entries([other], "site-1", tmp_path / "mismatch")
    cine_file = Path(entries[0]["cine"])
    cine_file.write_bytes(cine_file.read_bytes()[:2000])  # truncated: named, no mask written
    with pytest.raises(DataValidationError, match=rf"{cine_file.name}: unreadable or corrupt"):
        motion_entries(entries, "site-1", tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


def test_fedmotion_is_the_supervised_recipe_on_the_sites_masks(phantom_images, tmp_path):
    """Federated: every weight averaged, two output classes, no label read; weight for weight
    what ``supervised`` trains on the same masks (the bench column the ablations report); with
    ``decoder_handover`` its decoder blocks hand over to fine-tuning."""
    datalists = {
        site: [{**e, "label": "/nowhere/never-read.nii.gz"} for e in entries]
        for site, entries in phantom_images(1).items()
    }
    spec = get_method("fedmotion")
    assert spec.federated and spec.pretraining and not spec.label_outputs
    config = {**CONFIG, "local_steps": 3}
    result = run_in_process("fedmotion", config, datalists, rounds=2)
    assert all(np.isfinite(r["metrics"]["train_loss"]) for r in result.history)
    weights = message_to_state_dict(result.global_message)
    assert {k.split(".")[0] for k in weights} == {"encoder", "up_layers"}  # the whole network travels
    assert weights["up_layers.1.head.weight"].shape[0] == 2  # still and moving
    encoders = [result.encoders[s]["conv_init.weight"] for s in datalists]
    assert torch.allclose(weights["encoder.conv_init.weight"], sum(encoders) / len(encoders), atol=1e-6)

    labelled = {site: motion_entries(e, site, tmp_path / site) for site, e in datalists.items()}
    supervised = {**config, "lr": 3e-3, "batch_size": 4}
    supervised["bundle"] = {**CONFIG["bundle"], "samples_per_volume": 2, "labels": MOTION_LABELS}
    reference = message_to_state_dict(
        run_in_process("supervised", supervised, labelled, rounds=2).global_message
    )
    assert reference.keys() == weights.keys() and all(torch.equal(reference[k], weights[k]) for k in weights)

    # decoder_handover: the encoder and the decoder blocks, not the still/moving head, load into a
    # network with the label set's classes
    save, final = spec.trainer.save_checkpoint, result.global_message
    assert save(final, tmp_path, config, None) == []  # off by default
    (path,) = save(final, tmp_path, {**config, "decoder_handover": True}, None)
    assert torch.load(path)["stages"][0]["method"] == "fedmotion"
    network = build_network(overrides=CONFIG["bundle"])
    loaded = load_pretrained_decoder(network, path)
    assert {k for k in network.state_dict() if ".head." not in k} == set(loaded)
    assert all(torch.equal(network.state_dict()[k], weights[k]) for k in loaded)


def test_the_trainer_keeps_its_masks_in_its_work_folder(phantom_images, tmp_path):
    entries = phantom_images(1)["site-1"]
    trainer = MotionSegTrainer({**CONFIG, "workdir": str(tmp_path)}, entries, "site-1")
    assert sorted(p.name for p in (tmp_path / "site-1" / "motion_masks").iterdir()) == ["patient001.nii.gz"]
    assert trainer.num_train == len(entries)


def test_the_cli_writes_a_sites_masks_to_look_at(site_splits, tmp_path, capsys):
    from fedcontrast.cli import main
    from fedcontrast.data.datalist import load_site_datalist
    from fedcontrast.methods.volumes import frames_by_patient, pretraining_entries

    assert main(["data", "motion-masks", str(site_splits / "site-1.json"), "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    patients = frames_by_patient(pretraining_entries(load_site_datalist(site_splits / "site-1.json")))
    assert len(lines) == len(patients) == len(list(tmp_path.glob("*.nii.gz")))
    assert all(0.0 < float(line.rsplit(" ", 1)[1]) < 0.5 for line in lines)
