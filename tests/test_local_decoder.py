"""Local contrastive decoder pre-training (SPEC §4): region grid, L^R / L^D masks, the frozen
encoder, the self-describing checkpoint and its strict loading by fine-tuning; FedRotation; FedDense
(the same loss on the encoder's deepest map)."""

import math
from types import SimpleNamespace

import pytest
import torch

from fedcontrast.flare.jobs import build_job, export_job
from fedcontrast.methods.base import message_to_state_dict
from fedcontrast.methods.feddense import DenseEncoderTrainer, turn
from fedcontrast.methods.fedrotation import rotate_batch
from fedcontrast.methods.local_decoder import DECODER_FILE, DecoderFedAvg, DecoderPretrainer, pretrain_decoder
from fedcontrast.methods.losses import local_contrastive_loss, local_contrastive_masks
from fedcontrast.methods.registry import available_methods, get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.methods.supervised import SupervisedBundleTrainer
from fedcontrast.nets.bundle import build_network
from fedcontrast.nets.decoder import (
    DecoderWithLocalHead,
    build_checkpoint,
    decoder_block_keys,
    load_pretrained_decoder,
    save_decoder_checkpoint,
)
from fedcontrast.nets.heads import extract_regions, region_grid
from fedcontrast.nets.presets import network_preset

SITES = ("site-1", "site-2")
TINY_NETWORK = network_preset("tiny")
CONFIG = {
    "bundle": {**TINY_NETWORK, "roi_size": [32, 32]},
    "batch_size": 2,
    "head_hidden": 32,
    "embedding_dim": 16,
    "seed": 3,
}


@pytest.fixture(scope="module")
def datalists(phantom_images) -> dict[str, list[dict]]:
    return phantom_images(1)


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory) -> dict[str, str]:
    """Two different encoder files for the tiny network (site-1, site-2)."""
    folder = tmp_path_factory.mktemp("encoders")
    files = {}
    for i, site in enumerate(SITES):
        torch.manual_seed(10 + i)
        state = build_network(overrides=TINY_NETWORK).encoder.state_dict()
        # non-default BatchNorm statistics, so that any update of them would show
        state = {k: v + 0.1 if "running" in k else v for k, v in state.items()}
        files[site] = str(folder / f"{site}.pt")
        torch.save(state, files[site])
    return files


# ---- region grid and masks, by hand ----


def test_region_grid_centres_windows_in_cells_and_keeps_them_inside():
    # cells of 4 pixels, centres 2 and 6, 3-pixel windows start one pixel before
    assert region_grid(8, 8, grid=2, window=3) == [(1, 1), (1, 5), (5, 1), (5, 5)]
    # 2-pixel cells: a window centred on 3 would overflow a 4-pixel map, so it is shifted to 1
    assert region_grid(4, 4, grid=2, window=3) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="2x2 feature map is too small"):
        region_grid(2, 2, grid=2, window=3)


def test_extract_regions_takes_the_grid_windows():
    fmap = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    regions = extract_regions(fmap, grid=2, window=3)
    assert regions.shape == (1, 4, 2 * 3 * 3)
    # region 1 (row 0, column 1): top-left (1, 5), channel 0 then channel 1
    assert regions[0, 1, :9].tolist() == [13, 14, 15, 21, 22, 23, 29, 30, 31]
    assert regions[0, 1, 9:].tolist() == [v + 64 for v in [13, 14, 15, 21, 22, 23, 29, 30, 31]]


def _index(view: int, image: int, region: int, images: int = 3, regions: int = 2) -> int:
    return (view * images + image) * regions + region


