"""The label-efficiency protocol (SPEC §7), resumable.

Work is split into units:

- a **pre-training unit** ``(method, seed)`` runs the method's real protocol in process
  (:func:`~fedcontrast.methods.runner.run_in_process`: the same trainer and strategy calls,
  and the same :func:`~fedcontrast.methods.base.count_bytes` on the same messages, as the
  NVFlare controller) for ``pretrain_steps`` optimiser steps per site (``pretrain_rounds``
  rounds, warm-up + cosine learning rate), and saves its encoder(s), its per-round bytes and
  its pre-training curve (loss, alignment, uniformity, partition accuracy per site and round);
- a **fine-tuning unit** ``(method, seed, mode, N, readout)`` starts the bundle network
  (decoder initialised by the run seed, so the same for every method) from that encoder and
  trains it with the ``supervised`` method (the bundle's own train workflow) on N labelled
  volumes per site for ``finetune_steps`` optimiser steps of ``finetune_batch_samples`` slices
  (from ``min(N, finetune_batch_samples)`` volumes), whatever N, federated (FedAvg,
  one global model, one round per checkpoint) or local (each site alone). The readout
  ``finetune`` trains the whole network; ``probe`` trains the decoder on the frozen encoder,
  which isolates the representation. After each of ``finetune_checkpoints`` equal slices
  of the budget (at the smallest N and for random init; elsewhere after the last only, the
  scores the report reads), every site's model is scored on the site's held-out test patients
  (and, for random init, its validation patients: the plateau curve that sets the budget) with
  :class:`~fedcontrast.bench.evaluate.BundleScorer`, BatchNorm statistics re-estimated on the
  site's labelled training volumes first. Each site's model of a local, full fine-tuning unit is
  also scored at the last checkpoint on every *other* site's test patients (cross-site
  generalisation, SPEC §7: rows with ``eval_split`` :data:`CROSS_SITE` and ``trained_site``),
  as the site that trained it deploys it (its own BatchNorm statistics).

A **decoder column** ``<base>+decoder`` (``base`` any registered pre-training method, e.g.
``fcl+decoder``) is the three-stage pipeline global -> local -> fine-tune (SPEC §4): its
pre-training unit is the decoder stage (:func:`decoder_unit`:
:func:`~fedcontrast.methods.local_decoder.pretrain_decoder`, federated on the base's global
encoder, and per site on each site's own encoder where the base is not federated), run on the
base's saved encoders once the base's pre-training unit has finished (the base's pre-training
runs in the same run when it is not saved yet, even when the base is not a column itself);
its fine-tuning units load the encoder AND the pre-trained decoder blocks (``supervised``'s
``pretrained_decoder``). Its record's bytes and wall time are the base's plus the stage's.
A federated pre-training method whose trainer writes a decoder-stage checkpoint of its own
(``save_checkpoint``: ``fedrestore``, ``fedpseudoseg`` and ``fedmotion`` with ``decoder_handover``) is
fine-tuned from that checkpoint the same way.

The **supervised ceiling** column ``supervised_ceiling`` is a diagnostic, not a method a
hospital can run: its pre-training unit trains the bundle network with the ``supervised``
method (federated, FedAvg) on every pre-training volume *with its label*, for the same
optimiser steps and rounds as the contrastive methods (fine-tuning's learning rate and batch
shape), and hands over its encoder like any pre-training. What an encoder pre-trained with all
those labels adds over random init bounds what any pre-training of the encoder can add on the
run's data, network and fine-tuning protocol. It needs a dataset whose pre-training volumes
are labelled (the phantom's all are). Its variants (:data:`CEILING_CLASSES`) train the same
way on fewer, merged classes (the label files rewritten once under ``ceiling_labels/<column>/``
in the run folder), to show which distinctions of the labels the encoder's gain comes from.
The same recipe on each patient's label-free motion mask is a method a hospital runs: ``fedmotion``.

``random_init`` is fine-tuning without an encoder. Federated methods yield one global encoder;
``local_cl`` yields one per site: local fine-tuning starts each site from its own, federated
fine-tuning from their average. Units run on :func:`unit_pool`'s reused workers, and the
peak resident memory a unit reports (sites run one after another) is its own
(:func:`run_unit`). Every finished unit
is appended to ``rows.jsonl`` (and its pre-training record to ``pretrain/``), so an
interrupted run continues where it stopped, and each call that runs units records the machine
it ran on (:func:`~fedcontrast.bench.environment.record_call`); a run folder refuses other settings, except
more methods (a method added later runs as its own column with the same configuration). A call
may run only some budgets' units (``run_budgets``: e.g. the largest N before the middle ones
when time is short); the others stay missing, and the report lists them, until a later call.
The data split is fixed (its seed is ``data_seed``): per site ``test_per_site`` test and
``validation_per_site`` validation patients, never used for pre-training or fine-tuning;
labelled sets nested across N. Run seeds change the training only.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcontrast.bench.environment import record_call
from fedcontrast.bench.report import CROSS_SITE
from fedcontrast.data.labels import ACDC_LABELS, merge_classes, relabel_file
from fedcontrast.methods.base import KINDS, Message, message_to_state_dict
from fedcontrast.methods.registry import available_methods, get_method
from fedcontrast.methods.runner import run_in_process
from fedcontrast.nets.bundle import encoder_options, encoder_state, save_encoder
from fedcontrast.nets.presets import network_preset

logger = logging.getLogger(__name__)

RANDOM_INIT = "random_init"
#: The supervised-ceiling column (see the module docstring).
SUPERVISED_CEILING = "supervised_ceiling"
#: The supervised-ceiling columns: name -> the classes it trains on, as groups of the label set's
#: foreground classes (:func:`~fedcontrast.data.labels.merge_classes`: one class per group, the
#: classes in no group join the background); None keeps the labels as they are.
CEILING_CLASSES: dict[str, list[list[str]] | None] = {
    SUPERVISED_CEILING: None,
    f"{SUPERVISED_CEILING}_cavities": [["RV", "LV"], ["MYO"]],  # the two blood pools one class
    f"{SUPERVISED_CEILING}_myocardium": [["MYO"]],  # the muscle against everything else
    f"{SUPERVISED_CEILING}_heart": [["RV", "MYO", "LV"]],  # the heart against the background
}
#: Suffix of a decoder column: ``<base>+decoder`` (see the module docstring).
DECODER_SUFFIX = "+decoder"
MODES = ("local", "federated")
#: Settings a later call may extend in the same run folder (the folder keeps the union).
GROWING = ("methods", "seeds")

#: The methods of the published comparison (SPEC §7; issue 10's grid): scheduled before any
#: other method, so a run cut short holds their complete smallest-budget cells first.
CORE_METHODS = (RANDOM_INIT, "local_cl", "fedsimclr", "fedbyol", "fcl", "fclopt", "fclopt_ptnu_dp")
READOUTS = ("finetune", "probe")
#: Values of ``BenchConfig.validation``.
VALIDATION_SCOPES = (RANDOM_INIT, "all")

#: The bench network: the bundle's SegResNetDS in 2D (slices, as the published FCL and local
#: contrastive U-Nets) at 3 mm in-plane on a 48 x 48 crop.
SMALL_BUNDLE: dict[str, Any] = {"spatial_dims": 2, **network_preset("small")}

#: Named settings of ``fedcontrast bench --profile``; options given on the command line win.
PROFILES: dict[str, dict[str, Any]] = {
    # CI: two sites, one seed, N = 1, a tiny network: every method in a few minutes
    "quick": {
        "budgets": [1],
        "seeds": [0],
        "sites": 2,
        "patients_per_site": 5,
        "test_per_site": 1,
        "validation_per_site": 1,
        "pretrain_steps": 2,
        "pretrain_rounds": 1,
        "finetune_steps": 4,
        "finetune_checkpoints": 2,
        "difficulty": "standard",
        "bundle": {**SMALL_BUNDLE, **network_preset("tiny")},
    },
    # the full grid on a 2-core CPU inside one working session (measured in the report)
    "cpu": {},
    # realistic budgets on a GPU: full-resolution phantom, thousands of pre-training steps
    "gpu": {
        "size": "full",
        "pretrain_steps": 2000,
        "pretrain_rounds": 20,
        "batch_size": 8,
        "finetune_steps": 400,
        "finetune_checkpoints": 8,
        "bundle": {"spatial_dims": 2, "init_filters": 16},
        "device": "auto",
    },
}


#: How each setting of the cpu profile was chosen (the report's settings table). None was chosen on
#: test scores; where a setting could not be tuned in the time available, that is what it says.
SETTING_CHOICES: dict[str, str] = {
    "finetune_steps": "96 (the cpu profile): the largest budget whose full grid fits one 2-core session; at "
    "the chosen learning rate random init's validation curves are at their 192-step level there (within "
    "0.01, local N = 1 above it) except federated N = 8, 0.047 below it (benchmarks/results/finetune_lr). "
    "At lr 1e-3 the "
    "budget chosen on random init's 768-step validation curve was 384 "
    "(benchmarks/results/label_efficiency_budget)",
    "finetune_lr": "AdamW 3e-3, chosen on random init's validation curves (N = 1 and 8, local and federated, "
    "seeds 0 and 1, 192 steps) among 1e-3, 3e-3 and 1e-2: the best mean validation Dice at 96 and at "
    "192 steps (benchmarks/results/finetune_lr)",
    "finetune_encoder_lr_scale": "1 (the encoder at the decoder's rate): random init's best on validation "
    "among 1, 0.3, 0.1 and 0.03 (three phantoms, N = 1: 0.3 loses 0.012 / 0.003, 0.1 0.026 / 0.023, 0.03 "
    "0.036 / 0.058), and FCL's and every other contrastive column's (0.3 tried; section 27, one phantom); an "
    "encoder that learned the anatomy keeps more at 0.3 to 0.03 (ablations README section 25)",
    "finetune_encoder_warmup_steps": "0 (the encoder trains from the first step): random init's best on "
    "validation over both modes among 0, 16 and 48 of the 96 steps (three phantoms, N = 1: 16 scores "
    "-0.010 / +0.007, 48 -0.013 / -0.022), and FCL's and every other contrastive column's (16 tried; "
    "section 27); fedmotion's federated gain halves on test with 48 (ablations README section 26)",
    "finetune_batch_samples": "8 slices a step for every N (from min(N, 8) volumes), so every budget "
    "gets the same optimiser steps on batches of the same size; not tuned",
    "pretrain_steps": "set by the 2-core time budget, not tuned (benchmarks/pretraining_ablation.py "
    "measures 4x the steps)",
    "pretrain_rounds": "4 rounds, so the schedule and feature exchange act; not tuned",
    "batch_size": "4 volumes x 4 partitions = 16 samples a step, the methods' default; 16 volumes "
    "moved FCL's fine-tuned gain by less than 0.01 on validation (ablations README section 28, one phantom)",
    "bundle": "2D SegResNetDS at 3 mm on a 48 x 48 crop: the published methods' 2D networks, at a "
    "size a CPU can afford",
    "size": "small: a heart-centred crop, so a CPU affords the grid; on the whole chest (full, 96 x 96 at "
    "3 mm) FCL gains nothing either (ablations README section 29, two phantoms)",
    "difficulty": "the phantom calibrated on random init's validation curve (phantom_difficulty.json)",
    "cine": "false: the phantom's ED and ES frames only, what the methods pre-train on; true only where "
    "fedmotion's masks come from the whole cycle (ablations README section 19), averaged into 6 phases "
    "(phase_bins: tighter masks on the whole chest, level with every frame on the crop; sections 30-32)",
    "test_per_site": "2 test patients per site (SPEC §7 minimum)",
    "validation_per_site": "2 validation patients per site, for the plateau and any tuning",
    "seeds": "5 seeds (SPEC §7 minimum)",
    "pretrain_overrides": "none: the methods' defaults (AdamW 1e-3, temperature 0.1, default augmentation). "
    "FCL's lr (1e-3, 3e-3, 1e-2), temperature (0.1, 0.5) and a stronger augmentation compared on "
    "validation at N = 1, 3 seeds (benchmarks/results/pretrain_sweep): larger learning rates are worse; "
    "the pick, temperature 0.5, beat the defaults by 0.013, inside the benchmark's noise, so not adopted",
}


@dataclass
class BenchConfig:
    """Everything that changes the numbers (written into every result file); defaults = ``cpu``."""

    methods: list[str] = field(default_factory=lambda: [RANDOM_INIT, *available_methods(pretraining=True)])
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    sites: int = 4
    patients_per_site: int = 24
    test_per_site: int = 2
    validation_per_site: int = 2
    data_seed: int = 0
    size: str = "small"
    difficulty: str = "realistic"
    #: the phantom also writes each patient's cine series (every frame of the cycle), from which
    #: ``fedmotion``'s masks are then computed
    cine: bool = False
    pretrain_steps: int = 96
    pretrain_rounds: int = 4
    batch_size: int = 4
    finetune_steps: int = 96
    finetune_checkpoints: int = 4
    finetune_lr: float = 3e-3
    #: the encoder's fine-tuning learning rate as a fraction of ``finetune_lr`` (the bundle's
    #: ``encoder_lr_scale``); the probe freezes the encoder whatever it is
    finetune_encoder_lr_scale: float = 1.0
    #: fine-tuning steps (per site) for which only the decoder trains, the encoder's learning rate
    #: held at 0, before it joins (the bundle's ``encoder_warmup_iterations``)
    finetune_encoder_warmup_steps: int = 0
    finetune_batch_samples: int = 8
    readouts: list[str] = field(default_factory=lambda: list(READOUTS))
    probe_modes: list[str] = field(default_factory=lambda: ["federated"])
    probe_budgets: list[int] = field(default_factory=lambda: [1, 2])
    bundle: dict[str, Any] = field(default_factory=lambda: dict(SMALL_BUNDLE))
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    #: which methods are also scored on the validation patients: random init (its plateau curve)
    #: or ``"all"`` (to choose a method's settings on validation, never on test)
    validation: str = RANDOM_INIT

    def __post_init__(self) -> None:
        for total, parts, what in (
            (self.pretrain_steps, self.pretrain_rounds, "pretrain_steps / pretrain_rounds"),
            (self.finetune_steps, self.finetune_checkpoints, "finetune_steps / finetune_checkpoints"),
        ):
            if parts < 1 or total < parts or total % parts:
                raise ValueError(f"{what} must be a whole number of steps >= 1, got {total} / {parts}")
        unknown = set(self.readouts) - set(READOUTS)
        if unknown:
            raise ValueError(f"unknown readouts {sorted(unknown)}; known: {READOUTS}")
        if self.validation not in VALIDATION_SCOPES:
            raise ValueError(f"validation must be one of {VALIDATION_SCOPES}, got {self.validation!r}")

    @property
    def torch_device(self) -> str:
        """``device``, with ``"auto"`` resolved to CUDA when available."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def pretrain_config(self, seed: int) -> dict[str, Any]:
        """The pre-training methods' configuration for ``seed``."""
        return {
            "bundle": self.bundle,
            "seed": seed,
            "local_steps": self.pretrain_steps // self.pretrain_rounds,
            "rounds": self.pretrain_rounds,
            "batch_size": self.batch_size,
            **self.pretrain_overrides,
        }

    @property
    def label_set(self) -> dict[str, int]:
        """The data's label set: the ``bundle`` override ``labels``, else ACDC's."""
        return self.bundle.get("labels", ACDC_LABELS)

    def ceiling_config(self, seed: int, column: str = SUPERVISED_CEILING) -> dict[str, Any]:
        """The ``supervised`` configuration of the supervised-ceiling ``column``'s pre-training for
        ``seed``: the pre-training's steps and rounds, fine-tuning's learning rate and step of
        ``finetune_batch_samples`` slices from ``batch_size`` volumes, and the column's merged
        label set (:data:`CEILING_CLASSES`) as the network's outputs."""
        volumes = min(self.batch_size, self.finetune_batch_samples)
        if CEILING_CLASSES[column] is None:
            classes = {}
        else:
            classes = {"labels": merge_classes(self.label_set, CEILING_CLASSES[column])[0]}
        samples = self.finetune_batch_samples // volumes
        return {
            "bundle": {**self.bundle, "samples_per_volume": samples, **classes},
            "local_steps": self.pretrain_steps // self.pretrain_rounds,
            "lr": self.finetune_lr,
            "batch_size": volumes,
            "seed": seed,
            "num_workers": 0,
        }

    def finetune_config(self, unit: FinetuneUnit, encoder: str, decoder: str = "") -> dict[str, Any]:
        """The ``supervised`` configuration of ``unit``, starting from ``encoder`` ("" for none), or
        from the decoder-stage checkpoint ``decoder`` (its encoder and decoder blocks).

        A step's batch holds ``finetune_batch_samples`` samples whatever N: ``min(N, samples)``
        volumes, ``samples // volumes`` samples (slices in 2D, patches in 3D) drawn from each. The
        encoder fine-tunes at ``finetune_encoder_lr_scale`` times the learning rate, after the decoder
        has trained alone for ``finetune_encoder_warmup_steps`` steps.
        """
        start = {"pretrained_encoder": "", "pretrained_decoder": decoder} if decoder else {}
        volumes = min(unit.n_labeled, self.finetune_batch_samples)
        return {
            "bundle": {
                **self.bundle,
                "samples_per_volume": self.finetune_batch_samples // volumes,
                "encoder_lr_scale": self.finetune_encoder_lr_scale,
                "encoder_warmup_iterations": self.finetune_encoder_warmup_steps,
            },
            "pretrained_encoder": encoder,
            **start,
            "local_steps": self.finetune_steps // self.finetune_checkpoints,
            "lr": self.finetune_lr,
            "batch_size": volumes,
            "freeze_encoder": unit.readout == "probe",
            "seed": unit.seed,
            "num_workers": 0,
        }


