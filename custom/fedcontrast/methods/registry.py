"""One registry of training methods, looked up by name by the jobs, the CLI and the benchmark.

A method module registers itself with :func:`register`; importing
:mod:`fedcontrast.methods` imports every method module, so a method added
later appears everywhere without touching the callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedcontrast.methods.base import ServerStrategy, SiteTrainer


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: registry key, also the ``method`` column of benchmark results.
        trainer: the site-side learning code.
        strategy: the server-side logic.
        federated: False for methods where every site trains alone (no aggregation).
        pretraining: True for self-supervised pre-training methods (they produce an encoder).
        description: one line for ``fedcontrast methods`` and the reports.
    """

    name: str
    trainer: type[SiteTrainer]
    strategy: type[ServerStrategy] = ServerStrategy
    federated: bool = True
    pretraining: bool = True
    description: str = ""

    @property
    def defaults(self) -> dict[str, Any]:
        """The method's default configuration: its strategy's defaults (where it has its own)
        under its trainer's (:attr:`SiteTrainer.DEFAULTS`)."""
        return {**getattr(self.strategy, "DEFAULTS", {}), **self.trainer.DEFAULTS}

    @property
    def label_outputs(self) -> bool:
        """False where the trainer's network predicts a pretext's target rather than the label
        set's classes (its ``PRETEXT_OUTPUTS``: the whole-network pretexts ``fedrestore`` and
        ``fedpseudoseg``, and ``fedmotion``'s still and moving); such final weights are never
        exported as a segmentation model, even where their shapes match one."""
        return not getattr(self.trainer, "PRETEXT_OUTPUTS", False)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry; a name may be registered once."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``; a clear error lists the known names."""
    import fedcontrast.methods  # noqa: F401  (registers every method module)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {sorted(_REGISTRY)}") from None


def available_methods(pretraining: bool | None = None) -> list[str]:
    """Names of the registered methods, optionally only (non-)pre-training ones."""
    import fedcontrast.methods  # noqa: F401

    return sorted(n for n, s in _REGISTRY.items() if pretraining is None or s.pretraining == pretraining)