def _mask(pairs: set[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros(12, 12, dtype=torch.bool)
    for q, k in pairs:
        mask[q, k] = True
    return mask


def test_local_masks_by_hand():
    # three images: volumes 0, 1, 2; partitions 0, 0, 1; two regions each; two views
    volumes, partitions = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    lr_pos, lr_neg = local_contrastive_masks(volumes, partitions, 2, "L^R", "image")
    ld_pos, ld_neg = local_contrastive_masks(volumes, partitions, 2, "L^D", "image")
    # L^R: the same region of the same image in the other view, nothing else
    expected_lr = {(_index(v, b, r), _index(1 - v, b, r)) for v in (0, 1) for b in range(3) for r in (0, 1)}
    assert torch.equal(lr_pos, _mask(expected_lr))
    # L^D adds: the same region of images 0 <-> 1 (same partition, other volume), both views;
    # image 2 (another partition) gains nothing
    extra = {
        (_index(v, b, r), _index(w, 1 - b, r)) for v in (0, 1) for w in (0, 1) for b in (0, 1) for r in (0, 1)
    }
    assert torch.equal(ld_pos, _mask(expected_lr | extra))
    # negatives: the other region of the same image, in both views
    expected_neg = {
        (_index(v, b, r), _index(w, b, 1 - r))
        for v in (0, 1)
        for w in (0, 1)
        for b in range(3)
        for r in (0, 1)
    }
    assert torch.equal(lr_neg, _mask(expected_neg)) and torch.equal(ld_neg, lr_neg)
    # "batch" negatives: every region with another index, any image
    _, batch_neg = local_contrastive_masks(volumes, partitions, 2, "L^R", "batch")
    region = torch.arange(2).repeat(6)
    assert torch.equal(batch_neg, region[:, None] != region[None, :])
    assert not (ld_pos & ld_neg).any() and not ld_pos.diagonal().any()


def test_local_loss_value_when_regions_are_perfectly_separated():
    # every region r of every image and view embeds to the r-th unit vector: each positive has
    # similarity 1, each of the 2(R-1) negatives 0, so l = log(1 + 2(R-1) exp(-1/tau))
    regions, tau = 4, 0.5
    embeddings = torch.eye(regions).repeat(2 * 3, 1, 1)  # (2B, R, R)
    loss = local_contrastive_loss(embeddings, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]), "L^D", tau)
    assert loss.item() == pytest.approx(math.log(1 + 2 * (regions - 1) * math.exp(-1 / tau)), rel=1e-5)
    with pytest.raises(ValueError, match="unknown local contrastive strategy"):
        local_contrastive_loss(embeddings, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]), "G^D")


# ---- the truncated network ----


def test_decoder_blocks_exclude_heads_and_later_levels():
    network = build_network(overrides=TINY_NETWORK)  # two up-sampling levels
    keys = decoder_block_keys(network, 1)
    assert keys and all(k.startswith(("up_layers.0.upsample.", "up_layers.0.blocks.")) for k in keys)
    assert not any(".head." in k for k in decoder_block_keys(network, 2))
    model = DecoderWithLocalHead(network, None, grid=2, window=3, embedding_dim=8)
    assert model.levels == 1 and sorted(model.decoder_state_dict()) == keys
    assert model(torch.randn(3, 1, 32, 32, 2)).shape == (3 * 2, 4, 8)  # 3D slabs, slice-wise
    model2d = DecoderWithLocalHead(build_network(overrides={**TINY_NETWORK, "spatial_dims": 2}), 1, 2, 3, 8)
    out = model2d(torch.randn(3, 1, 32, 32))
    assert out.shape == (3, 4, 8) and torch.allclose(out.norm(dim=-1), torch.ones(3, 4))


def test_trainer_refuses_spatial_views_and_a_missing_encoder(datalists, encoder_files):
    with pytest.raises(ValueError, match="intensity-only views"):
        DecoderPretrainer(
            {**CONFIG, "pretrained_encoder": encoder_files["site-1"], "augment": {"flip_prob": 0.5}},
            datalists["site-1"],
            "site-1",
        )
    with pytest.raises(ValueError, match="needs pretrained_encoder"):
        DecoderPretrainer(CONFIG, datalists["site-1"], "site-1")
    with pytest.raises(ValueError, match="one encoder for every site"):
        DecoderFedAvg({"pretrained_encoder": "/x/{site}.pt"}, {})


# ---- tiny runs: the stage leaves the encoder bit-identical; checkpoints ----


