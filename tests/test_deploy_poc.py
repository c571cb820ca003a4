"""A provisioned deployment on this machine: real server and site processes, mutual TLS on loopback.

One deployment (2 sites, tiny phantom) serves the module; it runs the exported FCL job
as every hospital would, then the same job with one site pointing at a datalist that
does not exist, then a 3-round job whose site-2 is killed (its client and job processes,
as when a hospital's machine dies) during round 1, with and without ``--min-clients 1``;
site-2 is started again after each kill. Every process it started is gone when the module ends.
"""

import ipaddress
import json
import re
import threading
import time
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from nvflare.apis.workspace import Workspace
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer

from fedcontrast.data.splits import site_names
from fedcontrast.deploy.admin import COMPONENTS_DIR, WORKSPACE_DIR, export_job, run_job
from fedcontrast.deploy.builder import OUTCOME_WAIT_LINE
from fedcontrast.deploy.poc import (
    LOCALHOST,
    LocalDeployment,
    provision_local,
    site_datalists,
)
from fedcontrast.deploy.site import write_site_config
from fedcontrast.nets.bundle import build_network, encoder_options, load_pretrained_encoder

pytestmark = pytest.mark.poc

SITES = site_names(2)
JOB_TIMEOUT = 240.0
#: The killed site's wait: a round without an answer ends after this many seconds.
TASK_TIMEOUT = 20
#: Round 0 pays each site's start-up (slow on a loaded 2-core machine).
FIRST_ROUND_TIMEOUT = 180


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants (job processes run in sessions of their own)."""
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def poc(tmp_path_factory, site_splits, tiny_fcl_config):
    """Kits provisioned from deploy/project.yml, each site pointing at its own datalist, all processes up."""
    root = tmp_path_factory.mktemp("poc")
    job_dir = export_job(
        "fcl", root / "job", len(SITES), ["--rounds", "2", "--config", json.dumps(tiny_fcl_config)]
    )
    prod_dir, project = provision_local(root, site_datalists(site_splits, SITES))
    deployment = LocalDeployment(prod_dir, project)
    try:
        deployment.start()
        yield SimpleNamespace(root=root, splits=site_splits, job_dir=job_dir, deployment=deployment)
    finally:
        started = [member for p in deployment.processes.values() for member in tree(p.pid)]
        deployment.stop()
        assert not [p.pid for p in started if alive(p)]


def run(poc, results: str, job_dir: Path | None = None):
    with closing(poc.deployment.session()) as session:
        return run_job(
            session, job_dir or poc.job_dir, poc.root / results, timeout=JOB_TIMEOUT, poll_interval=1.0
        )


def site_job_log(poc, site: str, job_id: str) -> str:
    """The site's own log of one job, in its workspace (which the admin cannot see)."""
    return (poc.deployment.kit(site) / job_id / "log.txt").read_text()


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_kits_listen_on_loopback_only_and_allow_fedcontrast(poc):
    deployment = poc.deployment
    for participant, process in deployment.processes.items():
        listening = [
            c.laddr.ip for c in psutil.Process(process.pid).net_connections() if c.status == "LISTEN"
        ]
        assert listening and all(map(is_loopback, listening)), (participant, listening)
    # the server does not wait NVFlare's 15 min for a dead site's job outcome
    assert OUTCOME_WAIT_LINE in (deployment.kit(LOCALHOST) / "startup" / "sub_start.sh").read_text()
    authorizer = ComponentPathAuthorizer()
    for participant in [LOCALHOST, *SITES]:
        workspace = Workspace(str(deployment.kit(participant)), participant)
        for path in (
            "fedcontrast.flare.executor.MethodExecutor",
            "nvflare.app_common.workflows.fedavg.FedAvg",
        ):
            authorizer.authorize_component_config({"path": path}, workspace=workspace)  # raises if refused


