"""What the project admin does through the FLARE API: submit a job, follow it, fetch and read its results.

The same functions serve a real deployment (the admin's startup kit) and the local one
of :mod:`fedcontrast.deploy.poc`. Results are downloaded, never deleted on the server:
``DEST/<job id>/`` holds the job's meta, the server's run folder ``workspace/`` (its log,
and what the controller wrote: ``bytes.json``, ``metrics.json``, the models) and, when a
site logged errors, ``components/ERRORLOG_<site>``, the error log each site streams to the
server (NVFlare's ``SiteLogStreamer``). The server's ``workspace/run_status.json`` (the
controller's) says whether the run finished or stopped, why, and which sites were left out of
which rounds; the reports read it.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvflare.fuel.flare_api.api_spec import MonitorReturnCode
from nvflare.fuel.flare_api.flare_api import Session

from fedcontrast.deploy.project import JOBS_DIR
from fedcontrast.flare.process_group import STATUS_FILE, read_status

#: Status of a job that ran to its end.
COMPLETED = "FINISHED:COMPLETED"
#: Where :func:`download_results` puts the sites' streamed error logs, under the job's folder.
COMPONENTS_DIR = "components"
#: The job's server-side run folder in the downloaded result.
WORKSPACE_DIR = "workspace"
#: Prefix of a site's streamed error log among the job's components.
ERROR_LOG_PREFIX = "ERRORLOG_"
#: A log record: ``<time> - <logger> - <LEVEL> - [context] - <message>``.
LOG_RECORD = re.compile(
    r"^\S+ \S+ - (?P<logger>\S+) - (?P<level>[A-Z]+) - (?:\[[^\]]*\] - )?(?P<message>.*)$"
)


def job_names() -> list[str]:
    """The job scripts this installation carries (``jobs/<name>/job.py``)."""
    return sorted(p.parent.name for p in JOBS_DIR.glob("*/job.py"))


def export_job(name: str, out_dir: str | Path, num_sites: int, job_args: Sequence[str] = ()) -> Path:
    """Export ``jobs/<name>/job.py`` for ``num_sites`` sites (``--export``); returns the job folder.

    ``job_args`` are more options of the job script (e.g. ``--rounds 2``). No datalist is
    baked in unless ``job_args`` asks for one: each site names its own.

    Raises:
        ValueError: there is no such job script.
        RuntimeError: the script failed.
    """
    script = JOBS_DIR / name / "job.py"
    if not script.is_file():
        raise ValueError(
            f"no job script {script} (known jobs: {job_names()}); or pass an exported job folder"
        )
    spec = importlib.util.spec_from_file_location(f"fedcontrast_job_{name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out_dir = Path(out_dir).resolve()
    shutil.rmtree(out_dir, ignore_errors=True)  # only this export in it
    code = module.main(["--export", str(out_dir), "--sites", str(num_sites), *job_args])
    exported = [meta.parent for meta in out_dir.glob("*/meta.json")]
    if code or len(exported) != 1:
        raise RuntimeError(f"{script} --export {out_dir} failed (exit code {code})")
    return exported[0]


def job_folder(job: str, out_dir: str | Path, num_sites: int, job_args: Sequence[str] = ()) -> Path:
    """``job`` as a job folder: an exported folder as it is, else a job name to :func:`export_job`."""
    path = Path(job)
    if (path / "meta.json").is_file():
        if job_args:
            raise ValueError(f"{path} is an exported job folder: options {list(job_args)} cannot apply")
        return path.resolve()
    return export_job(job, out_dir, num_sites, job_args)


def log_messages(text: str, level: str | None = None, logger: str | None = None) -> list[str]:
    """The messages of ``text``'s log records, optionally of one level and/or one logger."""
    found = []
    for line in text.splitlines():
        record = LOG_RECORD.match(line)
        if record and level in (None, record["level"]) and logger in (None, record["logger"]):
            found.append(record["message"])
    return found


def follow_job(
    session: Session,
    job_id: str,
    timeout: float = 0.0,
    poll_interval: float = 5.0,
    say: Callable[[str], None] = print,
    progress_logger: str = "MethodController",
) -> dict:
    """Wait until the job ends, saying its status changes and its controller's progress messages.

    Args:
        session: an open FLARE API session.
        job_id: the submitted job.
        timeout: seconds to wait (0: no limit).
        poll_interval: seconds between polls.
        say: where progress lines go.
        progress_logger: the server logger whose INFO messages are progress (the job's controller).

    Returns:
        The job's final meta (``status``, ``job_deploy_detail``, ...).

    Raises:
        TimeoutError: the job was still running after ``timeout`` seconds (it keeps running).
    """
    start, seen = time.monotonic(), {"status": None, "messages": 0}

    def report(sess: Session, job: str, meta: dict) -> bool:
        if meta.get("status") != seen["status"]:
            seen["status"] = meta.get("status")
            say(f"[{time.monotonic() - start:5.0f} s] job {job}: {seen['status']}")
        if meta.get("status") == "RUNNING":
            server_log = sess.get_job_logs(job, "server").get("logs", {}).get("server", "")
            messages = log_messages(server_log, "INFO", progress_logger)
            for message in messages[seen["messages"] :]:
                say(f"[{time.monotonic() - start:5.0f} s]   {message}")
            seen["messages"] = max(seen["messages"], len(messages))
        return True

    code, meta = session.monitor_job_and_return_job_meta(job_id, timeout, poll_interval, report)
    if code == MonitorReturnCode.TIMEOUT:
        raise TimeoutError(
            f"job {job_id} still running after {timeout:.0f} s (the admin console can abort it)"
        )
    return meta


