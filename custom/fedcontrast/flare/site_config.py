"""What a site configures locally: where its datalist is, the component policy that lets
jobs built from the installed ``fedcontrast`` package run, and its outbound privacy policy.

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


#: The site's privacy policy file in ``local/`` (NVFlare's), and the scope this package writes.
PRIVACY_FILE = "privacy.json"
PRIVACY_SCOPE = "fedcontrast"
#: Class paths of the site-side result filters (named, not imported: this module stays light).
OUTBOUND_POLICY_FILTER = "fedcontrast.flare.filters.OutboundPolicyFilter"
FEATURE_PRIVACY_FILTER = "fedcontrast.flare.filters.FeaturePrivacyFilter"


def privacy_policy(
    allow_features: bool = True,
    max_features_per_partition: int = 0,
    feature_clip: float = 0.0,
    feature_noise: float = 0.0,
) -> dict:
    """A site's ``local/privacy.json``: one default scope whose result filters are the
    feature privacy filter (only when ``feature_clip`` or ``feature_noise`` is set) and then
    the outbound policy (see :class:`fedcontrast.flare.filters.OutboundPolicyFilter`)."""
    # "out": on a site's results as they leave (a server reading this file ignores them)
    filters = []
    if feature_clip or feature_noise:
        args = {"clip_norm": feature_clip, "noise_std": feature_noise}
        filters.append({"path": FEATURE_PRIVACY_FILTER, "args": args, "direction": "out"})
    policy_args = {"allow_features": allow_features, "max_features_per_partition": max_features_per_partition}
    filters.append({"path": OUTBOUND_POLICY_FILTER, "args": policy_args, "direction": "out"})
    scope = {"name": PRIVACY_SCOPE, "properties": {}, "task_result_filters": filters}
    return {"scopes": [scope], "default_scope": PRIVACY_SCOPE}


def write_privacy_policy(local_dir: str | Path, overwrite: bool = False, **settings: object) -> Path | None:
    """Write :func:`privacy_policy` to ``local_dir/privacy.json``; a site's existing policy is
    kept unless ``overwrite``. Returns the path written, or None when it was kept."""
    target = Path(local_dir) / PRIVACY_FILE
    if target.exists() and not overwrite:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(privacy_policy(**settings), indent=4) + "\n")
    return target
