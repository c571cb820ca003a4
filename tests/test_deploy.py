"""``fedcontrast deploy`` without starting anything: project file, site settings, job folders, reports."""

import json
from pathlib import Path

import pytest

from fedcontrast.cli import main, parse_args
from fedcontrast.data.splits import site_names
from fedcontrast.demo import prepare_data
from fedcontrast.deploy.admin import (
    COMPONENTS_DIR,
    WORKSPACE_DIR,
    job_folder,
    log_messages,
    participant_reports,
)
from fedcontrast.deploy.builder import OUTCOME_WAIT_ENV, OUTCOME_WAIT_LINE, bound_outcome_wait
from fedcontrast.deploy.cli import admin_user, job_options
from fedcontrast.deploy.poc import (
    INHERITED_DATALIST,
    LOCAL_OUTCOME_WAIT_S,
    LocalDeployment,
    free_ports,
    site_datalists,
    site_environment,
)
from fedcontrast.deploy.project import (
    admin_name,
    load_project,
    names,
    server_name,
    with_server,
    with_sites,
    write_project,
)
from fedcontrast.deploy.site import allows_package, configure_site
from fedcontrast.flare.site_config import ALLOW_LIST_PREFIX

BUILDER = "fedcontrast.deploy.builder.InstalledPackageBuilder"


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Path:
    """Site datalists of a 2-site phantom: 1 labelled, 5 unlabelled, 2 test volumes each."""
    return prepare_data(tmp_path_factory.mktemp("deploy-units"), sites=2, patients_per_site=4, seed=0)


def log_line(logger: str, level: str, message: str, context: str = "[identity=site-2, run=j1]") -> str:
    """A record as NVFlare writes it in log.txt and error_log.txt."""
    return (
        f"2026-01-01 10:00:00,000 - {logger} - {level} - "
        + (f"{context} - " if context else "")
        + f"{message}\n"
    )


# ---- project file ----------------------------------------------------------------------------


def test_project_file_has_a_server_an_admin_sites_and_the_package_builder():
    project = load_project()
    assert server_name(project) == "fl-server.example.org"
    assert admin_name(project) == "admin@example.org"
    assert names(project, "client") == ["site-1", "site-2", "site-3"]
    builders = [b["path"] for b in project["builders"]]
    # the builder edits the default policy that StaticFileBuilder writes
    assert builders.index(BUILDER) > builders.index("nvflare.lighter.impl.static_file.StaticFileBuilder")


def test_sites_and_server_are_replaced_in_a_copy():
    project = load_project()
    local = with_server(with_sites(project, site_names(2)), "localhost", 4001, 4002)
    assert names(local, "client") == ["site-1", "site-2"]
    assert [p["org"] for p in local["participants"] if p["type"] == "client"] == ["site_1", "site_2"]
    server = next(p for p in local["participants"] if p["type"] == "server")
    assert (server["name"], server["fed_learn_port"], server["admin_port"]) == ("localhost", 4001, 4002)
    assert admin_name(local) == admin_name(project) and names(project, "client") == site_names(3)


def test_bad_project_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="project file not found"):
        load_project(tmp_path / "missing.yml")
    project = load_project()
    project["participants"] = [p for p in project["participants"] if p["type"] != "admin"]
    with pytest.raises(ValueError, match="project_admin"):
        load_project(write_project(project, tmp_path / "no-admin.yml"))
    with pytest.raises(ValueError, match="at least one site"):
        site_names(0)


# ---- a site's own settings -------------------------------------------------------------------


def test_configure_site_points_at_its_datalist_and_allows_the_package(splits, tmp_path):
    kit = tmp_path / "site-1"
    (kit / "local").mkdir(parents=True)
    # a kit provisioned without the package builder: NVFlare's default policy only
    (kit / "local" / "resources.json.default").write_text(json.dumps({"format_version": 2}))
    assert not allows_package(kit)

    lines = configure_site(kit, splits / "site-1.json")
    assert "1 labelled, 5 unlabelled and 2 test volume(s)" in lines[0]
    config = json.loads((kit / "local" / "fedcontrast.json").read_text())
    assert config == {"datalist": str((splits / "site-1.json").resolve())}
    assert allows_package(kit)
    assert ALLOW_LIST_PREFIX in json.loads((kit / "local" / "resources.json").read_text())["class_allow_list"]
    assert len(configure_site(kit, splits / "site-1.json")) == 2  # the policy is not written twice


def test_configure_site_refuses_a_missing_datalist(tmp_path):
    with pytest.raises(ValueError, match="site datalist not found"):
        configure_site(tmp_path / "kit", tmp_path / "nowhere" / "site-1.json")
    assert not (tmp_path / "kit" / "local" / "fedcontrast.json").exists()


def test_site_datalists_are_found_by_site_name(splits):
    assert site_datalists(splits, ["site-1", "site-2"])["site-2"] == (splits / "site-2.json").resolve()
    with pytest.raises(ValueError, match=r"site-3\.json"):
        site_datalists(splits, site_names(3))


