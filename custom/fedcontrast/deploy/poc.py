"""A provisioned deployment on this machine: a real server and one real client process per site.

NVFlare's proof-of-concept mode, built from the same ``deploy/project.yml`` as a real
deployment: the server is named ``localhost`` (so it listens on the loopback interface
only and the sites connect there), its two ports are free ones, and every participant
gets a provisioned startup kit with certificates (mutual TLS over gRPC). Each process is
its kit's own ``startup/sub_start.sh --once`` (NVFlare's start command, without its
restart loop) in a session of its own, so :meth:`LocalDeployment.stop` can always find
and end everything it started, even job processes, after a graceful shutdown through
the FLARE API.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
from nvflare.fuel.flare_api.flare_api import Session, new_secure_session
from nvflare.lighter.utils import update_storage_locations
from nvflare.tool.api_utils import shutdown_system_by_session

from fedcontrast.deploy.builder import OUTCOME_WAIT_ENV
from fedcontrast.deploy.project import (
    DEFAULT_PROJECT,
    admin_name,
    load_project,
    names,
    provision,
    server_name,
    with_server,
    with_sites,
    write_project,
)
from fedcontrast.deploy.site import local_dir, write_site_config

#: The local server's name: the host it binds and the sites connect to (loopback only).
LOCALHOST = "localhost"
#: Each process's console output, in its kit folder.
CONSOLE_LOG = "console.log"
#: Environment variable the sites' processes must not inherit: each site reads its own local/fedcontrast.json.
INHERITED_DATALIST = "FEDCONTRAST_DATALIST"
#: The local server's wait for a dead site's job outcome (``OUTCOME_WAIT_ENV`` of
#: :mod:`fedcontrast.deploy.builder`, whose kits default to ``OUTCOME_WAIT_S``): on one machine a
#: live site reports within seconds, and a job with a dead site stays ``RUNNING`` until then.
LOCAL_OUTCOME_WAIT_S = 10


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on the loopback interface now."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def site_environment(num_sites: int) -> dict[str, str]:
    """The environment of the local processes: this Python first on PATH (``sub_start.sh`` runs
    ``python3``), no inherited datalist, the CPU cores shared between the sites, and the server's
    wait for a dead site's job outcome cut to :data:`LOCAL_OUTCOME_WAIT_S` (unless set already)."""
    env = {k: v for k, v in os.environ.items() if k != INHERITED_DATALIST}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, num_sites))))
    env.setdefault(OUTCOME_WAIT_ENV, str(LOCAL_OUTCOME_WAIT_S))
    return env


def site_datalists(data_dir: str | Path, sites: list[str]) -> dict[str, Path]:
    """Each site's datalist ``<data_dir>/<site>.json`` (as ``fedcontrast data split`` names them).

    Raises:
        ValueError: a site has no datalist there.
    """
    datalists = {site: Path(data_dir).resolve() / f"{site}.json" for site in sites}
    missing = [str(path) for path in datalists.values() if not path.is_file()]
    if missing:
        raise ValueError(f"no site datalist {missing} (see `fedcontrast data split`)")
    return datalists


def provision_local(
    workspace: str | Path, datalists: dict[str, Path], project_file: str | Path = DEFAULT_PROJECT
) -> tuple[Path, dict[str, Any]]:
    """Provision ``project_file`` for these sites on this machine and point each site at its datalist.

    Writes ``WORKSPACE/project.yml`` (server ``localhost`` on two free ports, one client per
    site) and its kits under ``WORKSPACE/kits``; the server keeps its job store in
    the kits' folder (``prod_NN/server-storage``, not NVFlare's default under /tmp), so no run
    sees the jobs of an earlier one.

    Returns:
        ``(prod_dir, project)``: the kits' folder and the project they come from.
    """
    workspace = Path(workspace).resolve()
    project = with_server(with_sites(load_project(project_file), list(datalists)), LOCALHOST, *free_ports(2))
    prod_dir = provision(write_project(project, workspace / "project.yml"), workspace / "kits")
    storage = prod_dir / "server-storage"
    update_storage_locations(local_dir=str(local_dir(prod_dir / LOCALHOST)), workspace=str(storage))
    for site, datalist in datalists.items():
        write_site_config(prod_dir / site, datalist)
    return prod_dir, project


