"""The contract between the learning code and the federation layer.

Every method is two plain-Python objects that know nothing of NVFlare:

- a :class:`SiteTrainer` that lives at one site, receives a :data:`Message`,
  trains locally and returns a :class:`SiteUpdate`;
- a :class:`ServerStrategy` that lives on the server, decides what each site
  receives (:meth:`ServerStrategy.message_for`) and folds the sites' updates
  into the global state (:meth:`ServerStrategy.aggregate`).

A :data:`Message` is a flat ``{key: numpy array}`` dict whose keys are
``"<kind>/<name>"``; the kind (:data:`KINDS`) says what the bytes are, so one
byte counter (:func:`count_bytes`) serves every method and every direction.
``fedcontrast.flare`` only moves messages between the two objects.

Every trainer's ``local_round`` is guarded here, once for all methods
(:meth:`SiteTrainer.__init_subclass__`): a received message, an upload or a metric (the
loss) holding NaN or Inf raises :class:`NonFiniteError` naming the site, the round and the
entry, so one bad volume or a diverged step never turns the federation into NaN.
"""

from __future__ import annotations

import functools
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from fedcontrast.methods.device import resolve_device

if TYPE_CHECKING:
    from fedcontrast.methods.outbound import OutboundSchema

#: What a message entry carries. ``weights``: the online/main network being averaged;
#: ``target``: a target (EMA) network; ``features``: 128-d projections and their tags;
#: ``stats``: scalar bookkeeping (sample counts, distances, flags).
KINDS: tuple[str, ...] = ("weights", "target", "features", "stats")

Message = dict[str, np.ndarray]


def message_key(kind: str, name: str) -> str:
    """Return the message key ``"<kind>/<name>"``, checking ``kind`` against :data:`KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}; expected one of {KINDS}")
    return f"{kind}/{name}"


def kind_of(key: str) -> str:
    """Return the kind of a message key (the part before the first ``/``)."""
    kind = key.split("/", 1)[0]
    if kind not in KINDS:
        raise ValueError(f"message key {key!r} has no known kind prefix {KINDS}")
    return kind


def select(message: Mapping[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """Entries of one kind, with the ``"<kind>/"`` prefix stripped."""
    prefix = message_key(kind, "")
    return {k[len(prefix) :]: v for k, v in message.items() if k.startswith(prefix)}


def pack(kind: str, entries: Mapping[str, Any]) -> Message:
    """Prefix ``entries`` with ``kind`` and convert tensors to CPU numpy arrays."""
    return {message_key(kind, name): to_numpy(value) for name, value in entries.items()}


def to_numpy(value: Any) -> np.ndarray:
    """A CPU numpy copy of a tensor, array or scalar (never a view: the caller keeps training)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    return np.array(value)


def count_bytes(message: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Payload bytes of a message by kind (``ndarray.nbytes``); every kind present, zeros included."""
    totals = dict.fromkeys(KINDS, 0)
    for key, value in message.items():
        totals[kind_of(key)] += int(np.asarray(value).nbytes)
    return totals


def state_dict_to_message(state: Mapping[str, torch.Tensor], kind: str = "weights") -> Message:
    """Pack a torch state dict as message entries of ``kind``."""
    return pack(kind, state)


def message_to_state_dict(
    message: Mapping[str, np.ndarray], kind: str = "weights"
) -> dict[str, torch.Tensor]:
    """The ``kind`` entries of a message as a torch state dict (CPU tensors)."""
    return {k: torch.as_tensor(np.array(v)) for k, v in select(message, kind).items()}


class NonFiniteError(ValueError):
    """A message, an upload or a loss holds NaN or Inf; the message says where."""


def non_finite_entries(message: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Entries of ``message`` holding NaN or Inf, with how many such values (integer entries are skipped)."""
    bad = {}
    for key, value in message.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.inexact) and not (finite := np.isfinite(value)).all():
            bad[key] = int(value.size - finite.sum())
    return bad