def download_results(session: Session, job_id: str, destination: str | Path) -> Path:
    """Download the job's result and the sites' streamed error logs into ``destination/<job id>``."""
    result = Path(session.download_job_result(job_id, destination=str(Path(destination).resolve())))
    if session.list_job_components(job_id):
        components = Path(session.download_job_components(job_id))  # in the admin kit's download folder
        shutil.move(components, result / COMPONENTS_DIR)
    return result


@dataclass(frozen=True)
class ParticipantReport:
    """How one participant fared in a job: ``ok``, ``failed``, ``left out`` (of some rounds: a site
    that failed, was silent or whose update was refused; ``detail`` says why) or ``stopped``."""

    name: str
    status: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.name}: {self.status}" + (f": {self.detail}" if self.detail else "")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def left_out_rounds(status: dict) -> dict[str, str]:
    """Each site the controller's run status says was left out, with the rounds and why
    (``"round 1: silent (no answer within 20 s)"``); a silent site is not sent later rounds."""
    found: dict[str, list[str]] = {}
    for round_num, sites in sorted(status.get("left_out", {}).items(), key=lambda item: int(item[0])):
        for site, why in sites.items():
            found.setdefault(site, []).append(f"round {round_num}: {why}")
    return {site: "; ".join(rounds) for site, rounds in found.items()}


def participant_reports(result_dir: str | Path, meta: dict) -> list[ParticipantReport]:
    """Which participants of a finished job failed or were left out, read from its downloaded result.

    A site whose deployment failed failed. When the job did not complete, a site failed if
    it logged an error (its streamed error log). A site the controller left out of a round
    (``run_status.json``: it failed, was silent or its update was refused) is ``left out``,
    completed job or not. When the job did not complete, a site an error of the server names
    failed too (NVFlare's "Result from <site> is bad", "Client <site> is deemed
    disconnected!"); if no site failed, the server failed when it logged an error. Everyone
    else is ``ok`` when the job completed, else ``stopped``; a stopped server's detail is the
    controller's reason for the stop, when it gave one; the server is ``ok`` when its run
    finished, even if NVFlare then ended the job otherwise (e.g. a dead site never reported).
    """
    result_dir = Path(result_dir)
    completed = meta.get("status") == COMPLETED
    deployed = dict(entry.split(": ", 1) for entry in meta.get("job_deploy_detail", []) if ": " in entry)
    server_errors = log_messages(_read(result_dir / WORKSPACE_DIR / "log.txt"), "ERROR")
    status = read_status(result_dir / WORKSPACE_DIR / STATUS_FILE)
    left_out = left_out_rounds(status)
    sites = sorted(name for name in deployed if name != "server")
    reports = []
    for site in sites:
        errors = log_messages(_read(result_dir / COMPONENTS_DIR / f"{ERROR_LOG_PREFIX}{site}"), "ERROR")
        named = re.compile(rf"(?<![\w-]){re.escape(site)}(?![\w-])")
        bad = [message for message in server_errors if named.search(message)]
        if deployed[site] != "OK":
            reports.append(ParticipantReport(site, "failed", f"deployment: {deployed[site]}"))
        elif not completed and errors:
            reports.append(ParticipantReport(site, "failed", errors[0]))
        elif site in left_out:
            reports.append(ParticipantReport(site, "left out", left_out[site]))
        elif not completed and bad:
            reports.append(ParticipantReport(site, "failed", bad[0]))
        else:
            reports.append(ParticipantReport(site, "ok" if completed else "stopped"))
    errors = log_messages(_read(result_dir / WORKSPACE_DIR / "error_log.txt"), "ERROR")
    if completed:
        server = ParticipantReport("server", "ok")
    elif status.get("status") == "finished":  # NVFlare ended the job badly after the run was over
        server = ParticipantReport("server", "ok", f"the run finished; the job ended {meta.get('status')}")
    elif status.get("status") == "aborted" and status.get("reason", "aborted") != "aborted":
        server = ParticipantReport("server", "stopped", status["reason"])
    elif any(r.status in ("failed", "left out") for r in reports):
        server = ParticipantReport("server", "stopped")
    elif errors:
        server = ParticipantReport("server", "failed", errors[0])
    else:  # e.g. a site's training process died: only the server's own log.txt says which
        server = ParticipantReport(
            "server", "stopped", "the job's logs name no cause; see the server's log.txt"
        )
    return [server, *reports]


@dataclass(frozen=True)
class JobOutcome:
    """A finished job: its id, final meta, downloaded result folder and how each participant fared."""

    job_id: str
    meta: dict
    result_dir: Path
    reports: list[ParticipantReport]

    @property
    def completed(self) -> bool:
        return self.meta.get("status") == COMPLETED


def run_job(
    session: Session,
    job_dir: str | Path,
    results_dir: str | Path,
    timeout: float = 0.0,
    say: Callable[[str], None] = print,
    poll_interval: float = 5.0,
) -> JobOutcome:
    """Submit a job folder, follow it to its end, download its results and say who failed or was
    left out (whether the job completed or not; see :func:`follow_job` for the arguments)."""
    job_id = session.submit_job(str(Path(job_dir).resolve()))
    say(f"submitted {job_dir} as job {job_id}")
    meta = follow_job(session, job_id, timeout, poll_interval, say=say)
    result_dir = download_results(session, job_id, results_dir)
    return JobOutcome(job_id, meta, result_dir, participant_reports(result_dir, meta))
