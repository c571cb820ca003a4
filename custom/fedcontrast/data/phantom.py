"""Multi-site short-axis cardiac MRI phantom in the ACDC on-disk layout.

Real cardiac data cannot be shipped, so tests, demos and benchmarks run on
volumes generated here. Each volume is a stack of short-axis slices (slice
axis last) from the base of the heart towards the apex:

* heart: LV cavity (label 3, papillary muscles included as in ACDC), LV
  myocardium (label 2, a ring whose thickness varies around the wall, closed
  into a cap at the apex), RV cavity (label 1, a crescent against the septum
  with a thin unlabelled free wall), all tapering from base to apex; atria and
  great-vessel roots (unlabelled blood) above the base. Per patient: size,
  shape harmonics, position, long-axis tilt, in-plane rotation and an ACDC
  pathology group (NOR, MINF, DCM, HCM, RV) that scales cavities and walls.
  ED and ES frames of one patient share the anatomy; at ES the cavities are
  smaller, the wall thicker and the base lower. Optionally the whole cine series
  (``*_4d.nii.gz``), contracting from ED to ES and back over the cycle.
* surroundings with overlapping intensities, so that intensity alone cannot
  segment the heart: subcutaneous and epicardial fat (as bright as blood in
  bSSFP), chest-wall, paraspinal and arm muscles, mediastinal tissue and liver
  (as grey as myocardium), lungs with bright vessels, descending aorta, spine,
  stomach, plus smooth tissue texture.
* per-site scanner: matrix size and in-plane spacing, slice count and
  thickness, intensity scale, tissue contrast, multiplicative bias field,
  partial-volume blur, Rician noise, per-slice gain (separate breath-holds);
  with three or more sites the last one uses a spoiled gradient-echo contrast
  (darker blood) instead of bSSFP.

How much patients and sites differ is a :class:`Difficulty`, chosen by name with
``synthesize_dataset(..., difficulty=...)``: ``"standard"`` (the default, for tests and
the demo) or ``"realistic"``, for the label-efficiency benchmark: wider heart position,
orientation, size, shape and pathology ranges, per-patient tissue contrast and bias
field, stronger site noise and partial-volume blur, so that one labelled volume per site
no longer describes the whole population. Random init's measured federated fine-tuning
curve on it (against the published one) is in ``benchmarks/results/phantom_difficulty.json``,
written by ``benchmarks/phantom_difficulty.py``. ``"realistic_planned"`` is
``"realistic"`` with each patient's stack planned from just above the base to the apex
(:func:`plan_stack`: per-patient slice count and spacing, as a technician plans a cine
stack), so that a slice's place in its stack tells where it lies on the long axis;
``"realistic_anatomy"`` adds a distinct base to it (outflow tracts, both atria).

Everything is drawn from ``numpy.random.SeedSequence`` streams keyed by
``(seed, site, patient)``, so a patient's volumes do not depend on how many
other sites or patients are generated. Labels: 0 background, 1 RV, 2 MYO, 3 LV.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from fedcontrast.data.io import save_nifti, write_json
from fedcontrast.data.labels import ACDC_LABELS
from fedcontrast.data.validation import DataValidationError

#: ACDC label convention used by the phantom.
LABELS: dict[str, int] = dict(ACDC_LABELS)

#: Name of the summary file ``synthesize_dataset`` writes at the top of its output.
SUMMARY_FILE = "phantom.json"

Size = Literal["small", "small_fine", "full"]
Phase = Literal["ED", "ES"]

# Tissue classes painted into a volume before it becomes intensities.
AIR, LUNG, FAT, MUSCLE, SOFT, BLOOD, MYOCARDIUM, LIVER, BONE, MARROW, FLUID = range(11)

#: Relative tissue intensities (blood of bSSFP = 1) per sequence, indexed by tissue class.
SEQUENCES: dict[str, np.ndarray] = {
    #                  air  lung  fat  muscle soft blood myo  liver bone marrow fluid
    "bssfp": np.array([0.0, 0.07, 0.88, 0.28, 0.42, 1.00, 0.30, 0.36, 0.05, 0.62, 0.95]),
    "gre": np.array([0.0, 0.05, 0.95, 0.36, 0.50, 0.62, 0.32, 0.50, 0.05, 0.80, 0.25]),
}

#: Multipliers per ACDC group: (LV radius, wall thickness, RV size, ES/ED cavity ratio).
GROUPS: dict[str, tuple[float, float, float, float]] = {
    "NOR": (1.00, 1.00, 1.00, 0.68),
    "MINF": (1.15, 0.90, 1.00, 0.85),
    "DCM": (1.30, 0.80, 1.05, 0.90),
    "HCM": (0.85, 1.60, 0.95, 0.55),
    "RV": (0.95, 1.00, 1.45, 0.70),
}


@dataclass(frozen=True)
class SizePreset:
    """Ranges a site's protocol is drawn from: matrix (voxels), field of view (mm), slices, thickness (mm).

    ``matrix_scale`` multiplies the drawn matrix and divides the pixel spacing: the same field of
    view, random draws and patients at finer pixels (the in-plane blur, in voxels, shrinks in mm).
    """

    matrix: tuple[int, int]
    fov_mm: tuple[float, float]
    slices: tuple[int, int]
    thickness_mm: tuple[float, float]
    centre_on_heart: bool
    matrix_scale: int = 1


#: Most slices any preset draws (the per-slice breath-hold jitter is drawn for this many).
MAX_SLICES = 16

SIZES: dict[str, SizePreset] = {
    # tests: a heart-centred crop of about 48 x 48 x 8
    "small": SizePreset((44, 52), (140.0, 170.0), (7, 9), (9.0, 11.0), centre_on_heart=True),
    # realistic: the whole chest at about 200 x 200 x 10, 1.3-1.9 mm pixels
    "full": SizePreset((184, 224), (280.0, 360.0), (9, 11), (7.0, 9.5), centre_on_heart=False),
}
# the small phantom's sites and patients at half its pixel size (about 96x96x8, 1.4-1.9 mm)
SIZES["small_fine"] = replace(SIZES["small"], matrix_scale=2)


@dataclass(frozen=True)
class Difficulty:
    """How much patients and sites vary; ``Difficulty()`` is the ``"standard"`` phantom.

    Pose and anatomy multiply (or, for ranges, replace) the standard draws, so a patient's
    random stream is the same at every difficulty. Angles in degrees, lengths in mm.

    Attributes:
        heart_shift_mm: half-width of the heart's uniform offset in the field of view (per axis).
        heart_rotation_deg: half-width of the heart's in-plane rotation within the chest.
        body_rotation_deg: half-width of the chest's in-plane rotation.
        heart_scale: range of a per-patient factor on every heart dimension.
        shape: factor on the heart's shape harmonics (ellipticity, triangularity), wall
            thickness variation and RV size variation.
        pathology: factor on the ACDC groups' deviations from NOR (1: as in :data:`GROUPS`).
        slice_motion: factor on the long-axis tilt and breath-hold shifts between slices.
        tissue_jitter: std of a per-patient log-gain on each tissue's intensity (contrast).
        patient_bias: range of a per-patient factor on the site's bias-field amplitude.
        bias: range of the site's bias-field log-amplitude.
        noise: range of the site's Rician noise (relative to blood).
        blur: ranges of the site's partial-volume blur (in-plane voxels, through-plane slices).
        planned_stack: plan each patient's short-axis stack as on a scanner (:func:`plan_stack`):
            from just above the base to the apex, so a slice's place in the stack says where it
            lies on the long axis. Otherwise every stack has the site's slice spacing and count
            and starts at a random height on the heart (``base_offset``).
        outflow_tracts: draw the basal quarter of the ventricles as a real base looks: the LV
            ring opens into the outflow tract towards the aortic root (blood, labelled LV, as
            the cavity) and the RV widens into its outflow tract around the front of the LV;
            above the base the right atrium lies beside the left. No random draw changes, so
            the patients are those of the same difficulty without it.
        shared_frame_gain: give every frame of a slice the ED frame's per-slice gain, as on a
            scanner, where a slice's frames come from one breath-hold; each frame keeps its own
            noise. Otherwise each frame draws its own gain (under which sections 19-30 of the
            ablations ran). Changes the ES frame's gain and the cine series, nothing else.
    """

    heart_shift_mm: float = 12.0
    heart_rotation_deg: float = 25.0
    body_rotation_deg: float = 15.0
    heart_scale: tuple[float, float] = (1.0, 1.0)
    shape: float = 1.0
    pathology: float = 1.0
    slice_motion: float = 1.0
    tissue_jitter: float = 0.0
    patient_bias: tuple[float, float] = (1.0, 1.0)
    bias: tuple[float, float] = (0.15, 0.45)
    noise: tuple[float, float] = (0.03, 0.08)
    blur: tuple[tuple[float, float], tuple[float, float]] = ((0.4, 1.0), (0.15, 0.4))
    planned_stack: bool = False
    outflow_tracts: bool = False
    shared_frame_gain: bool = False


#: Named difficulties (see :class:`Difficulty`); ``"realistic"`` is the benchmark's (candidate "A" of
#: ``benchmarks/results/phantom_difficulty.json``).
DIFFICULTIES: dict[str, Difficulty] = {
    "standard": Difficulty(),
    "realistic": Difficulty(
        heart_shift_mm=18.0,
        heart_rotation_deg=60.0,
        body_rotation_deg=20.0,
        heart_scale=(0.8, 1.2),
        shape=2.0,
        pathology=1.5,
        slice_motion=1.5,
        tissue_jitter=0.2,
        patient_bias=(0.5, 2.0),
        bias=(0.3, 0.7),
        noise=(0.05, 0.12),
        blur=((0.6, 1.3), (0.3, 0.6)),
    ),
}
#: ``realistic`` with stacks planned base to apex (the partition-signal ablation of issue 10).
DIFFICULTIES["realistic_planned"] = replace(DIFFICULTIES["realistic"], planned_stack=True)
#: ``realistic_planned`` with a distinct base (outflow tracts, both atria): the long-axis anatomy
#: ablation of issue 10.
DIFFICULTIES["realistic_anatomy"] = replace(DIFFICULTIES["realistic_planned"], outflow_tracts=True)
#: ``realistic`` with one gain per slice for all its frames: the cine-mask ablation of issue 10.
DIFFICULTIES["realistic_shared_gain"] = replace(DIFFICULTIES["realistic"], shared_frame_gain=True)


def get_difficulty(difficulty: str | Difficulty) -> Difficulty:
    """The :class:`Difficulty` named ``difficulty`` (an instance is returned as is).

    Raises:
        DataValidationError: an unknown name.
    """
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise DataValidationError(f"difficulty {difficulty!r}: expected one of {sorted(DIFFICULTIES)}")
    return DIFFICULTIES[difficulty]


def _span(u: float, lo_hi: tuple[float, float], standard: tuple[float, float]) -> float:
    """Map a value drawn uniformly from ``standard`` onto the range ``lo_hi`` (same quantile)."""
    if tuple(lo_hi) == tuple(standard):
        return float(u)
    q = (u - standard[0]) / (standard[1] - standard[0])
    return float(lo_hi[0] + q * (lo_hi[1] - lo_hi[0]))


def _widen(value: float, centre: float, factor: float) -> float:
    """``value`` moved ``factor`` times as far from ``centre`` (unchanged when ``factor`` is 1)."""
    return float(value) if factor == 1.0 else float(centre + factor * (value - centre))


@dataclass(frozen=True)
class Scanner:
    """One site's acquisition protocol.

    ``matrix``: (nx, ny) voxels; ``spacing``: (sx, sy, sz) mm, sz = slice thickness;
    ``tissue``: relative intensity per tissue class; ``scale``: stored value of intensity 1;
    ``bias``: log-amplitude of the bias field; ``noise``: Rician sigma relative to intensity 1;
    ``blur``: Gaussian partial-volume sigma (in-plane voxels, through-plane slices);
    ``centre_on_heart``: the field of view is centred on the heart (else on the chest).
    """

    name: str
    sequence: str
    matrix: tuple[int, int]
    spacing: tuple[float, float, float]
    n_slices: int
    tissue: np.ndarray
    scale: float
    bias: float
    noise: float
    blur: tuple[float, float]
    centre_on_heart: bool


def draw_scanner(
    name: str,
    index: int,
    seed: int,
    size: Size,
    sequence: str = "bssfp",
    site_shift: float = 1.0,
    difficulty: str | Difficulty = "standard",
) -> Scanner:
    """Draw the acquisition protocol of site number ``index`` (1-based) for ``seed``.

    ``site_shift`` scales how far a site's scanner departs from the nominal one: the per-tissue
    contrast jitter around the sequence's intensities (+-12% at 1) and the bias-field amplitude
    are multiplied by it, the noise by its square root. The random draws are the same for every
    value, and 1 gives exactly the default scanner. ``difficulty`` (see :class:`Difficulty`)
    sets the ranges the bias, noise and blur are drawn from, before ``site_shift`` applies.
    """
    if site_shift <= 0:
        raise DataValidationError(f"site_shift must be > 0, got {site_shift}")
    preset = SIZES[size]
    d, std = get_difficulty(difficulty), Difficulty()
    rng = np.random.default_rng([seed, 1, index])
    nx = int(rng.integers(preset.matrix[0] // 4, preset.matrix[1] // 4 + 1)) * 4
    ny = round(nx * rng.uniform(0.85, 1.0) / 4) * 4
    sxy = rng.uniform(*preset.fov_mm) / nx / preset.matrix_scale
    jitter = rng.uniform(0.88, 1.12, size=len(SEQUENCES[sequence]))
    if site_shift != 1.0:
        jitter = np.clip(1.0 + site_shift * (jitter - 1.0), 0.05, None)
    tissue = SEQUENCES[sequence] * jitter
    return Scanner(
        name=name,
        sequence=sequence,
        matrix=(nx * preset.matrix_scale, ny * preset.matrix_scale),
        spacing=(float(sxy), float(sxy), float(rng.uniform(*preset.thickness_mm))),
        n_slices=int(rng.integers(preset.slices[0], preset.slices[1] + 1)),
        tissue=tissue,
        scale=float(rng.uniform(300.0, 2500.0)),
        bias=_span(rng.uniform(*std.bias), d.bias, std.bias) * site_shift,
        noise=_span(rng.uniform(*std.noise), d.noise, std.noise) * site_shift**0.5,
        blur=(
            _span(rng.uniform(*std.blur[0]), d.blur[0], std.blur[0]),
            _span(rng.uniform(*std.blur[1]), d.blur[1], std.blur[1]),
        ),
        centre_on_heart=preset.centre_on_heart,
    )


@dataclass(frozen=True)
class Patient:
    """One patient's anatomy (mm, radians) and ACDC ``Info.cfg`` fields; see :func:`draw_patient`."""

    group: str
    height_cm: float
    weight_kg: float
    n_frames: int
    es_frame: int
    heart: dict[str, Any]
    body: dict[str, Any]


