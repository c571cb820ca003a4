"""fedcontrast.nets.bundle: the network, transforms and encoder of the bundle; the encoder option."""

import importlib
import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from fedcontrast.nets.bundle import (
    build_network,
    build_preprocessing,
    bundle_workflow,
    config_files,
    default_bundle_dir,
    encoder_options,
    encoder_state,
    load_pretrained_encoder,
    save_encoder,
)
from fedcontrast.nets.presets import NETWORK_PRESETS, network_preset

TINY = network_preset("tiny")


@pytest.fixture
def volume(tmp_path):
    """A 40 x 36 x 9 scan with 2 x 2 x 9 mm voxels and a label, as NIfTI files."""
    affine = np.diag([2.0, 2.0, 9.0, 1.0])
    image = np.random.default_rng(0).normal(100, 20, (40, 36, 9)).astype(np.float32)
    label = np.zeros((40, 36, 9), np.uint8)
    label[15:25, 12:22, 2:7] = 3
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "lab.nii.gz")
    return {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz"), "patient": "p1"}


def test_default_bundle_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDCONTRAST_BUNDLE_DIR", raising=False)
    assert (default_bundle_dir() / "configs" / "metadata.json").is_file()
    monkeypatch.setenv("FEDCONTRAST_BUNDLE_DIR", str(tmp_path))
    assert default_bundle_dir() == tmp_path.resolve()


def test_config_files_are_overlays_on_train():
    assert [p.rsplit("/", 1)[1] for p in config_files(config="inference")] == ["inference.json"]
    with pytest.raises(ValueError, match="unknown bundle config 'deploy'"):
        config_files(config="deploy")


def test_3d_network_downsamples_in_plane_only_where_slices_are_few():
    net = build_network()
    assert type(net).__name__ == "SegResNetDS"
    factor = net.shape_factor()
    assert factor[0] == factor[1] > factor[2]
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 10)).shape == (1, 4, 32, 32, 10)


def test_2d_variant_is_one_config_value():
    net = build_network(overrides={"spatial_dims": 2, **TINY}).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 4, 32, 32)


def test_encoder_state_loads_into_another_network():
    donor, other = build_network(overrides=TINY), build_network(overrides=TINY)
    other.encoder.load_state_dict(donor.encoder.state_dict())
    assert all(k.startswith(("encoder.", "up_layers.")) for k in donor.state_dict())


def test_network_presets_are_fresh_copies_with_changes_in_place():
    small = network_preset("small", blocks_down=[1, 1, 1], spatial_dims=2)
    assert list(small) == [*NETWORK_PRESETS["small"], "spatial_dims"] and small["blocks_down"] == [1, 1, 1]
    network_preset("tiny")["blocks_down"].append(2)
    assert network_preset("tiny") == {"init_filters": 4, "blocks_down": [1, 1, 1]}
    with pytest.raises(ValueError, match=r"unknown network preset 'huge'; expected one of \['small'"):
        network_preset("huge")


def test_encoder_state_is_the_encoder_part_of_a_network_state():
    network = build_network(overrides=TINY)
    encoder = encoder_state(network.state_dict())
    expected = network.encoder.state_dict()
    assert encoder.keys() == expected.keys() and all(torch.equal(encoder[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match=r"no 'encoder\.\*' entry"):
        encoder_state(network.encoder.state_dict())


def test_preprocessing_resamples_in_plane_keeps_slices_and_crops(volume):
    out = build_preprocessing(overrides={"inplane_spacing": 1.5, "roi_size": [48, 48]})(volume)
    assert out["image"].shape == out["label"].shape == (1, 48, 48, 9)
    np.testing.assert_allclose(out["image"].pixdim, [1.5, 1.5, 9.0], rtol=1e-5)
    assert abs(float(out["image"].mean())) < 0.2 and set(out["label"].unique().tolist()) == {0.0, 3.0}
    assert out["patient"] == "p1"
    image_only = build_preprocessing()({"image": volume["image"]})
    assert image_only["image"].shape == (1, 160, 160, 9)


def test_load_pretrained_encoder_returns_the_loaded_keys(tmp_path):
    donor = build_network(overrides=TINY)
    save_encoder(donor.encoder.state_dict(), tmp_path / "enc.pt", encoder_options(overrides=TINY))
    net = build_network(overrides=TINY)
    loaded = load_pretrained_encoder(net, tmp_path / "enc.pt", encoder_options(overrides=TINY))
    assert loaded == sorted(donor.encoder.state_dict())
    assert all(torch.equal(v, donor.encoder.state_dict()[k]) for k, v in net.encoder.state_dict().items())


def test_an_encoder_from_another_grid_is_refused_naming_each_option(tmp_path):
    grid = {**TINY, "inplane_spacing": 3.0, "roi_size": [48, 48]}
    save_encoder(
        build_network(overrides=grid).encoder.state_dict(),
        tmp_path / "enc.pt",
        encoder_options(overrides=grid),
    )
    with pytest.raises(ValueError, match="differing options") as err:
        load_pretrained_encoder(
            build_network(overrides=TINY), tmp_path / "enc.pt", encoder_options(overrides=TINY)
        )
    assert "inplane_spacing: pre-trained 3.0, this network 1.5" in str(err.value)
    assert "roi_size: pre-trained [48, 48], this network [160, 160]" in str(err.value)
    assert "init_filters" not in str(err.value)


def test_a_plain_state_dict_loads_with_a_warning_that_its_grid_is_unchecked(tmp_path, caplog):
    torch.save(build_network(overrides=TINY).encoder.state_dict(), tmp_path / "enc.pt")
    with caplog.at_level(logging.WARNING):
        assert load_pretrained_encoder(
            build_network(overrides=TINY), tmp_path / "enc.pt", encoder_options(overrides=TINY)
        )
    assert "records no voxel grid or network options: not checked" in caplog.text


FULL_NETWORK = r"a full network state dict\?.*missing keys \['conv_init"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: build_network(overrides=TINY).state_dict(), FULL_NETWORK),
        (lambda: build_network(overrides={**TINY, "init_filters": 8}).encoder.state_dict(), "shape mismatch"),
        (lambda: [1, 2, 3], "expected a state dict of tensors"),
    ],
)
def test_load_pretrained_encoder_refuses_mismatches(tmp_path, make, message):
    torch.save(make(), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message):
        load_pretrained_encoder(build_network(overrides=TINY), tmp_path / "bad.pt", None)


