"""Readers on small trees in the exact ACDC, M&Ms and Decathlon layouts."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedcontrast.cli import main
from fedcontrast.data.phantom import synthesize_dataset
from fedcontrast.data.readers import ACDC_LABELS, read_acdc, read_dataset, read_decathlon, read_mnms
from fedcontrast.data.splits import write_site_splits
from fedcontrast.data.validation import DataValidationError

AFFINE = np.diag([1.5, 1.25, 8.0, 1.0])
MNMS_CSV = "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv"


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def write_acdc_patient(folder: Path, ed: int = 1, es: int = 12, labels: bool = True) -> None:
    """One ACDC patient: Info.cfg with 1-based frames and the ED/ES frames (frame k holds k)."""
    pid = folder.name
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(
        f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n"
    )
    for frame in (ed, es):
        save(folder / f"{pid}_frame{frame:02d}.nii.gz", np.full((6, 5, 3), frame, np.int16))
        if labels:
            save(
                folder / f"{pid}_frame{frame:02d}_gt.nii.gz",
                np.arange(90, dtype=np.uint8).reshape(6, 5, 3) % 4,
            )


def write_mnms_case(root: Path, part: str, code: str, frames: int = 6, labels: bool = True) -> None:
    """One M&Ms case: a 4D cine whose frame t (0-based) holds the value 100 + t; labels on frames 0 and 4."""
    cine = np.broadcast_to(100 + np.arange(frames, dtype=np.int16), (8, 7, 3, frames)).copy()
    save(root / part / code / f"{code}_sa.nii.gz", cine)
    if labels:
        gt = np.zeros((8, 7, 3, frames), np.uint8)
        gt[1:3, :, :, 0] = 1  # M&Ms 1 = LV
        gt[3:5, :, :, 0] = 2
        gt[5:7, :, :, 0] = 3  # M&Ms 3 = RV
        gt[0:2, :, :, 4] = 1
        save(root / part / code / f"{code}_sa_gt.nii.gz", gt)


def write_mnms_csv(root: Path, rows: list[tuple[str, str, int, int, int]]) -> None:
    lines = [",External code,VendorName,Vendor,Centre,ED,ES,Age,Pathology,Sex,Height,Weight"]
    for i, (code, vendor, centre, ed, es) in enumerate(rows):
        lines.append(f"{i},{code},Name{vendor},{vendor},{centre},{ed},{es},60,NOR,M,175,80")
    (root / MNMS_CSV).write_text("\n".join(lines) + "\n")


@pytest.fixture
def mnms(tmp_path):
    root = tmp_path / "OpenDataset"
    write_mnms_case(root, "Training/Labeled", "A1B2C3")
    write_mnms_case(root, "Validation", "D4E5F6")
    write_mnms_case(root, "Training/Unlabeled", "G7H8I9", labels=False)
    write_mnms_csv(
        root,
        [
            ("A1B2C3", "A", 1, 0, 4),
            ("D4E5F6", "B", 2, 0, 4),
            ("G7H8I9", "C", 4, 2, 5),
            ("NOTHERE", "D", 5, 0, 9),
        ],
    )
    return root


# ACDC --------------------------------------------------------------------------------------------


def test_acdc_single_site_uses_one_based_frames(tmp_path):
    write_acdc_patient(tmp_path / "training" / "patient001", ed=1, es=12)
    write_acdc_patient(tmp_path / "training" / "patient002", ed=3, es=10)
    entries = read_acdc(tmp_path / "training")
    assert [(e["patient"], e["frame"]) for e in entries] == [
        ("patient001", "ED"),
        ("patient001", "ES"),
        ("patient002", "ED"),
        ("patient002", "ES"),
    ]
    es = entries[1]
    assert es["site"] == "training" and Path(es["image"]).is_absolute()
    assert es["image"].endswith("patient001/patient001_frame12.nii.gz")
    assert es["label"].endswith("patient001/patient001_frame12_gt.nii.gz")
    assert np.asarray(nib.load(es["image"]).dataobj)[0, 0, 0] == 12  # frame 12 is the 12th, 1-based
    assert entries[2]["image"].endswith("patient002_frame03.nii.gz")
    assert es["spacing"] == [1.5, 1.25, 8.0]
    assert {e["site"] for e in read_acdc(tmp_path / "training", site="hospital")} == {"hospital"}


def test_acdc_download_with_training_and_testing_is_one_site(tmp_path):
    write_acdc_patient(tmp_path / "ACDC" / "training" / "patient001")
    write_acdc_patient(tmp_path / "ACDC" / "testing" / "patient101")
    entries = read_acdc(tmp_path / "ACDC")
    assert {e["site"] for e in entries} == {"ACDC"}
    assert [e["patient"] for e in entries] == ["patient001", "patient001", "patient101", "patient101"]


def test_acdc_multi_site_phantom(tmp_path):
    synthesize_dataset(tmp_path / "d", sites=2, patients_per_site=2)
    entries = read_acdc(tmp_path / "d")
    assert len(entries) == 8
    assert [e["site"] for e in entries] == ["site-1"] * 4 + ["site-2"] * 4
    assert {e["patient"] for e in entries if e["site"] == "site-2"} == {"patient003", "patient004"}
    assert all(set(e) == {"image", "label", "site", "patient", "frame", "spacing"} for e in entries)


def test_acdc_cine_series_is_carried_into_the_splits_and_a_mismatched_one_is_named(tmp_path):
    """A patient's ``<patient>_4d`` series becomes its entries' ``"cine"`` and stays in every split
    list; a series whose frames are not the frame files' shape is refused naming both files."""
    for pid in ("patient001", "patient002"):
        write_acdc_patient(tmp_path / "site" / pid)
    save(tmp_path / "site" / "patient001" / "patient001_4d.nii.gz", np.zeros((6, 5, 3, 30), np.int16))
    entries = read_acdc(tmp_path / "site")
    cine = str(tmp_path / "site" / "patient001" / "patient001_4d.nii.gz")
    assert [e.get("cine") for e in entries] == [cine, cine, None, None]
    write_site_splits(entries, ACDC_LABELS, tmp_path / "splits", labeled_per_site=1, test_per_site=1)
    split = json.loads((tmp_path / "splits" / "site-1.json").read_text())
    listed = [e for key in ("training", "unlabeled", "test") for e in split[key]]
    assert {e["patient"]: e.get("cine") for e in listed} == {"patient001": cine, "patient002": None}
    save(tmp_path / "site" / "patient002" / "patient002_4d.nii.gz", np.zeros((6, 5, 4, 30), np.int16))
    with pytest.raises(
        DataValidationError,
        match=r"patient002_4d.nii.gz: frames of shape \(6, 5, 4\) do not match .*patient002_frame01",
    ):
        read_acdc(tmp_path / "site")