def draw_patient(
    seed: int, site_index: int, patient_index: int, difficulty: str | Difficulty = "standard"
) -> Patient:
    """Draw patient ``patient_index`` of site ``site_index`` for ``seed`` (independent of other patients).

    ``difficulty`` widens the ranges (see :class:`Difficulty`); the draws themselves are the
    same at every difficulty, plus a separate stream for what only harder phantoms vary.
    """
    d = get_difficulty(difficulty)
    rng = np.random.default_rng([seed, 2, site_index, patient_index])
    extra = np.random.default_rng([seed, 3, site_index, patient_index])
    group = str(rng.choice(list(GROUPS)))
    lv_mult, wall_mult, rv_mult, es_ratio = (_widen(m, 1.0, d.pathology) for m in GROUPS[group])
    scale = float(extra.uniform(*d.heart_scale)) if d.heart_scale[0] != d.heart_scale[1] else 1.0
    n_frames = int(rng.integers(20, 36))
    heart = {
        "lv_radius": rng.uniform(20.0, 26.0) * lv_mult * scale,
        "wall": rng.uniform(6.5, 9.5) * wall_mult * scale,
        "wall_variation": min(rng.uniform(0.1, 0.35) * d.shape, 0.6),
        "wall_angle": rng.uniform(0, 2 * np.pi),
        "harmonics": rng.uniform([0.02, 0.0], [0.10, 0.05]) * d.shape,
        "harmonic_phases": rng.uniform(0, 2 * np.pi, size=2),
        "infarct": group == "MINF",
        "infarct_angle": rng.uniform(0, 2 * np.pi),
        "rv_angle": np.deg2rad(rng.uniform(150.0, 190.0)),
        "rv_depth": _widen(rng.uniform(0.70, 0.85), 0.775, d.shape) * rv_mult,
        "rv_width": _widen(rng.uniform(1.35, 1.65), 1.5, d.shape) * min(rv_mult, 1.2),
        "rv_end": rng.uniform(0.75, 0.92),
        "rv_wall": rng.uniform(2.0, 3.5),
        "papillary": rng.uniform(3.0, 5.0),
        "epicardial_fat": rng.uniform(1.0, 6.0),
        "length": rng.uniform(75.0, 95.0) * scale,
        "base_offset": rng.uniform(-8.0, 6.0),
        "tilt": rng.uniform(-2.5, 2.5, size=2) * d.slice_motion,
        "es_ratio": es_ratio * rng.uniform(0.95, 1.05),
        "es_wall": rng.uniform(1.3, 1.5),
        "rotation": np.deg2rad(rng.uniform(-25.0, 25.0) * d.heart_rotation_deg / 25.0),
        "outflow_tracts": d.outflow_tracts,
    }
    body = {
        "axes": rng.uniform([150.0, 100.0], [185.0, 130.0]),
        "rotation": np.deg2rad(rng.uniform(-15.0, 15.0) * d.body_rotation_deg / 15.0),
        "heart_offset": rng.uniform([25.0, 10.0], [45.0, 30.0]),
        "fov_offset": rng.uniform(-12.0, 12.0, size=2) * d.heart_shift_mm / 12.0,
        "subcutaneous_fat": rng.uniform(6.0, 25.0),
        "muscle": rng.uniform(8.0, 15.0),
        "liver_start": rng.uniform(0.45, 0.85),
        "stomach_fluid": bool(rng.random() < 0.5),
        "breath_hold": rng.normal(0.0, 1.5, size=(2, MAX_SLICES)) * d.slice_motion,
        "seed": int(rng.integers(2**31)),
        "tissue_gain": np.exp(extra.normal(0.0, d.tissue_jitter, size=len(SEQUENCES["bssfp"])))
        if d.tissue_jitter > 0
        else np.ones(len(SEQUENCES["bssfp"])),
        "bias_gain": float(extra.uniform(*d.patient_bias)) if d.patient_bias[0] != d.patient_bias[1] else 1.0,
        "shared_frame_gain": d.shared_frame_gain,
    }
    return Patient(
        group=group,
        height_cm=round(float(rng.uniform(150.0, 195.0)), 1),
        weight_kg=round(float(rng.uniform(50.0, 110.0)), 1),
        n_frames=n_frames,
        es_frame=round(n_frames * rng.uniform(0.3, 0.45)) + 1,
        heart=heart,
        body=body,
    )


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of the points (x, y) in a frame rotated by ``angle``."""
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _in_ellipse(u: np.ndarray, v: np.ndarray, centre: tuple[float, float], axes: Any) -> np.ndarray:
    """Boolean mask of the points (u, v) inside an axis-aligned ellipse; ``axes`` may vary per slice."""
    return ((u - centre[0]) / axes[0]) ** 2 + ((v - centre[1]) / axes[1]) ** 2 <= 1.0


def _paint(tissue: np.ndarray, mask: np.ndarray, value: int) -> None:
    """Set ``tissue`` to ``value`` where ``mask`` (broadcast to its shape) is true."""
    tissue[np.broadcast_to(mask, tissue.shape)] = value


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field smoothed with ``sigma`` (voxels)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-6)


def render(scanner: Scanner, patient: Patient, phase: Phase) -> tuple[np.ndarray, np.ndarray]:
    """Render the ED or ES frame of one patient as the site's scanner sees it (deterministic for its inputs).

    Returns:
        ``(image, label)``, both of shape ``(nx, ny, n_slices)`` (slice axis last, slice 0 at the
        base side): ``image`` int16 in scanner units, ``label`` uint8 with values in :data:`LABELS`.
    """
    return render_frame(scanner, patient, 1.0 if phase == "ES" else 0.0, 1 if phase == "ES" else 0)


def contraction_curve(n_frames: int, es_index: int) -> np.ndarray:
    """How far each frame of a cine series has contracted: 0 at ED (frame 0), 1 at ES (frame
    ``es_index``, 0-based), a half-cosine between them in systole and back in diastole.

    Returns:
        ``(n_frames,)`` floats in [0, 1].
    """
    frames = np.arange(n_frames, dtype=np.float64)
    systole = 0.5 * (1.0 - np.cos(np.pi * np.clip(frames / es_index, 0.0, 1.0)))
    diastole = 0.5 * (1.0 + np.cos(np.pi * (frames - es_index) / (n_frames - es_index)))
    return np.where(frames <= es_index, systole, diastole)


def render_cine(scanner: Scanner, patient: Patient) -> np.ndarray:
    """The patient's whole cine series, ``patient.n_frames`` frames over one cardiac cycle.

    Frame 0 is :func:`render`'s ED frame and frame ``es_frame - 1`` its ES frame, voxel for voxel
    (as ACDC's frame files are frames of its ``_4d`` series); the others contract along
    :func:`contraction_curve`, each with its own noise.

    Returns:
        int16 ``(nx, ny, n_slices, n_frames)``.
    """
    es_index = patient.es_frame - 1
    contraction = contraction_curve(patient.n_frames, es_index)
    noise_keys = [0 if f == 0 else 1 if f == es_index else 1 + f for f in range(patient.n_frames)]
    frames = [
        render_frame(scanner, patient, float(c), k)[0] for c, k in zip(contraction, noise_keys, strict=True)
    ]
    return np.stack(frames, axis=-1)


def _lerp(ed: float, es: float, contraction: float) -> float:
    """``ed`` at contraction 0, ``es`` at 1 (both exactly), linear between."""
    return (1.0 - contraction) * ed + contraction * es


def render_frame(
    scanner: Scanner, patient: Patient, contraction: float, noise_key: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame of one patient at ``contraction`` (0: ED, 1: ES) with the frame noise
    stream ``noise_key`` (0 is ED's, 1 ES's); returns :func:`render`'s ``(image, label)``."""
    (nx, ny), nz = scanner.matrix, scanner.n_slices
    sx, sy, sz = scanner.spacing
    h, b = patient.heart, patient.body
    c = contraction

    # Heart geometry of this frame: towards ES the cavities shrink, the wall thickens and the base descends.
    lv_radius = h["lv_radius"] * _lerp(1.0, h["es_ratio"], c)
    wall = h["wall"] * _lerp(1.0, h["es_wall"], c)
    length = h["length"] * _lerp(1.0, 0.9, c)
    base = h["base_offset"] + c * 0.1 * h["length"]

    # World coordinates (mm) with the LV centre at the base as origin; slice axis last.
    body_rot = b["rotation"]
    body_centre = -np.array(_rotate(*b["heart_offset"], -body_rot))
    rv_direction = body_rot + h["rotation"] + h["rv_angle"]
    heart_centre = 0.5 * (h["lv_radius"] + h["wall"]) * np.array([np.cos(rv_direction), np.sin(rv_direction)])
    fov_centre = b["fov_offset"] + (heart_centre if scanner.centre_on_heart else body_centre)
    x = ((np.arange(nx) - (nx - 1) / 2) * sx + fov_centre[0]).astype(np.float32)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * sy + fov_centre[1]).astype(np.float32)[None, :, None]
    z_mm = np.arange(nz, dtype=np.float32)[None, None, :] * sz
    t = (z_mm - base) / length  # 0 at the base, 1 at the apex of the cavity
    tc = np.clip(t, 0.0, None)
    in_heart = t >= 0

    # Body frame (u: patient left, v: anterior), centred on the torso.
    u, v = _rotate(x - body_centre[0], y - body_centre[1], body_rot)
    # Heart frame per slice: long-axis tilt plus breath-hold jitter move the centre between slices.
    jitter = b["breath_hold"][:, None, None, :nz]
    cx = (h["tilt"][0] * z_mm / sz + jitter[0]).astype(np.float32)
    cy = (h["tilt"][1] * z_mm / sz + jitter[1]).astype(np.float32)
    hx, hy = _rotate(x - cx, y - cy, body_rot + h["rotation"])
    r = np.hypot(hx, hy)
    theta = np.arctan2(hy, hx)

    # LV: cavity and a ring of angle-dependent thickness, both tapering; the wall closes into an apical cap.
    e2, e3 = h["harmonics"]
    p2, p3 = h["harmonic_phases"]
    shape = 1.0 + e2 * np.cos(2 * theta - p2) + e3 * np.cos(3 * theta - p3)
    thickness = wall * (1.0 + h["wall_variation"] * np.cos(theta - h["wall_angle"]))
    if h["infarct"]:  # a thinned sector
        gap = np.angle(np.exp(1j * (theta - h["infarct_angle"])))
        thickness = thickness * (1.0 - 0.5 * np.exp(-((gap / 0.5) ** 2)))
    endo_taper = np.sqrt(np.clip(1.0 - tc**2.5, 0.0, 1.0)) * in_heart
    epi_taper = np.sqrt(np.clip(1.0 - (tc / 1.12) ** 2.5, 0.0, 1.0)) * in_heart
    r_endo = lv_radius * shape * endo_taper
    r_epi = (lv_radius * shape + thickness) * epi_taper
    lv_cavity = r < r_endo
    lv_wall = (r >= r_endo) & (r < r_epi)
    aortic_angle = h["rv_angle"] - 0.9
    basal, outflow = np.zeros_like(tc), np.zeros_like(lv_cavity)
    if h.get("outflow_tracts"):  # basal quarter: 1 at the base, 0 from a quarter of the length on
        basal = np.clip(1.0 - tc / 0.25, 0.0, 1.0) * in_heart
        outflow = np.abs(np.angle(np.exp(1j * (theta - aortic_angle)))) < 0.7 * basal
        lv_cavity |= outflow & (r < r_epi)  # the LV ring opens towards the aortic root
        lv_wall &= ~lv_cavity

    # Papillary muscles: two myocardium-grey blobs inside the cavity (labelled LV, as in ACDC).
    papillary = np.zeros_like(lv_cavity)
    pm_radius = h["papillary"] * _lerp(1.0, 1.3, c)
    for offset in (-0.9, 0.9):
        angle = h["rv_angle"] + np.pi + offset
        px = 0.62 * lv_radius * endo_taper * np.cos(angle)
        py = 0.62 * lv_radius * endo_taper * np.sin(angle)
        papillary |= ((hx - px) ** 2 + (hy - py) ** 2 < pm_radius**2) & (t > 0.15) & (t < 0.8)
    papillary &= lv_cavity

    # RV: an ellipse beside the septum minus the LV, i.e. a crescent; a thin free wall around it.
    outer = lv_radius + wall
    rv_taper = np.sqrt(np.clip(1.0 - (tc / h["rv_end"]) ** 2, 0.0, 1.0)) * in_heart
    depth = outer * h["rv_depth"] * _lerp(1.0, 0.8, c) * (1.0 + 0.3 * basal) * rv_taper + 1e-3
    width = outer * h["rv_width"] * _lerp(1.0, 0.9, c) * (1.0 + 0.5 * basal) * rv_taper + 1e-3
    along, across = _rotate(hx, hy, h["rv_angle"])
    rho = np.sqrt(((along - outer * epi_taper) / depth) ** 2 + (across / width) ** 2)
    outflow_septum = outflow & (r >= r_epi) & (r < r_epi + h["rv_wall"])  # between the two outflow tracts
    rv_cavity = (rho < 1.0) & ~(lv_cavity | lv_wall | outflow_septum) & (rv_taper > 0.05)
    rv_free_wall = (rho < 1.0 + h["rv_wall"] / width) & ~(lv_cavity | lv_wall | rv_cavity) & (rv_taper > 0.05)
    heart = lv_cavity | lv_wall | rv_cavity | rv_free_wall
    fat_width = h["epicardial_fat"] * (0.6 + 0.5 * np.cos(2 * theta - p2))
    epicardial = ((r < r_epi + fat_width) | (rho < 1.0 + (h["rv_wall"] + fat_width) / width)) & ~heart
    heart_zone = (r < (outer + 6.0) * np.maximum(epi_taper, 0.6 * in_heart)) | (rho < 1.3)

    # Surroundings, painted back to front.
    tissue = np.full((nx, ny, nz), AIR, dtype=np.uint8)
    A, B = b["axes"]
    sub_fat, muscle = b["subcutaneous_fat"], b["muscle"] + 10.0 * np.clip(v / B, 0.0, 1.0)
    for side in (-1.0, 1.0):  # arms beside the chest
        arm = (side * (A + 40.0), 0.0)
        _paint(tissue, _in_ellipse(u, v, arm, (38.0, 48.0)), FAT)
        _paint(tissue, _in_ellipse(u, v, arm, (30.0, 40.0)), MUSCLE)
        _paint(tissue, _in_ellipse(u, v, arm, (9.0, 9.0)), MARROW)
    _paint(tissue, _in_ellipse(u, v, (0.0, 0.0), (A, B)), FAT)
    _paint(tissue, _in_ellipse(u, v, (0.0, 0.0), (A - sub_fat, B - sub_fat)), MUSCLE)
    ta, tb = A - sub_fat - muscle, B - sub_fat - muscle  # thoracic cavity
    thorax = _in_ellipse(u, v, (0.0, 0.0), (ta, tb))
    _paint(tissue, thorax, SOFT)
    lungs = _in_ellipse(u, v, (0.45 * ta, 0.0), (0.45 * ta, 0.82 * tb)) | _in_ellipse(
        u, v, (-0.47 * ta, 0.05 * tb), (0.47 * ta, 0.85 * tb)
    )
    _paint(tissue, lungs & thorax & ~heart_zone, LUNG)
    anatomy_rng = np.random.default_rng(b["seed"])  # same texture and bias in both frames
    vessels = _smooth_noise(anatomy_rng, (nx, ny, nz), (1.5 / sx, 1.5 / sy, 0.3)) > 2.2
    _paint(tissue, vessels & (tissue == LUNG), BLOOD)
    # Liver (patient's right) and stomach (left) rise into the lower slices.
    below = np.clip((z_mm - (base + b["liver_start"] * length)) / 30.0, 0.0, 1.0)
    liver = _in_ellipse(u, v, (-0.35 * ta, -0.1 * tb), (0.75 * ta * below + 1e-3, 0.85 * tb * below + 1e-3))
    _paint(tissue, liver & thorax & ~heart_zone, LIVER)
    stomach_grow = np.clip(below - 0.3, 0.0, 1.0)
    stomach = _in_ellipse(
        u, v, (0.5 * ta, -0.15 * tb), (0.3 * ta * stomach_grow + 1e-3, 0.35 * tb * stomach_grow + 1e-3)
    )
    _paint(tissue, stomach & thorax & ~heart_zone, FLUID if b["stomach_fluid"] else AIR)
    # Spine, spinal canal, paraspinal muscles, descending aorta.
    spine_v = -B + sub_fat + 35.0
    for side in (-1.0, 1.0):
        _paint(tissue, _in_ellipse(u, v, (side * 28.0, spine_v - 12.0), (24.0, 17.0)), MUSCLE)
    _paint(tissue, _in_ellipse(u, v, (0.0, spine_v), (18.0, 16.0)), BONE)
    _paint(tissue, _in_ellipse(u, v, (0.0, spine_v), (15.5, 13.5)), MARROW)
    _paint(tissue, _in_ellipse(u, v, (0.0, spine_v - 21.0), (7.0, 6.0)), FLUID)
    _paint(tissue, _in_ellipse(u, v, (24.0, spine_v + 30.0), (11.0, 11.0)), BLOOD)
    # Above the base: atrium and great-vessel roots (blood, unlabelled).
    above = (t < 0.05) & (t > -0.5)
    _paint(
        tissue, _in_ellipse(hx, hy, (-0.1 * outer, -0.45 * outer), (0.9 * outer, 0.75 * outer)) & above, BLOOD
    )
    if h.get("outflow_tracts"):  # right atrium, beside the RV
        centre = (1.1 * outer * np.cos(h["rv_angle"] + 0.5), 1.1 * outer * np.sin(h["rv_angle"] + 0.5))
        _paint(tissue, _in_ellipse(hx, hy, centre, (0.7 * outer, 0.6 * outer)) & above, BLOOD)
    for angle in (aortic_angle, h["rv_angle"] + 0.4):  # aortic root, pulmonary trunk
        centre = (1.05 * outer * np.cos(angle), 1.05 * outer * np.sin(angle))
        _paint(tissue, _in_ellipse(hx, hy, centre, (13.0, 13.0)) & above, BLOOD)
    # Heart.
    _paint(tissue, epicardial & (tissue != AIR), FAT)
    _paint(tissue, rv_free_wall, MYOCARDIUM)
    _paint(tissue, rv_cavity, BLOOD)
    _paint(tissue, lv_wall, MYOCARDIUM)
    _paint(tissue, lv_cavity, BLOOD)
    _paint(tissue, papillary, MYOCARDIUM)

    label = np.zeros((nx, ny, nz), dtype=np.uint8)
    label[rv_cavity] = LABELS["RV"]
    label[lv_wall] = LABELS["MYO"]
    label[lv_cavity] = LABELS["LV"]

    # Scanner: texture, partial-volume blur, bias field, per-slice gain, Rician noise.
    image = (scanner.tissue * b["tissue_gain"]).astype(np.float32)[tissue]
    image *= 1.0 + 0.08 * _smooth_noise(anatomy_rng, (nx, ny, nz), (4.0 / sx, 4.0 / sy, 0.5))
    image = ndimage.gaussian_filter(image, (scanner.blur[0], scanner.blur[0] * sx / sy, scanner.blur[1]))
    xn, yn = x / (nx * sx / 2), y / (ny * sy / 2)
    zn = np.linspace(-0.5, 0.5, nz, dtype=np.float32)[None, None, :]
    coef = anatomy_rng.uniform(-1.0, 1.0, size=6)
    log_bias = (
        coef[0] * xn + coef[1] * yn + coef[2] * xn**2 + coef[3] * yn**2 + coef[4] * xn * yn + coef[5] * zn
    )
    image *= np.exp(scanner.bias * b["bias_gain"] * log_bias / 1.5)
    rng = np.random.default_rng([int(b["seed"]), noise_key])  # this frame's gain and noise
    gain = rng.normal(1.0, 0.03, size=nz)  # drawn even when shared, so the noise below is unchanged
    if b["shared_frame_gain"]:  # one breath-hold per slice: ED's gain for every frame
        gain = np.random.default_rng([int(b["seed"]), 0]).normal(1.0, 0.03, size=nz)
    image *= gain.astype(np.float32)[None, None, :]
    real = image + rng.normal(0.0, scanner.noise, size=image.shape).astype(np.float32)
    imag = rng.normal(0.0, scanner.noise, size=image.shape).astype(np.float32)
    image = np.clip(np.hypot(real, imag) * scanner.scale, 0, np.iinfo(np.int16).max)
    return np.rint(image).astype(np.int16), label


