"""Faults without a simulator: finite-value guards, the outbound schema and the site's policy
filter, the server's sorting of a round's updates, the redacted error log, fault injection,
the privacy policy NVFlare reads, and the simulator launcher's process-group handling."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_reply
from nvflare.apis.workspace import Workspace
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.private.fed.app.fl_conf import create_privacy_manager

from fedcontrast.flare.controller import sort_updates
from fedcontrast.flare.executor import FAULT_ENV, corrupt, injected_fault
from fedcontrast.flare.filters import OUTBOUND_SCHEMA_PROP, OutboundPolicyFilter
from fedcontrast.flare.log_privacy import SAFE, RedactingFormatter
from fedcontrast.flare.messages import update_to_flmodel
from fedcontrast.flare.process_group import run_process_group
from fedcontrast.flare.site_config import privacy_policy, write_privacy_policy
from fedcontrast.methods.base import NonFiniteError, SiteTrainer, SiteUpdate
from fedcontrast.methods.fcl import FCLTrainer
from fedcontrast.methods.outbound import OutboundPolicyError, OutboundSchema
from fedcontrast.methods.volumes import load_volumes
from fedcontrast.nets.presets import network_preset

TINY = {"bundle": network_preset("tiny"), "head_hidden": 8, "embedding_dim": 16}


# ---- finite values in the trainers ----------------------------------------------------------


class ToyTrainer(SiteTrainer):
    """Uploads what the test asks for: ``config["upload"]`` and ``config["loss"]``."""

    @classmethod
    def initial_message(cls, config):
        return {"weights/w": np.zeros(3, dtype=np.float32)}

    def local_round(self, incoming, round_num):
        return SiteUpdate(
            {"weights/w": self.config["upload"]}, 1, {"loss": self.config["loss"], "val_dice": np.nan}
        )

    def encoder_state_dict(self):
        return {}


def test_every_trainer_refuses_non_finite_messages_and_losses():
    good = np.ones(3, dtype=np.float32)
    trainer = ToyTrainer({"upload": good, "loss": 0.5}, [], "site-2")
    assert trainer.local_round({"weights/w": good}, 4).metrics["loss"] == 0.5  # a NaN Dice is allowed
    with pytest.raises(
        NonFiniteError, match=r"site-2: round 4: the message received .* 'weights/w' \(1 value"
    ):
        trainer.local_round({"weights/w": np.array([1.0, np.inf, 0.0], dtype=np.float32)}, 4)
    with pytest.raises(NonFiniteError, match=r"site-2: round 1: the loss diverged .*\['loss'\]"):
        ToyTrainer({"upload": good, "loss": float("nan")}, [], "site-2").local_round({}, 1)
    with pytest.raises(NonFiniteError, match=r"site-2: round 0: the upload: .*'weights/w' \(3 value"):
        ToyTrainer({"upload": good * np.nan, "loss": 0.1}, [], "site-2").local_round({}, 0)


def test_pretraining_volumes_with_nan_are_refused_naming_the_file(phantom_images, tmp_path):
    source = phantom_images(1)["site-1"][0]["image"]
    img = nib.load(source)
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[0, 0, 0] = np.nan
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), bad)
    with pytest.raises(ValueError, match=f"{bad}: NaN or Inf voxels"):
        load_volumes([{"image": source}, {"image": str(bad)}], overrides={"roi_size": [32, 32]})


# ---- the outbound schema and the site's policy filter -----------------------------------------


@pytest.fixture(scope="module")
def fcl():
    """FCL's tiny schema (16-d features, K=2 per partition, S=4) and a valid upload."""
    config = {**TINY, "features_per_partition": 2, "partitions": 4}
    schema = FCLTrainer.outbound_schema(config)
    upload = {
        **FCLTrainer.initial_message(config),
        "features/embeddings": np.ones((8, 16), dtype=np.float32),
        "features/partitions": np.repeat(np.arange(4), 2).astype(np.int64),
        "stats/steps": np.int64(3),
    }
    return schema, upload


def test_schema_is_derived_from_the_method(fcl):
    schema, upload = fcl
    assert (schema.feature_width, schema.features_per_partition, schema.partitions) == (16, 2, 4)
    assert all(k.startswith(("weights/encoder.", "weights/head.")) for k in schema.entries)
    schema.check(upload)
    assert FCLTrainer.outbound_schema({**TINY, "features_per_partition": 0}).feature_width == 0