def check_finite(message: Mapping[str, np.ndarray], what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` and the entries when ``message`` holds NaN or Inf."""
    if bad := non_finite_entries(message):
        listed = ", ".join(f"{key!r} ({n} value(s))" for key, n in bad.items())
        raise NonFiniteError(f"{what}: non-finite values (NaN/Inf) in {listed}")


@dataclass
class SiteUpdate:
    """What one site returns after a round.

    Attributes:
        message: entries to upload (weights, features, ...).
        num_samples: samples seen this round; the default aggregation weight.
        metrics: scalars to log (loss, validation Dice, ...); never data.
    """

    message: Message
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def check_choice(config: Mapping[str, Any], key: str, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``key`` when ``config[key]`` is not one of ``choices``."""
    if config[key] not in choices:
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {config[key]!r}")


#: Config keys folded into ``bundle`` (one override dict for the network and the preprocessing).
RENAMED_TO_BUNDLE = ("network", "preprocessing")


def merge_config(defaults: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` over ``defaults``; where both hold a dict, the dicts are merged recursively.

    Raises:
        ValueError: ``defaults`` has a ``bundle`` key and ``config`` still uses one of the
            keys it replaced (:data:`RENAMED_TO_BUNDLE`).
    """
    stale = [key for key in RENAMED_TO_BUNDLE if key in config and "bundle" in defaults]
    if stale:
        raise ValueError(
            f"config keys {stale} were folded into one 'bundle' dict of bundle overrides "
            f"(network and preprocessing alike); pass {{'bundle': {{...}}}} instead"
        )
    merged = dict(defaults)
    for key, value in config.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_config(merged[key], value)
        else:
            merged[key] = value
    return merged


def site_folder(workdir: str | None, site: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """A site's work folder, ``<workdir>/<site>``, and the temporary folder that stands for
    ``workdir`` when it is None (else None). The caller keeps the temporary folder for as long as
    it uses the site's folder: the folder is removed with it."""
    temporary = None if workdir else tempfile.TemporaryDirectory(prefix=f"fedcontrast-{site}-")
    return Path(workdir or temporary.name) / site, temporary


class SiteTrainer(ABC):
    """Learning code at one site. Plain PyTorch; constructed once per run.

    Args:
        config: method hyper-parameters (see each method's docstring) plus the
            common keys ``bundle_dir``, ``seed``, ``local_epochs``, ``batch_size`` and
            ``workdir`` (a folder of the site's for local outputs such as checkpoints and
            logs; methods that write none ignore it); merged over :attr:`DEFAULTS` into
            ``self.config``.
        datalist: this site's volumes as MONAI datalist entries
            (``{"image": path, ...}``; ``"label"`` where the method needs it).
        site: the site's name (tags its features).
        device: torch device string, used where ``config["device"]`` is unset or None (a CUDA
            device this machine lacks is an error naming the site).
    """

    #: The method's default configuration, under which the config given is merged: what its
    #: numbers depend on besides the config (the benchmark records it per run folder).
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Mapping[str, Any], datalist: list[dict], site: str, device: str = "cpu"):
        self.config = merge_config(self.DEFAULTS, config)
        self.datalist = datalist
        self.site = site
        self.device = resolve_device(self.config.get("device") or device, site)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Guard every ``local_round`` a subclass defines with :func:`guarded_round`."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("local_round")
        if own is not None and not getattr(own, "_finite_guard", False):
            cls.local_round = guarded_round(own)

    @classmethod
    @abstractmethod
    def initial_message(cls, config: Mapping[str, Any]) -> Message:
        """The global state before round 0 (deterministic for ``config["seed"]``); built on the server."""

    @classmethod
    def outbound_schema(cls, config: Mapping[str, Any]) -> OutboundSchema:
        """What this method's uploads may hold (:mod:`fedcontrast.methods.outbound`).

        The default allows the round-0 message's entries (the network and heads, with their
        shapes and dtypes) and scalar ``stats/``; a method that sends more overrides this.
        """
        from fedcontrast.methods.outbound import OutboundSchema

        return OutboundSchema.from_message(cls.initial_message(config))

    @abstractmethod
    def local_round(self, incoming: Message, round_num: int) -> SiteUpdate:
        """Load what the server sent, train ``config["local_epochs"]`` epochs, return the upload."""

    #: Attributes :meth:`restorable_state` leaves out: what the trainer rebuilds from its data
    #: and settings (a method adds its own large, rebuilt attributes).
    TRANSIENT: tuple[str, ...] = ("config", "datalist", "site", "device", "volumes")

    def restorable_state(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly (banks, momentum/target networks, random
        generators, ...): by default every attribute but :attr:`TRANSIENT` (it is pickled)."""
        return {k: v for k, v in vars(self).items() if k not in self.TRANSIENT}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back a :meth:`restorable_state` (the trainer was built on the same data and settings)."""
        self.__dict__.update(state)

    @abstractmethod
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of the segmentation network's encoder (keys as in ``network.encoder``)."""


def guarded_round(
    local_round: Callable[[SiteTrainer, Message, int], SiteUpdate],
) -> Callable[[SiteTrainer, Message, int], SiteUpdate]:
    """``local_round`` that refuses non-finite values in, out and in its loss metrics.

    Raises:
        NonFiniteError: the received message, the upload or a loss metric (name holding "loss") holds NaN
            or Inf; the message names the site, the round and the entries.
    """

    @functools.wraps(local_round)
    def guarded(self: SiteTrainer, incoming: Message, round_num: int) -> SiteUpdate:
        where = f"{self.site}: round {round_num}"
        check_finite(incoming, f"{where}: the message received from the server")
        update = local_round(self, incoming, round_num)
        # loss terms only: a validation Dice may be NaN for a class absent from the volumes
        bad = sorted(k for k, v in update.metrics.items() if "loss" in k and not np.isfinite(v))
        if bad:
            raise NonFiniteError(
                f"{where}: the loss diverged or the data holds NaN/Inf: non-finite {bad} "
                f"(check the site's images with `fedcontrast data check --values`; lower the lr)"
            )
        check_finite(update.message, f"{where}: the upload")
        return update

    guarded._finite_guard = True  # type: ignore[attr-defined]
    return guarded


class ServerStrategy:
    """Server-side logic of a method; the default is FedAvg of the ``weights`` entries.

    Args:
        config: the method's configuration (same dict the sites get).
        initial: the round-0 global message from :meth:`SiteTrainer.initial_message`.
    """

    def __init__(self, config: Mapping[str, Any], initial: Message):
        self.config = dict(config)
        self.global_message: Message = dict(initial)

    def message_for(self, site: str, round_num: int) -> Message:
        """What ``site`` receives at the start of ``round_num``."""
        return {k: v for k, v in self.global_message.items() if kind_of(k) == "weights"}

    def aggregate(self, updates: Mapping[str, SiteUpdate], round_num: int) -> None:
        """Fold the sites' uploads of ``round_num`` into the global state."""
        self.global_message.update(weighted_average(updates, kind="weights"))

    def round_metrics(self, round_num: int) -> dict[str, float]:
        """Server-side scalars of the round just aggregated (logged under the site ``"server"``)."""
        return {}

    def global_weights(self) -> Message:
        """The current global ``weights`` entries (what is saved as the global model)."""
        return {k: v for k, v in self.global_message.items() if kind_of(k) == "weights"}


def weighted_average(
    updates: Mapping[str, SiteUpdate], kind: str, weights: Mapping[str, float] | None = None
) -> Message:
    """Average the ``kind`` entries of several updates.

    Args:
        updates: site name -> update; every update must hold the same ``kind`` keys.
        kind: which entries to average.
        weights: site name -> non-negative weight; defaults to ``num_samples``.

    Returns:
        The averaged entries, keys with their ``kind`` prefix. Integer arrays
        (e.g. BatchNorm counters) are taken from the first site unchanged.
    """
    if not updates:
        raise ValueError("cannot aggregate: no site returned an update this round")
    sites = list(updates)
    w = np.array([float(weights[s] if weights is not None else updates[s].num_samples) for s in sites])
    if w.sum() <= 0:
        w = np.ones_like(w)
    w = w / w.sum()
    prefix = message_key(kind, "")
    keys = [k for k in updates[sites[0]].message if k.startswith(prefix)]
    averaged: Message = {}
    for key in keys:
        missing = [s for s in sites if key not in updates[s].message]
        if missing:
            raise KeyError(f"sites {missing} did not send {key!r}")
        first = updates[sites[0]].message[key]
        if not np.issubdtype(first.dtype, np.floating):
            averaged[key] = first
            continue
        acc = sum(wi * updates[s].message[key].astype(np.float64) for wi, s in zip(w, sites))
        averaged[key] = np.asarray(acc, dtype=first.dtype)
    return averaged
