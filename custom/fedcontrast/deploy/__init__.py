"""Real deployment: provisioned NVFlare sites, each hospital with its own data.

- :mod:`~fedcontrast.deploy.project`: ``deploy/project.yml`` (server, project admin, one client
  per hospital) and ``nvflare provision``;
- :mod:`~fedcontrast.deploy.builder`: ``InstalledPackageBuilder``, the provisioning builder that
  lets every kit run the installed ``fedcontrast`` package's components (no BYOC);
- :mod:`~fedcontrast.deploy.site`: a hospital's own settings (its datalist, its component policy);
- :mod:`~fedcontrast.deploy.admin`: submit, follow, download and read a job through the FLARE API;
- :mod:`~fedcontrast.deploy.poc`: the whole deployment as real processes on this machine (loopback);
- :mod:`~fedcontrast.deploy.cli`: ``fedcontrast deploy {provision,site,submit,poc}``.

See docs/deployment.md.
"""
