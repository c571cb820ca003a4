"""Inference inputs are all checked before anything is written; outputs appear whole; the 2D variant runs."""

import gzip
import importlib
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from fedcontrast.nets.bundle import build_network, bundle_workflow, default_bundle_dir
from fedcontrast.nets.presets import network_preset

TINY = network_preset("tiny", roi_size=[32, 32], patch_size=[16, 16, 4])


@pytest.fixture(scope="module")
def nifti_scripts():
    """The bundle's ``scripts.nifti`` module (the bundle root goes on ``sys.path`` as monai.bundle does)."""
    sys.path.insert(1, str(default_bundle_dir()))
    return importlib.import_module("scripts.nifti")


def write_scan(path, shape=(36, 30, 6), affine=None, seed=0):
    """A random scan with a box of class 3 and another of class 1; returns ``(image path, label path)``."""
    affine = np.diag([1.5, 1.5, 8.0, 1.0]) if affine is None else affine
    image = np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[10:20, 8:18, 1:5], label[22:30, 8:14, 1:5] = 3, 1
    image[label == 3] += 80
    image[label == 1] += 40
    nib.save(nib.Nifti1Image(image, affine), path)
    nib.save(nib.Nifti1Image(label, affine), str(path).replace(".nii.gz", "_gt.nii.gz"))
    return str(path), str(path).replace(".nii.gz", "_gt.nii.gz")


def run_inference(dataset_dir, output_dir, ckpt, network=None):
    overrides = {**(network or TINY), "dataset_dir": str(dataset_dir), "output_dir": str(output_dir)}
    workflow = bundle_workflow(config="inference", overrides={**overrides, "ckpt_path": str(ckpt)})
    workflow.initialize()
    workflow.run()


@pytest.fixture
def checkpoint(tmp_path):
    torch.save(build_network(overrides=TINY).state_dict(), tmp_path / "model.pt")
    return tmp_path / "model.pt"


def test_bad_inputs_are_all_named_and_nothing_is_written(tmp_path, checkpoint):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_scan(scans / "good.nii.gz")
    (scans / "good_gt.nii.gz").unlink()
    good = (scans / "good.nii.gz").read_bytes()
    (scans / "truncated.nii.gz").write_bytes(gzip.compress(gzip.decompress(good)[:-2000]))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), scans / "cine4d.nii.gz")
    (scans / "notes.txt").write_text("not an image")
    with pytest.raises(RuntimeError) as err:
        run_inference(scans, tmp_path / "out", checkpoint)
    message = str(err.value.__cause__)
    assert "3 input file(s)" in message and "good.nii.gz" not in message.replace("/good.nii.gz", "")
    assert f"{scans / 'truncated.nii.gz'}: not readable as NIfTI" in message
    assert f"{scans / 'cine4d.nii.gz'}: not a 3D volume (shape (8, 8, 4, 3))" in message
    assert f"{scans / 'notes.txt'}: not a NIfTI file name" in message
    assert not (tmp_path / "out").exists()


def test_an_empty_or_missing_folder_is_refused(tmp_path, nifti_scripts):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        nifti_scripts.nifti_datalist(tmp_path / "missing")
    (tmp_path / ".hidden.nii.gz").write_text("skipped")
    with pytest.raises(ValueError, match="no NIfTI volume"):
        nifti_scripts.nifti_datalist(tmp_path)


def test_a_single_slice_scan_gives_a_single_slice_segmentation(tmp_path, checkpoint):
    """An (X, Y, 1) scan gives an (X, Y, 1) segmentation in its affine, not a 2-D image."""
    affine = np.diag([1.4, 1.1, 8.0, 1.0])
    affine[:3, 3] = [-20.0, 5.0, 33.0]
    scans = tmp_path / "scans"
    scans.mkdir()
    write_scan(scans / "one.nii.gz", shape=(36, 30, 1), affine=affine)
    (scans / "one_gt.nii.gz").unlink()
    run_inference(scans, tmp_path / "out", checkpoint)
    seg = nib.load(tmp_path / "out" / "one_seg.nii.gz")
    assert seg.shape == (36, 30, 1) and seg.header["dim"][0] == 3
    np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
    assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2, 3}


def test_a_failed_write_leaves_no_file(tmp_path, nifti_scripts, monkeypatch):
    def writer():
        w = nifti_scripts.AtomicNibabelWriter()  # a NibabelWriter writes once
        w.set_data_array(torch.zeros(1, 4, 4, 2), channel_dim=0)
        w.set_metadata({"affine": torch.eye(4)}, resample=False)
        return w

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        writer().write(tmp_path / "seg.nii.gz")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    writer().write(tmp_path / "seg.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]
    assert (tmp_path / "seg.nii.gz").stat().st_mode & 0o777 == 0o644


def test_2d_variant_trains_slice_wise_and_infers_in_input_geometry(tmp_path):
    """``spatial_dims: 2``: slices in training, SliceInferer in validation and inference."""
    rotation = np.array([[0.94, -0.34, 0.0], [0.34, 0.94, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.3, 1.7, 7.0])
    image, label = write_scan(tmp_path / "scan.nii.gz", affine=affine)
    network = {**TINY, "spatial_dims": 2}
    entries = [{"image": image, "label": label}]
    workflow = bundle_workflow(
        overrides={
            **network,
            "train_datalist": entries,
            "val_datalist": entries,
            "epochs": 1,
            "val_interval": 1,
            "samples_per_volume": 2,
            "num_workers": 0,
            "ckpt_dir": str(tmp_path / "models"),
            "log_dir": str(tmp_path / "logs"),
        }
    )
    workflow.initialize()
    workflow.run()
    assert workflow.trainer.state.output[0]["image"].shape == (1, 16, 16)
    assert 0.0 <= workflow.evaluator.state.metrics["val_dice"] <= 1.0
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "scan.nii.gz").write_bytes((tmp_path / "scan.nii.gz").read_bytes())
    run_inference(tmp_path / "scans", tmp_path / "out", tmp_path / "models" / "model.pt", network)
    seg = nib.load(tmp_path / "out" / "scan_seg.nii.gz")
    assert seg.shape == (36, 30, 6)
    np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