def test_acdc_missing_label_is_an_error_unless_allowed(tmp_path):
    write_acdc_patient(tmp_path / "s" / "patient001", labels=False)
    with pytest.raises(DataValidationError, match=r"patient001_frame01_gt\.nii\.gz: file not found"):
        read_acdc(tmp_path / "s")
    entries = read_acdc(tmp_path / "s", allow_unlabeled=True)
    assert all("label" not in e for e in entries)


def test_acdc_bad_info_cfg_names_the_file(tmp_path):
    write_acdc_patient(tmp_path / "s" / "patient001")
    (tmp_path / "s" / "patient001" / "Info.cfg").write_text("ED: 1\nGroup: NOR\n")
    with pytest.raises(DataValidationError, match=r"patient001/Info\.cfg: ES must be a 1-based frame number"):
        read_acdc(tmp_path / "s")


# M&Ms --------------------------------------------------------------------------------------------


def test_mnms_extracts_zero_based_frames_and_swaps_labels(mnms, tmp_path):
    entries = read_mnms(mnms, tmp_path / "cache")
    assert [(e["site"], e["patient"], e["frame"]) for e in entries] == [
        ("A", "A1B2C3", "ED"),
        ("A", "A1B2C3", "ES"),
        ("B", "D4E5F6", "ED"),
        ("B", "D4E5F6", "ES"),
        ("C", "G7H8I9", "ED"),
        ("C", "G7H8I9", "ES"),
    ]
    ed, es = entries[0], entries[1]
    image = nib.load(ed["image"])
    assert image.shape == (8, 7, 3)
    np.testing.assert_array_equal(image.affine, AFFINE)
    assert ed["spacing"] == [1.5, 1.25, 8.0]
    # CSV ED 0 / ES 4 are 0-based: the first frame and the fifth
    assert np.asarray(image.dataobj)[0, 0, 0] == 100
    assert np.asarray(nib.load(es["image"]).dataobj)[0, 0, 0] == 104
    ed_label = np.asarray(nib.load(ed["label"]).dataobj)
    assert ed_label.dtype == np.uint8
    assert (ed_label[1:3] == ACDC_LABELS["LV"]).all()  # M&Ms 1 (LV) -> ACDC 3
    assert (ed_label[3:5] == ACDC_LABELS["MYO"]).all()
    assert (ed_label[5:7] == ACDC_LABELS["RV"]).all()  # M&Ms 3 (RV) -> ACDC 1
    assert (np.asarray(nib.load(es["label"]).dataobj)[0:2] == 3).all()
    assert "label" not in entries[4] and np.asarray(nib.load(entries[4]["image"]).dataobj)[0, 0, 0] == 102
    assert entries[0]["image"].startswith(str(tmp_path / "cache" / "A" / "A1B2C3"))
    assert entries[1]["cine"] == str(mnms / "Training" / "Labeled" / "A1B2C3" / "A1B2C3_sa.nii.gz")