def test_federated_decoder_stage_keeps_the_encoder_bit_identical(datalists, encoder_files, tmp_path):
    spec = get_method("local_decoder")
    assert spec.federated and not spec.pretraining and "local_decoder" not in available_methods(True)
    file = encoder_files["site-1"]
    frozen = torch.load(file, weights_only=True)
    initial = message_to_state_dict(DecoderPretrainer.initial_message(CONFIG))
    assert not any(k.startswith("encoder.") for k in initial)  # the encoder never travels
    result = pretrain_decoder(file, {**CONFIG, "loss_strategy": "L^D"}, datalists, 1, True, tmp_path)
    run = result.runs[0]
    assert all(math.isfinite(r["metrics"]["loss"]) for r in run.history)
    assert all(r["bytes_up"]["weights"] > 0 and r["bytes_up"]["features"] == 0 for r in run.history)
    for site in SITES:  # every tensor, BatchNorm statistics and counters included
        assert run.encoders[site].keys() == frozen.keys()
        assert all(torch.equal(run.encoders[site][k], frozen[k]) for k in frozen)
    checkpoint = torch.load(tmp_path / DECODER_FILE, weights_only=True)
    assert result.paths == dict.fromkeys(SITES, tmp_path / DECODER_FILE)
    assert checkpoint["contains"] == ["encoder", "decoder_blocks"] and checkpoint["decoder_levels"] == 1
    assert [s["stage"] for s in checkpoint["stages"]] == ["encoder", "decoder"]
    assert checkpoint["stages"][1]["federated"] and checkpoint["stages"][1]["loss_strategy"] == "L^D"
    assert all(torch.equal(checkpoint["encoder"][k], frozen[k]) for k in frozen)
    assert sorted(checkpoint["decoder"]) == decoder_block_keys(build_network(overrides=TINY_NETWORK), 1)
    assert any(not torch.equal(checkpoint["decoder"][k], initial[k]) for k in checkpoint["decoder"])


def test_per_site_decoder_stage_uses_each_sites_encoder(datalists, encoder_files, tmp_path):
    template = encoder_files["site-1"].replace("site-1", "{site}")
    result = pretrain_decoder(template, CONFIG, datalists, 1, federated=False, out=tmp_path)
    for site in SITES:
        own = torch.load(encoder_files[site], weights_only=True)
        checkpoint = torch.load(tmp_path / site / DECODER_FILE, weights_only=True)
        assert all(torch.equal(checkpoint["encoder"][k], own[k]) for k in own)
        assert checkpoint["stages"][1]["site"] == site and not checkpoint["stages"][1]["federated"]
    assert result.checkpoints["site-1"] is not result.checkpoints["site-2"]


# ---- fine-tuning loads encoder and decoder blocks strictly ----


def _checkpoint(tmp_path, network_overrides=TINY_NETWORK, levels=1, name="dec.pt", encoder=True):
    torch.manual_seed(5)
    donor = build_network(overrides=network_overrides)
    state = donor.state_dict()
    decoder = {
        k: state[k] + 0.5 if state[k].is_floating_point() else state[k]
        for k in decoder_block_keys(donor, levels)
    }
    path = tmp_path / name
    save_decoder_checkpoint(
        build_checkpoint(decoder, levels, donor.encoder.state_dict() if encoder else None), path
    )
    return path, donor


def test_finetuning_loads_encoder_and_decoder_blocks(tmp_path):
    path, _ = _checkpoint(tmp_path)
    config = {"bundle": TINY_NETWORK, "seed": 1, "pretrained_decoder": str(path)}
    weights = message_to_state_dict(SupervisedBundleTrainer.initial_message(config))
    random = message_to_state_dict(
        SupervisedBundleTrainer.initial_message({**config, "pretrained_decoder": ""})
    )
    checkpoint = torch.load(path, weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in checkpoint["decoder"].items())
    assert all(torch.equal(weights[f"encoder.{k}"], v) for k, v in checkpoint["encoder"].items())
    rest = [k for k in weights if not k.startswith("encoder.") and k not in checkpoint["decoder"]]
    assert "up_layers.1.head.weight" in rest  # the output head and later levels start random
    assert all(torch.equal(weights[k], random[k]) for k in rest)


def test_the_bundle_train_config_loads_the_checkpoint_with_its_own_scripts(tmp_path):
    from fedcontrast.nets.bundle import bundle_parser

    path, _ = _checkpoint(tmp_path)
    parser = bundle_parser(None, "train", {**TINY_NETWORK, "pretrained_decoder": str(path), "device": "cpu"})
    step = next(
        s for s in parser["initialize"] if isinstance(s, dict) and s.get("path") == "@pretrained_decoder"
    )
    assert step["_target_"] == "scripts.decoder.load_pretrained_decoder"  # the bundle alone, no fedcontrast
    index = parser["initialize"].index(step)
    loaded = parser.get_parsed_content(f"initialize#{index}")
    network = parser.get_parsed_content("network")
    checkpoint = torch.load(path, weights_only=True)
    assert sorted(loaded) == sorted(
        [*checkpoint["decoder"], *(f"encoder.{k}" for k in checkpoint["encoder"])]
    )
    state = network.state_dict()
    assert all(torch.equal(state[k], v) for k, v in checkpoint["decoder"].items())


