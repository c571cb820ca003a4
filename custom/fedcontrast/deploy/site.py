"""A hospital's own settings, kept in its startup kit's ``local/`` folder and never in a job.

- ``local/fedcontrast.json``: ``{"datalist": "/abs/path/site.json"}``, the site datalist
  written by ``fedcontrast data split`` (or by hand). Its ``training`` list is the site's
  labelled volumes, so the datalist a site points at is also its label budget. The
  environment variable ``FEDCONTRAST_DATALIST`` of the site's process takes precedence
  (see :func:`fedcontrast.flare.site_config.resolve_datalist`).
- ``local/privacy.json``: the site's outbound policy (written when absent; the hospital edits
  it: :func:`fedcontrast.flare.site_config.privacy_policy`);
- ``local/resources.json``: NVFlare's component policy; its ``class_allow_list`` must
  allow ``"fedcontrast."`` (kits provisioned from ``deploy/project.yml`` already do).
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.fl_constant import WorkspaceConstants
from nvflare.app_common.widgets.component_path_authorizer import ALLOW_ALL, CLASS_ALLOW_LIST

from fedcontrast.data.datalist import load_site_datalist
from fedcontrast.flare.site_config import (
    ALLOW_LIST_PREFIX,
    SITE_CONFIG_FILE,
    allow_installed_package,
    write_privacy_policy,
)


def local_dir(kit_dir: str | Path) -> Path:
    """A startup kit's ``local/`` folder (the site's own configuration)."""
    return Path(kit_dir) / WorkspaceConstants.SITE_FOLDER_NAME


def write_site_config(kit_dir: str | Path, datalist: str | Path) -> Path:
    """Point the site of ``kit_dir`` at its datalist (absolute path); returns ``local/fedcontrast.json``."""
    path = local_dir(kit_dir) / SITE_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"datalist": str(Path(datalist).expanduser().resolve())}, indent=2) + "\n")
    return path


def allows_package(kit_dir: str | Path) -> bool:
    """Whether the kit's component policy (``resources.json``, else its default) allows fedcontrast."""
    local = local_dir(kit_dir)
    for name in (WorkspaceConstants.RESOURCES_CONFIG, WorkspaceConstants.DEFAULT_RESOURCES_CONFIG):
        if (local / name).is_file():
            allowed = json.loads((local / name).read_text()).get(CLASS_ALLOW_LIST, [])
            return ALLOW_ALL in allowed or ALLOW_LIST_PREFIX in allowed
    return False


def configure_site(kit_dir: str | Path, datalist: str | Path) -> list[str]:
    """Check a site's datalist (every voxel: label values, finite and complete images), point
    its kit at it and make sure the kit allows fedcontrast.

    Returns:
        Lines that say what the site will train on and what was written.

    Raises:
        ValueError: the datalist is missing or invalid (the message names the file).
    """
    content = load_site_datalist(datalist, check_values=True)
    counts = {key: len(content[key]) for key in ("training", "unlabeled", "test")}
    lines = [
        f"{Path(datalist).resolve()}: {counts['training']} labelled, {counts['unlabeled']} unlabelled "
        f"and {counts['test']} test volume(s)",
        f"wrote {write_site_config(kit_dir, datalist)}",
    ]
    if (privacy := write_privacy_policy(local_dir(kit_dir))) is not None:
        lines.append(f"wrote {privacy} (the site's outbound policy: only what each method declares leaves)")
    if not allows_package(kit_dir):
        resources = allow_installed_package(local_dir(kit_dir))
        lines.append(f"wrote {resources} (class_allow_list + {ALLOW_LIST_PREFIX!r})")
    return lines
