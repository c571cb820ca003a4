"""Every bad input ends in a DataValidationError naming the file or site, and the CLI exits 2 with it."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedcontrast.cli import main
from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.data.phantom import synthesize_dataset
from fedcontrast.data.validation import DataValidationError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine") / "data"
    synthesize_dataset(root, sites=2, patients_per_site=3, seed=0)
    return root


@pytest.fixture
def dataset(pristine, tmp_path):
    """A fresh copy of a two-site phantom (3 patients per site) and site-1's patient001 ED image and label."""
    root = shutil.copytree(pristine, tmp_path / "data")
    folder = root / "site-1" / "patient001"
    return root, folder / "patient001_frame01.nii.gz", folder / "patient001_frame01_gt.nii.gz"


def split_cli(root: Path, out: Path, *extra: str) -> list[str]:
    return ["data", "split", "--dataset", str(root), "--format", "acdc", "--out", str(out), *extra]


def expect_error(capsys, argv: list[str], pattern: str, out: Path | None = None) -> None:
    """The CLI exits 2, prints a message matching ``pattern`` and leaves ``out`` without datalists."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    if out is not None:
        assert not list(out.glob("*.json"))


def test_missing_file(dataset, tmp_path, capsys):
    root, image, _ = dataset
    image.unlink()
    argv = split_cli(root, tmp_path / "out", "--labeled-per-site", "1", "--test-per-site", "1")
    expect_error(capsys, argv, rf"error: {image}: file not found", tmp_path / "out")


def test_corrupt_nifti_header(dataset, tmp_path, capsys):
    root, image, _ = dataset
    image.write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    argv = split_cli(root, tmp_path / "out", "--labeled-per-site", "1", "--test-per-site", "1")
    expect_error(capsys, argv, rf"{image}: unreadable or corrupt NIfTI file", tmp_path / "out")


def test_truncated_label_data(dataset, tmp_path, capsys):
    root, _, label = dataset
    label.write_bytes(label.read_bytes()[:400])
    argv = split_cli(root, tmp_path / "out", "--labeled-per-site", "6", "--test-per-site", "0")
    expect_error(capsys, argv, rf"{label}: unreadable or corrupt NIfTI", tmp_path / "out")


def test_4d_where_3d_expected(dataset, tmp_path, capsys):
    root, image, _ = dataset
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), np.eye(4)), image)
    argv = split_cli(root, tmp_path / "out", "--labeled-per-site", "1", "--test-per-site", "1")
    expect_error(capsys, argv, rf"{image}: expected a 3D volume, found 4D with shape \(4, 4, 3, 2\)")


def test_image_label_shape_mismatch(dataset, tmp_path, capsys):
    root, image, label = dataset
    old = nib.load(label)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), old.affine), label)
    argv = split_cli(root, tmp_path / "out", "--labeled-per-site", "6", "--test-per-site", "0")
    expect_error(capsys, argv, rf"{label}: label shape \(5, 5, 5\) does not match image {image} shape")


def test_image_label_affine_mismatch(dataset, tmp_path, capsys):
    root, image, label = dataset
    old = nib.load(label)
    shifted = old.affine.copy()
    shifted[0, 3] += 2.0
    nib.save(nib.Nifti1Image(np.asarray(old.dataobj), shifted), label)
    argv = split_cli(root, tmp_path / "out", "--labeled-per-site", "6", "--test-per-site", "0")
    expect_error(
        capsys, argv, rf"{label}: label affine does not match image {image} affine", tmp_path / "out"
    )


def test_label_values_outside_declared_set(dataset, tmp_path, capsys):
    root, _, label = dataset
    old = nib.load(label)
    values = np.asarray(old.dataobj).copy()
    values[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(values, old.affine), label)
    argv = split_cli(root, tmp_path / "out", "--labeled-per-site", "6", "--test-per-site", "0")
    expect_error(capsys, argv, rf"{label}: label values \[5\] outside the declared set \[0, 1, 2, 3\]")


def test_site_with_no_volumes(dataset, tmp_path, capsys):
    root, _, _ = dataset
    (root / "site-3").mkdir()
    argv = split_cli(root, tmp_path / "out", "--labeled-per-site", "1", "--test-per-site", "1")
    expect_error(capsys, argv, r"site 'site-3' \(.*site-3\): no volumes", tmp_path / "out")


def test_label_budget_larger_than_site(dataset, tmp_path, capsys):
    root, _, _ = dataset
    argv = split_cli(root, tmp_path / "out", "--labeled-per-site", "5", "--test-per-site", "1")
    expect_error(
        capsys, argv, r"site 'site-1': label budget of 5 volumes exceeds its 4 labelled", tmp_path / "out"
    )


def test_cli_success_writes_datalists(dataset, tmp_path, capsys):
    root, _, _ = dataset
    argv = split_cli(root, tmp_path / "out", "--labeled-per-site", "2", "--test-per-site", "1", "--seed", "1")
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["sites"]["site-2"]["test"] == 2
    assert main(["data", "check", str(tmp_path / "out" / "site-1.json"), "--values"]) == 0
    assert "site site-1: training 2, unlabeled 2, test 2: OK" in capsys.readouterr().out


def test_site_datalist_problems_name_the_file(dataset, tmp_path):
    _, image, _ = dataset
    path = tmp_path / "site-1.json"
    with pytest.raises(DataValidationError, match=rf"{path}: site datalist not found"):
        load_site_datalist(path)
    path.write_text(json.dumps({"site": "site-1", "labels": {"background": 0}, "training": []}))
    with pytest.raises(DataValidationError, match=rf"{path}: missing keys \['unlabeled', 'test'\]"):
        load_site_datalist(path)
    relative = str(image.relative_to(tmp_path))
    entry = {"image": relative, "label": relative.replace(".nii.gz", "_gt.nii.gz"), "patient": "patient001"}
    path.write_text(
        json.dumps({"site": "site-1", "labels": {"bg": 0}, "training": [entry], "unlabeled": [], "test": []})
    )
    assert load_site_datalist(path)["training"][0]["image"] == str(image)  # relative to the file's folder
    with pytest.raises(DataValidationError, match=rf"{path} \(training\): .*_gt.nii.gz: label values"):
        load_site_datalist(path, check_values=True)
    image.unlink()
    with pytest.raises(DataValidationError, match=rf"{path} \(training\): {image}: file not found"):
        load_site_datalist(path)


def test_synth_cli_rejects_foreign_folder(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    expect_error(
        capsys, ["data", "synth", "--out", str(tmp_path)], rf"{tmp_path}: exists and is not a phantom"
    )
