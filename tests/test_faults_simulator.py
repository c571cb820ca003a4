"""Faults in the NVFlare simulator (one tiny FCL run, 2 sites, 2 rounds, ``--min-clients 1``):
a hostile extra entry is refused at its site and never reaches the server, a site that dies
is left out after the task timeout, and the job script still delivers the model and exits."""

import json
import time

import numpy as np
import pytest
from conftest import job_module

from fedcontrast.flare.executor import FAULT_ENV
from fedcontrast.nets.bundle import build_network, encoder_options, load_pretrained_encoder

pytestmark = pytest.mark.simulator

TASK_TIMEOUT = 90


def test_a_hostile_entry_and_a_dead_site_leave_the_run_going(
    site_splits, tiny_fcl_config, tmp_path, monkeypatch
):
    workspace, output = tmp_path / "ws", tmp_path / "out"
    monkeypatch.setenv(FAULT_ENV, "site-1:0:extra,site-2:1:die")
    start = time.monotonic()
    code = job_module("fcl").main(
        ["--datalist-dir", str(site_splits), "--rounds", "2", "--workspace", str(workspace),
         "--output", str(output), "--record-messages", "--min-clients", "1",
         "--task-timeout", str(TASK_TIMEOUT), "--config", json.dumps(tiny_fcl_config)]
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert code == 0
    result = workspace / "server" / "simulate_job"
    status = json.loads((result / "run_status.json").read_text())
    assert status["status"] == "finished"
    assert status["left_out"]["0"]["site-1"].startswith("failed (TASK_RESULT_FILTER_ERROR")
    assert status["left_out"]["1"]["site-2"] == f"silent (no answer within {TASK_TIMEOUT} s)"
    # the model of the sites that answered is delivered
    network = build_network(overrides=tiny_fcl_config["bundle"])
    assert load_pretrained_encoder(
        network, output / "pretrained_encoder.pt", encoder_options(overrides=tiny_fcl_config["bundle"])
    )

    # the extra entry was refused at site-1, named in its own log, and never left it
    assert "outbound policy: entry 'features/raw'" in (workspace / "site-1" / "log.txt").read_text()
    recorded = sorted(p.name for p in (result / "messages").glob("*_up.npz"))
    assert recorded == ["r0_site-2_up.npz", "r1_site-1_up.npz"]
    for path in (result / "messages").glob("*.npz"):
        with np.load(path) as message:
            assert not any(key.endswith("/raw") for key in message.files)
    assert "features/raw" not in (workspace / "server" / "log.txt").read_text()
    ledger = json.loads((output / "bytes.json").read_text())
    assert {(r["round"], r["site"]) for r in ledger["records"] if r["direction"] == "up"} == {
        (0, "site-2"),
        (1, "site-1"),
    }
    # the dead site cost one task timeout, then the script exited (no hang on the dead worker)
    assert elapsed < 300, elapsed
