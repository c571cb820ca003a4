"""Non-finite and incomplete images are refused up front, naming the file: by ``data split``,
``data check --values``, ``deploy site`` and the bundle's inference datalist."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO

from fedcontrast.cli import main
from fedcontrast.data.phantom import synthesize_dataset
from fedcontrast.deploy.site import configure_site


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine") / "data"
    synthesize_dataset(root, sites=2, patients_per_site=3, seed=0)
    return root


def poison(image: Path, value: float) -> None:
    """Set one voxel of ``image`` to ``value`` (NaN or Inf), keeping its header and affine."""
    img = nib.load(image)
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[1, 2, 0] = value
    nib.save(nib.Nifti1Image(data, img.affine), image)


@pytest.fixture
def dataset(pristine, tmp_path):
    """A copy of the phantom and its site-1 patient002 ED image (a volume of the split, poisoned by tests)."""
    root = shutil.copytree(pristine, tmp_path / "data")
    return root, root / "site-1" / "patient002" / "patient002_frame01.nii.gz"


def split(root: Path, out: Path, *extra: str) -> int:
    argv = ["data", "split", "--dataset", str(root), "--format", "acdc", "--out", str(out)]
    return main([*argv, "--labeled-per-site", "1", "--test-per-site", "1", *extra])


@pytest.mark.parametrize("value, counts", [(np.nan, "1 NaN and 0 Inf"), (np.inf, "0 NaN and 1 Inf")])
def test_split_refuses_a_non_finite_image(dataset, tmp_path, capsys, value, counts):
    root, image = dataset
    poison(image, value)
    assert split(root, tmp_path / "out") == 2
    assert f"{image}: {counts} voxel(s)" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.json"))


def test_check_values_and_site_setup_refuse_a_non_finite_image(dataset, tmp_path, capsys):
    root, image = dataset
    assert split(root, tmp_path / "out") == 0
    datalist = tmp_path / "out" / "site-1.json"
    assert image.as_posix() in datalist.read_text()
    poison(image, np.nan)
    capsys.readouterr()
    assert main(["data", "check", str(datalist)]) == 0  # headers only: the voxels are not read
    assert main(["data", "check", str(datalist), "--values"]) == 2
    assert f"{image}: 1 NaN and 0 Inf voxel(s)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"{image}: 1 NaN"):
        configure_site(tmp_path / "kit", datalist)
    assert not (tmp_path / "kit" / "local" / "fedcontrast.json").exists()


def test_check_values_refuses_a_truncated_image_with_an_intact_header(dataset, tmp_path, capsys):
    root, image = dataset
    assert split(root, tmp_path / "out") == 0
    raw = nib.load(image)
    nib.save(raw, tmp_path / "plain.nii")  # uncompressed, so the header survives the cut
    image.unlink()
    cut = image.with_name(image.name.replace(".nii.gz", ".nii"))
    cut.write_bytes((tmp_path / "plain.nii").read_bytes()[:600])
    text = (tmp_path / "out" / "site-1.json").read_text().replace(image.name, cut.name)
    (tmp_path / "out" / "site-1.json").write_text(text)
    capsys.readouterr()
    assert main(["data", "check", str(tmp_path / "out" / "site-1.json"), "--values"]) == 2
    assert f"{cut}: unreadable or corrupt NIfTI data" in capsys.readouterr().err


def test_inference_datalist_refuses_a_non_finite_scan(pristine, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bundles" / "cardiac_seg"))
    sys.modules.pop("scripts.nifti", None)
    nifti = importlib.import_module("scripts.nifti")
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = scans / "scan.nii.gz"
    shutil.copy(pristine / "site-1" / "patient001" / "patient001_frame01.nii.gz", scan)
    assert [e["image"] for e in nifti.nifti_datalist(scans)] == [str(scan)]
    poison(scan, np.nan)
    with pytest.raises(ValueError, match=rf"{scan}: 1 non-finite voxel\(s\)"):
        nifti.nifti_datalist(scans)
