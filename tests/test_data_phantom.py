"""The multi-site phantom: layout, determinism, labels, geometry, per-site differences."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from fedcontrast.cli import main
from fedcontrast.data.phantom import (
    DIFFICULTIES,
    SUMMARY_FILE,
    Difficulty,
    contraction_curve,
    draw_patient,
    draw_scanner,
    plan_stack,
    render,
    render_frame,
    synthesize_dataset,
)
from fedcontrast.data.readers import read_info_cfg
from fedcontrast.data.validation import DataValidationError


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "data"
    start = time.perf_counter()
    summary = synthesize_dataset(out, sites=2, patients_per_site=3, seed=0, size="small")
    return out, summary, time.perf_counter() - start


def test_small_phantom_is_fast(phantom):
    assert phantom[2] < 2.0


def test_acdc_layout_and_info_cfg(phantom):
    out, summary, _ = phantom
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_FILE, "site-1", "site-2"]
    assert summary["sites"]["site-2"]["patients"] == ["patient004", "patient005", "patient006"]
    folder = out / "site-1" / "patient001"
    info = read_info_cfg(folder / "Info.cfg")
    assert info["ED"] == "1" and info["Group"] in {"NOR", "MINF", "DCM", "HCM", "RV"}
    assert {"Height", "Weight", "NbFrame"} <= set(info) and 1 < int(info["ES"]) <= int(info["NbFrame"])
    names = {p.name for p in folder.iterdir()}
    es = int(info["ES"])
    assert names == {
        "Info.cfg",
        "patient001_frame01.nii.gz",
        "patient001_frame01_gt.nii.gz",
        f"patient001_frame{es:02d}.nii.gz",
        f"patient001_frame{es:02d}_gt.nii.gz",
    }


def test_volumes_geometry_and_labels(phantom):
    out, summary, _ = phantom
    folder = out / "site-1" / "patient001"
    image = nib.load(folder / "patient001_frame01.nii.gz")
    label = nib.load(folder / "patient001_frame01_gt.nii.gz")
    site = summary["sites"]["site-1"]
    assert list(image.shape) == site["shape"] and image.shape == label.shape
    assert 40 <= image.shape[0] <= 56 and 6 <= image.shape[2] <= 10
    np.testing.assert_allclose(image.header.get_zooms(), site["spacing_mm"], atol=1e-3)
    np.testing.assert_allclose(np.diag(image.affine)[:3], site["spacing_mm"], atol=1e-3)
    np.testing.assert_array_equal(image.affine, label.affine)
    assert label.get_data_dtype() == np.uint8 and image.get_data_dtype() == np.int16
    values = np.asarray(label.dataobj)
    assert set(np.unique(values)) == {0, 1, 2, 3}
    # the heart tapers: the LV cavity is largest near the base, absent or small at the apex
    lv_area = (values == 3).sum(axis=(0, 1))
    assert lv_area.argmax() < len(lv_area) // 2 and lv_area[-1] < lv_area.max() / 3


def test_es_has_smaller_cavities_and_thicker_wall():
    scanner, patient = draw_scanner("site-1", 1, 0, "small"), draw_patient(0, 1, 1)
    _, ed = render(scanner, patient, "ED")
    _, es = render(scanner, patient, "ES")
    assert (es == 3).sum() < 0.8 * (ed == 3).sum()
    assert (es == 1).sum() < (ed == 1).sum()
    ed_wall = (ed == 2).sum() / np.count_nonzero(((ed == 2) | (ed == 3)).any(axis=(0, 1)))
    es_wall = (es == 2).sum() / np.count_nonzero(((es == 2) | (es == 3)).any(axis=(0, 1)))
    assert es_wall > 0.9 * ed_wall
    _, middle = render_frame(scanner, patient, 0.5, 7)  # half-way: cavities in between
    assert (es == 3).sum() < (middle == 3).sum() < (ed == 3).sum()


def test_deterministic_per_seed_and_independent_of_counts(tmp_path, phantom):
    out, _, _ = phantom
    again = synthesize_dataset(tmp_path / "again", sites=1, patients_per_site=1, seed=0, size="small")
    assert again["sites"]["site-1"]["spacing_mm"] == phantom[1]["sites"]["site-1"]["spacing_mm"]
    for name in ("patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz"):
        a = np.asarray(nib.load(out / "site-1" / "patient001" / name).dataobj)
        b = np.asarray(nib.load(tmp_path / "again" / "site-1" / "patient001" / name).dataobj)
        np.testing.assert_array_equal(a, b)
    other = render(draw_scanner("site-1", 1, 1, "small"), draw_patient(1, 1, 1), "ED")[0]
    assert other.shape != a.shape or not np.array_equal(other, a)


def test_sites_differ_in_protocol():
    scanners = [draw_scanner(f"site-{k}", k, 0, "full") for k in range(1, 5)]
    assert len({s.spacing for s in scanners}) == 4 and len({s.scale for s in scanners}) == 4
    for s in scanners:
        assert 176 <= s.matrix[0] <= 232 and 1.2 <= s.spacing[0] <= 2.0 and 8 <= s.n_slices <= 12


def test_other_sequence_site(tmp_path):
    summary = synthesize_dataset(tmp_path / "d", sites=3, patients_per_site=1, size="small")
    assert [s["sequence"] for s in summary["sites"].values()] == ["bssfp", "bssfp", "gre"]


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(DataValidationError, match="not a phantom folder"):
        synthesize_dataset(tmp_path, sites=1, patients_per_site=1)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_replaces_previous_phantom(tmp_path):
    synthesize_dataset(tmp_path / "d", sites=2, patients_per_site=1)
    synthesize_dataset(tmp_path / "d", sites=1, patients_per_site=1)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [SUMMARY_FILE, "site-1"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_realistic_difficulty_is_valid_and_deterministic(tmp_path):
    kwargs = {"sites": 2, "patients_per_site": 2, "seed": 3, "size": "small", "difficulty": "realistic"}
    summary = synthesize_dataset(tmp_path / "a", **kwargs)
    synthesize_dataset(tmp_path / "b", **kwargs)
    assert summary["difficulty"] == "realistic"
    assert (
        summary["difficulty_settings"]["heart_rotation_deg"] == DIFFICULTIES["realistic"].heart_rotation_deg
    )
    volumes = sorted((tmp_path / "a").glob("site-*/patient*/*.nii.gz"))
    assert len(volumes) == 2 * 2 * 2 * 2  # sites x patients x (ED, ES) x (image, label)
    for path in volumes:
        a, b = nib.load(path), nib.load(tmp_path / "b" / path.relative_to(tmp_path / "a"))
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
        if path.name.endswith("_gt.nii.gz"):
            assert a.get_data_dtype() == np.uint8
            assert set(np.unique(np.asarray(a.dataobj))) == {0, 1, 2, 3}, path
        else:
            assert a.get_data_dtype() == np.int16 and np.asarray(a.dataobj).max() > 0


def test_difficulty_widens_variability_and_keeps_standard():
    assert DIFFICULTIES["standard"] == Difficulty()
    scanner = draw_scanner("s", 1, 0, "small", difficulty="standard")
    default = render(draw_scanner("s", 1, 0, "small"), draw_patient(0, 1, 1), "ED")[0]
    np.testing.assert_array_equal(default, render(scanner, draw_patient(0, 1, 1, "standard"), "ED")[0])
    hard = DIFFICULTIES["realistic"]
    rotations = np.rad2deg([draw_patient(0, 1, p, hard).heart["rotation"] for p in range(1, 41)])
    assert np.abs(rotations).max() > 25.0 and np.abs(rotations).max() <= hard.heart_rotation_deg
    gains = np.stack([draw_patient(0, 1, p, hard).body["tissue_gain"] for p in range(1, 6)])
    assert gains.std(axis=0).max() > 0.05
    assert np.all(draw_patient(0, 1, 1).body["tissue_gain"] == 1.0)
    with pytest.raises(DataValidationError, match="difficulty 'nope'"):
        synthesize_dataset("unused", difficulty="nope")


def test_planned_stack_runs_from_above_the_base_to_the_apex(tmp_path):
    level = DIFFICULTIES["realistic_planned"]
    scanner = draw_scanner("s", 1, 0, "small", difficulty=level)
    for number in range(1, 6):
        patient = draw_patient(0, 1, number, level)
        planned, moved = plan_stack(scanner, patient)
        n, spacing = planned.n_slices, planned.spacing[2]
        assert 5 <= n <= 16 and abs((n - 1) * spacing - 1.05 * patient.heart["length"]) < 1e-6
        assert planned.matrix == scanner.matrix and moved.group == patient.group
        _, label = render(planned, moved, "ED")
        lv = (label == 3).sum(axis=(0, 1))
        assert label.shape[2] == n and lv[0] == 0 and lv[-1] == 0 and lv[1:-1].min() > 0
    summary = synthesize_dataset(tmp_path / "d", sites=1, patients_per_site=2, difficulty="realistic_planned")
    assert summary["difficulty"] == "realistic_planned"
    image = nib.load(next((tmp_path / "d").glob("site-1/patient001/*frame01.nii.gz")))
    spacing = plan_stack(scanner, draw_patient(0, 1, 1, level))[0].spacing[2]
    assert image.header.get_zooms()[2] == pytest.approx(spacing, rel=1e-5)


def test_cine_series_holds_the_frame_files_and_contracts_over_the_cycle(tmp_path, phantom):
    """With ``cine`` (``fedcontrast data synth --cine``) each patient also gets its ``_4d`` series:
    ``NbFrame`` frames whose ED and ES frames are the frame files voxel for voxel (which stay as
    without ``cine``), the others in between and each with its own noise."""
    assert contraction_curve(10, 4).tolist() == pytest.approx(
        [0, 0.146, 0.5, 0.854, 1, 0.933, 0.75, 0.5, 0.25, 0.067], abs=1e-3
    )
    out = tmp_path / "cine"
    args = ["data", "synth", "--out", str(out), "--sites", "1", "--patients-per-site", "1", "--cine"]
    assert main(args) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["cine"] is True and "cine" not in phantom[1]
    folder, plain = out / "site-1" / "patient001", phantom[0] / "site-1" / "patient001"
    info = read_info_cfg(folder / "Info.cfg")
    series = nib.load(folder / "patient001_4d.nii.gz")
    ed = nib.load(folder / "patient001_frame01.nii.gz")
    np.testing.assert_array_equal(series.affine, ed.affine)
    assert series.shape == (*ed.shape, int(info["NbFrame"]))
    frames = np.asarray(series.dataobj)
    es_index = int(info["ES"]) - 1
    for index, name in (
        (0, "patient001_frame01.nii.gz"),
        (es_index, f"patient001_frame{es_index + 1:02d}.nii.gz"),
    ):
        np.testing.assert_array_equal(frames[..., index], np.asarray(nib.load(folder / name).dataobj))
        np.testing.assert_array_equal(frames[..., index], np.asarray(nib.load(plain / name).dataobj))
    assert not (plain / "patient001_4d.nii.gz").exists()
    assert len({frames[..., f].tobytes() for f in range(frames.shape[-1])}) == frames.shape[-1]


def test_outflow_tracts_change_only_the_base():
    planned, anatomy = DIFFICULTIES["realistic_planned"], DIFFICULTIES["realistic_anatomy"]
    scanner = draw_scanner("s", 1, 0, "small", difficulty=planned)
    for number in range(1, 4):
        before = plan_stack(scanner, draw_patient(0, 1, number, planned))
        after = plan_stack(scanner, draw_patient(0, 1, number, anatomy))
        assert after[1].heart["length"] == before[1].heart["length"] and after[0] == before[0]
        (image_0, label_0), (image_1, label_1) = render(*before, "ED"), render(*after, "ED")
        length = before[1].heart["length"]
        t = (np.arange(before[0].n_slices) * before[0].spacing[2] - 0.05 * length) / length
        basal = (t >= 0) & (t < 0.2)
        # The base: the LV ring opens (less myocardium, more LV cavity) and the RV widens.
        assert (label_1[..., basal] == 2).sum() < (label_0[..., basal] == 2).sum()
        assert (label_1[..., basal] == 3).sum() > (label_0[..., basal] == 3).sum()
        assert (label_1[..., basal] == 1).sum() > (label_0[..., basal] == 1).sum()
        # From a quarter of the length on the labels do not change; above the base the right atrium appears.
        assert np.array_equal(label_1[..., t >= 0.25], label_0[..., t >= 0.25])
        assert not np.array_equal(image_1[..., t < 0], image_0[..., t < 0])


def test_shared_frame_gain_gives_every_frame_of_a_slice_the_ed_gain():
    """``shared_frame_gain``: a slice keeps ED's gain in every frame (one breath-hold per slice);
    without it each frame's noise stream also draws that frame's gain. Noise is off so that only
    the gain can tell two frames at the same contraction apart."""
    realistic, shared = DIFFICULTIES["realistic"], DIFFICULTIES["realistic_shared_gain"]
    scanner = replace(draw_scanner("s", 1, 0, "small", difficulty=realistic), noise=0.0)
    own_gain, one_gain = draw_patient(0, 1, 1, realistic), draw_patient(0, 1, 1, shared)
    ed = render_frame(scanner, own_gain, 0.0, 0)[0]
    np.testing.assert_array_equal(render_frame(scanner, one_gain, 0.0, 0)[0], ed)  # ED is unchanged
    np.testing.assert_array_equal(render_frame(scanner, one_gain, 0.0, 7)[0], ed)
    other = render_frame(scanner, own_gain, 0.0, 7)[0].astype(np.float64)
    ratio = other.sum(axis=(0, 1)) / ed.astype(np.float64).sum(axis=(0, 1))  # per slice
    assert np.all(np.abs(ratio - 1.0) < 0.15) and np.abs(ratio - 1.0).max() > 0.005


def test_small_fine_draws_the_small_phantom_at_half_the_pixel_size():
    realistic = DIFFICULTIES["realistic"]
    for site in range(1, 4):
        coarse = draw_scanner("s", site, 0, "small", difficulty=realistic)
        fine = draw_scanner("s", site, 0, "small_fine", difficulty=realistic)
        assert fine.matrix == (2 * coarse.matrix[0], 2 * coarse.matrix[1])
        assert np.allclose(fine.spacing, (coarse.spacing[0] / 2, coarse.spacing[1] / 2, coarse.spacing[2]))
        assert (fine.n_slices, fine.scale, fine.noise, fine.blur) == (
            coarse.n_slices,
            coarse.scale,
            coarse.noise,
            coarse.blur,
        )
        # The same patient: each class covers the same volume in mm^3 (within the coarse pixels' error).
        patient = draw_patient(0, site, 1, realistic)
        label_coarse, label_fine = render(coarse, patient, "ED")[1], render(fine, patient, "ED")[1]
        assert label_fine.shape == (*fine.matrix, fine.n_slices)
        for value in (1, 2, 3):
            volume_coarse = (label_coarse == value).sum() * np.prod(coarse.spacing)
            volume_fine = (label_fine == value).sum() * np.prod(fine.spacing)
            assert volume_fine == pytest.approx(volume_coarse, rel=0.08)