def plan_stack(scanner: Scanner, patient: Patient) -> tuple[Scanner, Patient]:
    """The scanner and patient of a short-axis stack planned base to apex, as a technician plans it.

    The first slice lies 5% of the LV's ED length above its base (in the atria), the last at the
    apex; the slice count is the one that keeps the spacing nearest the site's slice thickness
    (between 5 and :data:`MAX_SLICES`), and the spacing fits the stack to the heart exactly.
    In-plane geometry, thickness-independent blur and every random draw are unchanged.
    """
    length = patient.heart["length"]
    span = 1.05 * length
    n_slices = int(np.clip(round(span / scanner.spacing[2]) + 1, 5, MAX_SLICES))
    spacing = span / (n_slices - 1)
    planned = replace(scanner, n_slices=n_slices, spacing=(*scanner.spacing[:2], float(spacing)))
    return planned, replace(patient, heart={**patient.heart, "base_offset": 0.05 * length})


def affine(scanner: Scanner) -> np.ndarray:
    """The 4x4 voxel-to-world matrix (mm) of a scanner's volumes: spacing on the diagonal, centred."""
    (nx, ny), spacing = scanner.matrix, scanner.spacing
    matrix = np.diag([*spacing, 1.0])
    matrix[:2, 3] = [-(nx - 1) / 2 * spacing[0], -(ny - 1) / 2 * spacing[1]]
    return matrix


