"""NVFlare glue: moves messages between the sites' trainers and the server's strategy.

- :mod:`~fedcontrast.flare.executor`: ``MethodExecutor``, any method's site trainer at a site;
- :mod:`~fedcontrast.flare.controller`: ``MethodController``, any method's server strategy;
- :mod:`~fedcontrast.flare.messages`: ``Message`` <-> ``FLModel`` (params_type FULL);
- :mod:`~fedcontrast.flare.filters`: ``FeaturePrivacyFilter`` (clip + Gaussian noise on features);
- :mod:`~fedcontrast.flare.ledger`: ``RunLedger`` (bytes and metrics per round, JSON + TensorBoard);
- :mod:`~fedcontrast.flare.jobs`: ``build_job`` / ``run_simulator`` / ``export_job`` for ``jobs/*/job.py``.
- :mod:`~fedcontrast.flare.process_group`: the simulator's process group, always ended (no torch or NVFlare).
"""
