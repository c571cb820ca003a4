"""The label-efficiency protocol's pieces: validation hold-out, BatchNorm re-estimation, budgets."""

from pathlib import Path

import pytest
import torch

from fedcontrast.bench import evaluate
from fedcontrast.bench.evaluate import BundleScorer, reestimate_batchnorm
from fedcontrast.bench.protocol import (
    PROFILES,
    RANDOM_INIT,
    BenchConfig,
    FinetuneUnit,
    finetune_units,
    hold_out_validation,
    peak_rss_mb,
    pretraining_curve,
    run_unit,
)
from fedcontrast.methods.runner import run_in_process
from fedcontrast.nets.presets import network_preset


def test_validation_patients_come_out_of_the_held_out_set():
    test = [{"patient": p, "image": f"{p}_{f}"} for p in ("p3", "p1", "p2") for f in ("ED", "ES")]
    split = hold_out_validation({"site": "site-1", "test": test, "training": []}, patients=1)
    assert [e["image"] for e in split["validation"]] == ["p3_ED", "p3_ES"]
    assert {e["patient"] for e in split["test"]} == {"p1", "p2"}
    with pytest.raises(ValueError, match="site-1: 3 held-out patients cannot give 3 validation"):
        hold_out_validation({"site": "site-1", "test": test}, patients=3)


def test_batchnorm_statistics_are_those_of_the_given_images():
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    network[1].running_mean.fill_(100.0)
    images = [torch.full((1, 4, 4), 2.0), torch.full((1, 4, 4), 4.0)]
    reestimate_batchnorm(network, images, lambda x, net: net(x))
    conv_mean = network[0](torch.full((1, 1, 1, 1), 3.0)).flatten()  # linear: mean input 3
    torch.testing.assert_close(network[1].running_mean, conv_mean.detach())
    assert not network.training and network[1].momentum == 0.1


def test_scoring_reestimates_batchnorm_on_training_volumes_only(site_splits, monkeypatch):
    # The scorer sees a site's training, validation and test volumes; BatchNorm statistics may
    # come from the training (fine-tuning) volumes only.
    from fedcontrast.data.datalist import load_site_datalist

    datalist = load_site_datalist(site_splits / "site-1.json")
    bundle = {"spatial_dims": 2, **network_preset("tiny", roi_size=[32, 32])}
    scorer = BundleScorer(
        {"site-1": datalist["test"][1:]},
        bundle,
        calibration_sets={"site-1": datalist["training"]},
        validation_sets={"site-1": datalist["test"][:1]},
    )
    seen = []
    monkeypatch.setattr(evaluate, "reestimate_batchnorm", lambda net, images, inferer: seen.extend(images))
    state = scorer.network.state_dict()
    scorer.score(state, "site-1")
    scorer.score(state, "site-1", "validation")
    held_out = [v["image"] for split in ("test", "validation") for v in scorer.splits[split]["site-1"]]
    assert len(seen) == 2 * len(datalist["training"])
    assert all(any(x is image for image in scorer.calibration["site-1"]) for x in seen)
    assert not any(x is image for x in seen for image in held_out)


def test_a_model_is_scored_elsewhere_with_its_own_sites_batchnorm(site_splits, monkeypatch):
    # Cross-site generalisation (SPEC §7): site-1's model on every other site's test volumes, with
    # the statistics of site-1's training volumes, the same scores as loading it there by hand.
    from fedcontrast.data.datalist import load_site_datalist

    sites = {s: load_site_datalist(site_splits / f"{s}.json") for s in ("site-1", "site-2")}
    bundle = {"spatial_dims": 2, **network_preset("tiny", roi_size=[32, 32])}
    scorer = BundleScorer(
        {s: d["test"] for s, d in sites.items()},
        bundle,
        calibration_sets={s: d["training"] for s, d in sites.items()},
    )
    state = {k: v.clone() for k, v in scorer.network.state_dict().items()}
    scorer.load(state, "site-1")
    expected = scorer.evaluate("site-2")
    seen = []
    original = evaluate.reestimate_batchnorm
    monkeypatch.setattr(
        evaluate,
        "reestimate_batchnorm",
        lambda net, images, inferer: seen.append(images) or original(net, images, inferer),
    )
    scores = scorer.score_elsewhere(state, "site-1")
    assert list(scores) == ["site-2"] and scores["site-2"] == expected
    assert seen == [scorer.calibration["site-1"]]  # calibrated once, at the site that trained it


