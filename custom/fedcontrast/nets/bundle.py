"""Access to the MONAI bundle ``bundles/cardiac_seg``: its network, its transforms, its encoder.

The bundle owns the segmentation network (MONAI ``SegResNetDS``) and the
deterministic preprocessing; everything else in fedcontrast takes them from
here so that pre-training, fine-tuning and inference see the same network and
the same voxels.

Config ids are the bundle's own (see ``bundles/cardiac_seg/configs/train.json``),
e.g. ``{"spatial_dims": 2, "init_filters": 8, "roi_size": [64, 64]}``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Compose

from fedcontrast import resources

#: Config files of each bundle workflow, in merge order, as the model zoo has them:
#: ``train.json`` and ``inference.json`` each stand alone (the ids they share are kept
#: identical, see ``tests/test_bundle_standalone.py``); evaluation is an overlay on ``train.json``.
CONFIG_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.json",),
    "evaluate": ("train.json", "evaluate.json"),
    "inference": ("inference.json",),
}

#: MONAI workflow type of each config, whose required ids ``check_properties`` verifies.
WORKFLOW_TYPES: dict[str, str | None] = {"train": "train", "evaluate": None, "inference": "infer"}


def default_bundle_dir() -> Path:
    """``$FEDCONTRAST_BUNDLE_DIR`` if set, else the installed package's (or the checkout's) bundle."""
    return resources.bundle_dir()


def config_files(bundle_dir: str | os.PathLike | None = None, config: str = "train") -> list[str]:
    """Paths of the config files that make up workflow ``config`` (``train``, ``evaluate``, ``inference``)."""
    if config not in CONFIG_FILES:
        raise ValueError(f"unknown bundle config {config!r}; expected one of {sorted(CONFIG_FILES)}")
    root = Path(bundle_dir) if bundle_dir is not None else default_bundle_dir()
    paths = [root / "configs" / name for name in CONFIG_FILES[config]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"bundle config file(s) not found: {missing} (bundle folder {root}: set FEDCONTRAST_BUNDLE_DIR "
            "to a bundle, or install fedcontrast from its wheel or sdist, which carry one)"
        )
    return [str(p) for p in paths]


def bundle_parser(
    bundle_dir: str | os.PathLike | None = None,
    config: str = "train",
    overrides: Mapping[str, Any] | None = None,
) -> ConfigParser:
    """A parser of one bundle workflow, with ``bundle_root`` set and ``overrides`` applied.

    The bundle root is also put on ``sys.path`` so that the bundle's ``scripts``
    components resolve, as ``python -m monai.bundle run`` does.

    Args:
        bundle_dir: the bundle folder; defaults to :func:`default_bundle_dir`.
        config: ``"train"``, ``"evaluate"`` or ``"inference"``.
        overrides: config id -> value, applied after reading (``"train#trainer#max_epochs"`` style ids).
    """
    root = _bundle_root(bundle_dir)
    parser = ConfigParser()
    parser.read_config(config_files(root, config))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser["bundle_root"] = str(root)
    parser.update(dict(overrides or {}))
    return parser


def bundle_workflow(
    bundle_dir: str | os.PathLike | None = None,
    config: str = "train",
    overrides: Mapping[str, Any] | None = None,
) -> ConfigWorkflow:
    """A MONAI ``ConfigWorkflow`` of one bundle workflow, not yet initialised.

    Same files, ``bundle_root`` and ``overrides`` as :func:`bundle_parser`; the bundle's
    ``logging.conf`` is not applied (the host process keeps its logging). Its properties
    (``trainer``, ``evaluator``, ``network_def`` ...) are the model-zoo ids of the train workflow.
    """
    root = _bundle_root(bundle_dir)
    return ConfigWorkflow(
        config_file=config_files(root, config),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=WORKFLOW_TYPES[config],
        **{"bundle_root": str(root), **dict(overrides or {})},
    )


def _bundle_root(bundle_dir: str | os.PathLike | None) -> Path:
    """The absolute bundle folder, put on ``sys.path`` so that its ``scripts`` components resolve."""
    root = Path(bundle_dir).resolve() if bundle_dir is not None else default_bundle_dir()
    if str(root) not in sys.path:
        sys.path.insert(1, str(root))
    return root


def build_network(
    bundle_dir: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> torch.nn.Module:
    """A freshly initialised instance of the bundle's ``network_def`` (on CPU)."""
    return bundle_parser(bundle_dir, "train", overrides).get_parsed_content("network_def")


