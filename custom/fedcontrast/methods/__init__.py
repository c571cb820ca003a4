"""Learning code: one module per method, plus shared losses, banks, partitions and augmentations.

Importing this package registers every method (see :mod:`fedcontrast.methods.registry`).
Method modules are added to ``_METHOD_MODULES`` as they are written.
"""

from importlib import import_module

_METHOD_MODULES: tuple[str, ...] = (
    "fcl",
    "local_cl",
    "fedsimclr",
    "supervised",
    "fedbyol",
    "fclopt",
    "fedprox",
    "fedcrld",
    "fedrotation",
    "local_decoder",
    "fedmoco",
    "feddense",
    "fedrestore",
    "fedpseudoseg",
    "fedmotion",
)

for _name in _METHOD_MODULES:
    import_module(f"fedcontrast.methods.{_name}")
