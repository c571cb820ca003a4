"""Data: the multi-site cardiac phantom, dataset readers, per-site splits and their validation.

* :mod:`fedcontrast.data.phantom`: ``synthesize_dataset`` (``fedcontrast data synth``).
* :mod:`fedcontrast.data.readers`: ACDC, M&Ms and Decathlon layouts to datalist entries.
* :mod:`fedcontrast.data.splits`: per-site datalists (``fedcontrast data split``).
* :mod:`fedcontrast.data.datalist`: ``load_site_datalist`` for the bundle and the jobs.
* :mod:`fedcontrast.data.validation`: ``DataValidationError`` and the checks behind it.
"""
