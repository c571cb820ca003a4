"""The bundle's training pipeline caches plain tensors and draws exactly the samples it drew before.

``train.json`` strips MONAI metadata at the end of the cached (deterministic) part, caches the
label's foreground/background indices there for ``RandCropByPosNegLabeld`` and lets
``RandAffined`` cache its identity grid: speed-ups only. The reference here is the same
pipeline without all three, run without any cache, with metadata tracking on.
"""

import pytest
import torch
from monai.data import Dataset, MetaTensor, get_track_meta, set_track_meta

from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.nets.bundle import bundle_parser
from fedcontrast.nets.presets import network_preset


@pytest.fixture(autouse=True)
def _restore_track_meta():
    previous = get_track_meta()
    yield
    set_track_meta(previous)


def reference_augmentation(augmentation: list[dict]) -> list[dict]:
    """The bundle's ``train#augmentation`` without the speed-ups: no metadata strip, no cached
    crop indices, no grid cache."""
    plain = []
    for t in augmentation:
        if t["_target_"] in ("EnsureTyped", "FgBgToIndicesd"):
            continue
        t = dict(t)
        if t["_target_"] == "RandCropByPosNegLabeld":
            t.pop("fg_indices_key")
            t.pop("bg_indices_key")
        if t["_target_"] == "RandAffined":
            t.pop("cache_grid")
            t.pop("spatial_size")
        plain.append(t)
    return plain


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cached_pipeline_draws_the_uncached_metadata_samples(site_splits, spatial_dims):
    datalist = load_site_datalist(site_splits / "site-1.json")
    entries = (datalist["training"] + datalist["test"])[:2]  # two labelled volumes
    data = [{"image": str(e["image"]), "label": str(e["label"])} for e in entries]
    bundle = {"spatial_dims": spatial_dims, **network_preset("tiny_phantom")}
    overrides = {**bundle, "train_datalist": data, "val_datalist": [], "num_workers": 0}
    fast = bundle_parser(None, "train", overrides)
    reference = bundle_parser(None, "train", overrides)
    targets = [t["_target_"] for t in fast.get("train#augmentation")]
    assert (
        targets.index("EnsureTyped")
        < targets.index("FgBgToIndicesd")
        < targets.index("RandCropByPosNegLabeld")
    )
    reference["train#augmentation"] = reference_augmentation(fast.get("train#augmentation"))

    cached = fast.get_parsed_content("train#dataset")  # the bundle's CacheDataset
    assert all({"label_fg_indices", "label_bg_indices"} <= item.keys() for item in cached._cache)
    assert all(type(v) is torch.Tensor for item in cached._cache for v in item.values()), (
        "the cache must hold plain tensors: metadata is copied at every step otherwise"
    )
    uncached = Dataset(data, reference.get_parsed_content("train#preprocessing"))
    for untracked in (True, False):  # the trainer's setting (untracked_meta) and a plain bundle run
        cached.transform.set_random_state(seed=7)
        uncached.transform.set_random_state(seed=7)
        for i in [0, 1, 1, 0, 1]:
            set_track_meta(True)
            expected = uncached[i]
            set_track_meta(not untracked)
            drawn = cached[i]
            assert len(drawn) == len(expected) == (8 if spatial_dims == 2 else 1)
            for a, b in zip(drawn, expected):
                for key in ("image", "label"):
                    assert isinstance(b[key], MetaTensor)
                    assert torch.equal(torch.as_tensor(a[key]), b[key].as_tensor()), (key, i)
