"""Bundle components that MONAI does not provide: volume checks, atomic writing, per-class reports.

Referenced from the configs by ``_target_`` (``scripts.nifti.nifti_datalist`` ...);
``python -m monai.bundle run`` puts the bundle root on ``sys.path``.
"""
