"""``InstalledPackageBuilder``: an NVFlare provisioning builder that lets every kit run fedcontrast jobs.

Listed in ``deploy/project.yml`` after NVFlare's ``StaticFileBuilder``, it adds
``"fedcontrast."`` to the ``class_allow_list`` of the server's and every site's
``local/resources.json.default``, the file ``StaticFileBuilder`` writes with NVFlare's
default component policy. So a plain ``nvflare provision -p deploy/project.yml`` makes
startup kits that accept the exported jobs (which name ``fedcontrast.*`` classes and
carry no code) without the ``byoc`` right. NVFlare's own confidential-computing builder
extends the allow list at the same place. Every site's kit also gets ``local/privacy.json``,
the site's outbound policy (:func:`~fedcontrast.flare.site_config.privacy_policy`).

The server's ``startup/sub_start.sh`` gets a bound on how long the server waits, after a job's
workflow has ended, for each site to report how the job ended there (NVFlare's
``client_outcome_wait_timeout``, read from :data:`OUTCOME_WAIT_ENV` when the server starts;
900 s by default): a site whose machine died never reports, and until that wait is over the
admin sees the job ``RUNNING`` although its run is over and its model written. A live site
reports within seconds. The server's environment still wins (``${VAR:-default}``).
"""

from __future__ import annotations

import os
from pathlib import Path

from nvflare.lighter.constants import ProvFileName
from nvflare.lighter.spec import Builder, Project, ProvisionContext

from fedcontrast.flare.site_config import allow_installed_package, write_privacy_policy

#: NVFlare's server setting, an environment variable read when the server starts: seconds the
#: server waits, after a job's workflow ended, for each site's report of how the job ended there.
OUTCOME_WAIT_ENV = "NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT"
#: The provisioned server's default for it (NVFlare's own is 900).
OUTCOME_WAIT_S = 60
#: The line the server's start script gets (after its ``#!`` line).
OUTCOME_WAIT_LINE = (
    f'export {OUTCOME_WAIT_ENV}="${{{OUTCOME_WAIT_ENV}:-{OUTCOME_WAIT_S}}}"'
    "  # fedcontrast: a dead site's job outcome is not waited for 15 min"
)


def bound_outcome_wait(script: Path) -> None:
    """Add :data:`OUTCOME_WAIT_LINE` to a start script after its ``#!`` line (once).

    Raises:
        RuntimeError: the script is missing or does not start with ``#!``.
    """
    text = script.read_text() if script.is_file() else ""
    if not text.startswith("#!"):
        raise RuntimeError(
            f"{script}: not the server's start script (list this builder after StaticFileBuilder)"
        )
    if OUTCOME_WAIT_LINE in text:
        return
    shebang, _, rest = text.partition("\n")
    script.write_text(f"{shebang}\n{OUTCOME_WAIT_LINE}\n{rest}")


class InstalledPackageBuilder(Builder):
    """Allow the installed ``fedcontrast`` package's components in the server's and clients' kits."""

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        """Extend each server/client kit's ``local/resources.json.default`` allow list, write each
        site's outbound policy and bound the server's wait for a dead site's job outcome."""
        for participant in [project.get_server(), *project.get_clients()]:
            local_dir = Path(ctx.get_local_dir(participant))
            default = local_dir / ProvFileName.RESOURCES_JSON_DEFAULT
            if not default.is_file():
                raise RuntimeError(f"{default} is missing: list this builder after StaticFileBuilder")
            # allow_installed_package writes resources.json from the default; the kit ships the
            # result as its default, so a site's own resources.json still overrides it
            os.replace(allow_installed_package(local_dir), default)
        for client in project.get_clients():  # the outbound policy, on by default, the site's to edit
            write_privacy_policy(ctx.get_local_dir(client))
        bound_outcome_wait(Path(ctx.get_kit_dir(project.get_server())) / ProvFileName.SUB_START_SH)
