"""Per-site splits and site datalists: reproducible, nested, fixed test set, disjoint patients."""

from __future__ import annotations

import itertools
import json

import pytest
from monai.data import load_decathlon_datalist

from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.data.phantom import synthesize_dataset
from fedcontrast.data.readers import ACDC_LABELS, read_acdc
from fedcontrast.data.splits import INDEX_FILE, write_site_splits
from fedcontrast.data.validation import DataValidationError


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    root = tmp_path_factory.mktemp("splits") / "data"
    synthesize_dataset(root, sites=2, patients_per_site=5, seed=0)
    return read_acdc(root)


def split(entries, out, n, t=2, seed=0, **kwargs):
    write_site_splits(entries, ACDC_LABELS, out, labeled_per_site=n, test_per_site=t, seed=seed, **kwargs)
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("site-*.json"))}


def images(part):
    return [e["image"] for e in part]


def test_site_file_format(entries, tmp_path):
    sites = split(entries, tmp_path, n=2)
    assert list(sites) == ["site-1", "site-2"]
    site = sites["site-1"]
    assert site["site"] == "site-1" and site["seed"] == 0 and site["labels"] == ACDC_LABELS
    assert (len(site["training"]), len(site["unlabeled"]), len(site["test"])) == (2, 4, 4)
    assert all({"image", "label", "patient"} <= set(e) for e in site["training"] + site["test"])
    assert all("label" not in e and {"image", "patient"} <= set(e) for e in site["unlabeled"])
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["sites"]["site-2"]["datalist"] == "site-2.json" and index["sites"]["site-2"]["training"] == 2
    assert index["units"] == {"labeled_per_site": "volumes", "test_per_site": "patients"}
    # the site file is Decathlon style: MONAI reads its lists directly
    assert len(load_decathlon_datalist(tmp_path / "site-1.json", data_list_key="test")) == 4
    assert load_site_datalist(tmp_path / "site-1.json", check_values=True)["site"] == "site-1"


def test_each_volume_once_and_no_patient_in_train_and_test(entries, tmp_path):
    for name, site in split(entries, tmp_path, n=3).items():
        source = [e["image"] for e in entries if e["site"] == name]
        assigned = images(site["training"]) + images(site["unlabeled"]) + images(site["test"])
        assert sorted(assigned) == sorted(source)
        train = {e["patient"] for e in site["training"] + site["unlabeled"]}
        assert train.isdisjoint({e["patient"] for e in site["test"]})


def test_test_set_fixed_and_labelled_sets_nested_across_budgets(entries, tmp_path):
    runs = {n: split(entries, tmp_path / f"n{n}", n=n) for n in (0, 1, 2, 4, 6)}
    for name in ("site-1", "site-2"):
        tests = {n: images(run[name]["test"]) for n, run in runs.items()}
        assert all(t == tests[0] for t in tests.values())
        labelled = [images(runs[n][name]["training"]) for n in (0, 1, 2, 4, 6)]
        for smaller, larger in itertools.pairwise(labelled):
            assert larger[: len(smaller)] == smaller
        # the first volumes come from different patients (every ED before any ES)
        three = runs[4][name]["training"][:3]
        assert len({e["patient"] for e in three}) == 3 and {e["frame"] for e in three} == {"ED"}


def test_reproducible_for_a_seed(entries, tmp_path):
    assert split(entries, tmp_path / "a", n=2, seed=3) == split(entries, tmp_path / "b", n=2, seed=3)
    assert split(entries, tmp_path / "c", n=2, seed=4) != split(entries, tmp_path / "a", n=2, seed=3)


def test_deal_single_site_to_k_sites(entries, tmp_path):
    one_site = [{**e, "site": "ACDC"} for e in entries]
    sites = split(one_site, tmp_path / "a", n=1, t=1, sites=3)
    assert list(sites) == ["site-1", "site-2", "site-3"]
    patients = [
        {e["patient"] for part in ("training", "unlabeled", "test") for e in s[part]} for s in sites.values()
    ]
    assert sorted(len(p) for p in patients) == [3, 3, 4]
    assert set.union(*patients) == {e["patient"] for e in entries} and sum(map(len, patients)) == 10
    assert all(s["source_site"] == "ACDC" for s in sites.values())
    assert split(one_site, tmp_path / "b", n=1, t=1, sites=3) == sites


def test_stale_site_files_are_removed(entries, tmp_path):
    one_site = [{**e, "site": "ACDC"} for e in entries]
    split(one_site, tmp_path, n=1, t=1, sites=3)
    assert list(split(entries, tmp_path, n=1)) == ["site-1", "site-2"]


def test_label_budget_larger_than_site(entries, tmp_path):
    with pytest.raises(
        DataValidationError, match=r"site 'site-1': label budget of 7 volumes exceeds its 6 labelled"
    ):
        split(entries, tmp_path, n=7, t=2)
    assert not list(tmp_path.iterdir())  # nothing written


def test_test_set_larger_than_site(entries, tmp_path):
    with pytest.raises(
        DataValidationError, match=r"site 'site-1': test set of 6 patients exceeds its 5 labelled"
    ):
        split(entries, tmp_path, n=0, t=6)
    with pytest.raises(
        DataValidationError, match=r"site 'site-1': a test set of 5 patients leaves no training"
    ):
        split(entries, tmp_path, n=0, t=5)


def test_more_sites_than_patients(entries, tmp_path):
    one_site = [{**e, "site": "ACDC"} for e in entries if e["site"] == "site-1"]
    with pytest.raises(
        DataValidationError, match=r"site 'site-6': no volumes \(5 patients dealt to 6 sites\)"
    ):
        split(one_site, tmp_path, n=0, t=0, sites=6)
    with pytest.raises(DataValidationError, match=r"dealing to --sites needs a single-site dataset"):
        split(entries, tmp_path, n=0, t=0, sites=2)


def test_unlabelled_volumes_never_labelled_or_tested(entries, tmp_path):
    partly = [
        {k: v for k, v in e.items() if k != "label"} if e["patient"] == "patient001" else e for e in entries
    ]
    site = split(partly, tmp_path, n=6, t=1)["site-1"]
    assert "patient001" not in {e["patient"] for e in site["training"] + site["test"]}
    assert {e["patient"] for e in site["unlabeled"]} == {"patient001"}