def test_every_budget_gets_the_same_steps_and_the_probe_freezes_the_encoder(site_splits):
    from fedcontrast.data.datalist import load_site_datalist

    config = BenchConfig(**PROFILES["quick"])
    unit = FinetuneUnit(RANDOM_INIT, 0, "federated", 1)
    assert (
        config.finetune_config(unit, "")["local_steps"]
        == config.finetune_steps // config.finetune_checkpoints
    )
    probe = config.finetune_config(FinetuneUnit(RANDOM_INIT, 0, "federated", 1, "probe"), "")
    assert probe["freeze_encoder"] and not config.finetune_config(unit, "")["freeze_encoder"]
    training = {"site-1": load_site_datalist(site_splits / "site-1.json")["training"][:1]}
    result = run_in_process("supervised", {**probe, "local_steps": 3}, training, rounds=1)
    assert result.history[0]["metrics"]["steps"] == 3.0  # 3 steps from one volume
    from fedcontrast.methods.supervised import SupervisedBundleTrainer

    initial = SupervisedBundleTrainer.initial_message(probe)
    after = result.global_message
    encoder = [
        k
        for k in initial
        if k.startswith("weights/encoder.") and "running" not in k and "num_batches" not in k
    ]
    decoder = [k for k in initial if k.startswith("weights/up_layers.") and "weight" in k]
    assert encoder and all(
        torch.equal(torch.as_tensor(initial[k]), torch.as_tensor(after[k])) for k in encoder
    )
    assert any(not torch.equal(torch.as_tensor(initial[k]), torch.as_tensor(after[k])) for k in decoder)


@pytest.mark.parametrize("scale", [0.25, 0.0])
def test_the_encoder_fine_tunes_at_its_fraction_of_the_learning_rate(site_splits, scale):
    from fedcontrast.data.datalist import load_site_datalist
    from fedcontrast.methods.supervised import SupervisedBundleTrainer

    config = BenchConfig(**{**PROFILES["quick"], "finetune_encoder_lr_scale": scale})
    cfg = {**config.finetune_config(FinetuneUnit(RANDOM_INIT, 0, "local", 1), ""), "local_steps": 3}
    training = load_site_datalist(site_splits / "site-1.json")["training"][:1]
    trainer = SupervisedBundleTrainer(cfg, training, "site-1")
    encoder_group, rest = trainer.trainer.optimizer.param_groups
    assert encoder_group["lr"] == pytest.approx(config.finetune_lr * scale)
    assert rest["lr"] == config.finetune_lr
    assert [id(p) for p in encoder_group["params"]] == [id(p) for p in trainer.network.encoder.parameters()]
    assert len(encoder_group["params"]) + len(rest["params"]) == len(list(trainer.network.parameters()))

    initial = SupervisedBundleTrainer.initial_message(cfg)
    after = trainer.local_round(initial, 0).message
    moved = {
        k: not torch.equal(torch.as_tensor(initial[k]), torch.as_tensor(after[k]))
        for k in initial
        if k.endswith(".weight")
    }
    encoder_moved = [v for k, v in moved.items() if k.startswith("weights/encoder.")]
    assert any(v for k, v in moved.items() if k.startswith("weights/up_layers."))
    assert any(encoder_moved) if scale else not any(encoder_moved)


