"""Restorable run state, so a stopped run continues from its last complete round.

Two halves, both written atomically (a temporary file, then a rename) after every round:

- the server's: the round to run next, the strategy (global message, banks' and targets'
  state, PTNU/DP bookkeeping: the whole :class:`~fedcontrast.methods.base.ServerStrategy`
  object), each site's last message for local runs, the sites still taking part, who was
  left out, and the ledger's records (:func:`save_server_state`, :func:`load_server_state`);
- each site's: its trainer's :meth:`~fedcontrast.methods.base.SiteTrainer.restorable_state`
  (memory banks, momentum/target networks, optimiser, random generators) and torch's
  global random state, kept in the site's own folder under the round it precedes
  (:func:`save_site_state`, :func:`load_site_state`; the two latest are kept, because a site
  can finish a round the server never aggregated).

Same seed, CPU: a run stopped after round r and resumed gives the weights of a run that was
never stopped (``tests/test_faults_resume.py``).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedcontrast.methods.base import SiteTrainer

#: The server's state file, in its result folder.
SERVER_STATE_FILE = "server_state.pkl"
#: Site state files kept per site and method.
KEEP_SITE_STATES = 2


def _atomic_pickle(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def save_server_state(path: str | os.PathLike, method: str, next_round: int, **state: Any) -> Path:
    """Write the server's state before ``next_round`` (``state``: strategy, own, sites, ...)."""
    return _atomic_pickle(Path(path), {"method": method, "next_round": next_round, **state})


def load_server_state(path: str | os.PathLike, method: str) -> dict[str, Any]:
    """The server state at ``path``, checked to be ``method``'s.

    Raises:
        ValueError: no such file, not a state file, or another method's (named).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no server state to resume from (a run saves it after each round)")
    try:
        with path.open("rb") as handle:
            state = pickle.load(handle)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable server state ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("method") != method:
        found = state.get("method") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: a state of {found!r}, not of {method!r}")
    return state


def site_state_path(folder: str | os.PathLike, next_round: int) -> Path:
    """Where a site's state before ``next_round`` is kept in ``folder``."""
    return Path(folder) / f"before_round_{next_round}.pkl"


def save_site_state(folder: str | os.PathLike, trainer: SiteTrainer, next_round: int) -> Path:
    """Keep ``trainer``'s restorable state before ``next_round`` (and torch's random state)."""
    path = _atomic_pickle(
        site_state_path(folder, next_round),
        {"state": trainer.restorable_state(), "torch_rng": torch.get_rng_state()},
    )
    kept = sorted(Path(folder).glob("before_round_*.pkl"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    for old in kept[:-KEEP_SITE_STATES]:
        old.unlink(missing_ok=True)
    return path


def load_site_state(folder: str | os.PathLike, trainer: SiteTrainer, next_round: int) -> bool:
    """Restore ``trainer`` to its state before ``next_round``; False when none was kept."""
    path = site_state_path(folder, next_round)
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        saved = pickle.load(handle)
    trainer.restore(saved["state"])
    torch.set_rng_state(saved["torch_rng"])
    return True