def test_mnms_centre_as_site_and_cache_reuse(mnms, tmp_path):
    entries = read_mnms(mnms, tmp_path / "cache", site_key="centre")
    assert [e["site"] for e in entries[::2]] == ["1", "2", "4"]
    mtime = Path(entries[0]["image"]).stat().st_mtime_ns
    assert read_mnms(mnms, tmp_path / "cache", site_key="centre") == entries
    assert Path(entries[0]["image"]).stat().st_mtime_ns == mtime


def test_mnms_split_cli_by_vendor(mnms, tmp_path, capsys):
    argv = ["data", "split", "--dataset", str(mnms), "--format", "mnms", "--out", str(tmp_path / "out")]
    assert main([*argv, "--site-key", "vendor", "--labeled-per-site", "0", "--test-per-site", "0"]) == 0
    index = json.loads(capsys.readouterr().out)
    assert {k: v["source_site"] for k, v in index["sites"].items()} == {
        "site-1": "A",
        "site-2": "B",
        "site-3": "C",
    }
    site = json.loads((tmp_path / "out" / "site-1.json").read_text())
    assert site["unlabeled"][0]["image"].startswith(str(tmp_path / "out" / "mnms_frames" / "A" / "A1B2C3"))
    # vendor C has no labels: a label budget there is an error that names the site
    assert main([*argv, "--labeled-per-site", "1", "--test-per-site", "0"]) == 2
    assert "site 'C': label budget of 1 volumes exceeds its 0 labelled" in capsys.readouterr().err


def test_mnms_case_missing_from_csv(mnms, tmp_path):
    write_mnms_case(mnms, "Testing", "Z9Z9Z9")
    with pytest.raises(
        DataValidationError, match=r"Z9Z9Z9_sa\.nii\.gz: case 'Z9Z9Z9' is not listed in .*\.csv"
    ):
        read_mnms(mnms, tmp_path / "cache")