def test_exported_fcl_job_runs_on_provisioned_sites(poc, tiny_fcl_config):
    outcome = run(poc, "results")
    assert outcome.completed, outcome.reports
    assert [(r.name, r.status) for r in outcome.reports] == [
        ("server", "ok"),
        ("site-1", "ok"),
        ("site-2", "ok"),
    ]

    result = outcome.result_dir / WORKSPACE_DIR
    assert outcome.result_dir.parent == poc.root / "results"
    network = build_network(overrides=tiny_fcl_config["bundle"])
    assert load_pretrained_encoder(
        network, result / "pretrained_encoder.pt", encoder_options(overrides=tiny_fcl_config["bundle"])
    )
    ledger = json.loads((result / "bytes.json").read_text())
    assert {(r["round"], r["site"], r["direction"]) for r in ledger["records"]} == {
        (r, s, d) for r in (0, 1) for s in SITES for d in ("down", "up")
    }
    assert ledger["totals"]["up"]["weights"] > 0 and ledger["totals"]["up"]["features"] > 0
    metrics = json.loads((result / "metrics.json").read_text())["records"]
    assert {(m["round"], m["site"]) for m in metrics if m["site"] in SITES} == {
        (r, s) for r in (0, 1) for s in SITES
    }
    for site in SITES:  # each site read the datalist its own workspace names
        config = poc.deployment.kit(site) / "local" / "fedcontrast.json"
        assert f"{site}: datalist {poc.splits.resolve() / site}.json (from {config})" in site_job_log(
            poc, site, outcome.job_id
        )


def test_a_site_without_its_data_is_named_in_the_report_and_its_path_stays_at_the_site(poc, tmp_path):
    # a path that holds a patient's name: it may be in the site's own log, nowhere on the server
    name = "Jane_Doe_1970-01-01"
    missing = tmp_path / name / "site-2.json"
    write_site_config(poc.deployment.kit("site-2"), missing)
    try:
        outcome = run(poc, "results-misconfigured")
    finally:
        write_site_config(poc.deployment.kit("site-2"), poc.splits / "site-2.json")

    assert not outcome.completed
    reports = {r.name: r for r in outcome.reports}
    summary = "site-2: round 0: cannot set up the method on its data (ValueError)"
    assert reports["site-2"].status == "failed" and reports["site-2"].detail.startswith(summary)
    assert reports["site-1"].status != "failed" and reports["server"].status != "failed"
    assert f"site-2: cannot use its datalist: {missing}: site datalist not found" in site_job_log(
        poc, "site-2", outcome.job_id
    )
    assert summary in (outcome.result_dir / COMPONENTS_DIR / "ERRORLOG_site-2").read_text()
    # nothing the admin downloaded, nothing in the server's workspace or job store, holds the name
    server = poc.deployment.kit(LOCALHOST)
    server_files = [
        *outcome.result_dir.rglob("*"),
        *server.rglob("*"),
        *(server.parent / "server-storage").rglob("*"),
    ]
    assert not [p for p in server_files if p.is_file() and name.encode() in p.read_bytes()]
    assert name not in "\n".join(str(r) for r in outcome.reports)


def fault_job(poc, config: dict, name: str, *options: str) -> Path:
    """The FCL job for 3 rounds with a task timeout (and ``options``), exported to ``root/name``."""
    args = ["--rounds", "3", "--task-timeout", str(TASK_TIMEOUT)]
    args += ["--first-round-timeout", str(FIRST_ROUND_TIMEOUT), "--config", json.dumps(config), *options]
    return export_job("fcl", poc.root / name, len(SITES), args)