@pytest.mark.parametrize(
    "change, pattern",
    [
        (
            {"features/raw": np.zeros((16, 16), np.float32)},
            "'features/raw' is not in the method's outbound schema",
        ),
        ({"images/x": np.zeros(2)}, "'images/x': unknown kind"),
        ({"stats/hist": np.zeros(5)}, r"'stats/hist' \(float64 \(5,\)\) is not in"),
        (
            {"features/embeddings": np.ones((8, 32), np.float32)},
            r"float32 \(8, 32\), the method sends float32 \(n, 16\)",
        ),
        (
            {"features/partitions": np.zeros(8, np.int64)},
            "8 rows in one partition, the method sends at most 2",
        ),
        ({"features/embeddings": np.ones((8, 16), np.float64)}, "float64"),
        ({"weights/encoder.extra": np.zeros(3, np.float32)}, "'weights/encoder.extra'"),
        ({"features/embeddings": np.full((8, 16), np.nan, np.float32)}, "128 non-finite value"),
    ],
)
def test_schema_refuses_anything_undeclared_naming_the_entry(fcl, change, pattern):
    schema, upload = fcl
    with pytest.raises(OutboundPolicyError, match=pattern):
        schema.check({**upload, **change})


def test_schema_refuses_a_weight_of_another_shape(fcl):
    schema, upload = fcl
    key = next(k for k in upload if k.startswith("weights/"))
    with pytest.raises(OutboundPolicyError, match=rf"entry '{key}': float32 \(1,\), the method declares"):
        schema.check({**upload, key: np.zeros(1, np.float32)})


def site_ctx(schema: OutboundSchema | None) -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=False)
    if schema is not None:
        fl_ctx.set_prop(OUTBOUND_SCHEMA_PROP, schema, private=True, sticky=False)
    return fl_ctx


def result(message: dict, round_num: int = 2):
    return FLModelUtils.to_shareable(update_to_flmodel(SiteUpdate(message, 4, {"loss": 0.1}), round_num))


def test_policy_filter_lets_only_declared_results_leave(fcl):
    schema, upload = fcl
    policy = OutboundPolicyFilter()
    assert policy.process(result(upload), site_ctx(schema)) is not None
    hostile = corrupt(SiteUpdate(upload, 4), "extra").message
    with pytest.raises(
        OutboundPolicyError, match=r"site-1: round 2: outbound policy: entry 'features/raw' .*not sent"
    ):
        policy.process(result(hostile), site_ctx(schema))
    with pytest.raises(OutboundPolicyError, match="carries no declared schema"):
        policy.process(result(upload), site_ctx(None))
    failed = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert policy.process(failed, site_ctx(None)) is failed  # an error reply carries nothing
    # the hospital's own settings narrow what the method declares
    with pytest.raises(OutboundPolicyError, match="this method sends no features"):
        OutboundPolicyFilter(allow_features=False).process(result(upload), site_ctx(schema))
    with pytest.raises(OutboundPolicyError, match="2 rows in one partition, the method sends at most 1"):
        OutboundPolicyFilter(max_features_per_partition=1).process(result(upload), site_ctx(schema))


def test_the_site_privacy_policy_is_what_nvflare_loads(tmp_path):
    local = tmp_path / "local"
    assert write_privacy_policy(local, feature_clip=1.0, feature_noise=0.1) == local / "privacy.json"
    assert write_privacy_policy(local) is None  # a site's own policy is kept
    (tmp_path / "startup").mkdir()
    manager = create_privacy_manager(Workspace(str(tmp_path), "site-1"), names_only=False)
    scope = manager.get_scope("")  # what a job without a scope gets: the default
    names = [type(f).__name__ for f in scope.task_result_filters["out"]]
    assert names == ["FeaturePrivacyFilter", "OutboundPolicyFilter"] and not scope.task_result_filters["in"]
    assert [f["path"].rsplit(".", 1)[1] for f in privacy_policy()["scopes"][0]["task_result_filters"]] == [
        "OutboundPolicyFilter"
    ]


# ---- the server's view of a round -------------------------------------------------------------


def test_a_round_goes_on_without_failed_silent_or_refused_sites_when_enough_answered(fcl):
    schema, upload = fcl
    good = SiteUpdate(upload, 4)
    nan = corrupt(good, "nan")
    received = {"site-1": good, "site-3": nan, "site-4": good}
    failed = {"site-4": "EXECUTION_EXCEPTION"}
    sites = ["site-1", "site-2", "site-3", "site-4"]
    updates, left_out, reason = sort_updates(sites, received, failed, schema, 1, True, "within 9 s")
    assert list(updates) == ["site-1"] and not reason
    assert left_out["site-2"] == "silent (no answer within 9 s)"
    assert (
        left_out["site-3"].startswith("update refused: entry 'weights/")
        and "non-finite" in left_out["site-3"]
    )
    assert left_out["site-4"].startswith("failed (EXECUTION_EXCEPTION")
    # by default a refused update stops the run, naming the site; so does a round short of sites
    _, _, reason = sort_updates(sites, received, failed, schema, 1, False)
    assert reason.startswith("site-3: update refused: entry 'weights/")
    _, _, reason = sort_updates(sites, received, failed, schema, 0, True)
    assert reason.startswith("1 of 4 site(s) answered, 4 needed; left out: site-2: silent")
    assert sort_updates(sites[:1], received, {}, schema)[0] == {"site-1": good}