def test_mnms_frame_index_out_of_range(mnms, tmp_path):
    write_mnms_csv(mnms, [("A1B2C3", "A", 1, 0, 6), ("D4E5F6", "B", 2, 0, 4), ("G7H8I9", "C", 4, 2, 5)])
    with pytest.raises(
        DataValidationError, match=r"\.csv: ES of A1B2C3 must be a 0-based frame index below 6"
    ):
        read_mnms(mnms, tmp_path / "cache")


def test_mnms_cine_must_be_4d(mnms, tmp_path):
    save(mnms / "Validation" / "D4E5F6" / "D4E5F6_sa.nii.gz", np.zeros((8, 7, 3), np.int16))
    with pytest.raises(DataValidationError, match=r"D4E5F6_sa\.nii\.gz: expected a 4D cine"):
        read_mnms(mnms, tmp_path / "cache")


def test_mnms_label_values_outside_set(mnms, tmp_path):
    gt = np.zeros((8, 7, 3, 6), np.uint8)
    gt[0, 0, 0, 0] = 7
    save(mnms / "Validation" / "D4E5F6" / "D4E5F6_sa_gt.nii.gz", gt)
    with pytest.raises(DataValidationError, match=r"D4E5F6_sa_gt\.nii\.gz: label values \[7\] outside"):
        read_mnms(mnms, tmp_path / "cache")