class LocalDeployment:
    """The server and sites of a provisioned project, as processes on this machine.

    Use as a context manager: leaving it (normally, on an error or on Ctrl-C) stops
    every process it started.

    Args:
        prod_dir: the provisioned kits (``<prod dir>/<participant>``).
        project: the project file it was provisioned from (server named ``localhost``).
        say: where progress lines go.
    """

    def __init__(self, prod_dir: str | Path, project: dict[str, Any], say: Callable[[str], None] = print):
        self.prod_dir = Path(prod_dir)
        self.server = server_name(project)
        self.sites = names(project, "client")
        self.admin = admin_name(project)
        self.say = say
        self.processes: dict[str, subprocess.Popen] = {}

    def kit(self, participant: str) -> Path:
        """A participant's startup kit (also its workspace: logs, job folders)."""
        return self.prod_dir / participant

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        """Start the server, then every site; return when all sites are connected.

        Raises:
            RuntimeError: a process exited, or the sites did not all connect in ``timeout`` seconds;
                the message quotes the console log concerned.
        """
        for participant in [self.server, *self.sites]:
            self.launch(participant)
        self.say(f"started {self.server} and {len(self.sites)} site(s) from {self.prod_dir}")
        self.wait_for_sites(timeout)

    def launch(self, participant: str) -> None:
        """Start one participant's process (``startup/sub_start.sh --once``), console to its kit."""
        kit = self.kit(participant)
        with open(kit / CONSOLE_LOG, "ab") as console:
            self.processes[participant] = subprocess.Popen(
                [str(kit / "startup" / "sub_start.sh"), "--once"],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=site_environment(len(self.sites)),
                start_new_session=True,  # not hit by the terminal's Ctrl-C; stop() ends it
            )

    def kill(self, site: str) -> list[int]:
        """SIGKILL a site's process and its job processes, as when the hospital's machine dies.

        Returns:
            The pids killed.
        """
        process = self.processes[site]
        members = [psutil.Process(process.pid), *_descendants(process.pid)] if process.poll() is None else []
        for member in members:
            with suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(members, timeout=10.0)
        process.wait()
        self.say(f"killed {site} ({len(members)} process(es))")
        return [member.pid for member in members]

    def restart(self, site: str, timeout: float = 120.0) -> None:
        """Start a site whose process has ended (e.g. after :meth:`kill`) and wait until every
        site is connected again."""
        if self.processes[site].poll() is None:
            raise RuntimeError(f"{site} is still running")
        since = time.time()
        self.launch(site)
        self.say(f"restarted {site}")
        self.wait_for_sites(timeout, rejoined={site: since})

    def session(self, timeout: float = 30.0) -> Session:
        """A FLARE API session as the project admin (close it after use)."""
        return new_secure_session(self.admin, str(self.kit(self.admin)), timeout=timeout)

    def check_alive(self) -> None:
        """Raise if a started process has exited, quoting its console log."""
        for participant, process in self.processes.items():
            if process.poll() is not None:
                log = self.kit(participant) / CONSOLE_LOG
                tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
                raise RuntimeError(f"{participant} exited with code {process.returncode}; {log}:\n{tail}")

    def wait_for_sites(self, timeout: float, rejoined: dict[str, float] | None = None) -> None:
        """Wait until every site is connected to the server, checking that every process still runs.

        Args:
            timeout: seconds to wait.
            rejoined: sites that must have connected again since a time (``time.time()``): the
                server lists a dead site as connected until its heartbeat times out.
        """
        rejoined = rejoined or {}
        deadline = time.monotonic() + timeout
        connected: set[str] = set()
        session, last_error = None, None
        try:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    session = session or self.session(timeout=5.0)
                except Exception as exc:  # the server is not listening yet
                    last_error = exc
                else:
                    connected = {
                        c.name
                        for c in session.get_system_info().client_info
                        if (c.last_connect_time or 0.0) >= rejoined.get(c.name, 0.0)
                    }
                    if connected >= set(self.sites):
                        self.say(f"sites connected: {', '.join(sorted(connected))}")
                        return
                time.sleep(1.0)
        finally:
            if session is not None:
                session.close()
        missing = sorted(set(self.sites) - connected)
        reason = (
            f"the admin cannot log in ({last_error})" if session is None else f"sites {missing} are missing"
        )
        raise RuntimeError(f"not ready after {timeout:.0f} s: {reason}; see the kits' {CONSOLE_LOG}")

    def stop(self, timeout: float = 30.0) -> None:
        """Shut everything down through the FLARE API, then end whatever is left of what was started."""
        running = {name: p for name, p in self.processes.items() if p.poll() is None}
        if not running:
            return
        # job processes run in sessions of their own: list them while their parents still exist
        descendants = [child for p in running.values() for child in _descendants(p.pid)]
        graceful = self.server in running and self.shutdown(timeout)
        deadline = time.monotonic() + (timeout if graceful else 0.0)
        for process in running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        _, alive = psutil.wait_procs(descendants, timeout=5.0)
        for orphan in alive:
            orphan.kill()
        self.say(f"stopped {len(running)} process(es)" + (f" and {len(alive)} job process(es)" * bool(alive)))

    def shutdown(self, timeout: float) -> bool:
        """NVFlare's shutdown through the FLARE API: abort running jobs, stop the server and every
        client. Returns whether it went through (the server may be unreachable or wedged)."""
        try:
            with closing(self.session(timeout=5.0)) as session, _quiet("nvflare"):
                shutdown_system_by_session(session, timeout_in_sec=int(timeout), verbose=False)
        except Exception as exc:
            self.say(f"graceful shutdown failed ({exc}); ending the processes")
            return False
        return True


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a logger for a while: a shutdown makes the FLARE API log the server's absence as errors."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
