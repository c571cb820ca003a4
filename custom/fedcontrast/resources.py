"""Where the bundle, the job scripts and the deployment files are, installed or in a checkout.

A wheel or sdist install carries them as package data under ``fedcontrast/_resources/``
(``setup.py`` copies :data:`RESOURCES` there when it builds), laid out as in the
repository: ``bundles/cardiac_seg/``, ``jobs/<name>/job.py``, ``deploy/project.yml``. A
checkout (or an editable install of one) has no such folder and uses the repository's
own. ``$FEDCONTRAST_BUNDLE_DIR`` points the bundle elsewhere in both cases.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The repository paths an install carries (folders whole, without caches and logs).
RESOURCES: tuple[str, ...] = ("bundles/cardiac_seg", "jobs", "deploy")
#: Where an installed package keeps :data:`RESOURCES`.
PACKAGED_DIR = Path(__file__).resolve().parent / "_resources"
#: The repository root of a checkout (``custom/fedcontrast/`` is two levels down).
CHECKOUT_DIR = Path(__file__).resolve().parents[2]


def resource_dir() -> Path:
    """The folder holding :data:`RESOURCES`: the installed package's if it has one, else the checkout's.

    Nothing is checked here; whoever reads a file there names it when it is missing.
    """
    return PACKAGED_DIR if PACKAGED_DIR.is_dir() else CHECKOUT_DIR


def bundle_dir() -> Path:
    """``$FEDCONTRAST_BUNDLE_DIR`` if set, else the packaged (or checkout's) ``bundles/cardiac_seg``."""
    env = os.environ.get("FEDCONTRAST_BUNDLE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return resource_dir() / "bundles" / "cardiac_seg"


def jobs_dir() -> Path:
    """The job scripts' folder (``<name>/job.py``)."""
    return resource_dir() / "jobs"


def deploy_dir() -> Path:
    """The deployment folder (``project.yml``, the site templates)."""
    return resource_dir() / "deploy"
