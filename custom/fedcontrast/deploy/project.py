"""The NVFlare project file (``deploy/project.yml``) and ``nvflare provision``.

``deploy/project.yml`` describes a deployment: one server (named by the host name the
sites connect to), one project admin, and one client per hospital; its builders add
:class:`~fedcontrast.deploy.builder.InstalledPackageBuilder` to NVFlare's, so every
startup kit accepts the exported ``fedcontrast`` jobs. The helpers here change its
sites or its server and run ``nvflare provision`` on it.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from fedcontrast.resources import deploy_dir, jobs_dir

#: The deployment folder and the job scripts (``jobs/<name>/job.py``): the installed package's
#: (or the checkout's), see :mod:`fedcontrast.resources`.
DEPLOY_DIR, JOBS_DIR = deploy_dir(), jobs_dir()
#: The project file ``fedcontrast deploy`` starts from unless told otherwise.
DEFAULT_PROJECT = DEPLOY_DIR / "project.yml"


def load_project(path: str | Path = DEFAULT_PROJECT) -> dict[str, Any]:
    """Read an NVFlare project file.

    Raises:
        ValueError: the file is missing, or is not a project with one server and one project admin.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: project file not found (pass --project)")
    project = yaml.safe_load(path.read_text())
    if not isinstance(project, dict) or not isinstance(project.get("participants"), list):
        raise ValueError(f"{path}: not an NVFlare project file (no 'participants' list)")
    for getter in (server_name, admin_name):
        getter(project)  # raises when missing
    return project


def names(project: dict[str, Any], kind: str) -> list[str]:
    """The names of the participants of ``kind`` (``server``, ``client``, ``admin``)."""
    return [p["name"] for p in project["participants"] if p.get("type") == kind]


def server_name(project: dict[str, Any]) -> str:
    """The server's name: the host name its startup kit listens on and the sites connect to."""
    servers = names(project, "server")
    if len(servers) != 1:
        raise ValueError(f"project {project.get('name')!r} needs exactly one server, has {servers}")
    return servers[0]


def admin_name(project: dict[str, Any]) -> str:
    """The project admin: the user whose startup kit submits jobs."""
    admins = [p["name"] for p in project["participants"] if p.get("role") == "project_admin"]
    if not admins:
        raise ValueError(f"project {project.get('name')!r} has no admin with role project_admin")
    return admins[0]


def with_sites(project: dict[str, Any], sites: list[str]) -> dict[str, Any]:
    """A copy of ``project`` whose clients are ``sites``, each its own organisation (``site_1`` ...)."""
    project = copy.deepcopy(project)
    others = [p for p in project["participants"] if p.get("type") != "client"]
    clients = [{"name": site, "type": "client", "org": re.sub(r"\W", "_", site)} for site in sites]
    server_at = next(i for i, p in enumerate(others) if p.get("type") == "server")
    project["participants"] = others[: server_at + 1] + clients + others[server_at + 1 :]
    return project


def with_server(project: dict[str, Any], host: str, fed_learn_port: int, admin_port: int) -> dict[str, Any]:
    """A copy of ``project`` whose server is ``host`` (its name: where it listens and sites connect)."""
    project = copy.deepcopy(project)
    server = next(p for p in project["participants"] if p.get("type") == "server")
    server.update(name=host, fed_learn_port=fed_learn_port, admin_port=admin_port)
    server.pop("default_host", None)  # the name is the host
    return project


def write_project(project: dict[str, Any], path: str | Path) -> Path:
    """Write ``project`` as YAML; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


def provision(project_file: str | Path, workspace: str | Path) -> Path:
    """Run ``nvflare provision -p PROJECT -w WORKSPACE``; returns the new ``prod_NN`` folder of kits.

    Each participant's startup kit is ``<prod dir>/<participant name>``; NVFlare keeps the
    project's root CA in ``WORKSPACE/<project>/state``, so provisioning again adds kits signed
    by the same CA in a new ``prod_NN``.

    Raises:
        RuntimeError: ``nvflare provision`` failed; its output is in the message.
    """
    project_file, workspace = Path(project_file).resolve(), Path(workspace).resolve()
    command = [sys.executable, "-m", "nvflare.cli", "provision", "--force"]
    done = subprocess.run(
        [*command, "-p", str(project_file), "-w", str(workspace)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"nvflare provision failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    project_dir = workspace / load_project(project_file)["name"]
    return max(project_dir.glob("prod_*"), key=lambda p: int(p.name.split("_")[1]))
