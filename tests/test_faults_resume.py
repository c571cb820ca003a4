"""Resume: a run stopped after round 2 and resumed from its saved state ends with the weights of
a run that was never stopped (same seed, CPU), for a method with banks and a momentum encoder:
in process, and through ``jobs/fcl/job.py --resume`` in the NVFlare simulator (one simulator test:
three launches). A failed re-run or resume never loses the results to continue from."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import job_module

from fedcontrast.flare import jobs
from fedcontrast.flare.controller import ENCODER_FILE
from fedcontrast.flare.executor import FAULT_ENV, site_entries
from fedcontrast.methods.checkpoint import SERVER_STATE_FILE, load_server_state, site_state_path
from fedcontrast.methods.runner import run_in_process


def test_stop_after_round_2_and_resume_gives_the_uninterrupted_weights(
    phantom_images, tiny_fcl_config, tmp_path
):
    datalists, config = phantom_images(1), tiny_fcl_config
    whole = run_in_process("fcl", config, datalists, rounds=3)
    state = tmp_path / "state"
    run_in_process("fcl", config, datalists, rounds=2, state_dir=state)  # "killed" after round 2
    assert load_server_state(state / SERVER_STATE_FILE, "fcl")["next_round"] == 2
    assert site_state_path(state / "site-1", 2).is_file()
    resumed = run_in_process("fcl", config, datalists, rounds=3, state_dir=state, resume=True)
    assert [h["round"] for h in resumed.history] == [2, 2]
    assert resumed.global_message.keys() == whole.global_message.keys()
    for key, value in whole.global_message.items():
        np.testing.assert_array_equal(resumed.global_message[key], value, err_msg=key)
    with pytest.raises(ValueError, match="a state of 'fcl', not of 'fedsimclr'"):
        run_in_process("fedsimclr", config, datalists, rounds=3, state_dir=state, resume=True)


@pytest.mark.simulator
def test_a_simulator_run_stopped_after_round_2_resumes_to_the_uninterrupted_weights(
    site_splits, tiny_fcl_config, tmp_path, monkeypatch
):
    """``jobs/fcl/job.py``: nothing to resume is a clear error; a run stopped in round 2 keeps
    its state; a resume that fails leaves the stopped run's model and state as they were; the
    same command with ``--resume`` then ends with the weights of an uninterrupted run (the
    in-process one, which the simulator reproduces bit for bit: same seed, CPU, one thread)."""
    workspace = tmp_path / "ws"
    result = workspace / "server" / "simulate_job"
    argv = ["--datalist-dir", str(site_splits), "--rounds", "3", "--workspace", str(workspace),
            "--config", json.dumps(tiny_fcl_config)]  # fmt: skip
    main = job_module("fcl").main
    with pytest.raises(SystemExit, match=f"--resume: no {SERVER_STATE_FILE} in .*: no stopped run"):
        main([*argv, "--resume"])

    # "killed" after round 2: site-1 fails in round 2 (index 2, the third), the run stops
    monkeypatch.setenv(FAULT_ENV, "site-1:2:raise")
    assert main(argv) == 1
    assert load_server_state(result / SERVER_STATE_FILE, "fcl")["next_round"] == 2
    stopped = {name: (result / name).read_bytes() for name in (SERVER_STATE_FILE, ENCODER_FILE)}

    # a resume that fails again never deletes the stopped run's model, nor its state
    assert main([*argv, "--resume"]) == 1
    assert {name: (result / name).read_bytes() for name in stopped} == stopped

    monkeypatch.delenv(FAULT_ENV)
    assert main([*argv, "--resume"]) == 0
    final = load_server_state(result / SERVER_STATE_FILE, "fcl")
    assert final["next_round"] == 3
    resumed = final["strategy"].global_message
    # the sites joined at round 2 with the state they kept, not with fresh trainers
    for site in ("site-1", "site-2"):
        assert "joining at round 2: restored its state" in (workspace / site / "log.txt").read_text()

    config = json.loads(json.dumps({"local_epochs": 1, "seed": 0, "batch_size": 4, **tiny_fcl_config}))
    datalists = {
        site: site_entries(site, site_splits / f"{site}.json", ("training", "unlabeled"))
        for site in ("site-1", "site-2")
    }
    whole = run_in_process("fcl", config, datalists, rounds=3)
    assert resumed.keys() == whole.global_message.keys()
    for key, value in whole.global_message.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)


@pytest.mark.parametrize(
    ("resumed", "completed", "kept"),
    [(False, 3, "previous"), (True, 0, "previous"), (True, 3, "new")],
    ids=["re-run", "resume-failing-at-once", "resume-failing-later"],
)
def test_a_failed_run_keeps_the_previous_results_unless_it_resumed_them_further(
    resumed, completed, kept, tmp_path, monkeypatch
):
    """A failed re-run puts the previous run's results back; a failed ``--resume`` that completed
    rounds of its own keeps its state (the sites kept theirs for it, not for the stopped run's)."""
    workspace = tmp_path / "ws"
    result = workspace / "server" / "simulate_job"
    result.mkdir(parents=True)
    (result / ENCODER_FILE).write_text("previous")
    (result / SERVER_STATE_FILE).write_text("previous")

    def failing_run(command, status_file, grace_s, env):  # the simulator: `completed` rounds, then a stop
        status_file.parent.mkdir(parents=True, exist_ok=True)
        if completed:
            (status_file.parent / ENCODER_FILE).write_text("new")
            (status_file.parent / SERVER_STATE_FILE).write_text("new")
        return 0, {"status": "aborted", "reason": f"round {completed}: site-1 failed"}

    monkeypatch.setattr(jobs, "export_job", lambda job, root: Path(root))
    monkeypatch.setattr(jobs, "run_process_group", failing_run)
    with pytest.raises(RuntimeError, match=f"the run stopped: round {completed}: site-1 failed") as error:
        jobs.run_simulator(None, workspace, 2, resumed=resumed)
    assert (result / ENCODER_FILE).read_text() == kept
    assert (result / SERVER_STATE_FILE).read_text() == kept
    if kept == "new":
        assert f"--resume continues from the state in {result}" in str(error.value)
        assert (jobs.previous_results(result) / ENCODER_FILE).read_text() == "previous"
    else:
        assert f"the previous run's results are back in {result}" in str(error.value)