def test_local_processes_get_this_python_and_no_inherited_datalist(monkeypatch):
    monkeypatch.setenv(INHERITED_DATALIST, "/data/one-for-all.json")
    env = site_environment(num_sites=3)
    assert INHERITED_DATALIST not in env
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert env[OUTCOME_WAIT_ENV] == str(LOCAL_OUTCOME_WAIT_S)
    ports = free_ports(2)
    assert len(set(ports)) == 2 and all(1024 <= p < 65536 for p in ports)


def test_a_start_that_fails_says_why_and_leaves_no_process(tmp_path):
    """Kits whose server exits at once (e.g. its port is taken) and whose sites would run on."""
    scripts = {"localhost": "echo 'bind: address already in use'; exit 3", "site-1": "exec sleep 120"}
    for participant, body in scripts.items():
        script = tmp_path / participant / "startup" / "sub_start.sh"
        script.parent.mkdir(parents=True)
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    project = {"participants": [
        {"name": "localhost", "type": "server"}, {"name": "site-1", "type": "client"},
        {"name": "admin@example.org", "type": "admin", "role": "project_admin"},
    ]}  # fmt: skip
    deployment = LocalDeployment(tmp_path, project, say=lambda line: None)
    with (
        pytest.raises(RuntimeError, match=r"(?s)localhost exited with code 3.*address already in use"),
        deployment,
    ):
        deployment.start(timeout=30)
    assert deployment.processes["site-1"].poll() is not None  # stopped on the way out


# ---- jobs and reports ------------------------------------------------------------------------


def test_job_folders_and_job_names(tmp_path):
    exported = tmp_path / "fcl"
    exported.mkdir()
    (exported / "meta.json").write_text("{}")
    assert job_folder(str(exported), tmp_path / "out", 2) == exported.resolve()
    with pytest.raises(ValueError, match="cannot apply"):
        job_folder(str(exported), tmp_path / "out", 2, ["--rounds", "2"])
    with pytest.raises(ValueError, match=r"known jobs.*fcl"):
        job_folder("no-such-job", tmp_path / "out", 2)


def test_cli_passes_options_after_dashes_to_the_job_script():
    args = parse_args(["deploy", "poc", "--sites", "2", "--", "--rounds", "1", "--local"])
    assert (args.sites, args.job, args.job_args) == (2, "fcl", ["--rounds", "1", "--local"])
    args = parse_args(["deploy", "poc", "--rounds", "3", "--", "--local"])
    assert job_options(args) == ["--rounds", "3", "--local"]
    args = parse_args(["job", "export", "fcl", "--out", "x", "--rounds", "2", "--", "--config", "{}"])
    assert (args.job, args.out, job_options(args)) == ("fcl", Path("x"), ["--rounds", "2", "--config", "{}"])
    with pytest.raises(SystemExit):
        parse_args(["bench", "--quick", "--", "--rounds", "1"])


