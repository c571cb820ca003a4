"""What a site configures locally: where its datalist is, and the component policy that lets
jobs built from the installed ``fedcontrast`` package run.

Kept free of torch and of the rest of the package, so that provisioning and site set-up
(``fedcontrast deploy provision|site``) start in about a second.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST

#: The installed package the job's components come from.
PACKAGE = "fedcontrast"
#: What a site's ``class_allow_list`` needs for these jobs.
ALLOW_LIST_PREFIX = f"{PACKAGE}."
#: Environment variable with the path of this site's datalist (first choice).
DATALIST_ENV = "FEDCONTRAST_DATALIST"
#: The site's configuration file in its workspace's ``local/`` folder (second choice).
SITE_CONFIG_FILE = "fedcontrast.json"
#: Placeholder of the site name in the job's datalist template (last choice).
SITE_PLACEHOLDER = "{site}"


def resolve_datalist(
    site: str,
    template: str,
    site_config_dir: str | os.PathLike | None,
    environ: Mapping[str, str] = os.environ,
) -> tuple[Path, str]:
    """Where ``site``'s datalist is, and which setting said so.

    Args:
        site: the site's name.
        template: the job's datalist path, ``{site}`` standing for the site name ("" for none).
        site_config_dir: the site workspace's ``local/`` folder (None when there is none).
        environ: the environment to read ``FEDCONTRAST_DATALIST`` from.

    Returns:
        ``(path, source)``; ``source`` names the setting for messages.

    Raises:
        ValueError: the site's configuration file is malformed, or nothing names a datalist.
    """
    if environ.get(DATALIST_ENV):
        return Path(environ[DATALIST_ENV]).expanduser(), f"${DATALIST_ENV}"
    config_file = Path(site_config_dir) / SITE_CONFIG_FILE if site_config_dir else None
    if config_file is not None and config_file.is_file():
        try:
            settings = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{site}: {config_file} is not valid JSON ({exc})") from exc
        if not isinstance(settings, dict) or not isinstance(settings.get("datalist"), str):
            raise ValueError(f'{site}: {config_file} must hold {{"datalist": "<path>"}}')
        return config_file.parent / Path(settings["datalist"]).expanduser(), str(config_file)
    if not template:
        raise ValueError(
            f"{site}: no datalist: set ${DATALIST_ENV}, write {config_file or SITE_CONFIG_FILE} "
            f'with {{"datalist": "<path>"}}, or give the job a datalist template'
        )
    return Path(template.replace(SITE_PLACEHOLDER, site)), "the job's datalist template"


def allow_installed_package(local_dir: str | Path) -> Path:
    """Add ``"fedcontrast."`` to the ``class_allow_list`` of a site's ``local/resources.json``.

    Starts from ``resources.json``, else ``resources.json.default``, else an empty policy
    (NVFlare's default allow list); writes ``resources.json``. Returns its path.
    """
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    target = local_dir / "resources.json"
    source = next((p for p in (target, local_dir / "resources.json.default") if p.is_file()), None)
    resources = json.loads(source.read_text()) if source else {"format_version": 2}
    allowed = list(resources.get(CLASS_ALLOW_LIST, DEFAULT_CLASS_ALLOW_LIST))
    if "*" not in allowed and ALLOW_LIST_PREFIX not in allowed:
        allowed.append(ALLOW_LIST_PREFIX)
    resources[CLASS_ALLOW_LIST] = allowed
    target.write_text(json.dumps(resources, indent=4))
    return target