def test_finetuning_refuses_a_mismatching_decoder_and_lists_the_keys(tmp_path):
    network = build_network(overrides=TINY_NETWORK)
    path, _ = _checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    decoder = checkpoint["decoder"]
    decoder["up_layers.0.extra.weight"] = torch.zeros(1)
    del decoder["up_layers.0.upsample.deconv.weight"]
    save_decoder_checkpoint(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as info:
        load_pretrained_decoder(network, tmp_path / "bad.pt")
    message = str(info.value)
    assert "missing keys ['up_layers.0.upsample.deconv.weight']" in message
    assert "unexpected keys ['up_layers.0.extra.weight']" in message
    # decoder blocks of a wider network: every shape mismatch listed
    wide, _ = _checkpoint(tmp_path, {**TINY_NETWORK, "init_filters": 8}, name="wide.pt")
    with pytest.raises(
        ValueError,
        match=r"shape mismatches \['up_layers\.0\.blocks\.0\.conv1\.weight: \(16, 16, 3, 3, 1\) != \(8, 8",
    ):
        SupervisedBundleTrainer.initial_message({"bundle": TINY_NETWORK, "pretrained_decoder": str(wide)})
    # a plain encoder state dict is not a decoder checkpoint
    torch.save(network.encoder.state_dict(), tmp_path / "enc.pt")
    with pytest.raises(ValueError, match="encoder file goes to pretrained_encoder"):
        load_pretrained_decoder(network, tmp_path / "enc.pt")
    # decoder blocks trained against another encoder than the one given
    with pytest.raises(ValueError, match=r"trained against another encoder.*differing keys"):
        SupervisedBundleTrainer.initial_message(
            {
                "bundle": TINY_NETWORK,
                "pretrained_encoder": str(tmp_path / "enc.pt"),
                "pretrained_decoder": str(path),
            }
        )
    no_encoder, _ = _checkpoint(tmp_path, name="noenc.pt", encoder=False)
    with pytest.raises(ValueError, match="holds no encoder"):
        load_pretrained_decoder(network, no_encoder)


def test_decoder_job_exports(tmp_path):
    job = build_job(
        "local_decoder",
        {**CONFIG, "pretrained_encoder": "/data/{site}/enc.pt"},
        num_rounds=1,
        num_sites=2,
        name="decoder",
        datalist_keys=("training", "unlabeled"),
        validation_key="",
        federated=False,
    )
    folder = export_job(job, tmp_path)
    client = (folder / "app" / "config" / "config_fed_client.json").read_text()
    assert "local_decoder" in client and "unlabeled" in client


# ---- FedRotation ----


def test_rotate_batch_labels_each_quarter_turn():
    image = torch.arange(4.0).reshape(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    rotated, labels = rotate_batch(image.repeat(2, 1, 1, 1))
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert rotated[2, 0].tolist() == [[1, 3], [0, 2]]  # 90 degrees counter-clockwise
    assert rotated[4, 0].tolist() == [[3, 2], [1, 0]]
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(1, 1, 2, 3))


def test_fedrotation_averages_the_encoder(datalists):
    spec = get_method("fedrotation")
    assert spec.federated and spec.pretraining
    result = run_in_process("fedrotation", CONFIG, datalists, rounds=1)
    assert all(
        math.isfinite(r["metrics"]["loss"]) and 0 <= r["metrics"]["accuracy"] <= 1 for r in result.history
    )
    weights = message_to_state_dict(result.global_message)
    assert {k.split(".")[0] for k in weights} == {"encoder", "head"}
    assert weights["head.mlp.3.weight"].shape[0] == 4  # Linear, BatchNorm, ReLU, Linear
    key = "encoder.conv_init.weight"
    expected = (
        result.encoders["site-1"]["conv_init.weight"] + result.encoders["site-2"]["conv_init.weight"]
    ) / 2
    assert torch.allclose(weights[key], expected, atol=1e-6)


# ---- FedDense: the local loss on the encoder ----


def test_feddense_embeds_regions_of_the_deepest_encoder_map():
    tiny = {**CONFIG, "grid": 2, "embedding_dim": 8}
    model = DenseEncoderTrainer.build_model(DenseEncoderTrainer.DEFAULTS | tiny)
    out = model(torch.randn(3, 1, 32, 32, 2))  # 3D slabs: slice-wise, slab-major rows
    assert out.shape == (3 * 2, 4, 8) and torch.allclose(out.norm(dim=-1), torch.ones(6, 4))
    deepest = model.encoder(torch.randn(3, 1, 32, 32, 2))[-1]
    assert model.head.convs[0].in_channels == deepest.shape[1]
    above = DenseEncoderTrainer.build_model(DenseEncoderTrainer.DEFAULTS | tiny | {"feature_stage": -2})
    maps = above.encoder(torch.randn(3, 1, 32, 32, 2))
    assert above.head.convs[0].in_channels == maps[-2].shape[1] != maps[-1].shape[1]
    assert above(torch.randn(3, 1, 32, 32, 2)).shape == (3 * maps[-2].shape[-1], 4, 8)


def test_feddense_trains_and_averages_the_encoder_on_intensity_only_views(datalists):
    spec = get_method("feddense")
    assert spec.federated and spec.pretraining and "feddense" in available_methods(True)
    with pytest.raises(ValueError, match="intensity-only views"):
        DenseEncoderTrainer({**CONFIG, "augment": {"rot90_prob": 0.5}}, datalists["site-1"], "site-1")
    config = {**CONFIG, "grid": 2, "loss_strategy": "L^D"}
    initial = message_to_state_dict(DenseEncoderTrainer.initial_message(config))
    result = run_in_process("feddense", config, datalists, rounds=1)
    assert all(math.isfinite(r["metrics"]["loss"]) for r in result.history)
    assert all(r["bytes_up"]["weights"] > 0 and r["bytes_up"]["features"] == 0 for r in result.history)
    weights = message_to_state_dict(result.global_message)
    assert weights.keys() == initial.keys() and {k.split(".")[0] for k in weights} == {"encoder", "head"}
    key = "encoder.conv_init.weight"
    assert not torch.equal(weights[key], initial[key])  # the encoder itself learns
    expected = (
        result.encoders["site-1"]["conv_init.weight"] + result.encoders["site-2"]["conv_init.weight"]
    ) / 2
    assert torch.allclose(weights[key], expected, atol=1e-6)


def test_turn_applies_each_symmetry_of_the_square_and_undoes_it():
    image = torch.arange(4.0).reshape(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    batch = image.repeat(8, 1, 1, 1)
    turned = turn(batch, torch.arange(8))
    assert turned[0, 0].tolist() == [[0, 1], [2, 3]]
    assert turned[1, 0].tolist() == [[1, 3], [0, 2]]  # a quarter turn counter-clockwise
    assert turned[4, 0].tolist() == [[1, 0], [3, 2]]  # a flip along W
    assert turned[5, 0].tolist() == [[3, 1], [2, 0]]  # a quarter turn, then the flip
    assert len({tuple(t.flatten().tolist()) for t in turned}) == 8  # all eight differ
    slabs = torch.randn(8, 2, 4, 4, 3)
    assert torch.equal(turn(turn(slabs, torch.arange(8)), torch.arange(8), inverse=True), slabs)
    with pytest.raises(ValueError, match="square"):
        turn(torch.zeros(1, 1, 2, 3), torch.zeros(1, dtype=torch.long))


def test_feddense_turned_views_compare_the_same_places(datalists):
    config = {**CONFIG, "grid": 2, "turned_views": True}
    trainer = DenseEncoderTrainer(config, datalists["site-1"], "site-1")
    batch = next(trainer.batches())
    # an encoder whose deepest map is its input: turning the view and its map back must give
    # view 1's "regions" (here every pixel) exactly when the two views are the same image
    trainer.two_views = lambda b: torch.cat([b.images, b.images])
    seen = []
    trainer.model = SimpleNamespace(
        encoder=lambda x: seen.append(x) or [x], head=lambda m: m.flatten(2), stage=-1
    )
    embeddings = trainer.region_embeddings(batch)
    half = embeddings.shape[0] // 2
    assert not torch.equal(seen[0][:half], seen[0][half:])  # the encoder saw view 2 turned
    assert torch.equal(embeddings[:half], embeddings[half:])