def test_the_decoder_trains_alone_for_the_warmup_steps_across_rounds(site_splits):
    from fedcontrast.data.datalist import load_site_datalist
    from fedcontrast.methods.supervised import SupervisedBundleTrainer

    config = BenchConfig(**{**PROFILES["quick"], "finetune_encoder_warmup_steps": 4})
    cfg = {**config.finetune_config(FinetuneUnit(RANDOM_INIT, 0, "local", 1), ""), "local_steps": 3}
    training = load_site_datalist(site_splits / "site-1.json")["training"][:1]
    trainer = SupervisedBundleTrainer(cfg, training, "site-1")

    def moved(before, after, prefix):
        return any(
            not torch.equal(torch.as_tensor(before[k]), torch.as_tensor(after[k]))
            for k in before
            if k.startswith(prefix) and k.endswith(".weight")
        )

    start = SupervisedBundleTrainer.initial_message(cfg)
    first = trainer.local_round(start, 0).message  # steps 1-3: inside the warm-up
    assert moved(start, first, "weights/up_layers.") and not moved(start, first, "weights/encoder.")
    assert trainer.trainer.optimizer.param_groups[0]["lr"] == 0.0
    second = trainer.local_round(first, 1).message  # step 4 still warm, 5-6 train the encoder
    assert moved(first, second, "weights/encoder.")
    assert trainer.trainer.optimizer.param_groups[0]["lr"] == config.finetune_lr


@pytest.mark.parametrize(
    ("n_labeled", "volumes", "per_volume"), [(1, 1, 8), (2, 2, 4), (4, 4, 2), (8, 8, 1), (20, 8, 1)]
)
def test_a_step_holds_the_same_number_of_slices_for_every_budget(n_labeled, volumes, per_volume):
    cfg = BenchConfig().finetune_config(FinetuneUnit(RANDOM_INIT, 0, "local", n_labeled), "")
    assert (cfg["batch_size"], cfg["bundle"]["samples_per_volume"]) == (volumes, per_volume)


def test_smallest_budget_units_come_first_and_probes_are_federated():
    config = BenchConfig(methods=["random_init", "fcl"], budgets=[2, 1], seeds=[0], sites=2)
    units = finetune_units(config)
    assert [u.n_labeled for u in units][:6] == [1] * 6
    assert {u.mode for u in units if u.readout == "probe"} == {"federated"}


@pytest.mark.parametrize("bad", [{"pretrain_steps": 10, "pretrain_rounds": 3}, {"readouts": ["linear"]}])
def test_inconsistent_budgets_are_refused(bad):
    with pytest.raises(ValueError):
        BenchConfig(**bad)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profiles_are_valid_and_resolve_a_device(profile):
    config = BenchConfig(**PROFILES[profile])
    assert config.torch_device in ("cpu", "cuda")
    unit = FinetuneUnit(RANDOM_INIT, 0, "federated", 1)
    assert (
        config.finetune_config(unit, "")["local_steps"] * config.finetune_checkpoints == config.finetune_steps
    )


def _allocate_mb(megabytes: int) -> float:
    """Touch ``megabytes`` MiB, free them, and return this process's peak RSS afterwards."""
    block = bytearray(megabytes * 1024 * 1024)
    block[::4096] = b"\x01" * len(block[::4096])
    del block
    return peak_rss_mb()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak-RSS reset")
def test_a_reused_worker_reports_each_units_own_peak_memory():
    high = run_unit(_allocate_mb, 300)  # an earlier, larger unit in the same process
    low = run_unit(peak_rss_mb)
    assert high - low > 250


def test_pretraining_curve_keeps_a_bundle_trainers_train_loss_as_its_loss():
    history = [
        {"round": 0, "site": "a", "metrics": {"train_loss": 0.5, "steps": 24.0}},
        {"round": 1, "site": "a", "metrics": {"loss": 3.0, "train_loss": 9.0, "alignment": 0.2}},
    ]
    assert pretraining_curve(history, 24) == [
        {"round": 0, "step": 24, "site": "a", "loss": 0.5},
        {"round": 1, "step": 48, "site": "a", "loss": 3.0, "alignment": 0.2},
    ]
