"""A hospital's install: the sdist and wheel carry the bundle and the jobs, and work outside a checkout.

Builds the sdist from a copy of the source, the wheel from the unpacked sdist (what pip does
with an sdist), installs the wheel (not editable, no dependencies, offline) into a fresh virtual
environment outside the checkout that sees the already installed dependencies, and from there,
with no PYTHONPATH: exports the FCL job with ``fedcontrast job export``, runs it in the
simulator on 2 sites for 1 round, and runs the packaged bundle's inference on a scan.
"""

import ast
import json
import shutil
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO

from fedcontrast.resources import RESOURCES

pytestmark = pytest.mark.simulator

SOURCE = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "custom", *RESOURCES)
PACKAGED = "fedcontrast/_resources/"
#: Files a site or the admin needs from the install (relative to the package's resources).
NEEDED = (
    "bundles/cardiac_seg/configs/train.json",
    "bundles/cardiac_seg/configs/inference.json",
    "bundles/cardiac_seg/configs/evaluate.json",
    "bundles/cardiac_seg/configs/metadata.json",
    "bundles/cardiac_seg/docs/README.md",
    "bundles/cardiac_seg/models/model.pt",
    "bundles/cardiac_seg/scripts/encoder.py",
    "bundles/cardiac_seg/scripts/decoder.py",
    "bundles/cardiac_seg/scripts/optim.py",
    "bundles/cardiac_seg/LICENSE",
    "jobs/fcl/job.py",
    "jobs/finetune/job.py",
    "deploy/project.yml",
)


def build_hook(run: Callable[..., str], hook: str, cwd: Path, out: Path) -> Path:
    """Call the PEP 517 ``hook`` of setuptools (no isolation: offline) in ``cwd``; the file it wrote."""
    code = f"from setuptools import build_meta as b; print(b.{hook}({str(out)!r}))"
    name = run([sys.executable, "-c", code], cwd).strip().splitlines()[-1]
    return out / name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, run_ok) -> Path:
    src = tmp_path_factory.mktemp("source")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCE:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=skip)
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    sdist = build_hook(run_ok, "build_sdist", src, dist)
    with tarfile.open(sdist) as tar:
        tar.extractall(dist / "unpacked", filter="data")
    (unpacked,) = (dist / "unpacked").iterdir()
    return build_hook(run_ok, "build_wheel", unpacked, dist)


@pytest.fixture(scope="module")
def venv(wheel, venv_without_fedcontrast, env_outside_checkout, run_ok) -> Path:
    """A fresh venv outside the checkout with the wheel installed (not editable, no dependencies)."""
    root = venv_without_fedcontrast("hospital")
    python = str(root / "bin" / "python")
    run_ok(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        root,
        env_outside_checkout,
    )
    return root


def test_sdist_and_wheel_carry_the_bundle_jobs_and_project(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = [path for path in NEEDED if PACKAGED + path not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # setup.py packages exactly what fedcontrast.resources looks for
    setup = ast.parse((REPO / "setup.py").read_text())
    (assigned,) = [
        n.value for n in setup.body if isinstance(n, ast.Assign) and n.targets[0].id == "RESOURCES"
    ]
    assert ast.literal_eval(assigned) == RESOURCES


def test_installed_package_exports_and_simulates_the_fcl_job_and_runs_inference(
    venv, site_splits, tiny_fcl_config, env_outside_checkout, run_ok, tmp_path
):
    run = run_ok
    bin_dir, env, work = venv / "bin", env_outside_checkout, tmp_path / "hospital"
    work.mkdir()
    where = json.loads(
        run([str(bin_dir / "python"), "-c", "import fedcontrast, fedcontrast.resources as r, json; "
             "print(json.dumps([fedcontrast.__file__, str(r.bundle_dir()), str(r.jobs_dir())]))"], work, env)
    )  # fmt: skip
    site_packages = str(venv / "lib")
    assert all(path.startswith(site_packages) for path in where), where
    bundle = Path(where[1])

    # the admin: a job folder from the installed package, no checkout
    config = json.dumps(tiny_fcl_config)
    out = run(
        [str(bin_dir / "fedcontrast"), "job", "export", "fcl", "--out", str(work / "jobs"), "--sites", "2",
         "--rounds", "1", "--", "--datalist-dir", str(site_splits), "--config", config], work, env,
    )  # fmt: skip
    job = work / "jobs" / "fcl"
    assert f"job folder: {job}" in out and (job / "meta.json").is_file()

    # the sites and the server, simulated: 2 sites, 1 round, from the installed package
    run(
        [str(bin_dir / "python"), "-m", "fedcontrast.flare.simulator", str(job), "-w", str(work / "ws"),
         "-c", "site-1,site-2", "-t", "2"], work, env, timeout=600,
    )  # fmt: skip
    result = work / "ws" / "server" / "simulate_job"
    assert (result / "pretrained_encoder.pt").is_file()
    assert len(json.loads((result / "bytes.json").read_text())["records"]) == 4  # 2 sites x (down, up)

    # the packaged bundle's inference, with its shipped weights, on a scan
    scans, segs = work / "scans", work / "segs"
    scans.mkdir()
    image = np.random.default_rng(0).normal(100, 20, (40, 36, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 9.0, 1.0])), scans / "patient_sa.nii.gz")
    configs = [str(bundle / "configs" / name) for name in ("train.json", "inference.json")]
    run(
        [str(bin_dir / "python"), "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
         "--meta_file", str(bundle / "configs" / "metadata.json"), "--bundle_root", str(bundle),
         "--dataset_dir", str(scans), "--output_dir", str(segs), "--num_workers", "0"], bundle, env,
    )  # fmt: skip
    (seg,) = segs.rglob("*.nii.gz")
    assert nib.load(seg).shape == image.shape
