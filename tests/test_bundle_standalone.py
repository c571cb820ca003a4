"""The bundle stands alone, as a model-zoo bundle does: MONAI's own CLI runs it without fedcontrast.

``configs/inference.json`` runs by itself, ``configs/evaluate.json`` in the model zoo's
multi-file form on ``configs/train.json``, and ``verify_net_in_out`` passes, all in a copy of
the bundle and a Python environment where ``import fedcontrast`` fails. (``ckpt_export`` of
``inference.json``'s network is in ``test_bundle_metadata.py``: it uses no bundle script.)
"""

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np

from fedcontrast.nets.bundle import default_bundle_dir

BUNDLE = default_bundle_dir()
#: Ids that ``inference.json`` defines for itself; every other id it shares with ``train.json``.
INFERENCE_OWN = {"dataset_dir", "datalist", "initialize", "run"}


def read_config(name: str) -> dict:
    return json.loads((BUNDLE / "configs" / name).read_text())


def test_ids_shared_by_train_and_inference_configs_are_identical():
    train, inference = read_config("train.json"), read_config("inference.json")
    shared = (set(train) & set(inference)) - INFERENCE_OWN
    assert {"network_def", "preprocessing", "inferer", "labels", "roi_size", "inplane_spacing"} <= shared
    assert [key for key in sorted(shared) if train[key] != inference[key]] == []


def strings(value) -> list[str]:
    """Every string in a parsed JSON value (keys and values)."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_no_config_or_script_of_the_bundle_uses_fedcontrast():
    for name in ("train.json", "inference.json", "evaluate.json"):
        found = {s for s in strings(read_config(name)) if "fedcontrast" in s}
        assert not found, name
    for script in (BUNDLE / "scripts").glob("*.py"):
        code = script.read_text()
        assert "import fedcontrast" not in code and "from fedcontrast" not in code, script


def write_scan(folder: Path, name: str) -> tuple[Path, Path]:
    """A 40 x 36 x 9 short-axis-like scan (2 x 2 x 9 mm) with a 3-class label, as NIfTI files."""
    affine = np.diag([2.0, 2.0, 9.0, 1.0])
    label = np.zeros((40, 36, 9), np.uint8)
    label[14:26, 12:24, 2:7] = 2
    label[17:23, 15:21, 2:7] = 3
    label[8:14, 12:24, 2:7] = 1
    image = np.random.default_rng(0).normal(100, 10, label.shape).astype(np.float32) + 40 * label
    image_path, label_path = folder / f"{name}.nii.gz", folder.parent / f"{name}_gt.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), image_path)
    nib.save(nib.Nifti1Image(label, affine), label_path)
    return image_path, label_path


def test_monai_cli_runs_inference_evaluation_and_checks_without_fedcontrast(
    venv_without_fedcontrast, env_outside_checkout, run_ok, tmp_path
):
    python, env = venv_without_fedcontrast("bare-bundle") / "bin" / "python", env_outside_checkout
    bundle = tmp_path / "cardiac_seg"
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("__pycache__", "logs", "eval"))
    absent = subprocess.run([python, "-c", "import fedcontrast"], env=env, cwd=tmp_path, capture_output=True)
    assert absent.returncode != 0, "fedcontrast is importable in the bare environment"
    monai = [python, "-m", "monai.bundle"]
    scans = tmp_path / "scans"
    scans.mkdir()
    image, label = write_scan(scans, "patient01_sa")

    run_ok(
        [*monai, "run", "--config_file", "configs/inference.json", "--dataset_dir", scans,
         "--output_dir", tmp_path / "segs", "--num_workers", "0"], bundle, env,
    )  # fmt: skip
    (seg,) = (tmp_path / "segs").glob("*.nii.gz")
    assert nib.load(seg).shape == nib.load(image).shape

    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "test": [{"image": str(image), "label": str(label)}]}))
    run_ok(
        [*monai, "run", "--config_file", "['configs/train.json','configs/evaluate.json']",
         "--datalist", datalist, "--output_dir", tmp_path / "eval", "--num_workers", "0"], bundle, env,
    )  # fmt: skip
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["volumes"] == 1 and set(summary["dice"]) == {"RV", "MYO", "LV", "mean"}

    run_ok(
        [*monai, "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
         "--config_file", "configs/inference.json", "--device", "cpu"], bundle, env,
    )  # fmt: skip