def test_train_config_option_loads_and_logs_the_encoder(tmp_path, volume, caplog):
    encoder = build_network(overrides=TINY).encoder.state_dict()
    save_encoder(encoder, tmp_path / "enc.pt", encoder_options(overrides=TINY))
    workflow = bundle_workflow(
        overrides={**TINY, "train_datalist": [volume], "pretrained_encoder": str(tmp_path / "enc.pt")}
    )
    with caplog.at_level(logging.INFO, logger="scripts.encoder"):
        workflow.initialize()
    assert f"loaded {len(encoder)} encoder tensors from {tmp_path / 'enc.pt'}" in caplog.text
    network = workflow.parser.get_parsed_content("network")
    assert all(torch.equal(v, encoder[k]) for k, v in network.encoder.state_dict().items())


def test_train_config_option_refuses_a_mismatching_encoder(tmp_path):
    torch.save(build_network(overrides={**TINY, "init_filters": 8}).encoder.state_dict(), tmp_path / "enc.pt")
    workflow = bundle_workflow(overrides={**TINY, "pretrained_encoder": str(tmp_path / "enc.pt")})
    with pytest.raises(RuntimeError) as err:
        workflow.initialize()
    assert "does not match the network's encoder" in str(err.value.__cause__)
    assert "conv_init.weight" in str(err.value.__cause__)


def test_train_and_inference_configs_have_the_model_zoo_properties(volume, tmp_path):
    logs = {"log_dir": str(tmp_path / "logs"), "num_workers": 0}
    train = bundle_workflow(overrides={"train_datalist": [volume], "val_datalist": [volume], **logs})
    train.initialize()
    assert train.check_properties() == []
    infer = bundle_workflow(config="inference", overrides={"dataset_dir": str(tmp_path / "scans")})
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "img.nii.gz").write_bytes((tmp_path / "img.nii.gz").read_bytes())
    infer.initialize()
    assert infer.check_properties() == []


def test_train_config_option_refuses_an_encoder_from_another_grid(tmp_path):
    grid = {**TINY, "slice_spacing": 5.0}
    save_encoder(
        build_network(overrides=grid).encoder.state_dict(),
        tmp_path / "enc.pt",
        encoder_options(overrides=grid),
    )
    workflow = bundle_workflow(overrides={**TINY, "pretrained_encoder": str(tmp_path / "enc.pt")})
    with pytest.raises(RuntimeError) as err:
        workflow.initialize()
    assert "slice_spacing: pre-trained 5.0, this network 10.0" in str(err.value.__cause__)


def test_encoder_parameter_groups_split_only_when_the_encoder_has_its_own_rate():
    network = build_network(overrides=TINY)  # puts the bundle root on sys.path
    optim = importlib.import_module("scripts.optim")
    everything = [id(p) for p in network.parameters()]
    assert [id(p) for p in optim.encoder_parameter_groups(network, 1e-3)] == everything
    encoder, rest = optim.encoder_parameter_groups(network, 1e-3, 0.1)
    assert encoder["lr"] == pytest.approx(1e-4) and "lr" not in rest
    assert sorted(id(p) for p in encoder["params"] + rest["params"]) == sorted(everything)
    with pytest.raises(ValueError, match="must be >= 0"):
        optim.encoder_parameter_groups(network, 1e-3, -0.5)
    with pytest.raises(ValueError, match="Linear has no encoder"):
        optim.encoder_parameter_groups(torch.nn.Linear(2, 2), 1e-3, 0.5)
    warm, _ = optim.encoder_parameter_groups(network, 1e-3, encoder_warmup_iterations=5)
    assert warm["lr"] == warm[optim.ENCODER_LR] == 1e-3  # split at scale 1 so the warm-up can hold it
    with pytest.raises(ValueError, match="encoder_warmup_iterations must be >= 0"):
        optim.encoder_parameter_groups(network, 1e-3, encoder_warmup_iterations=-1)
    with pytest.raises(ValueError, match="no encoder parameter group"):
        optim.EncoderWarmup(torch.optim.AdamW(network.parameters()), iterations=5)