def info_cfg(patient: Patient) -> str:
    """The text of an ACDC ``Info.cfg`` (ED is frame 1, ES a 1-based frame number)."""
    return (
        f"ED: 1\nES: {patient.es_frame}\nGroup: {patient.group}\nHeight: {patient.height_cm}\n"
        f"NbFrame: {patient.n_frames}\nWeight: {patient.weight_kg}\n"
    )


def write_patient(
    site_dir: Path, patient_id: str, scanner: Scanner, patient: Patient, cine: bool = False
) -> None:
    """Write one patient in the ACDC layout: ``site_dir/patient_id/{Info.cfg, *_frameYY[_gt].nii.gz}``,
    with ``cine`` also the whole series as ``*_4d.nii.gz`` (:func:`render_cine`)."""
    folder = site_dir / patient_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Info.cfg").write_text(info_cfg(patient))
    if cine:
        save_nifti(folder / f"{patient_id}_4d.nii.gz", render_cine(scanner, patient), affine(scanner))
    for phase, frame in (("ED", 1), ("ES", patient.es_frame)):
        image, label = render(scanner, patient, phase)
        save_nifti(folder / f"{patient_id}_frame{frame:02d}.nii.gz", image, affine(scanner))
        save_nifti(folder / f"{patient_id}_frame{frame:02d}_gt.nii.gz", label, affine(scanner))


