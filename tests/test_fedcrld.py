"""FedCRLD (SPEC §5): the bundle's network, the MI term, the history model, what a round uploads;
and FedProx's proximal term (the heterogeneous benchmark's baseline)."""

import math
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import job_module

from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.methods.base import SiteUpdate, kind_of, message_to_state_dict, pack
from fedcontrast.methods.fedcrld import (
    SITE_MODEL_FILE,
    FedCRLDStrategy,
    FedCRLDTrainer,
    mutual_information,
    network_overrides,
    soft_cross_entropy,
)
from fedcontrast.methods.fedprox import ProximalLoss
from fedcontrast.methods.losses import cross_encoder_info_nce, symmetric_kl
from fedcontrast.methods.registry import get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.methods.supervised import supervised_entries
from fedcontrast.nets.bundle import build_network, bundle_workflow
from fedcontrast.nets.presets import network_preset

SITES = ("site-1", "site-2")
#: A tiny network on the small phantom; two crops per volume, so a batch holds two images.
TINY = network_preset("tiny_phantom", samples_per_volume=2)
CONFIG = {"bundle": TINY, "local_epochs": 1, "batch_size": 1, "lr": 3e-3, "seed": 1}


def fedcrld_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(overrides=network_overrides(CONFIG))


@pytest.fixture(scope="module")
def datalists(site_splits) -> dict[str, list[dict]]:
    """The shared 2-site split: 1 labelled training volume and 2 validation volumes per site."""
    return {site: supervised_entries(load_site_datalist(site_splits / f"{site}.json")) for site in SITES}


def test_network_is_the_bundle_network_with_two_encoders():
    net = fedcrld_network()
    assert type(net).__name__ == "FedCRLDNet"
    plain = build_network(overrides=TINY).state_dict()
    state = net.state_dict()
    assert {k.split(".")[0] for k in state} == {"encoder", "private_encoder", "crl", "up_layers"}
    # shared encoder and decoder are SegResNetDS's own, key for key
    assert {k for k in state if k.startswith(("encoder.", "up_layers."))} == set(plain)
    assert {k[len("private_") :] for k in state if k.startswith("private_encoder.")} == {
        k for k in plain if k.startswith("encoder.")
    }


