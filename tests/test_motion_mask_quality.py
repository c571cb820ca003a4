"""The motion-mask quality diagnostic: overlap by hand, both frame sources scored per frame."""

from __future__ import annotations

import motion_mask_quality
import numpy as np
import pytest

from fedcontrast.data.phantom import synthesize_dataset
from fedcontrast.data.readers import read_acdc


def test_overlap_by_hand():
    mask = np.array([1, 1, 1, 0, 0], bool)
    heart = np.array([0, 1, 1, 1, 0], bool)
    scores = motion_mask_quality.overlap(mask, heart)
    assert scores == pytest.approx({"dice": 2 * 2 / 6, "precision": 2 / 3, "recall": 2 / 3})
    assert motion_mask_quality.overlap(mask & False, heart)["precision"] == 0.0


def test_separability_by_hand():
    spread = np.array([0.0, 0.0, 1.0, 3.0])
    mask = np.array([False, False, True, True])
    # share 1/2, class means 0 and 2: between 1/4 * 2^2 = 1 over the total variance 1.5
    assert motion_mask_quality.separability(spread, mask) == pytest.approx(1 / 1.5)
    assert motion_mask_quality.separability(np.array([0.0, 0.0, 2.0, 2.0]), mask) == pytest.approx(1.0)
    assert motion_mask_quality.separability(spread, mask & False) == 0.0


def test_each_frame_is_scored_for_the_cine_and_the_stored_frames(tmp_path):
    synthesize_dataset(tmp_path / "data", sites=1, patients_per_site=1, seed=0, size="small", cine=True)
    entries = read_acdc(tmp_path / "data")
    labels = {e["image"]: e["label"] for e in entries}
    scores = motion_mask_quality.patient_scores(entries, labels)
    cine, stored_key = ("cine series", 6.0, 0), ("ED and ES frames", 6.0, 0)
    assert list(scores) == [cine, stored_key]
    assert all(len(v) == 2 and all(0.0 < s["dice"] <= 1.0 for s in v) for v in scores.values())
    assert scores[cine] != scores[stored_key]
    stored = [{k: v for k, v in e.items() if k != "cine"} for e in entries]
    assert list(motion_mask_quality.patient_scores(stored, labels)) == [stored_key]
    summary = motion_mask_quality.summary(scores[cine])
    assert summary["volumes"] == 2 and 0.0 < summary["dice"]["mean"] <= 1.0


def test_each_smoothing_and_phase_count_is_scored_from_one_read(tmp_path):
    """Every (smoothing, phase count) of the cine series and every smoothing of the stored frames
    is scored, each as a separate call with that setting alone scores it."""
    synthesize_dataset(tmp_path / "data", sites=1, patients_per_site=1, seed=0, size="small", cine=True)
    entries = read_acdc(tmp_path / "data")
    labels = {e["image"]: e["label"] for e in entries}
    scores = motion_mask_quality.patient_scores(entries, labels, (0.0, 12.0), (0, 4))
    assert sorted(scores) == sorted(
        [("cine series", s, b) for s in (0.0, 12.0) for b in (0, 4)]
        + [("ED and ES frames", s, 0) for s in (0.0, 12.0)]
    )
    assert scores["cine series", 0.0, 0] != scores["cine series", 12.0, 0] != scores["cine series", 12.0, 4]
    alone = motion_mask_quality.patient_scores(entries, labels, (12.0,), (4,))
    assert alone["cine series", 12.0, 4] == scores["cine series", 12.0, 4]
    assert alone["ED and ES frames", 12.0, 4] == scores["ED and ES frames", 12.0, 0]
    assert motion_mask_quality.source_name("cine series", 6.0, [6.0]) == "cine series"
    assert motion_mask_quality.source_name("cine series", 12.0, [6.0, 12.0]) == "cine series, 12 mm"


def test_the_label_free_rule_scores_the_most_separable_phase_count_per_patient(tmp_path, monkeypatch):
    """The rule takes the scores of the count whose map splits most cleanly, whichever it is, and
    says which; the stored frames have no phases and no rule."""
    synthesize_dataset(tmp_path / "data", sites=1, patients_per_site=1, seed=0, size="small", cine=True)
    entries = read_acdc(tmp_path / "data")
    labels = {e["image"]: e["label"] for e in entries}
    for favoured in (0, 3):
        monkeypatch.setattr(motion_mask_quality, "frames_motion_spread", _spread_marking({favoured: 1.0}))
        monkeypatch.setattr(motion_mask_quality, "separability", lambda spread, mask: float(spread.flat[0]))
        scores = motion_mask_quality.patient_scores(entries, labels, (6.0,), (0, 3), rule=True)
        picked = scores["cine series", 6.0, motion_mask_quality.RULE]
        assert [{k: v for k, v in s.items() if k != "phase_bins"} for s in picked] == scores[
            "cine series", 6.0, favoured
        ]
        assert {s["phase_bins"] for s in picked} == {favoured}
        assert motion_mask_quality.summary(picked)["phase_bins"] == {str(favoured): 2}
        assert ("ED and ES frames", 6.0, motion_mask_quality.RULE) not in scores
    name = motion_mask_quality.source_name("cine series", 6.0, [6.0], motion_mask_quality.RULE, [0, 3])
    assert name == "cine series, most separable"


def _spread_marking(separable: dict[int, float]):
    """``frames_motion_spread`` with its first voxel set to ``separable[phase_bins]`` (else 0)."""
    real = motion_mask_quality.frames_motion_spread

    def spread(frames, zooms, smooth_mm, phase_bins):
        out = real(frames, zooms, smooth_mm, phase_bins).contiguous().clone()
        out.view(-1)[0] = separable.get(phase_bins, 0.0)
        return out

    return spread


def test_phase_counts_are_scored_for_the_cine_series_only():
    assert motion_mask_quality.source_name("cine series", 6.0, [6.0], 4, [0, 4]) == "cine series, 4 phases"
    assert motion_mask_quality.source_name("cine series", 6.0, [6.0], 0, [0, 4]) == "cine series, every frame"
    assert motion_mask_quality.source_name("ED and ES frames", 6.0, [6.0], 4, [0, 4]) == "ED and ES frames"
