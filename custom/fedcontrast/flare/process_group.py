"""The simulator's process group: run it, end it when the run is over, and always on the way out.

Standard library and psutil only, so that a job script's signal handling is importable (and
testable) without torch or NVFlare. :func:`run_process_group` is what ``jobs/*/job.py`` runs
the simulator with (through :func:`fedcontrast.flare.jobs.run_simulator`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

#: The controller's run status in its result folder (see :mod:`fedcontrast.flare.controller`).
STATUS_FILE = "run_status.json"


def _parent_death_signal() -> None:
    """In the child, before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_process_group(
    command: list[str], status_file: Path, grace_s: float, env: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """Run ``command`` in a new process group until it exits or, ``grace_s`` seconds after
    ``status_file`` says the run is over, is ended; the group is always ended on the way out.

    Returns:
        ``(exit code, status)``: the status file's content ({} when it never appeared).
    """
    linux = sys.platform.startswith("linux")
    process = subprocess.Popen(
        command, start_new_session=True, preexec_fn=_parent_death_signal if linux else None, env=env
    )
    previous = {}

    def interrupt(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    status: dict[str, Any] = {}
    over_since = None
    tracked: dict[int, psutil.Process] = {}
    try:
        while process.poll() is None:
            time.sleep(0.5)
            tracked.update(descendants(process.pid))
            status = read_status(status_file)
            if status.get("status") in ("finished", "aborted"):
                over_since = over_since or time.monotonic()
                if time.monotonic() - over_since > grace_s:
                    print(
                        f"the run is {status['status']}; ending the simulator, which did not exit",
                        file=sys.stderr,
                    )
                    break
        return process.poll() if process.poll() is not None else -signal.SIGKILL, read_status(status_file)
    finally:
        end_group(process, tracked)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def read_status(path: Path) -> dict[str, Any]:
    """The controller's ``run_status.json`` ({} when absent or being replaced)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def descendants(pid: int) -> dict[int, psutil.Process]:
    """The processes started by ``pid``, children of children included, by pid."""
    try:
        return {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}


def end_group(process: subprocess.Popen, tracked: dict[int, psutil.Process], wait_s: float = 5.0) -> None:
    """End ``process``, its process group and every descendant seen (``tracked``; NVFlare starts
    its site workers in sessions of their own): SIGTERM, then SIGKILL to any left after ``wait_s``."""
    members = {**tracked, **descendants(process.pid)}
    with contextlib.suppress(psutil.NoSuchProcess):
        members[process.pid] = psutil.Process(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    for member in members.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()  # psutil checks it is still the same process
    _, alive = psutil.wait_procs(list(members.values()), timeout=wait_s)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    psutil.wait_procs(alive, timeout=2.0)
