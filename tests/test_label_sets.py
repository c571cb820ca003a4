"""The label set comes from the data: a 2-class Decathlon dataset is trained, scored and exported
under its own class names, never the cardiac ones; mixed label sets are refused naming both."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import verify_metadata, verify_net_in_out

from fedcontrast.bench.evaluate import BundleScorer
from fedcontrast.data.labels import ACDC_LABELS, class_names, common_label_set, merge_classes, relabel_file
from fedcontrast.data.phantom import synthesize_dataset
from fedcontrast.data.readers import read_acdc, read_dataset
from fedcontrast.data.splits import write_site_splits
from fedcontrast.data.validation import DataValidationError
from fedcontrast.flare.controller import MODEL_BUNDLE_DIR, MODEL_FILE, save_models
from fedcontrast.flare.executor import site_entries
from fedcontrast.flare.jobs import with_label_set
from fedcontrast.methods.base import message_to_state_dict
from fedcontrast.methods.runner import run_in_process
from fedcontrast.methods.supervised import supervised_entries
from fedcontrast.methods.volumes import pretraining_entries
from fedcontrast.nets.bundle import bundle_workflow
from fedcontrast.nets.presets import network_preset

SITES = ("site-1", "site-2")
#: Two foreground classes, named unlike the cardiac ones (values as in the Decathlon file).
DECLARED = {"0": "background", "1": "blood_pool", "2": "heart_wall"}
NAMES = ["blood_pool", "heart_wall"]
CARDIAC = {"RV", "MYO", "LV"}
SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "monai" / "meta_schema_20240725.json"
TINY = network_preset("tiny", inplane_spacing=3.0, roi_size=[48, 48])


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Path:
    """A 2-site Decathlon dataset (phantom images; RV+LV -> blood_pool, MYO -> heart_wall) split per site."""
    root = tmp_path_factory.mktemp("decathlon")
    synthesize_dataset(root / "phantom", sites=2, patients_per_site=2, seed=0, size="small")
    (root / "labelsTr").mkdir()
    training = []
    for entry in read_acdc(root / "phantom"):
        label = nib.load(entry["label"])
        two = np.select([np.isin(label.get_fdata(), [1, 3]), label.get_fdata() == 2], [1, 2], 0).astype(
            np.uint8
        )
        path = root / "labelsTr" / Path(entry["label"]).name
        nib.save(nib.Nifti1Image(two, label.affine), path)
        training.append({"image": entry["image"], "label": str(path), "hospital": entry["site"]})
    (root / "dataset.json").write_text(json.dumps({"labels": DECLARED, "training": training}))
    entries, labels = read_dataset(root, "decathlon", site_key="hospital")
    write_site_splits(entries, labels, root / "splits", labeled_per_site=1, test_per_site=1, seed=0)
    return root / "splits"


def datalists(splits: Path) -> dict[str, dict]:
    return {site: json.loads((splits / f"{site}.json").read_text()) for site in SITES}


def metric_names(history: list[dict]) -> set[str]:
    return {name for record in history for name in record["metrics"]}


def test_pretraining_finetuning_evaluation_and_export_use_the_datasets_class_names(splits, tmp_path):
    sites = datalists(splits)
    assert all(d["labels"] == {"background": 0, "blood_pool": 1, "heart_wall": 2} for d in sites.values())

    pretrain = {"bundle": TINY, "batch_size": 2, "head_hidden": 16, "embedding_dim": 8, "partitions": 2}
    result = run_in_process("fcl", pretrain, {s: pretraining_entries(d) for s, d in sites.items()}, rounds=1)
    assert not any(name in CARDIAC or name.endswith(tuple(CARDIAC)) for name in metric_names(result.history))

    # the job takes the label set from the sites' datalists
    config = with_label_set({"bundle": TINY, "local_epochs": 1, "seed": 0}, str(splits / "{site}.json"), 2)
    assert config["bundle"]["labels"] == {"background": 0, "blood_pool": 1, "heart_wall": 2}
    result = run_in_process(
        "supervised", config, {s: supervised_entries(d) for s, d in sites.items()}, rounds=1
    )
    per_class = {n for n in metric_names(result.history) if n.startswith("val_dice_")}
    assert per_class == {f"val_dice_{name}" for name in NAMES}
    state = message_to_state_dict(result.global_message, "weights")
    heads = [v.shape[0] for k, v in state.items() if k.endswith("head.weight")]
    assert heads and set(heads) == {3}  # output channels: background + 2 classes

    # evaluation: the bench's scorer and the bundle's evaluate workflow
    scorer = BundleScorer({s: d["test"] for s, d in sites.items()}, config["bundle"])
    assert list(scorer.score(state, "site-1")["dice"]) == NAMES
    torch.save(state, tmp_path / "model.pt")
    evaluation = bundle_workflow(
        config="evaluate",
        overrides={**config["bundle"], "val_datalist": sites["site-1"]["test"], "num_workers": 0,
                   "ckpt_path": str(tmp_path / "model.pt"), "output_dir": str(tmp_path / "eval")},
    )  # fmt: skip
    evaluation.initialize()
    evaluation.run()
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary["dice"]) == {*NAMES, "mean"}

    # the exported model: a bundle whose metadata names the 3 output channels
    written = save_models(result.global_message, tmp_path / "out", config, pretraining=False)
    assert written == [tmp_path / "out" / MODEL_FILE, tmp_path / "out" / MODEL_BUNDLE_DIR]
    exported = tmp_path / "out" / MODEL_BUNDLE_DIR
    meta = json.loads((exported / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == DECLARED and pred["num_channels"] == 3
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(exported / "configs" / "metadata.json"),
        config_file=str(exported / "configs" / "inference.json"),
        device="cpu",
    )
    assert not CARDIAC & set(json.dumps(meta).replace('"', " ").split())
    if SCHEMA.is_file():  # the schema vendored for offline checks, as in test_bundle_metadata
        verify_metadata(meta_file=str(exported / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_class_names_follow_the_label_values():
    assert class_names(ACDC_LABELS) == ["RV", "MYO", "LV"]
    assert class_names({"b": 2, "background": 0, "a": 1}) == ["a", "b"]
    with pytest.raises(DataValidationError, match=r"background 0 and each class 1 \.\. K-1"):
        common_label_set({"x.json": {"background": 0, "a": 2}})


def test_mixed_label_sets_are_refused_naming_both(splits, tmp_path):
    other = datalists(splits)["site-2"] | {"labels": ACDC_LABELS}
    (tmp_path / "site-1.json").write_text((splits / "site-1.json").read_text())
    (tmp_path / "site-2.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="mixed label sets") as err:
        with_label_set({}, str(tmp_path / "{site}.json"), 2)
    assert "site-1's datalist" in str(err.value) and "site-2's datalist" in str(err.value)
    assert "blood_pool" in str(err.value) and "MYO" in str(err.value)
    # a site whose datalist declares another set than the job's refuses to start, naming both
    with pytest.raises(
        ValueError, match=r"the job's label set declares .*blood_pool.* but site-2's datalist"
    ):
        site_entries("site-2", tmp_path / "site-2.json", ["training"], labels=("the job's label set", {
            "background": 0, "blood_pool": 1, "heart_wall": 2}))  # fmt: skip


def test_merging_classes_numbers_the_groups_and_sends_the_rest_to_the_background(tmp_path):
    labels, values = merge_classes(ACDC_LABELS, [["RV", "LV"], ["MYO"]])
    assert labels == {"background": 0, "RV+LV": 1, "MYO": 2}
    assert values == {0: 0, 1: 1, 2: 2, 3: 1}
    assert merge_classes(ACDC_LABELS, [["MYO"]]) == ({"background": 0, "MYO": 1}, {0: 0, 1: 0, 2: 1, 3: 0})
    with pytest.raises(DataValidationError, match="'MYO' is in two class groups"):
        merge_classes(ACDC_LABELS, [["MYO"], ["LV", "MYO"]])
    with pytest.raises(DataValidationError, match="'aorta' is not a foreground class"):
        merge_classes(ACDC_LABELS, [["aorta"]])
    with pytest.raises(DataValidationError, match="'background' is not a foreground class"):
        merge_classes(ACDC_LABELS, [["background"]])

    affine = np.diag([1.5, 1.5, 10.0, 1.0])
    source = tmp_path / "gt.nii.gz"
    nib.save(nib.Nifti1Image(np.array([[[0, 1], [2, 3]]], dtype=np.uint8), affine), source)
    relabel_file(source, tmp_path / "merged.nii.gz", values)
    merged = nib.load(tmp_path / "merged.nii.gz")
    assert merged.get_data_dtype() == np.uint8 and np.allclose(merged.affine, affine)
    assert np.asarray(merged.dataobj).tolist() == [[[0, 1], [2, 1]]]
    with pytest.raises(DataValidationError, match=r"gt\.nii\.gz: label values \[3\]"):
        relabel_file(source, tmp_path / "never.nii.gz", {0: 0, 1: 1, 2: 1})
    assert not (tmp_path / "never.nii.gz").exists()
