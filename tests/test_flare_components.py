"""The NVFlare glue without a simulator: messages, datalist resolution, executor, filter, ledger, export."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.fuel.utils.class_utils import get_component_init_parameters

from fedcontrast.flare.controller import (
    ENCODER_FILE,
    MODEL_BUNDLE_DIR,
    MODEL_FILE,
    MethodController,
    save_models,
)
from fedcontrast.flare.executor import MethodExecutor, site_entries
from fedcontrast.flare.filters import FeaturePrivacyFilter, privatize_features
from fedcontrast.flare.jobs import build_job, export_job, resolve_server_files
from fedcontrast.flare.ledger import RunLedger
from fedcontrast.flare.messages import (
    NUM_SAMPLES,
    as_message,
    flmodel_to_update,
    message_to_flmodel,
    update_to_flmodel,
)
from fedcontrast.flare.site_config import (
    ALLOW_LIST_PREFIX,
    DATALIST_ENV,
    allow_installed_package,
    resolve_datalist,
)
from fedcontrast.methods.base import Message, SiteTrainer, SiteUpdate, pack
from fedcontrast.methods.registry import MethodSpec
from fedcontrast.nets.bundle import build_network, encoder_options, load_pretrained_encoder
from fedcontrast.nets.presets import network_preset

TINY = network_preset("tiny")


def features_message(rows: int = 5, width: int = 128) -> Message:
    rng = np.random.default_rng(0)
    return {
        "weights/encoder.w": rng.normal(size=(4, 3)).astype(np.float32),
        "weights/encoder.n": np.array(7, dtype=np.int64),
        "features/embeddings": (3.0 * rng.normal(size=(rows, width))).astype(np.float32),
        "features/partitions": np.arange(rows, dtype=np.int64),
    }


# ---- messages -------------------------------------------------------------------------------


def test_message_round_trips_through_a_shareable():
    message = features_message()
    shareable = FLModelUtils.to_shareable(message_to_flmodel(message, round_num=3, total_rounds=5))
    model = FLModelUtils.from_shareable(shareable)
    assert model.current_round == 3 and model.total_rounds == 5
    back = as_message(model.params)
    assert back.keys() == message.keys()
    assert all(np.array_equal(back[k], message[k]) and back[k].dtype == message[k].dtype for k in message)


def test_update_round_trips_with_samples_and_metrics():
    update = SiteUpdate(message=features_message(), num_samples=12, metrics={"loss": 0.5})
    shareable = FLModelUtils.to_shareable(update_to_flmodel(update, round_num=1))
    model = FLModelUtils.from_shareable(shareable)
    assert model.meta[NUM_SAMPLES] == 12
    back = flmodel_to_update(model)
    assert back.num_samples == 12 and back.metrics == {"loss": 0.5}
    assert back.message.keys() == update.message.keys()


def test_a_key_without_a_kind_is_refused():
    with pytest.raises(ValueError, match="no known kind"):
        as_message({"images/x": np.zeros(3)})


# ---- datalist resolution at a site ----------------------------------------------------------


def test_files_the_server_reads_are_made_absolute_against_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {"initial_encoder": "out/encoder_s{seed}.pt", "bundle": {"roi_size": [32, 32]}, "lr": 1e-3}
    resolved = resolve_server_files(config)
    assert resolved["initial_encoder"] == str(tmp_path.resolve() / "out" / "encoder_s{seed}.pt")
    assert resolved["bundle"] == config["bundle"] and resolved["lr"] == config["lr"]
    assert resolve_server_files({"initial_encoder": ""}) == {"initial_encoder": ""}


def test_datalist_resolution_order(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    template = "/job/splits/{site}.json"
    assert resolve_datalist("site-2", template, local, environ={}) == (
        Path("/job/splits/site-2.json"),
        "the job's datalist template",
    )
    (local / "fedcontrast.json").write_text(json.dumps({"datalist": "mine.json"}))
    path, source = resolve_datalist("site-2", template, local, environ={})
    assert path == local / "mine.json" and source.endswith("fedcontrast.json")
    env = {DATALIST_ENV: "/env/site.json"}
    assert resolve_datalist("site-2", template, local, environ=env) == (
        Path("/env/site.json"),
        f"${DATALIST_ENV}",
    )


def test_datalist_resolution_errors_name_the_site(tmp_path):
    with pytest.raises(ValueError, match="site-3: no datalist"):
        resolve_datalist("site-3", "", tmp_path, environ={})
    (tmp_path / "fedcontrast.json").write_text('{"path": "x"}')
    with pytest.raises(ValueError, match=r"site-3: .*fedcontrast.json must hold"):
        resolve_datalist("site-3", "", tmp_path, environ={})


def test_site_entries_select_lists_and_tag_validation(site_splits):
    entries = site_entries("site-1", site_splits / "site-1.json", ["training", "unlabeled"], "test", 6)
    assert len(entries) == 8
    assert [e.get("split") for e in entries] == [None] * 6 + ["validation"] * 2


def test_site_entries_refuse_missing_or_short_datalists(site_splits, tmp_path):
    missing = tmp_path / "site-9.json"
    with pytest.raises(ValueError, match=f"site-9: cannot use its datalist: {missing}"):
        site_entries("site-9", missing, ["training"])
    with pytest.raises(ValueError, match=r"site-1: the job needs at least 2 volume\(s\) in \['training'\]"):
        site_entries("site-1", site_splits / "site-1.json", ["training"], min_volumes=2)


# ---- executor -------------------------------------------------------------------------------


class CountingTrainer(SiteTrainer):
    """A toy trainer: adds 1 to the weights, reports its number of entries as samples."""

    @classmethod
    def initial_message(cls, config):
        return {"weights/w": np.zeros(2, dtype=np.float32)}

    def local_round(self, incoming, round_num):
        return SiteUpdate({"weights/w": incoming["weights/w"] + 1}, len(self.datalist), {"loss": 1.0})

    def encoder_state_dict(self):
        return {}


def site_context(site: str, local_dir: Path) -> FLContext:
    """An FLContext as a site sees it: its name, job ``job-1`` and a workspace whose ``local/`` is
    ``local_dir`` (job run folders beside it)."""
    workspace = SimpleNamespace(
        get_site_config_dir=lambda: str(local_dir),
        get_run_dir=lambda job_id: str(local_dir / job_id),
        get_root_dir=lambda: str(local_dir),
    )
    engine = SimpleNamespace(get_workspace=lambda: workspace, fire_event=lambda *a, **k: None)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job-1", private=False, sticky=False)
    return fl_ctx


def task(round_num: int) -> object:
    return FLModelUtils.to_shareable(message_to_flmodel({"weights/w": np.ones(2)}, round_num, 2))


def test_executor_runs_the_method_on_the_site_datalist(site_splits, tmp_path, monkeypatch):
    spec = MethodSpec("toy", trainer=CountingTrainer, pretraining=False)
    monkeypatch.setattr("fedcontrast.flare.executor.get_method", lambda name: spec)
    executor = MethodExecutor(
        "toy", datalist=str(site_splits / "{site}.json"), datalist_keys=["training", "unlabeled"]
    )
    reply = executor.execute("train", task(1), site_context("site-2", tmp_path), Signal())
    update = flmodel_to_update(FLModelUtils.from_shareable(reply))
    assert update.num_samples == 6 and update.metrics == {"loss": 1.0}
    np.testing.assert_array_equal(update.message["weights/w"], [2.0, 2.0])
    assert executor.trainer.config["workdir"] == str(tmp_path / "job-1" / "fedcontrast")


def test_executor_failure_names_the_site_and_its_datalist(site_splits, tmp_path, monkeypatch, caplog):
    spec = MethodSpec("toy", trainer=CountingTrainer, pretraining=False)
    monkeypatch.setattr("fedcontrast.flare.executor.get_method", lambda name: spec)
    short = tmp_path / "short.json"
    (tmp_path / "fedcontrast.json").write_text(json.dumps({"datalist": str(short)}))
    site = json.loads((site_splits / "site-1.json").read_text())
    short.write_text(json.dumps({**site, "unlabeled": [], "test": []}))
    executor = MethodExecutor("toy", datalist=str(site_splits / "{site}.json"), min_volumes=3)
    with caplog.at_level(logging.WARNING):
        reply = executor.execute("train", task(0), site_context("site-1", tmp_path), Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert reply.get_header(AppConstants.CURRENT_ROUND) == 0
    # the details, path included, stay in the site's log (WARNING); the ERROR line, which a site
    # streams to the server, names the site, the round and the kind of failure only
    detail = f"site-1: the job needs at least 3 volume(s) in ['training'] but {short} has 1"
    assert any(detail in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert (
        len(errors) == 1 and "site-1: round 0: cannot set up the method on its data (ValueError)" in errors[0]
    )
    assert str(tmp_path) not in errors[0]
    assert executor.trainer is None


# ---- feature privacy filter -----------------------------------------------------------------


def test_privatize_clips_and_noises_float_features_only():
    message = features_message()
    clipped = privatize_features(message, clip_norm=1.0, noise_std=0.0, rng=np.random.default_rng(0))
    norms = np.linalg.norm(clipped["features/embeddings"], axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # every row was longer than 1
    for key in ("weights/encoder.w", "weights/encoder.n", "features/partitions"):
        assert clipped[key] is message[key]
    noised = privatize_features(message, clip_norm=0.0, noise_std=0.5, rng=np.random.default_rng(0))
    delta = noised["features/embeddings"] - message["features/embeddings"]
    assert noised["features/embeddings"].dtype == np.float32
    assert 0.45 < delta.std() < 0.55 and abs(delta.mean()) < 0.05


def test_filter_acts_on_a_task_result_and_is_off_by_default():
    message = features_message()
    result = FLModelUtils.to_shareable(update_to_flmodel(SiteUpdate(message, 5), round_num=0))
    unchanged = from_shareable(FeaturePrivacyFilter().process(result, FLContext())).data
    assert np.array_equal(unchanged["features/embeddings"], message["features/embeddings"])
    filtered = from_shareable(FeaturePrivacyFilter(clip_norm=0.5, seed=1).process(result, FLContext())).data
    np.testing.assert_allclose(np.linalg.norm(filtered["features/embeddings"], axis=1), 0.5, rtol=1e-5)
    assert np.array_equal(filtered["weights/encoder.w"], message["weights/encoder.w"])
    with pytest.raises(ValueError, match=">= 0"):
        FeaturePrivacyFilter(noise_std=-1.0)


# ---- ledger and saved models ----------------------------------------------------------------


def test_ledger_counts_bytes_by_round_site_direction_and_kind(tmp_path):
    ledger = RunLedger(tmp_path)
    message = features_message(rows=5, width=128)
    ledger.record_message(0, "site-1", "down", {"weights/encoder.w": message["weights/encoder.w"]})
    counts = ledger.record_message(0, "site-1", "up", message)
    assert counts == {"weights": 4 * 3 * 4 + 8, "target": 0, "features": 5 * 128 * 4 + 5 * 8, "stats": 0}
    ledger.record_metrics(0, "site-1", {"loss": 0.25}, num_samples=9)
    ledger.end_round(0)
    ledger.close()
    saved = json.loads((tmp_path / "bytes.json").read_text())
    assert [r["direction"] for r in saved["records"]] == ["down", "up"]
    assert saved["totals"]["up"]["features"] == counts["features"]
    assert saved["per_site"]["site-1"]["down"]["total"] == 48
    metrics = json.loads((tmp_path / "metrics.json").read_text())["records"]
    assert metrics == [{"round": 0, "site": "site-1", "num_samples": 9, "metrics": {"loss": 0.25}}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="direction"):
        ledger.record_message(0, "site-1", "sideways", message)


def test_saved_models_load_into_the_bundle_network(tmp_path):
    network = build_network(overrides=TINY)
    weights = pack("weights", network.state_dict())
    written = save_models(
        {**weights, "weights/head.fc.weight": np.zeros((2, 2))}, tmp_path, {"bundle": TINY}, pretraining=True
    )
    assert written == [tmp_path / MODEL_FILE, tmp_path / MODEL_BUNDLE_DIR, tmp_path / ENCODER_FILE]
    fresh = build_network(overrides=TINY)
    fresh.load_state_dict(torch.load(tmp_path / MODEL_FILE))
    assert load_pretrained_encoder(fresh, tmp_path / ENCODER_FILE, encoder_options(overrides=TINY))
    with pytest.raises(ValueError, match=r"differing options: init_filters: pre-trained 4, this network 8"):
        load_pretrained_encoder(
            fresh, tmp_path / ENCODER_FILE, encoder_options(overrides={**TINY, "init_filters": 8})
        )
    encoder_only = {k: v for k, v in weights.items() if k.startswith("weights/encoder.")}
    assert save_models(encoder_only, tmp_path / "enc", {"bundle": TINY}, pretraining=True) == [
        tmp_path / "enc" / ENCODER_FILE
    ]
    # a network with other outputs (FedRestore's one restored channel) is not a segmentation model
    restoration = pack("weights", build_network(overrides={**TINY, "num_classes": 1}).state_dict())
    assert save_models(restoration, tmp_path / "restore", {"bundle": TINY}, pretraining=True) == [
        tmp_path / "restore" / ENCODER_FILE
    ]
    # nor is a pretext's network of the segmentation network's shapes (FedPseudoSeg's clusters)
    pretext = {"bundle": TINY}, True, False
    assert save_models(weights, tmp_path / "pseudo", *pretext) == [tmp_path / "pseudo" / ENCODER_FILE]


# ---- job export -----------------------------------------------------------------------------


def test_exported_job_names_the_package_and_keeps_every_argument(tmp_path):
    job = build_job(
        "fcl",
        {"bundle": TINY, "seed": 4},
        num_rounds=3,
        num_sites=2,
        datalist="/data/{site}.json",
        name="fcl_export",
        datalist_keys=["unlabeled"],
        validation_key="test",
        min_volumes=2,
        federated=False,
        feature_clip=1.5,
        feature_noise=0.2,
        task_timeout=60,
        first_round_timeout=120,
        record_messages=True,
        task_request_interval=0.3,
        task_check_period=0.1,
        min_responses=1,
        exclude_bad_updates=True,
        resume_from="/results/server_state.pkl",
    )
    folder = export_job(job, tmp_path)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "app/config/config_fed_client.json",
        "app/config/config_fed_server.json",
        "meta.json",
    ]  # no custom/: no copy of fedcontrast, torch or MONAI
    assert json.loads((folder / "meta.json").read_text())["deploy_map"] == {"app": ["@ALL"]}
    client = json.loads((folder / "app/config/config_fed_client.json").read_text())
    server = json.loads((folder / "app/config/config_fed_server.json").read_text())
    executor = client["executors"][0]
    assert executor["tasks"] == ["pretrain"]
    (filters,) = client["task_result_filters"]
    assert filters["tasks"] == ["pretrain"]
    # the outbound policy is on by default, after the feature noise (and before any quantiser)
    assert filters["filters"][1] == {"path": "fedcontrast.flare.filters.OutboundPolicyFilter", "args": {}}
    components = [
        (MethodController, server["workflows"][0]),
        (MethodExecutor, executor["executor"]),
        (FeaturePrivacyFilter, filters["filters"][0]),
    ]
    for cls, entry in components:
        assert entry["path"] == f"{cls.__module__}.{cls.__name__}"
        rebuilt = cls(**entry["args"])
        # every constructor argument was given a non-default value above, so each must be in the
        # config (the filter's noise seed stays None: fresh entropy at each site)
        for param in set(get_component_init_parameters(rebuilt)) - {"self", "seed"}:
            assert param in entry["args"], f"{cls.__name__}.{param} is missing from the job config"
    assert server["workflows"][0]["args"]["config"] == {"bundle": TINY, "seed": 4}
    assert server["server"] == {"task_request_interval": 0.3}  # how often the sites ask for tasks


def test_allow_list_gains_the_package_prefix_once(tmp_path):
    (tmp_path / "resources.json.default").write_text(json.dumps({"format_version": 2, "x": 1}))
    path = allow_installed_package(tmp_path)
    allow_installed_package(tmp_path)
    resources = json.loads(path.read_text())
    assert path.name == "resources.json" and resources["x"] == 1
    assert resources["class_allow_list"].count(ALLOW_LIST_PREFIX) == 1
    assert "nvflare.app_common.workflows.fedavg.FedAvg" in resources["class_allow_list"]


# ---- simulator entry point -------------------------------------------------------------------


def test_build_context_is_private_to_each_thread_and_pickles_as_a_dict():
    import pickle
    import threading

    from fedcontrast.flare.simulator import ThreadBuildContext

    context = ThreadBuildContext({"client_name": None, "kit": "k"})
    started, sent = threading.Barrier(2), {}

    def start_worker(name: str) -> None:  # what do_one_task does, both threads at once
        context["client_name"] = name
        started.wait()
        sent[name] = pickle.loads(pickle.dumps(context))

    threads = [threading.Thread(target=start_worker, args=(n,)) for n in ("site-1", "site-2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sent == {s: {"client_name": s, "kit": "k"} for s in ("site-1", "site-2")}
    assert type(sent["site-1"]) is dict and context["client_name"] is None


def test_simulator_entry_point_installs_its_runner_patch(monkeypatch):
    from nvflare.private.fed.app.simulator.simulator_runner import SimulatorClientRunner

    from fedcontrast.flare import simulator

    monkeypatch.setattr(SimulatorClientRunner, "do_one_task", SimulatorClientRunner.do_one_task)
    simulator.install()
    runner = SimpleNamespace(build_ctx={"client_name": None})
    monkeypatch.setattr(simulator, "_nvflare_do_one_task", lambda self, client: self.build_ctx)
    context = SimulatorClientRunner.do_one_task(runner, "site-1")
    assert isinstance(context, simulator.ThreadBuildContext) and runner.build_ctx is context


def test_read_config_takes_a_json_string_longer_than_a_file_name():
    from fedcontrast.flare.jobs import read_config

    config = {"network": {"roi_size": [48, 48]}, "note": "x" * 300}
    assert read_config(json.dumps(config)) == config


def test_simulator_patch_refuses_an_nvflare_it_was_not_written_for():
    from fedcontrast.flare.simulator import check_patch_applies

    check_patch_applies()  # the installed NVFlare: the patch applies
    with pytest.raises(RuntimeError, match=r"patches NVFlare 2\.9\.x's .*NVFlare 2\.10\.0 is installed"):
        check_patch_applies(version="2.10.0")

    def do_one_task(self, client):  # a changed method: no shared build context written
        self.build_ctx = {"client_name": client.client_name}

    with pytest.raises(RuntimeError, match="no longer contains the line the simulator patch relies on"):
        check_patch_applies(version="2.9.0", method=do_one_task)