def synthesize_dataset(
    out_dir: str | Path,
    sites: int = 4,
    patients_per_site: int = 10,
    seed: int = 0,
    size: Size = "small",
    other_sequence: bool = True,
    sequences: list[str] | None = None,
    site_shift: float = 1.0,
    difficulty: str | Difficulty = "standard",
    cine: bool = False,
) -> dict[str, Any]:
    """Generate a multi-site phantom in the ACDC layout.

    Writes ``out_dir/site-k/patientXXX/{Info.cfg, patientXXX_frame01.nii.gz,
    patientXXX_frame01_gt.nii.gz, patientXXX_frameYY.nii.gz, patientXXX_frameYY_gt.nii.gz}``
    (frame 01 = ED, YY = ES; with ``cine`` also ``patientXXX_4d.nii.gz``) for k = 1..``sites``,
    patients numbered 001, 002, ... across all sites, and the returned summary as
    ``out_dir/phantom.json``. Images are int16 arrays of
    shape (nx, ny, slices), labels uint8 (0 background, 1 RV, 2 MYO, 3 LV).

    The dataset is built in a temporary sibling folder and moved into place when complete.
    An existing ``out_dir`` is replaced only if it holds a previous phantom (a ``phantom.json``)
    or nothing.

    Args:
        out_dir: output folder.
        sites: number of sites (hospitals).
        patients_per_site: patients per site; each gives an ED and an ES volume.
        seed: random seed; the same seed gives the same files.
        size: ``"small"`` (about 48x48x8, for tests), ``"small_fine"`` (the same at half the pixel
            size, about 96x96x8) or ``"full"`` (about 200x200x10).
        other_sequence: with three or more sites, the last site uses a gradient-echo contrast.
        sequences: each site's sequence (keys of :data:`SEQUENCES`), one per site; replaces the
            ``other_sequence`` rule.
        site_shift: how strongly the sites' scanners differ (see :func:`draw_scanner`; 1: default).
        difficulty: how much patients and sites vary, a name in :data:`DIFFICULTIES` or a
            :class:`Difficulty`: ``"standard"`` (tests, demo) or ``"realistic"`` (the
            label-efficiency benchmark; its measured random-init curve is in
            ``benchmarks/results/phantom_difficulty.json``).
        cine: also write each patient's whole cine series (``Info.cfg``'s ``NbFrame`` frames, x, y,
            slices, frames), as ACDC ships it (:func:`render_cine`).

    Returns:
        A JSON-able summary: seed, size, labels, counts and each site's protocol.

    Raises:
        DataValidationError: bad arguments, or ``out_dir`` holds something other than a phantom.
    """
    out_dir = Path(out_dir).resolve()
    if size not in SIZES:
        raise DataValidationError(f"size {size!r}: expected one of {sorted(SIZES)}")
    level = get_difficulty(difficulty)
    named = [n for n, v in DIFFICULTIES.items() if v == level]
    if sites < 1 or patients_per_site < 1:
        raise DataValidationError(
            f"need at least one site and one patient per site (got {sites}, {patients_per_site})"
        )
    if sequences is not None and (len(sequences) != sites or any(seq not in SEQUENCES for seq in sequences)):
        raise DataValidationError(
            f"sequences {sequences}: expected {sites} value(s) from {sorted(SEQUENCES)}, one per site"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SUMMARY_FILE).is_file():
        raise DataValidationError(
            f"{out_dir}: exists and is not a phantom folder; choose an empty or new folder"
        )

    work = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {
        "format": "acdc",
        "seed": seed,
        "size": size,
        "difficulty": named[0] if named else "custom",
        "difficulty_settings": asdict(level),
        "labels": LABELS,
        "patients": sites * patients_per_site,
        "volumes": 2 * sites * patients_per_site,
        "sites": {},
    }
    if cine:
        summary["cine"] = True
    if site_shift != 1.0:
        summary["site_shift"] = site_shift
    try:
        for k in range(1, sites + 1):
            name = f"site-{k}"
            if sequences is not None:
                sequence = sequences[k - 1]
            else:
                sequence = "gre" if other_sequence and sites >= 3 and k == sites else "bssfp"
            scanner = draw_scanner(name, k, seed, size, sequence, site_shift, level)
            first = (k - 1) * patients_per_site + 1
            for number in range(first, first + patients_per_site):
                patient = draw_patient(seed, k, number, level)
                stack = plan_stack(scanner, patient) if level.planned_stack else (scanner, patient)
                write_patient(work / name, f"patient{number:03d}", *stack, cine=cine)
            summary["sites"][name] = {
                "patients": [f"patient{n:03d}" for n in range(first, first + patients_per_site)],
                "sequence": sequence,
                "shape": [*scanner.matrix, scanner.n_slices],
                "spacing_mm": [round(s, 3) for s in scanner.spacing],
                "intensity_scale": round(scanner.scale, 1),
                "bias": round(scanner.bias, 3),
                "noise": round(scanner.noise, 3),
            }
            if level.planned_stack:
                summary["sites"][name]["stack"] = "planned per patient: slice count and spacing vary"
        write_json(work / SUMMARY_FILE, summary)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(work, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary
