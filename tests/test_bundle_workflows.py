"""The bundle's commands on a generated phantom: train, evaluate and infer with ``python -m monai.bundle``.

Tiny settings throughout (the small phantom has ~3.3 mm pixels and 7-9 slices); the commands are
the ones docs/README.md gives, run from the bundle folder, with outputs in a temporary folder.
"""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from fedcontrast.cli import main as fedcontrast_cli
from fedcontrast.nets.bundle import default_bundle_dir

BUNDLE = default_bundle_dir()
TINY = [
    "--init_filters", "4",
    "--blocks_down", "[1,1,1]",
    "--inplane_spacing", "3.0",
    "--roi_size", "[48,48]",
    "--patch_size", "[32,32,4]",
    "--num_workers", "0",
]  # fmt: skip


def bundle_run(configs: list[str], *args: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` from the bundle folder; fails the test with its output on error."""
    files = configs[0] if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *TINY, *args]
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def oblique_affine() -> np.ndarray:
    """Voxel-to-world: 1.4 x 1.1 x 8 mm voxels, rotated 20 deg about x and 15 about z, shifted."""
    ax, az = np.deg2rad(20.0), np.deg2rad(15.0)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([1.4, 1.1, 8.0])
    affine[:3, 3] = [-31.5, 12.25, 40.0]
    return affine


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A one-site phantom split (4 labelled volumes, 1 test patient) and a model trained 2 epochs on it."""
    root = tmp_path_factory.mktemp("bundle")
    fedcontrast_cli(["data", "synth", "--out", str(root / "data"), "--sites", "1", "--patients-per-site=3"])
    fedcontrast_cli(
        ["data", "split", "--dataset", str(root / "data"), "--format", "acdc", "--out", str(root / "splits"),
         "--labeled-per-site", "4", "--test-per-site", "1"]
    )  # fmt: skip
    proc = bundle_run(
        ["configs/train.json"],
        "--datalist", str(root / "splits" / "site-1.json"),
        "--ckpt_dir", str(root / "models"),
        "--log_dir", str(root / "logs"),
        "--epochs", "2",
        "--val_interval", "1",
    )  # fmt: skip
    return root, proc


def test_train_writes_checkpoints_logs_and_per_class_validation(work):
    root, proc = work
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "model_final.pt").is_file()
    assert list((root / "logs").glob("events.out.tfevents.*"))
    log = proc.stdout + proc.stderr
    assert "Epoch: 2/2" in log and "train_loss" in log
    assert all(f"val_dice_{c}" in log for c in ("RV", "MYO", "LV"))


def test_evaluate_writes_per_volume_csv_and_summary(work):
    root, _ = work
    bundle_run(
        ["configs/train.json", "configs/evaluate.json"],
        "--datalist", str(root / "splits" / "site-1.json"),
        "--ckpt_path", str(root / "models" / "model.pt"),
        "--output_dir", str(root / "eval"),
    )  # fmt: skip
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["volumes"] == 2
    assert set(summary["dice"]) == set(summary["hd95"]) == {"RV", "MYO", "LV", "mean"}
    assert 0.0 <= summary["dice"]["mean"] <= 1.0
    rows = (root / "eval" / "per_volume.csv").read_text().splitlines()
    assert rows[0].startswith("file,dice_RV,dice_MYO,dice_LV,dice_mean,hd95_RV")
    assert len(rows) == 3


def test_inference_keeps_each_input_geometry(work):
    """Outputs have their input's shape and affine, for a phantom scan, an oblique anisotropic one
    and a single slice of it (an (X, Y, 1) scan gives an (X, Y, 1) segmentation, not a 2-D one)."""
    root, _ = work
    scans = root / "scans"
    scans.mkdir()
    phantom = sorted((root / "data").glob("site-1/*/*_frame01.nii.gz"))[0]
    (scans / phantom.name).write_bytes(phantom.read_bytes())
    oblique = np.asanyarray(nib.load(phantom).dataobj)[3:48, 2:40, :7].astype(np.int16)
    nib.save(nib.Nifti1Image(oblique, oblique_affine()), scans / "oblique.nii.gz")
    nib.save(nib.Nifti1Image(oblique[..., 3:4], oblique_affine()), scans / "single_slice.nii.gz")
    bundle_run(
        ["configs/train.json", "configs/inference.json"],
        "--dataset_dir", str(scans),
        "--ckpt_path", str(root / "models" / "model.pt"),
        "--output_dir", str(root / "pred"),
    )  # fmt: skip
    for scan in sorted(scans.iterdir()):
        seg = nib.load(root / "pred" / scan.name.replace(".nii.gz", "_seg.nii.gz"))
        img = nib.load(scan)
        assert seg.shape == img.shape
        np.testing.assert_allclose(seg.affine, img.affine, atol=1e-4)
        assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2, 3}
    expected = [
        "oblique_seg.nii.gz",
        phantom.name.replace(".nii.gz", "_seg.nii.gz"),
        "single_slice_seg.nii.gz",
    ]
    assert sorted(p.name for p in (root / "pred").iterdir()) == expected