def build_preprocessing(
    bundle_dir: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> Compose:
    """The bundle's deterministic preprocessing (config id ``preprocessing``).

    Input: datalist entries ``{"image": path, "label": path (optional), ...}`` (other keys
    pass through). Output: ``image`` as a float32 ``MetaTensor`` of shape
    ``(1, roi_x, roi_y, slices)``, RAS-oriented, resampled in-plane to ``inplane_spacing`` mm
    (slice spacing kept), z-score normalised, centre cropped/padded in-plane to ``roi_size``;
    ``label`` (when present) the same geometry as uint8 class indices.
    """
    return bundle_parser(bundle_dir, "train", overrides).get_parsed_content("preprocessing")


def state_mismatch(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    bundle_dir: str | os.PathLike | None = None,
) -> str:
    """How ``state``'s keys and shapes differ from ``expected``'s ("" when they match): the
    missing keys, the unexpected keys and the shape mismatches, each sorted (the bundle's
    ``scripts.encoder.state_mismatch``, the one strict-load check)."""
    return _encoder_scripts(bundle_dir).state_mismatch(expected, state)


#: Prefix of the encoder's entries in a bundle network's state dict.
ENCODER_PREFIX = "encoder."


def encoder_state(network_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's part of a network state dict (what an encoder file holds): the
    ``encoder.*`` entries with that prefix stripped, values unchanged.

    Raises:
        ValueError: ``network_state`` has no ``encoder.*`` entry.
    """
    encoder = {k[len(ENCODER_PREFIX) :]: v for k, v in network_state.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise ValueError(f"the weights hold no '{ENCODER_PREFIX}*' entry (not a bundle network's state?)")
    return encoder


def check_encoder_state(
    network: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str,
    bundle_dir: str | os.PathLike | None = None,
) -> None:
    """Raise ``ValueError`` naming ``source`` and the keys unless ``state`` fits ``network.encoder``
    (the bundle's ``scripts.encoder.check_encoder_state``, which its encoder loader uses)."""
    _encoder_scripts(bundle_dir).check_encoder_state(network, state, source)


def _is_checkpoint(obj: Any) -> bool:
    """True for a self-describing fedcontrast checkpoint (see :mod:`fedcontrast.nets.decoder`)."""
    return isinstance(obj, Mapping) and "contains" in obj and "format" in obj


def encoder_options(
    bundle_dir: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The voxel grid and network options an encoder file records (config id ``encoder_options``).

    E.g. ``{"spatial_dims": 3, "in_channels": 1, "init_filters": 8, "blocks_down": [1, 2, 2, 4],
    "inplane_spacing": 1.5, "slice_spacing": 10.0, "roi_size": [160, 160]}`` (spacings in mm,
    ``roi_size`` in voxels) for the bundle with ``overrides`` applied.
    """
    return dict(bundle_parser(bundle_dir, "train", overrides).get_parsed_content("encoder_options"))


def bundle_scripts(name: str, bundle_dir: str | os.PathLike | None = None) -> ModuleType:
    """The bundle's ``scripts.<name>`` (the module its configs use), imported from the bundle root."""
    _bundle_root(bundle_dir)
    return importlib.import_module(f"scripts.{name}")


def _encoder_scripts(bundle_dir: str | os.PathLike | None) -> ModuleType:
    """The bundle's ``scripts.encoder``."""
    return bundle_scripts("encoder", bundle_dir)


def save_encoder(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    options: Mapping[str, Any],
    bundle_dir: str | os.PathLike | None = None,
) -> None:
    """Write an encoder file recording ``options`` (:func:`encoder_options`), via the bundle's scripts."""
    _encoder_scripts(bundle_dir).save_encoder(state, path, options)


def read_encoder(
    path: str | os.PathLike, bundle_dir: str | os.PathLike | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """An encoder file's state dict and recorded options (None for a plain state dict)."""
    return _encoder_scripts(bundle_dir).read_encoder(path)


def load_pretrained_encoder(
    network: torch.nn.Module,
    path: str | os.PathLike,
    options: Mapping[str, Any] | None,
    bundle_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Load an encoder file into ``network.encoder`` through the bundle's ``scripts.encoder``.

    Args:
        network: a bundle network (its ``encoder`` attribute receives the weights).
        path: an encoder file written by :func:`save_encoder` (or a plain encoder state dict,
            loaded with a warning that its grid cannot be checked).
        options: :func:`encoder_options` of the config ``network`` was built from; None skips
            the option check.
        bundle_dir: the bundle whose scripts read the file.

    Returns:
        The loaded keys, sorted.

    Raises:
        ValueError: a recorded option differs from ``options`` (the message names it and both
            values), or the keys or shapes differ from ``network.encoder``'s (listed).
    """
    return _encoder_scripts(bundle_dir).load_pretrained_encoder(network, path, options)


#: The configs an exported bundle writes its overrides into (each stands alone; evaluate.json
#: is an overlay on train.json and takes them from there).
EXPORTED_CONFIGS = ("train.json", "inference.json")


def export_bundle(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    bundle_dir: str | os.PathLike | None = None,
) -> Path:
    """A copy of the bundle that runs ``model`` by itself, as a model-zoo bundle.

    ``model`` (a network state dict, e.g. a fine-tuning job's ``global_model.pt``) becomes its
    ``models/model.pt``; ``overrides`` (top-level config ids, e.g. the job's ``bundle`` dict with
    its ``labels``) are written into ``configs/train.json`` and ``configs/inference.json``; its
    ``configs/metadata.json`` describes the network's input and output: ``in_channels``, the
    window shape and one named output channel per class of the label set (also its
    ``label_classes`` and ``pred_classes``; the shipped weights' ``eval_metrics`` are dropped).
    ``out_dir`` is replaced.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``model`` does not fit the network of the overridden config (keys or shapes).
    """
    source = Path(bundle_dir).resolve() if bundle_dir is not None else default_bundle_dir()
    out = Path(out_dir)
    overrides = dict(overrides or {})
    parser = bundle_parser(source, "train", overrides)
    state = torch.load(model, map_location="cpu", weights_only=True)
    try:
        parser.get_parsed_content("network_def").load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{model} does not fit the bundle network with {overrides}: {exc}") from exc
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__", "*.py[co]", "logs", "eval", "*.pt", "*.ts")
    shutil.copytree(source, partial, ignore=skip)
    (partial / "models").mkdir(exist_ok=True)
    shutil.copy2(model, partial / "models" / "model.pt")
    for name in EXPORTED_CONFIGS:
        path = partial / "configs" / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **overrides}, indent=4) + "\n")
    meta_path = partial / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    labels = parser.get_parsed_content("labels")
    shape = [int(v) for v in parser.get_parsed_content("window_size")]
    inputs, outputs = (
        meta["network_data_format"]["inputs"]["image"],
        meta["network_data_format"]["outputs"]["pred"],
    )
    inputs.update(num_channels=int(parser.get_parsed_content("in_channels")), spatial_shape=shape)
    channels = {str(value): name for name, value in sorted(labels.items(), key=lambda kv: kv[1])}
    outputs.update(num_channels=len(labels), spatial_shape=shape, channel_def=channels)
    classes = ", ".join(f"{value} {name}" for value, name in channels.items())
    meta.update(label_classes=classes, pred_classes=classes)
    meta.pop("eval_metrics", None)  # the shipped weights' scores, not this model's
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out
