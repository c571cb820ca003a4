"""The phantom's ``site_shift`` and ``sequences`` options (stronger, chosen per-site differences)."""

import numpy as np
import pytest

from fedcontrast.data.phantom import SEQUENCES, draw_scanner, synthesize_dataset
from fedcontrast.data.validation import DataValidationError


def test_site_shift_one_is_the_default_scanner():
    default, same = (
        draw_scanner("site-2", 2, 0, "small"),
        draw_scanner("site-2", 2, 0, "small", site_shift=1.0),
    )
    assert np.array_equal(default.tissue, same.tissue)
    assert (default.bias, default.noise, default.matrix) == (same.bias, same.noise, same.matrix)


def test_site_shift_scales_the_departure_from_the_nominal_scanner():
    base, strong = (draw_scanner("site-3", 3, 0, "small", "gre", s) for s in (1.0, 3.0))
    nominal = SEQUENCES["gre"]
    keep = nominal > 0
    np.testing.assert_allclose(
        strong.tissue[keep] / nominal[keep] - 1, 3.0 * (base.tissue[keep] / nominal[keep] - 1), rtol=1e-9
    )
    assert strong.bias == pytest.approx(3.0 * base.bias)
    assert strong.noise == pytest.approx(3.0**0.5 * base.noise)
    assert strong.matrix == base.matrix and strong.spacing == base.spacing
    with pytest.raises(DataValidationError, match="site_shift"):
        draw_scanner("site-1", 1, 0, "small", site_shift=0.0)


def test_sequences_are_chosen_per_site(tmp_path):
    summary = synthesize_dataset(
        tmp_path / "d", sites=2, patients_per_site=1, sequences=["gre", "bssfp"], site_shift=2.0
    )
    assert [s["sequence"] for s in summary["sites"].values()] == ["gre", "bssfp"]
    assert summary["site_shift"] == 2.0
    with pytest.raises(DataValidationError, match="one per site"):
        synthesize_dataset(tmp_path / "e", sites=2, patients_per_site=1, sequences=["gre"])