def base_method(method: str) -> str:
    """The pre-training method a column's encoders come from: ``fcl`` for ``fcl+decoder``."""
    return method.removesuffix(DECODER_SUFFIX)


def is_decoder_column(method: str) -> bool:
    """True for a decoder column ``<base>+decoder``."""
    return method.endswith(DECODER_SUFFIX)


def check_method(method: str) -> None:
    """Refuse a bench method name that is not ``random_init``, a registered method or ``<base>+decoder``.

    Raises:
        ValueError: an unknown name (from the registry), or a decoder column whose base is not a
            pre-training method.
    """
    if method == RANDOM_INIT or method in CEILING_CLASSES:
        return
    spec = get_method(base_method(method))
    if is_decoder_column(method) and not spec.pretraining:
        raise ValueError(
            f"{method}: the decoder stage needs encoders from a pre-training method, and "
            f"{spec.name} is not one (pre-training methods: {available_methods(pretraining=True)})"
        )


_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB since :func:`reset_peak_rss` (or its start).

    Linux's ``VmHWM``; elsewhere ``ru_maxrss``, the peak since the process started.
    """
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to its current size; False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def run_unit(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a reused worker process, its peak memory measured from this call on."""
    reset_peak_rss()
    return fn(*args)


def unit_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` spawned processes for bench units, submitted as ``pool.submit(run_unit, fn, *args)``.

    Processes are reused across units (a fresh one pays the libraries' import, several seconds)
    where :func:`reset_peak_rss` works, so each unit's peak memory is still its own; elsewhere
    every unit gets a fresh process.
    """
    fresh = None if reset_peak_rss() else 1
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), max_tasks_per_child=fresh)


def _site_bytes(history: list[dict[str, Any]], site: str) -> dict[str, Any]:
    """Sum of one site's per-round bytes, by kind and direction, in the RESULTS_FORMAT keys."""
    by_kind = {f"{k}_{d}": 0 for k in KINDS for d in ("up", "down")}
    up = down = 0
    for record in history:
        if record["site"] != site:
            continue
        for kind in KINDS:
            up += record["bytes_up"].get(kind, 0)
            down += record["bytes_down"].get(kind, 0)
            by_kind[f"{kind}_up"] += record["bytes_up"].get(kind, 0)
            by_kind[f"{kind}_down"] += record["bytes_down"].get(kind, 0)
    return {"pretrain_bytes_up": up, "pretrain_bytes_down": down, "bytes_by_kind": by_kind}


#: Per-round metrics of a pre-training site kept in the record's ``curve``.
CURVE_KEYS = ("loss", "alignment", "uniformity", "partition_accuracy", "samples_per_s", "lr")
#: The loss as the bundle-trained methods (fedmotion, the supervised ceilings) report it.
BUNDLE_LOSS_KEY = "train_loss"


def pretraining_curve(history: list[dict[str, Any]], steps_per_round: int) -> list[dict[str, Any]]:
    """One dict per (round, site): ``round``, ``step`` (steps done by the round's end), ``site`` and
    the :data:`CURVE_KEYS` the method reported (``loss`` also from :data:`BUNDLE_LOSS_KEY`)."""
    curve = []
    for r in history:
        metrics = r["metrics"]
        if "loss" not in metrics and BUNDLE_LOSS_KEY in metrics:
            metrics = {**metrics, "loss": metrics[BUNDLE_LOSS_KEY]}
        curve.append(
            {
                "round": r["round"],
                "step": (r["round"] + 1) * steps_per_round,
                "site": r["site"],
                **{k: metrics[k] for k in CURVE_KEYS if k in metrics},
            }
        )
    return curve


def image_labels(dataset: Path, fmt: str, cache_dir: Path) -> dict[str, str]:
    """``{image path: label path}`` of every labelled volume of ``dataset`` (the supervised ceiling's
    labels for the pre-training volumes, whose split entries carry none)."""
    from fedcontrast.data.readers import read_dataset

    entries, _ = read_dataset(dataset, fmt, cache_dir=cache_dir, allow_unlabeled=fmt == "acdc")
    return {e["image"]: e["label"] for e in entries if "label" in e}


def ceiling_entries(datalist: dict[str, Any], labels: dict[str, str]) -> list[dict[str, str]]:
    """A site's pre-training volumes (:func:`~fedcontrast.methods.volumes.pretraining_entries`) with
    their labels, for the supervised ceiling.

    Raises:
        ValueError: a pre-training volume has no label (named): the ceiling needs them all.
    """
    from fedcontrast.methods.volumes import pretraining_entries

    missing = [e["image"] for e in pretraining_entries(datalist) if e["image"] not in labels]
    if missing:
        raise ValueError(
            f"site {datalist.get('site')}: {SUPERVISED_CEILING} needs every pre-training volume labelled; "
            f"{len(missing)} are not, e.g. {missing[0]}"
        )
    return [{"image": e["image"], "label": labels[e["image"]]} for e in pretraining_entries(datalist)]


def ceiling_labels(
    labels: dict[str, str],
    datalists: Iterable[dict[str, Any]],
    column: str,
    folder: Path,
    label_set: dict[str, int] = ACDC_LABELS,
) -> dict[str, str]:
    """``{image path: label path}`` of the ``datalists``' pre-training volumes for the supervised-ceiling
    ``column``: ``labels``' files where it keeps every class, else their copies with its classes
    merged (:data:`CEILING_CLASSES`, classes of ``label_set``), written under ``folder`` unless there
    already.

    Raises:
        ValueError: a pre-training volume has no label (:func:`ceiling_entries`).
    """
    entries = [e for datalist in datalists for e in ceiling_entries(datalist, labels)]
    groups = CEILING_CLASSES[column]
    if groups is None:
        return {e["image"]: e["label"] for e in entries}
    values = merge_classes(label_set, groups)[1]
    merged = {}
    for index, entry in enumerate(sorted(entries, key=lambda e: e["image"])):
        target = folder / f"{index:04d}_{Path(entry['label']).name}"
        if not target.exists():
            relabel_file(entry["label"], target, values)
        merged[entry["image"]] = str(target)
    return merged


def pretrain_unit(
    config: BenchConfig,
    method: str,
    seed: int,
    datalists: dict,
    out: Path,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one pre-training; save its encoder(s) under ``out``; return its record (bytes, wall, rounds).

    ``pretrain_overrides`` keys ``feature_clip`` and ``feature_noise`` (C and Z, default 0: off)
    clip and noise every feature row a site uploads, as the sites' NVFlare feature privacy
    filter does (:class:`~fedcontrast.methods.privacy.FeaturePrivacy`, seeded by ``seed``).
    A supervised-ceiling column (``method`` in :data:`CEILING_CLASSES`) trains on the pre-training
    volumes with their ``labels`` (:func:`ceiling_labels`) instead.
    """
    from fedcontrast.methods.privacy import feature_privacy_from_config
    from fedcontrast.methods.volumes import pretraining_entries

    torch.set_num_threads(1)
    if method in CEILING_CLASSES:
        run_method, cfg = "supervised", config.ceiling_config(seed, method)
        entries = {site: ceiling_entries(d, labels or {}) for site, d in datalists.items()}
    else:
        run_method, cfg = method, config.pretrain_config(seed)
        entries = {site: pretraining_entries(d) for site, d in datalists.items()}
    result = run_in_process(
        run_method,
        cfg,
        entries,
        config.pretrain_rounds,
        device=config.torch_device,
        site_filter=feature_privacy_from_config(cfg),
    )
    options = encoder_options(None, cfg["bundle"])
    out.mkdir(parents=True, exist_ok=True)
    spec = get_method(run_method)
    if spec.federated:
        save_encoder(encoder_state(message_to_state_dict(result.global_message)), out / "global.pt", options)
        saver = getattr(spec.trainer, "save_checkpoint", None)
        if saver is not None:  # the whole-network pretexts' decoder blocks, with decoder_handover
            saver(result.global_message, out, cfg, None)
    else:
        for site, state in result.encoders.items():
            save_encoder(state, out / f"{site}.pt", options)
        stacked = {k: torch.stack([s[k].float() for s in result.encoders.values()]) for k in state}
        average = {k: v.mean(0).to(state[k].dtype) for k, v in stacked.items()}
        save_encoder(average, out / "global.pt", options)
    record = {
        "method": method,
        "seed": seed,
        "wall_s": result.wall_s,
        "sites": {site: _site_bytes(result.history, site) for site in datalists},
        "per_round": [
            {"round": r["round"], "site": r["site"], "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"]}
            for r in result.history
        ],
        "server_metrics": result.server_metrics,
        "curve": pretraining_curve(result.history, config.pretrain_steps // config.pretrain_rounds),
        "samples_per_s": float(np.mean([r["metrics"].get("samples_per_s", np.nan) for r in result.history])),
        "peak_rss_mb": peak_rss_mb(),
    }
    (out / "record.json").write_text(json.dumps(record, indent=1))
    return record


def decoder_unit(
    config: BenchConfig, method: str, seed: int, datalists: dict, base: Path, out: Path
) -> dict[str, Any]:
    """The pre-training unit of the decoder column ``method`` (``<base>+decoder``): the decoder stage.

    Runs :func:`~fedcontrast.methods.local_decoder.pretrain_decoder` (the ``local_decoder``
    defaults, ``pretrain_rounds`` rounds of the same steps as pre-training) on the encoders the
    base's :func:`pretrain_unit` saved in ``base``: federated on ``global.pt``, writing
    ``out/pretrained_decoder.pt``; and where the base saved per-site encoders (a method that is
    not federated), per site on each ``<site>.pt``, writing ``out/<site>/pretrained_decoder.pt``.
    The record has :func:`pretrain_unit`'s keys: ``sites`` (bytes per site: the base's plus the
    federated decoder stage's), ``wall_s`` (the base's plus the stage's), ``per_round`` (the
    base's rounds, then the stage's numbered after them), ``curve`` (the base's curve, then the
    federated stage's, ``stage`` saying which), ``samples_per_s`` (the stage's) and
    ``peak_rss_mb``; plus ``stage_wall_s``, ``stage_sites`` (the stage's own bytes) and the
    per-site stages' ``local_curve``.
    """
    from fedcontrast.methods.local_decoder import DECODER_FILE, pretrain_decoder
    from fedcontrast.methods.volumes import pretraining_entries

    torch.set_num_threads(1)
    base_record = json.loads((base / "record.json").read_text())
    entries = {site: pretraining_entries(d) for site, d in datalists.items()}
    cfg = {**config.pretrain_config(seed), "encoder_method": base_method(method)}
    rounds, steps_per_round = config.pretrain_rounds, config.pretrain_steps // config.pretrain_rounds
    start = time.perf_counter()
    federated = pretrain_decoder(base / "global.pt", cfg, entries, rounds, True, out, config.torch_device)
    history = federated.runs[0].history
    local_curve = []
    per_site = [site for site in entries if (base / f"{site}.pt").exists()]
    if per_site:  # per-site encoders: a per-site decoder stage on each, for local fine-tuning
        local = pretrain_decoder(
            {site: base / f"{site}.pt" for site in per_site},
            cfg,
            {site: entries[site] for site in per_site},
            rounds,
            False,
            out,
            config.torch_device,
        )
        local_curve = [e for run in local.runs for e in pretraining_curve(run.history, steps_per_round)]
    wall = time.perf_counter() - start
    assert (out / DECODER_FILE).exists()
    offset = 1 + max((r["round"] for r in base_record["per_round"]), default=-1)
    stage_sites = {site: _site_bytes(history, site) for site in datalists}
    sites = {}
    for site, own in stage_sites.items():
        before = base_record["sites"][site]
        sites[site] = {
            "pretrain_bytes_up": before["pretrain_bytes_up"] + own["pretrain_bytes_up"],
            "pretrain_bytes_down": before["pretrain_bytes_down"] + own["pretrain_bytes_down"],
            "bytes_by_kind": {k: before["bytes_by_kind"][k] + v for k, v in own["bytes_by_kind"].items()},
        }
    curve = [{**e, "stage": "encoder"} for e in base_record["curve"]] + [
        {**e, "round": e["round"] + offset, "step": e["step"] + config.pretrain_steps, "stage": "decoder"}
        for e in pretraining_curve(history, steps_per_round)
    ]
    record = {
        "method": method,
        "seed": seed,
        "base": str(base),
        "wall_s": base_record["wall_s"] + wall,
        "stage_wall_s": wall,
        "sites": sites,
        "stage_sites": stage_sites,
        "per_round": base_record["per_round"]
        + [
            {
                "round": r["round"] + offset,
                "site": r["site"],
                "bytes_up": r["bytes_up"],
                "bytes_down": r["bytes_down"],
            }
            for r in history
        ],
        "server_metrics": base_record["server_metrics"],
        "curve": curve,
        "local_curve": local_curve,
        "samples_per_s": float(np.mean([r["metrics"].get("samples_per_s", np.nan) for r in history])),
        "peak_rss_mb": max(peak_rss_mb(), base_record["peak_rss_mb"]),
    }
    (out / "record.json").write_text(json.dumps(record, indent=1))
    return record


@dataclass(frozen=True)
class FinetuneUnit:
    """One fine-tuning unit (see the module docstring)."""

    method: str
    seed: int
    mode: str
    n_labeled: int
    readout: str = "finetune"

    @property
    def key(self) -> str:
        return f"{self.method}|{self.seed}|{self.mode}|{self.n_labeled}|{self.readout}"


def finetune_unit(
    config: BenchConfig,
    unit: FinetuneUnit,
    splits: dict[str, dict],
    encoders: Path | None,
    record: dict | None,
    examples_dir: Path,
) -> list[dict[str, Any]]:
    """Fine-tune one unit, scoring every site at the checkpoints the report reads.

    Random init is scored at every checkpoint (its validation curve decides the plateau), and
    so is every method at the smallest budget (the learning curves); the other units only at the
    last checkpoint, whose scores are the same either way.

    Returns one row per (site, scored checkpoint, evaluation split): the RESULTS_FORMAT keys plus
    ``unit``, ``readout``, ``finetune_steps`` (steps done when scored) and ``eval_split``
    (``test``; random init also ``validation``); a local full fine-tuning unit adds, at the last
    checkpoint, one :data:`CROSS_SITE` row per (trained site, other site) with ``trained_site``
    (its bytes and times are the trained site's). The first seed at the smallest budget also
    saves an example (image, truth, prediction) of the first site's first test volume to
    ``examples_dir/<method>_<mode>.npz``.
    """
    from fedcontrast.bench.evaluate import BundleScorer

    torch.set_num_threads(1)
    training = {site: s["training"] for site, s in splits.items()}
    scorer = BundleScorer(
        {site: s["test"] for site, s in splits.items()},
        config.bundle,
        calibration_sets=training,
        validation_sets={site: s["validation"] for site, s in splits.items()}
        if unit.method == RANDOM_INIT or config.validation == "all"
        else None,
        device=config.torch_device,
    )
    steps_per_round = config.finetune_steps // config.finetune_checkpoints
    scores: list[dict[str, Any]] = []
    models: dict[str, dict[str, torch.Tensor]] = {}

    curve = unit.method == RANDOM_INIT or unit.n_labeled == min(config.budgets)
    cross_site = unit.mode == "local" and unit.readout == "finetune" and len(training) > 1

    def score(round_num: int, states: dict[str, dict[str, torch.Tensor]]) -> None:
        models.update(states)
        last = round_num + 1 == config.finetune_checkpoints
        if not curve and not last:
            return
        steps = (round_num + 1) * steps_per_round
        for site, state in states.items():
            scorer.load(state, site)  # BatchNorm re-estimated once per model, for every split below
            for split in ("test", "validation"):
                if scorer.splits[split]:
                    scores.append(
                        {
                            "site": site,
                            "finetune_steps": steps,
                            "eval_split": split,
                            **scorer.evaluate(site, split),
                        }
                    )
            if cross_site and last:
                for tested, result in scorer.evaluate_elsewhere(site).items():
                    scores.append(
                        {
                            "site": tested,
                            "trained_site": site,
                            "finetune_steps": steps,
                            "eval_split": CROSS_SITE,
                        }
                        | result
                    )

    from fedcontrast.methods.local_decoder import DECODER_FILE

    start = time.perf_counter()
    device = config.torch_device
    shared = encoders / DECODER_FILE if encoders else None
    if shared is not None and (is_decoder_column(unit.method) or shared.exists()):
        # decoder-stage checkpoints, a decoder column's or a pre-training's own: encoder and decoder blocks
        def start_from(site: str | None) -> dict[str, Any]:
            own = encoders / site / DECODER_FILE if site else shared
            return config.finetune_config(unit, "", str(own if own.exists() else shared))
    else:

        def start_from(site: str | None) -> dict[str, Any]:
            own = encoders / f"{site}.pt" if encoders and site else None
            encoder = str(own if own and own.exists() else encoders / "global.pt") if encoders else ""
            return config.finetune_config(unit, encoder)

    if unit.mode == "federated":
        cfg = start_from(None)

        def on_round(round_num: int, _updates: dict, global_message: Message) -> None:
            score(round_num, dict.fromkeys(training, message_to_state_dict(global_message)))

        run_in_process(
            "supervised", cfg, training, config.finetune_checkpoints, device=device, on_round=on_round
        )
    else:
        for site, entries in training.items():
            cfg = start_from(site)

            def on_round(round_num: int, updates: dict, _global: Message, site: str = site) -> None:
                score(round_num, {site: message_to_state_dict(updates[site].message)})

            run_in_process(
                "supervised", cfg, {site: entries}, config.finetune_checkpoints, False, device, on_round
            )
    wall = time.perf_counter() - start
    rows = []
    for entry in scores:
        own = entry.get("trained_site", entry["site"])
        bytes_ = record["sites"][own] if record else _site_bytes([], own)
        rows.append(
            {
                "unit": unit.key,
                "method": unit.method,
                "finetune": unit.mode,
                "readout": unit.readout,
                "n_labeled": unit.n_labeled,
                "seed": unit.seed,
                **entry,
                **bytes_,
                "pretrain_wall_s": record["wall_s"] if record else 0.0,
                "finetune_wall_s": wall,
                "peak_rss_mb": max(peak_rss_mb(), record["peak_rss_mb"] if record else 0.0),
            }
        )
    if unit.seed == config.seeds[0] and unit.n_labeled == min(config.budgets) and unit.readout == "finetune":
        site = sorted(models)[0]
        examples_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            examples_dir / f"{unit.method}_{unit.mode}.npz", **scorer.example(models[site], site)
        )
    return rows


def hold_out_validation(datalist: dict[str, Any], patients: int) -> dict[str, Any]:
    """Move the first ``patients`` test patients of a site datalist into a ``validation`` list."""
    order = list(dict.fromkeys(e["patient"] for e in datalist["test"]))
    if patients >= len(order):
        raise ValueError(
            f"site {datalist.get('site')}: {len(order)} held-out patients cannot give "
            f"{patients} validation patients and a test set"
        )
    validation = set(order[:patients])
    return {
        **datalist,
        "validation": [e for e in datalist["test"] if e["patient"] in validation],
        "test": [e for e in datalist["test"] if e["patient"] not in validation],
    }


def prepare_splits(
    config: BenchConfig, out: Path, dataset: Path | None = None, fmt: str = "acdc"
) -> dict[int, dict[str, dict]]:
    """Per-budget site splits ``{N: {site: site datalist}}`` (the phantom unless ``dataset`` is given).

    One split seed for every budget: the test and validation sets are the same and the labelled
    sets nested. Each site file holds ``training``, ``unlabeled``, ``validation`` and ``test``.
    """
    from fedcontrast.data.datalist import load_site_datalist
    from fedcontrast.data.io import write_json
    from fedcontrast.data.phantom import synthesize_dataset
    from fedcontrast.data.readers import read_dataset
    from fedcontrast.data.splits import write_site_splits

    if dataset is None:
        dataset = out / "data"
        if not (dataset / "phantom.json").exists():
            synthesize_dataset(
                dataset,
                config.sites,
                config.patients_per_site,
                config.data_seed,
                config.size,
                difficulty=config.difficulty,
                cine=config.cine,
            )
    entries, labels = read_dataset(dataset, fmt, cache_dir=out / "frames")
    splits = {}
    for n in config.budgets:
        folder = out / "splits" / f"N{n}"
        write_site_splits(
            entries,
            labels,
            folder,
            n,
            config.test_per_site + config.validation_per_site,
            seed=config.data_seed,
            sites=None if dataset == out / "data" else config.sites,
        )
        splits[n] = {}
        for path in sorted(folder.glob("site-*.json")):
            datalist = hold_out_validation(load_site_datalist(path), config.validation_per_site)
            write_json(path, datalist)
            splits[n][path.stem] = datalist
    return splits


def completed_units(rows_file: Path) -> set[str]:
    """Keys of the fine-tuning units already in ``rows_file``, read before appending to it.

    An incomplete last line (a run killed while writing it) is dropped from the file with a
    warning (:func:`load_rows` with ``repair``), so the rows appended next start on a line of
    their own; its unit is run again.
    """
    return {row["unit"] for row in load_rows(rows_file, repair=True)}


def method_tier(method: str) -> int:
    """0 for the :data:`CORE_METHODS`, 1 for any other method."""
    return int(method not in CORE_METHODS)


def finetune_units(config: BenchConfig) -> list[FinetuneUnit]:
    """Every fine-tuning unit: smallest budgets first, then the core methods (every seed), then the
    others, so a partial run holds complete low-N tables of the published comparison first."""
    units = [
        FinetuneUnit(m, seed, mode, n, readout)
        for n in sorted(config.budgets)
        for seed in config.seeds
        for m in config.methods
        for readout in config.readouts
        for mode in MODES
        if readout == "finetune" or (mode in config.probe_modes and n in config.probe_budgets)
    ]
    return sorted(units, key=lambda u: (u.n_labeled, method_tier(u.method)))


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's saved settings (JSON) with each setting added to the bench after it was saved at
    its default, so runs saved before and after a setting existed compare as equal."""
    return {**json.loads(json.dumps(asdict(BenchConfig()))), **saved}


def check_resumable(config: BenchConfig, out: Path) -> None:
    """Refuse to continue a run folder whose configuration differs from ``config``.

    Only ``methods`` and ``seeds`` may differ: a method added later runs as its own column, and
    seeds added later run as more seeds of every column, with the same configuration (the saved
    configuration then lists every method and seed run so far). A setting missing from the saved
    configuration (added to the bench after that run) counts as its default.

    Raises:
        ValueError: ``out`` holds rows of another configuration; the message names what differs.
    """
    saved = out / "bench_config.json"
    if not saved.exists():
        return
    previous = with_defaults(json.loads(saved.read_text()))
    current = json.loads(json.dumps(asdict(config)))
    changed = sorted(k for k in current if k not in GROWING and previous[k] != current[k])
    if changed:
        raise ValueError(
            f"{out} holds a run with other settings ({', '.join(changed)}); "
            "resume it with the same options or choose another --out"
        )


#: Where a run folder records the defaults of the methods its units use (:func:`record_method_defaults`).
METHOD_DEFAULTS_FILE = "method_defaults.json"


def used_methods(config: BenchConfig) -> list[str]:
    """The registered methods whose defaults a run's numbers depend on: ``supervised`` (every
    fine-tuning, and the supervised-ceiling columns' pre-training), each column's pre-training
    method, and ``local_decoder`` for a decoder column."""
    used = {"supervised"}
    for column in config.methods:
        if column != RANDOM_INIT and column not in CEILING_CLASSES:
            used.add(base_method(column))
            if is_decoder_column(column):
                used.add("local_decoder")
    return sorted(used)


def method_defaults(methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Each method's default configuration, as JSON
    (:attr:`~fedcontrast.methods.registry.MethodSpec.defaults`)."""
    return {m: json.loads(json.dumps(get_method(m).defaults)) for m in methods}


def changed_defaults(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> list[str]:
    """``"<method>.<key>: <saved> -> <current>"`` for every default that both records hold and that
    differs (a key added to a method after ``saved`` was written is not compared)."""
    return [
        f"{method}.{key}: {saved[method][key]!r} -> {value!r}"
        for method in sorted(set(saved) & set(current))
        for key, value in current[method].items()
        if key in saved[method] and saved[method][key] != value
    ]


def record_method_defaults(config: BenchConfig, out: Path) -> None:
    """Refuse to continue a run folder whose methods' defaults changed since it started; record them.

    ``bench_config.json`` holds the settings given (``pretrain_overrides`` among them), not what the
    methods fall back to. A fedcontrast version that changes a method's default (``fedmotion``'s
    ``phase_bins``, 0 -> 6) would otherwise run the folder's remaining units of that column under
    another configuration than its first. The defaults of :func:`used_methods` go to
    :data:`METHOD_DEFAULTS_FILE` (a method added later is added to it). A folder that holds rows but
    no record (run before records were kept) is recorded now, with a warning that its earlier
    units cannot be checked.

    Raises:
        ValueError: a recorded default differs from this version's; the message names each one.
    """
    file = out / METHOD_DEFAULTS_FILE
    current = method_defaults(used_methods(config))
    saved = json.loads(file.read_text()) if file.exists() else {}
    changed = changed_defaults(saved, current)
    if changed:
        raise ValueError(
            f"{out} was run with other method defaults than this fedcontrast's ({'; '.join(changed)}); "
            "its remaining units would mix two configurations in one column: choose another --out "
            "(its data/ and the rows of unchanged columns may be copied there)"
        )
    if not file.exists() and (out / "rows.jsonl").exists():
        logger.warning(
            "%s has no %s (run before method defaults were recorded): the units run so far cannot be "
            "checked against this version's defaults; recording them now",
            out,
            METHOD_DEFAULTS_FILE,
        )
    file.write_text(json.dumps({**saved, **current}, indent=1))


def run_benchmark(
    config: BenchConfig,
    out: Path,
    workers: int = 2,
    dataset: Path | None = None,
    fmt: str = "acdc",
    run_budgets: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every unit; returns all rows of the run folder. Progress goes to the log.

    Pre-training units and random init's fine-tuning start at once; a method's fine-tuning
    units are queued as soon as its pre-training for that seed is saved, and a decoder column's
    stage (:func:`decoder_unit`) as soon as its base's is (the base's pre-training is added
    when the base is no column of this run). ``run_budgets``
    (default: all of ``config.budgets``) restricts this call's fine-tuning units to those N;
    it is not part of the configuration, so a later call runs the rest in the same folder.
    """
    if run_budgets is not None and not set(run_budgets) <= set(config.budgets):
        raise ValueError(f"run budgets {sorted(run_budgets)} are not among the configured {config.budgets}")
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(config, out)
    record_method_defaults(config, out)
    saved = out / "bench_config.json"
    previous = json.loads(saved.read_text()) if saved.exists() else {}
    grown = {
        k: [*previous.get(k, []), *(v for v in getattr(config, k) if v not in previous.get(k, []))]
        for k in GROWING
    }
    saved.write_text(json.dumps({**asdict(config), **grown}, indent=1))
    splits = prepare_splits(config, out, dataset, fmt)
    labels: dict[str, dict[str, str]] = {}
    site_lists = splits[min(config.budgets)].values()
    ceilings = [m for m in config.methods if m in CEILING_CLASSES]
    if ceilings:  # an unlabelled pre-training volume is refused before any work
        found = image_labels(dataset or out / "data", fmt, out / "frames")
        labels = {
            m: ceiling_labels(found, site_lists, m, out / "ceiling_labels" / m, config.label_set)
            for m in ceilings
        }
    done = completed_units(out / "rows.jsonl")
    now = set(config.budgets if run_budgets is None else run_budgets)
    waiting = [u for u in finetune_units(config) if u.key not in done and u.n_labeled in now]

    def folder(method: str, seed: int) -> Path:
        return out / "pretrain" / f"{method}_s{seed}"

    def ready(unit: FinetuneUnit) -> bool:
        return unit.method == RANDOM_INIT or (folder(unit.method, unit.seed) / "record.json").exists()

    def append(rows: list[dict[str, Any]]) -> None:
        with open(out / "rows.jsonl", "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    bases = [base_method(m) for m in config.methods if is_decoder_column(m)]
    pending = sorted(
        (
            (m, s)
            for s in config.seeds
            for m in [*config.methods, *(b for b in dict.fromkeys(bases) if b not in config.methods)]
            if m != RANDOM_INIT and not (folder(m, s) / "record.json").exists()
        ),
        key=lambda unit: method_tier(unit[0]),
    )
    smallest = min(config.budgets)

    def startable(m: str, s: int) -> bool:
        """A decoder stage waits for its base's saved pre-training; any other pre-training can start."""
        return not is_decoder_column(m) or (folder(base_method(m), s) / "record.json").exists()

    def next_task() -> tuple[Any, tuple, str] | None:
        """Smallest-budget fine-tuning first, then pre-training, then the other fine-tuning units;
        within each, the core methods first (:func:`method_tier`)."""
        ready_units = [u for u in waiting if ready(u)]
        pretraining = [(m, s) for m, s in pending if startable(m, s)]
        first = [u for u in ready_units if u.n_labeled == smallest] or ([] if pretraining else ready_units)
        if pretraining and first and method_tier(first[0].method) > method_tier(pretraining[0][0]):
            first = []  # a core method's pre-training goes before another method's fine-tuning
        if first:
            unit = first[0]
            waiting.remove(unit)
            encoders = None if unit.method == RANDOM_INIT else folder(unit.method, unit.seed)
            args = (config, unit, splits[unit.n_labeled], encoders, _record(encoders), out / "examples")
            return finetune_unit, args, unit.key
        if pretraining:
            m, s = pretraining[0]
            pending.remove((m, s))
            if is_decoder_column(m):
                args = (config, m, s, splits[smallest], folder(base_method(m), s), folder(m, s))
                return decoder_unit, args, f"decoder stage {m} seed {s}"
            args = (config, m, s, splits[smallest], folder(m, s), labels.get(m))
            return pretrain_unit, args, f"pre-training {m} seed {s}"
        return None

    total, finished, start = len(pending) + len(waiting), 0, time.perf_counter()
    if total:
        record_call(out, units=total)
    # at most `workers` units are queued, so the order above holds as units finish
    with unit_pool(workers) as pool:
        running: dict[Any, str] = {}
        while True:
            while len(running) < workers and (task := next_task()) is not None:
                fn, args, name = task
                running[pool.submit(run_unit, fn, *args)] = name
            if not running:
                break
            completed, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in completed:
                result, name = future.result(), running.pop(future)
                if isinstance(result, list):
                    append(result)
                finished += 1
                elapsed = time.perf_counter() - start
                logger.info("%d/%d units done (%s) after %.0f s", finished, total, name, elapsed)
    if waiting or pending:
        raise RuntimeError(
            f"{len(waiting)} fine-tuning units and {len(pending)} decoder stages wait for pre-training "
            "that did not run"
        )
    return load_rows(out / "rows.jsonl")


def _record(encoders: Path | None) -> dict[str, Any] | None:
    """The pre-training record saved in ``encoders`` (None for random init)."""
    return json.loads((encoders / "record.json").read_text()) if encoders else None


def load_rows(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a ``rows.jsonl`` file (one JSON object a line); ``[]`` when it does not exist.

    A run killed while appending can leave the last line incomplete (no final newline, not
    valid JSON): that line is ignored with a warning naming the file and line. With ``repair``
    (the writer, before it appends; never while another process appends) the file is also
    rewritten atomically without it, or given its missing final newline.

    Raises:
        ValueError: any other line is not valid JSON; the message names the file and line.
    """
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines) or text.endswith("\n"):
                raise ValueError(
                    f"{path}:{number} is not a JSON row ({err}); fix or remove that line"
                ) from err
            torn = True
            logger.warning(
                "%s:%d: ignoring an incomplete last line (a run killed while writing it)%s",
                path, number, "; the file is rewritten without it" if repair else "",
            )  # fmt: skip
    if repair and text and not text.endswith("\n"):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text[: text.rfind("\n") + 1] if torn else text + "\n")
        tmp.replace(path)
    return rows


def pretrain_records(out: Path, methods: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Saved pre-training records by method."""
    return {
        m: [json.loads(p.read_text()) for p in sorted((out / "pretrain").glob(f"{m}_s*/record.json"))]
        for m in methods
    }
