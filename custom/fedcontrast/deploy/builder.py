"""``InstalledPackageBuilder``: an NVFlare provisioning builder that lets every kit run fedcontrast jobs.

Listed in ``deploy/project.yml`` after NVFlare's ``StaticFileBuilder``, it adds
``"fedcontrast."`` to the ``class_allow_list`` of the server's and every site's
``local/resources.json.default``, the file ``StaticFileBuilder`` writes with NVFlare's
default component policy. So a plain ``nvflare provision -p deploy/project.yml`` makes
startup kits that accept the exported jobs (which name ``fedcontrast.*`` classes and
carry no code) without the ``byoc`` right. NVFlare's own confidential-computing builder
extends the allow list at the same place. Every site's kit also gets ``local/privacy.json``,
the site's outbound policy (:func:`~fedcontrast.flare.site_config.privacy_policy`).
"""

from __future__ import annotations

import os
from pathlib import Path

from nvflare.lighter.constants import ProvFileName
from nvflare.lighter.spec import Builder, Project, ProvisionContext

from fedcontrast.flare.site_config import allow_installed_package, write_privacy_policy


class InstalledPackageBuilder(Builder):
    """Allow the installed ``fedcontrast`` package's components in the server's and clients' kits."""

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        """Extend each server/client kit's ``local/resources.json.default`` allow list."""
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