# ---- what leaves in logs -----------------------------------------------------------------------


def test_error_log_keeps_nvflare_and_safe_records_and_withholds_the_rest(tmp_path):
    path = tmp_path / "error_log.txt"
    handler = logging.FileHandler(path)
    handler.setFormatter(RedactingFormatter(logging.Formatter("%(name)s - %(levelname)s - %(message)s")))
    logger = logging.getLogger("ignite.engine.engine.SupervisedTrainer")
    logger.addHandler(handler)
    try:
        try:
            raise FileNotFoundError("/data/Jane_Doe_1970-01-01/scan.nii.gz")
        except FileNotFoundError:
            logger.exception("Engine run is terminating due to exception: /data/Jane_Doe_1970-01-01")
        logger.error("site-1: round 0: training failed (FileNotFoundError)", extra=SAFE)
        logging.getLogger("nvflare.private.fed.client").addHandler(handler)
        logging.getLogger("nvflare.private.fed.client").error("Processing error in Task Result Filter")
    finally:
        logger.removeHandler(handler)
        logging.getLogger("nvflare.private.fed.client").removeHandler(handler)
    text = path.read_text()
    assert "Jane_Doe" not in text
    assert "withheld: see the site's local log.txt" in text
    assert "site-1: round 0: training failed (FileNotFoundError)" in text
    assert "Processing error in Task Result Filter" in text


# ---- fault injection ----------------------------------------------------------------------------


def test_fault_injection_is_read_from_the_environment():
    environ = {FAULT_ENV: "site-2:1:die, site-1:0:extra"}
    assert injected_fault("site-2", 1, environ) == "die"
    assert injected_fault("site-1", 0, environ) == "extra"
    assert injected_fault("site-1", 1, environ) is None and injected_fault("site-1", 0, {}) is None
    with pytest.raises(ValueError, match="unknown fault 'boom'"):
        injected_fault("site-1", 0, {FAULT_ENV: "site-1:0:boom"})
    with pytest.raises(ValueError, match="is not <site>:<round>:<fault>"):
        injected_fault("site-1", 0, {FAULT_ENV: "site-1"})


# ---- the simulator launcher ends its process group ------------------------------------------------

#: A stand-in for the simulator: starts a worker in a session of its own (as NVFlare's simulator
#: does) that ignores SIGTERM, reports the run over (or not), hangs.
STUBBORN = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
        start_new_session=True)
    open(sys.argv[1] + ".pids", "w").write(f"{os.getpid()} {child.pid}")
    if sys.argv[2] == "over":
        json.dump({"status": "finished", "round": 1}, open(sys.argv[1], "w"))
    time.sleep(600)
    """
)


def gone(pids: list[int], timeout: float = 10.0) -> bool:
    """Whether every process of ``pids`` has exited (a zombie counts: this container's init may not reap)."""

    def dead(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + timeout
    while not all(dead(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def wait_for(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_a_finished_run_ends_a_simulator_that_hangs(tmp_path):
    status = tmp_path / "run_status.json"
    start = time.monotonic()
    code, content = run_process_group([sys.executable, "-c", STUBBORN, str(status), "over"], status, 1.0)
    assert content == {"status": "finished", "round": 1} and code != 0
    assert time.monotonic() - start < 20
    assert gone([int(p) for p in wait_for(Path(f"{status}.pids")).split()])


def test_sigterm_to_the_job_script_leaves_no_process_behind(tmp_path):
    status = tmp_path / "run_status.json"
    script = tmp_path / "job.py"  # what jobs/*/job.py does: run_process_group in its main thread
    command = [sys.executable, "-c", STUBBORN, str(status), "running"]
    script.write_text(  # the module imports no torch or NVFlare: the script starts in about a second
        "from pathlib import Path\nfrom fedcontrast.flare.process_group import run_process_group\n"
        f"run_process_group({command!r}, Path({str(status)!r}), 60)\n"
    )
    job = subprocess.Popen([sys.executable, str(script)], env={**os.environ})
    try:
        # signalled as soon as the worker exists (a loaded 2-core machine may still take a while)
        pids = [int(p) for p in wait_for(Path(f"{status}.pids"), timeout=120).split()]
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == 128 + signal.SIGTERM
        assert gone(pids)
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGTERM)  # it ends its own group on the way out
            job.wait(timeout=60)