def test_split_names_a_patient_id_found_twice_and_both_folders(tmp_path, capsys):
    """An ACDC download whose training/ and testing/ both hold patient001: not merged into one patient."""
    for part, pid in [("training", "patient001"), ("training", "patient002"), ("testing", "patient001")]:
        write_acdc_patient(tmp_path / "acdc" / part / pid)
    argv = [
        "data",
        "split",
        "--dataset",
        str(tmp_path / "acdc"),
        "--format",
        "acdc",
        "--out",
        str(tmp_path / "s"),
    ]
    assert main([*argv, "--labeled-per-site", "1", "--test-per-site", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    first, second = (
        tmp_path / "acdc" / part / "patient001" / "patient001_frame01.nii.gz"
        for part in ("testing", "training")
    )
    assert err == (
        f"fedcontrast data: error: site 'acdc': duplicate patient id 'patient001' (frame ED): {first} and "
        f"{second}; patient ids must be unique within a site (rename one patient, or give the volumes "
        "distinct frames)"
    )
    assert not (tmp_path / "s").exists()


# Decathlon ---------------------------------------------------------------------------------------


def write_decathlon(root: Path, labels: dict, site_key: str | None = None) -> Path:
    training = []
    for i, site in enumerate(["north", "south", "north"]):
        save(root / "imagesTr" / f"heart_{i:03d}.nii.gz", np.zeros((6, 5, 4), np.float32))
        save(root / "labelsTr" / f"heart_{i:03d}.nii.gz", np.zeros((6, 5, 4), np.uint8))
        item = {"image": f"./imagesTr/heart_{i:03d}.nii.gz", "label": f"./labelsTr/heart_{i:03d}.nii.gz"}
        training.append({**item, site_key: site} if site_key else item)
    save(root / "imagesTs" / "heart_100.nii.gz", np.zeros((6, 5, 4), np.float32))
    data = {"name": "Heart", "modality": {"0": "MRI"}, "labels": labels, "training": training}
    test = "./imagesTs/heart_100.nii.gz"
    data["test"] = [{"image": test, site_key: "south"} if site_key else test]
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def test_decathlon_labels_and_sites(tmp_path):
    root = write_decathlon(tmp_path / "Task02_Heart", {"0": "background", "1": "left atrium"}, "hospital")
    entries, labels = read_dataset(root / "dataset.json", "decathlon", site_key="hospital")
    assert labels == {"background": 0, "left atrium": 1}
    assert [e["site"] for e in entries[:3]] == ["north", "south", "north"]
    assert entries[0]["patient"] == "heart_000" and entries[0]["frame"] == 0
    assert entries[0]["image"] == str(root / "imagesTr" / "heart_000.nii.gz")
    assert entries[3]["site"] == "south" and "label" not in entries[3]
    data = json.loads((root / "dataset.json").read_text())
    data["test"] = ["./imagesTs/heart_100.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(
        DataValidationError,
        match=r"dataset\.json: 1 item\(s\) have no site key 'hospital' \(1 in test; first: test item 0\)",
    ):
        read_decathlon(root, site_key="hospital")
    # assigned by a flag instead: the unlabelled image joins that site (pre-training images)
    entries = read_decathlon(root, site_key="hospital", missing_site="south")
    assert entries[3]["site"] == "south" and "label" not in entries[3]


def test_decathlon_other_lists_give_unlabelled_pretraining_images(tmp_path):
    root = write_decathlon(tmp_path / "Task02_Heart", {"0": "background", "1": "left atrium"})
    data = json.loads((root / "dataset.json").read_text())
    save(root / "imagesUn" / "heart_200.nii.gz", np.zeros((6, 5, 4), np.float32))
    data["unlabelled"] = ["./imagesUn/heart_200.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(data))
    entries, _ = read_dataset(root, "decathlon", unlabelled_keys=["test", "unlabelled"])
    unlabelled = [Path(e["image"]).name for e in entries if "label" not in e]
    assert unlabelled == ["heart_100.nii.gz", "heart_200.nii.gz"]
    assert len(read_decathlon(root, unlabelled_keys=[])) == 3  # the training items only
    splits = write_site_splits(entries, {"background": 0, "LA": 1}, tmp_path / "splits", 1, 1, seed=0)
    site = json.loads((tmp_path / "splits" / f"{next(iter(splits['sites']))}.json").read_text())
    assert {"heart_100.nii.gz", "heart_200.nii.gz"} <= {Path(e["image"]).name for e in site["unlabeled"]}


def test_decathlon_single_site_named_after_folder(tmp_path):
    root = write_decathlon(tmp_path / "Task02_Heart", {"background": 0, "LA": 1})
    entries, labels = read_dataset(root, "decathlon")
    assert labels == {"background": 0, "LA": 1}
    assert {e["site"] for e in entries} == {"Task02_Heart"}
    assert "label" not in entries[-1] and "label" in entries[0]


def test_decathlon_two_files_with_one_patient_id_are_refused_naming_both(tmp_path):
    root = write_decathlon(tmp_path / "Task02_Heart", {"background": 0, "LA": 1})
    data = json.loads((root / "dataset.json").read_text())
    save(root / "imagesTs2" / "heart_100.nii.gz", np.zeros((6, 5, 4), np.float32))
    data["test"].append("./imagesTs2/heart_100.nii.gz")  # the same stem: patient 'heart_100', frame 0
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataValidationError) as err:
        read_decathlon(root)
    assert "site 'Task02_Heart': duplicate patient id 'heart_100' (frame 0): " in str(err.value)
    assert f"{root / 'imagesTs' / 'heart_100.nii.gz'} and {root / 'imagesTs2' / 'heart_100.nii.gz'}" in str(
        err.value
    )
    # distinct frames of one patient are one patient's volumes, as before
    data["test"][-1] = {"image": "./imagesTs2/heart_100.nii.gz", "patient": "heart_100", "frame": 1}
    (root / "dataset.json").write_text(json.dumps(data))
    assert [e["frame"] for e in read_decathlon(root) if e["patient"] == "heart_100"] == [0, 1]


def test_a_split_refuses_entries_with_one_patient_and_frame_twice(tmp_path):
    """Entries built by hand (not by a reader) are checked where patients are grouped."""
    from fedcontrast.data.splits import split_site

    entries = [
        {"image": str(tmp_path / name), "label": "x", "site": "s", "patient": "p1", "frame": "ED"}
        for name in ("a.nii.gz", "b.nii.gz")
    ]
    with pytest.raises(
        DataValidationError,
        match=r"site 's': duplicate patient id 'p1' \(frame ED\): .*a\.nii\.gz and .*b\.nii\.gz",
    ):
        split_site("s", entries, labeled=1, test=0, seed=0)