class KillInRound:
    """Kill ``site`` once its new job's log shows it started its task of round ``round_num``
    (NVFlare's "invoking task executor", once per round), in a thread; ``killed_at`` is then
    ``time.monotonic()``, and the site is started again (:meth:`restart`) after the job."""

    INVOKING = re.compile(r" - ClientRunner - INFO - .* - invoking task executor")

    def __init__(
        self, deployment: LocalDeployment, site: str, round_num: int = 1, timeout: float = JOB_TIMEOUT
    ):
        self.deployment, self.site, self.round_num, self.timeout = deployment, site, round_num, timeout
        self.kit = deployment.kit(site)
        self.before = set(self.kit.iterdir())
        self.killed_at: float | None = None
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def tasks_started(self) -> int:
        logs = [p / "log.txt" for p in set(self.kit.iterdir()) - self.before if (p / "log.txt").is_file()]
        return max((len(self.INVOKING.findall(p.read_text(errors="replace"))) for p in logs), default=0)

    def watch(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.tasks_started() > self.round_num:
                self.deployment.kill(self.site)
                self.killed_at = time.monotonic()
                return
            time.sleep(0.2)

    def restart(self) -> None:
        self.thread.join()
        if self.killed_at is not None:
            self.deployment.restart(self.site)


def run_status(outcome) -> dict:
    return json.loads((outcome.result_dir / WORKSPACE_DIR / "run_status.json").read_text())


def test_a_site_killed_mid_run_is_left_out_with_min_clients_1_and_the_model_is_delivered(
    poc, tiny_fcl_config
):
    job_dir = fault_job(poc, tiny_fcl_config, "job-min1", "--min-clients", "1")
    killer = KillInRound(poc.deployment, "site-2")
    try:
        outcome = run(poc, "results-min1", job_dir)
    finally:
        killer.restart()
    assert killer.killed_at is not None, "site-2 never started round 1"

    assert outcome.completed, outcome.reports
    silent = f"silent (no answer within {TASK_TIMEOUT} s)"
    status = run_status(outcome)
    assert status["status"] == "finished" and status["left_out"] == {"1": {"site-2": silent}}
    reports = {r.name: r for r in outcome.reports}
    assert (reports["site-2"].status, reports["site-2"].detail) == ("left out", f"round 1: {silent}")
    assert reports["site-1"].status == "ok" and reports["server"].status == "ok"
    # rounds 1 and 2 were aggregated over site-1 alone; the model it delivered loads
    result = outcome.result_dir / WORKSPACE_DIR
    metrics = json.loads((result / "metrics.json").read_text())["records"]
    assert {(m["round"], m["site"]) for m in metrics if m["site"] in SITES} == {
        (0, "site-1"), (0, "site-2"), (1, "site-1"), (2, "site-1")
    }  # fmt: skip
    network = build_network(overrides=tiny_fcl_config["bundle"])
    assert load_pretrained_encoder(
        network, result / "pretrained_encoder.pt", encoder_options(overrides=tiny_fcl_config["bundle"])
    )


def test_a_site_killed_mid_run_ends_the_run_within_the_task_timeout_naming_it(poc, tiny_fcl_config):
    job_dir = fault_job(poc, tiny_fcl_config, "job-all")
    killer = KillInRound(poc.deployment, "site-2")
    try:
        outcome = run(poc, "results-all", job_dir)
        ended_after = time.monotonic() - (killer.killed_at or time.monotonic())
    finally:
        killer.restart()
    assert killer.killed_at is not None, "site-2 never started round 1"

    # the job ended one task timeout after the kill, plus NVFlare's wind-down and the downloads
    assert not outcome.completed and ended_after < TASK_TIMEOUT + 60, ended_after
    silent = f"silent (no answer within {TASK_TIMEOUT} s)"
    reason = f"round 1: 1 of 2 site(s) answered, 2 needed; left out: site-2: {silent}"
    reports = {r.name: r for r in outcome.reports}
    assert (reports["server"].status, reports["server"].detail) == ("stopped", reason)
    assert (reports["site-2"].status, reports["site-2"].detail) == ("left out", f"round 1: {silent}")
    assert reports["site-1"].status == "stopped"
    # the last good global model (after round 0) is delivered with the stopped run
    status = run_status(outcome)
    assert status["status"] == "aborted" and status["reason"] == reason and status["model_round"] == 0
    result = outcome.result_dir / WORKSPACE_DIR
    network = build_network(overrides=tiny_fcl_config["bundle"])
    assert load_pretrained_encoder(
        network, result / "pretrained_encoder.pt", encoder_options(overrides=tiny_fcl_config["bundle"])
    )