def test_job_export_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("a hospital's file")
    assert main(["job", "export", "fcl", "--out", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").is_file()


def test_admin_user_comes_from_the_admin_kit(tmp_path):
    (tmp_path / "startup").mkdir()
    (tmp_path / "startup" / "fed_admin.json").write_text(json.dumps({"admin": {"username": "a@b.org"}}))
    assert admin_user(tmp_path) == "a@b.org"
    with pytest.raises(ValueError, match="not an admin startup kit"):
        admin_user(tmp_path / "startup")


def test_log_messages_by_level_and_logger():
    text = log_line("MethodExecutor", "ERROR", "site-2: boom") + log_line("ServerRunner", "INFO", "ok", "")
    text += "Traceback (most recent call last):\n"
    assert log_messages(text) == ["site-2: boom", "ok"]
    assert log_messages(text, "ERROR") == ["site-2: boom"]
    assert log_messages(text, "INFO", "ServerRunner") == ["ok"]


def write_result(
    root: Path,
    server_log: str = "",
    server_errors: str = "",
    site_errors: dict | None = None,
    run_status: dict | None = None,
) -> Path:
    (root / WORKSPACE_DIR).mkdir(parents=True)
    if run_status is not None:
        (root / WORKSPACE_DIR / "run_status.json").write_text(json.dumps(run_status))
    (root / WORKSPACE_DIR / "log.txt").write_text(server_log)
    (root / WORKSPACE_DIR / "error_log.txt").write_text(server_errors)
    for site, text in (site_errors or {}).items():
        (root / COMPONENTS_DIR).mkdir(exist_ok=True)
        (root / COMPONENTS_DIR / f"ERRORLOG_{site}").write_text(text)
    return root


def meta(status: str, **deploy: str) -> dict:
    detail = {"server": "OK", "site-1": "OK", "site-2": "OK", **deploy}
    return {"status": status, "job_deploy_detail": [f"{k}: {v}" for k, v in detail.items()]}


def statuses(reports) -> dict[str, tuple[str, str]]:
    return {r.name: (r.status, r.detail) for r in reports}


def test_reports_of_a_completed_job(tmp_path):
    result = write_result(tmp_path, site_errors={"site-1": log_line("X", "ERROR", "recovered")})
    assert statuses(participant_reports(result, meta("FINISHED:COMPLETED"))) == {
        "server": ("ok", ""), "site-1": ("ok", ""), "site-2": ("ok", "")
    }  # fmt: skip


def test_reports_name_the_site_that_failed(tmp_path):
    bad = "Aborting current RUN due to FATAL_SYSTEM_ERROR received: Result from site-2 is bad, error code: X."
    result = write_result(
        tmp_path,
        server_log=log_line("ServerRunner", "ERROR", bad, "[identity=server]"),
        site_errors={
            "site-2": log_line("MethodExecutor", "ERROR", "site-2: cannot use its datalist: /x.json")
        },
    )
    reports = participant_reports(result, meta("FINISHED:EXECUTION_EXCEPTION"))
    assert statuses(reports) == {
        "server": ("stopped", ""),
        "site-1": ("stopped", ""),
        "site-2": ("failed", "site-2: cannot use its datalist: /x.json"),
    }
    assert str(reports[2]) == "site-2: failed: site-2: cannot use its datalist: /x.json"
    # without its streamed error log, the server's word is enough
    reports = participant_reports(
        write_result(tmp_path / "b", server_log=log_line("S", "ERROR", bad)), meta("X")
    )
    assert statuses(reports)["site-2"] == ("failed", bad)
    # a site that vanished: the server names it, and no other site
    gone = log_line("WFCommServer", "ERROR", "Client site-2 is deemed disconnected!")
    reports = participant_reports(write_result(tmp_path / "c", server_log=gone), meta("X"))
    assert statuses(reports) == {
        "server": ("stopped", ""),
        "site-1": ("stopped", ""),
        "site-2": ("failed", "Client site-2 is deemed disconnected!"),
    }


def test_reports_of_deployment_and_server_failures(tmp_path):
    reports = participant_reports(
        write_result(tmp_path / "a"), meta("FINISHED:ABORTED", **{"site-1": "no app"})
    )
    assert statuses(reports)["site-1"] == ("failed", "deployment: no app")
    result = write_result(
        tmp_path / "b", server_errors=log_line("ServerRunner", "ERROR", "Component refused")
    )
    assert statuses(participant_reports(result, meta("FINISHED:EXECUTION_EXCEPTION")))["server"] == (
        "failed",
        "Component refused",
    )
    reports = statuses(
        participant_reports(write_result(tmp_path / "c"), meta("FINISHED:EXECUTION_EXCEPTION"))
    )
    assert [status for status, _ in reports.values()] == ["stopped"] * 3
    assert "no cause" in reports["server"][1]


def test_reports_name_the_sites_left_out_and_why_the_run_stopped(tmp_path):
    silent = "silent (no answer within 20 s)"
    finished = {"status": "finished", "round": 3, "left_out": {"1": {"site-2": silent}}}
    result = write_result(tmp_path / "a", run_status=finished)
    assert statuses(participant_reports(result, meta("FINISHED:COMPLETED"))) == {
        "server": ("ok", ""), "site-1": ("ok", ""), "site-2": ("left out", f"round 1: {silent}")
    }  # fmt: skip
    # the run finished, but NVFlare ended the job otherwise (a dead site never reported)
    reports = statuses(participant_reports(result, meta("FINISHED:EXECUTION_EXCEPTION")))
    assert reports["server"] == ("ok", "the run finished; the job ended FINISHED:EXECUTION_EXCEPTION")
    assert reports["site-2"] == ("left out", f"round 1: {silent}")

    reason = f"round 1: 1 of 2 site(s) answered, 2 needed; left out: site-2: {silent}"
    aborted = {"status": "aborted", "round": 1, "reason": reason, "left_out": {"1": {"site-2": silent}}}
    # the server's abort names the site too: the controller's word (the round, why) wins
    bad = f"Aborting current RUN due to FATAL_SYSTEM_ERROR received: {reason}"
    result = write_result(tmp_path / "b", server_log=log_line("S", "ERROR", bad), run_status=aborted)
    assert statuses(participant_reports(result, meta("FINISHED:EXECUTION_EXCEPTION"))) == {
        "server": ("stopped", reason), "site-1": ("stopped", ""), "site-2": ("left out", f"round 1: {silent}")
    }  # fmt: skip
    # a site's own error log says more than the round it was left out of
    failed = {"status": "aborted", "round": 0, "reason": "r", "left_out": {"0": {"site-2": "failed (X)"}}}
    result = write_result(
        tmp_path / "c", site_errors={"site-2": log_line("M", "ERROR", "site-2: boom")}, run_status=failed
    )
    assert statuses(participant_reports(result, meta("X")))["site-2"] == ("failed", "site-2: boom")


def test_the_server_start_script_bounds_the_wait_for_a_dead_sites_outcome(tmp_path):
    script = tmp_path / "sub_start.sh"
    script.write_text("#!/usr/bin/env bash\necho start\n")
    bound_outcome_wait(script)
    bound_outcome_wait(script)  # once
    assert script.read_text() == f"#!/usr/bin/env bash\n{OUTCOME_WAIT_LINE}\necho start\n"
    with pytest.raises(RuntimeError, match="not the server's start script"):
        bound_outcome_wait(tmp_path / "missing.sh")