def test_cross_attention_shapes_and_dependence_on_both_encoders():
    net = fedcrld_network().eval()
    block = net.crl
    private, shared = torch.randn(2, 16, 8, 8, 2), torch.randn(2, 16, 8, 8, 2)
    with torch.no_grad():
        out = block(private, shared)
        assert out.shape == private.shape
        assert not torch.allclose(block(private, torch.randn_like(shared)), out, atol=1e-5)
        assert not torch.allclose(block(torch.randn_like(private), shared), out, atol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        block(private, shared[..., :1])

    x = torch.randn(1, 1, 32, 32, 4)
    with torch.no_grad():
        features = net.forward_features(x)
        assert features["logits"].shape == (1, 4, 32, 32, 4)
        assert (
            features["shared"].shape
            == features["private"].shape
            == features["fused"].shape
            == (1, 16, 8, 8, 2)
        )
        assert torch.equal(net(x), features["logits"])
        # the logits move when either encoder's weights move
        for encoder in (net.encoder, net.private_encoder):
            saved = {k: v.clone() for k, v in encoder.state_dict().items()}
            for p in encoder.parameters():
                p.add_(0.1 * torch.randn_like(p))
            assert not torch.allclose(net(x), features["logits"], atol=1e-5)
            encoder.load_state_dict(saved)
        assert torch.allclose(net(x), features["logits"])


def test_mi_infonce_on_a_hand_made_case():
    tau = 0.5
    e = torch.eye(2, dtype=torch.float64)
    # shared and private embeddings of each image agree: positive logit 1/τ, the negative 0
    aligned = cross_encoder_info_nce(e, e.clone(), tau)
    assert aligned.item() == pytest.approx(math.log(1 + math.exp(-1 / tau)), rel=1e-5)
    # private embeddings swapped between the two images: positive 0, negative 1/τ
    crossed = cross_encoder_info_nce(e, e.flip(0), tau)
    assert crossed.item() == pytest.approx(math.log(1 + math.exp(1 / tau)), rel=1e-5)
    # one image: nothing to push apart, the term vanishes
    assert cross_encoder_info_nce(e[:1], e[:1], tau).item() == 0.0
    # feature maps are pooled over space and normalised first
    maps = torch.stack(
        [torch.full((3, 2, 2), 1.0, dtype=torch.float64) * e[i].repeat(2)[:3, None, None] for i in range(2)]
    )
    assert mutual_information(maps, 5 * maps, "infonce", tau).item() == pytest.approx(
        cross_encoder_info_nce(*(torch.nn.functional.normalize(maps.mean((2, 3)), dim=1),) * 2, tau).item()
    )


def test_symmetric_kl_option():
    a = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    b = torch.tensor([[math.log(3.0), 0.0]])  # softmax (3/4, 1/4)
    expected = 0.5 * math.log(3.0)  # each KL is (3/4 - 1/4) log 3
    assert symmetric_kl(a, b).item() == pytest.approx(expected, rel=1e-6)
    assert symmetric_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert mutual_information(a[:, :, None], b[:, :, None], "symmetric_kl", 0.1).item() == pytest.approx(
        expected
    )
    with pytest.raises(ValueError, match="unknown mi_form"):
        mutual_information(a[:, :, None], b[:, :, None], "mine", 0.1)


def test_soft_cross_entropy_is_minimal_at_the_teacher():
    teacher = torch.randn(2, 4, 3, 3, 2)
    at_teacher = soft_cross_entropy(teacher, teacher)
    entropy = -(teacher.softmax(1) * teacher.log_softmax(1)).sum(1).mean()
    assert at_teacher.item() == pytest.approx(entropy.item(), rel=1e-5)
    assert soft_cross_entropy(torch.randn_like(teacher), teacher) > at_teacher


def test_history_model_is_an_ema_of_the_rounds_models(datalists):
    trainer = FedCRLDTrainer({**CONFIG, "history_momentum": 0.75}, datalists["site-1"], "site-1")
    params = lambda net: {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}  # noqa: E731
    with torch.no_grad():
        for p in trainer.network.parameters():
            p.add_(1.0)
    first = params(trainer.network)
    trainer.update_history()  # the first update copies the model
    assert all(torch.equal(params(trainer.history)[k], v) for k, v in first.items())
    with torch.no_grad():
        for p in trainer.network.parameters():
            p.mul_(-2.0)
    second = params(trainer.network)
    trainer.update_history()
    history = params(trainer.history)
    for name, _ in trainer.network.named_parameters():
        assert torch.allclose(history[name], 0.75 * first[name] + 0.25 * second[name], atol=1e-6)
    assert not any(p.requires_grad for p in trainer.history.parameters())


def test_a_round_uploads_only_the_shared_encoder(datalists, tmp_path):
    config = {**CONFIG, "workdir": str(tmp_path)}
    initial = FedCRLDTrainer.initial_message(config)
    trainer = FedCRLDTrainer(config, datalists["site-1"], "site-1")
    shared_keys = {f"weights/encoder.{k}" for k in trainer.network.encoder.state_dict()}
    assert set(initial) == shared_keys
    private_before = {k: v.clone() for k, v in trainer.network.private_encoder.state_dict().items()}

    update = trainer.local_round(initial, 0)
    assert set(update.message) == shared_keys
    assert all(kind_of(k) == "weights" for k in update.message)
    metrics = update.metrics
    assert metrics["steps"] == 1 and metrics["loss_mi"] > 0 and "loss_distill" not in metrics
    assert 0.0 <= metrics["val_dice"] <= 1.0
    # the site's full model stays at the site, in its own folder
    saved = torch.load(tmp_path / "site-1" / SITE_MODEL_FILE, weights_only=True)
    assert saved.keys() == trainer.network.state_dict().keys()

    # round 1: the received shared encoder replaces the site's, the private parts carry on
    trained_private = {k: v.clone() for k, v in trainer.network.private_encoder.state_dict().items()}
    assert any(not torch.equal(private_before[k], v) for k, v in trained_private.items())
    update = trainer.local_round(initial, 1)
    assert {"loss_distill", "loss_feature"} <= update.metrics.keys()
    assert any(
        not torch.equal(trained_private[k], v)
        for k, v in trainer.network.private_encoder.state_dict().items()
    )

    with pytest.raises(ValueError, match="expected the shared encoder"):
        trainer.local_round({**initial, "weights/up_layers.0.head.weight": initial[next(iter(initial))]}, 2)


def test_server_averages_the_shared_encoder_and_refuses_anything_else():
    shared = {"weights/encoder.a": torch.zeros(2)}
    strategy = FedCRLDStrategy({"aggregation": "uniform"}, pack("weights", {"encoder.a": torch.zeros(2)}))
    updates = {
        "site-1": SiteUpdate(pack("weights", {"encoder.a": torch.tensor([1.0, 3.0])}), num_samples=1),
        "site-2": SiteUpdate(pack("weights", {"encoder.a": torch.tensor([3.0, 5.0])}), num_samples=3),
    }
    strategy.aggregate(updates, 0)
    assert strategy.message_for("site-1", 1).keys() == shared.keys()
    assert message_to_state_dict(strategy.message_for("site-2", 1))["encoder.a"].tolist() == [2.0, 4.0]
    message = updates["site-1"].message
    leaky = {"site-1": SiteUpdate({**message, "weights/up_layers.x": message["weights/encoder.a"]}, 1)}
    with pytest.raises(ValueError, match="site-1 uploaded entries other than the shared encoder"):
        strategy.aggregate(leaky, 1)


def test_two_sites_keep_their_own_models(datalists, site_splits, tmp_path):
    result = run_in_process("fedcrld", {**CONFIG, "workdir": str(tmp_path)}, datalists, rounds=2)
    assert get_method("fedcrld").strategy is FedCRLDStrategy
    assert all(r["bytes_up"]["weights"] == r["bytes_down"]["weights"] > 0 for r in result.history)
    assert all(
        r["bytes_up"]["weights"] == sum(v.nbytes for v in result.global_message.values())
        for r in result.history
    )
    one, two = (torch.load(tmp_path / s / SITE_MODEL_FILE, weights_only=True) for s in SITES)
    assert any(not torch.equal(one[k], two[k]) for k in one if k.startswith("private_encoder."))
    # the bundle's inference runs a site's model on a new scan (network_class selects FedCRLDNet)
    scan = Path(load_site_datalist(site_splits / "site-2.json")["test"][0]["image"])
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / scan.name).write_bytes(scan.read_bytes())
    overrides = {
        **network_overrides(CONFIG),
        "dataset_dir": str(tmp_path / "scans"),
        "ckpt_path": str(tmp_path / "site-1" / SITE_MODEL_FILE),
        "output_dir": str(tmp_path / "pred"),
        "num_workers": 0,
        "device": torch.device("cpu"),
    }
    workflow = bundle_workflow(None, "inference", overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    seg = nib.load(tmp_path / "pred" / scan.name.replace(".nii.gz", "_seg.nii.gz"))
    assert seg.shape == nib.load(scan).shape


def test_proximal_loss_adds_nvflare_fedprox_term():
    network, reference = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        reference.weight.copy_(network.weight + 1.0)
        reference.bias.copy_(network.bias - 2.0)
    loss = ProximalLoss(torch.nn.MSELoss(), network, reference, mu=0.5)
    pred, target = torch.zeros(3, 1), torch.ones(3, 1)
    # (mu / 2) * ||w - w_ref||^2 = 0.25 * (1 + 1 + 4)
    assert loss(pred, target).item() == pytest.approx(1.0 + 1.5)


def test_fedprox_trains_a_round_through_the_bundle(datalists):
    result = run_in_process("fedprox", {**CONFIG, "mu": 0.1}, datalists, rounds=1)
    assert get_method("fedprox").trainer.__name__ == "FedProxTrainer"
    assert all(
        math.isfinite(r["metrics"]["train_loss"]) and 0 <= r["metrics"]["val_dice"] <= 1
        for r in result.history
    )
    # the global model is a whole bundle network (FedAvg of the full state)
    build_network(overrides=TINY).load_state_dict(message_to_state_dict(result.global_message))


def test_job_exports_a_deployable_folder(tmp_path):
    import json

    assert (
        job_module("fedcrld").main(["--sites", "3", "--mi-form", "symmetric_kl", "--export", str(tmp_path)])
        == 0
    )
    client = json.loads((tmp_path / "fedcrld" / "app" / "config" / "config_fed_client.json").read_text())
    args = client["executors"][0]["executor"]["args"]
    assert args["method"] == "fedcrld" and args["config"]["mi_form"] == "symmetric_kl"
    assert not (tmp_path / "fedcrld" / "app" / "custom").exists()  # names the installed package, no code
