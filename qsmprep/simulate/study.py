"""A simulated multi-participant vertebra study: QSM against a QCT-like reference.

Every participant has four lumbar vertebral bodies (L1–L4) whose bone mineral density
``BMD`` (mg/cm³, the QCT reference) is drawn per participant (mean, uniform over a range
that covers the osteoporosis, osteopenia and normal categories) plus a per-vertebra
deviation. Susceptibility (ppm, relative to soft tissue = 0) relates linearly to it::

    chi = intercept + slope * BMD + e,   e ~ N(0, scatter)       (ppm, mg/cm³)

(bone mineral is diamagnetic: ``slope < 0``), and R2* (1/s) rises with it
(``r2star = r2star_intercept + r2star_slope * BMD``). The body is an elliptic cylinder of
soft tissue along B0 (z), of finite length, in air; the vertebral bodies are elliptic cylinders stacked along z
with discs (soft tissue) between them. Two observers delineate the vertebral bodies
(trabecular ROIs: the body eroded by one voxel; observer 2 shifted by up to one voxel in
plane); see :func:`rater_rois`.

Pure functions (no files): :func:`simulate_study` returns phantoms on the voxel grid, the
per-vertebra truth and the reference table rows; ``scripts/make_bids_examples.py`` writes
them as a BIDS dataset. Arrays ``[x, y, z]``, voxel size in mm, chi in ppm, R2* in 1/s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from qsmprep.simulate.phantom import AIR_CHI_PPM, HeadPhantom

LOGGER = logging.getLogger("qsmprep")

VERTEBRAE = ("L1", "L2", "L3", "L4")
#: label ids of the study phantom (vertebrae 1-4 = L1-L4)
LABELS = {1: "L1", 2: "L2", 3: "L3", 4: "L4", 5: "disc", 14: "air", 15: "soft_tissue"}


@dataclass(frozen=True)
class TruthModel:
    """The simulated relation between the QCT reference and the MRI maps."""

    intercept_ppm: float = 0.02
    slope_ppm_per_mgcm3: float = -0.0012
    scatter_ppm: float = 0.012
    r2star_intercept: float = 40.0  # 1/s
    r2star_slope: float = 0.25  # 1/s per mg/cm³
    bmd_range: tuple[float, float] = (45.0, 185.0)  # participant mean BMD, mg/cm³
    bmd_vertebra_sd: float = 8.0  # mg/cm³, deviation of each vertebra from the mean


@dataclass
class StudyParticipant:
    """One simulated participant: label, covariates and per-vertebra truth."""

    label: str
    age: float
    sex: str
    bmd: np.ndarray  # mg/cm³ per vertebra (L1-L4)
    chi: np.ndarray  # ppm per vertebra
    r2star: np.ndarray  # 1/s per vertebra
    phantom: HeadPhantom | None = None
    rois: dict[str, np.ndarray] = field(default_factory=dict)  # rater -> label image


def vertebra_phantom(
    chi: np.ndarray,
    r2star: np.ndarray,
    *,
    shape: tuple[int, int, int] = (26, 24, 80),
    voxel_size: tuple[float, float, float] = (3.0, 3.0, 3.0),
    body_semi_mm: tuple[float, float] = (36.0, 31.0),
    body_length_mm: float = 220.0,
    vertebra_semi_mm: tuple[float, float] = (10.0, 8.5),
    vertebra_height_mm: float = 15.0,
    disc_height_mm: float = 6.0,
    spine_offset_mm: float = -8.0,
) -> HeadPhantom:
    """Body phantom with four vertebral bodies of susceptibility ``chi`` (ppm) and R2*
    ``r2star`` (1/s), stacked along z around the grid centre, ``spine_offset_mm`` from the
    centre along y (posterior). The body is an elliptic cylinder (semi-axes
    ``body_semi_mm``) of ``body_length_mm`` along z, surrounded by air; simulate on this long
    grid and crop the central slab (as an acquisition whose field of view cuts the body:
    the body-end fields are then small and smooth in the slab). Soft tissue: chi 0, R2* 30 1/s, m0 0.75; vertebrae m0 0.55;
    discs chi 0, R2* 25 1/s, m0 0.85; air chi 9.2 ppm (label 14). ``brain_mask`` (the
    region of the local field) is the body eroded by two voxels."""
    chi = np.asarray(chi, dtype=np.float64)
    r2star = np.asarray(r2star, dtype=np.float64)
    if chi.shape != (4,) or r2star.shape != (4,):
        raise ValueError("chi and r2star need one value per vertebra (4)")
    vs = np.asarray(voxel_size, dtype=np.float64)
    coords = [(np.arange(n) - (n - 1) / 2.0) * d for n, d in zip(shape, vs)]
    x, y, z = np.meshgrid(*coords, indexing="ij")
    body = ((x / body_semi_mm[0]) ** 2 + (y / body_semi_mm[1]) ** 2 <= 1.0) & (
        np.abs(z) <= body_length_mm / 2.0)
    column = ((x / vertebra_semi_mm[0]) ** 2
              + ((y - spine_offset_mm) / vertebra_semi_mm[1]) ** 2 <= 1.0)
    pitch = vertebra_height_mm + disc_height_mm
    total = 4 * vertebra_height_mm + 3 * disc_height_mm
    if total > body_length_mm or body_length_mm > shape[2] * vs[2]:
        raise ValueError(f"the vertebral column ({total} mm) must fit the body "
                         f"({body_length_mm} mm) and the body the field of view")
    labels = np.full(shape, 14, dtype=np.int16)
    labels[body] = 15
    chi_map = np.where(body, 0.0, AIR_CHI_PPM)
    m0 = np.where(body, 0.75, 0.0)
    r2s = np.where(body, 30.0, 0.0)
    bottom = -total / 2.0
    # L1 is the most superior (largest z)
    for k in range(4):
        z0 = bottom + (3 - k) * pitch
        slab = (z >= z0) & (z < z0 + vertebra_height_mm)
        region = column & slab
        labels[region] = k + 1
        chi_map[region] = chi[k]
        m0[region] = 0.55
        r2s[region] = r2star[k]
        if k < 3:
            disc = column & (z >= z0 - disc_height_mm) & (z < z0)
            labels[disc] = 5
            m0[disc] = 0.85
            r2s[disc] = 25.0
    mask = ndimage.binary_erosion(body, iterations=2)
    return HeadPhantom(
        chi_ppm=chi_map.astype(np.float32), labels=labels,
        label_names={i: n for i, n in LABELS.items() if np.any(labels == i)},
        brain_mask=mask, m0=m0.astype(np.float32), r2star=r2s.astype(np.float32),
        voxel_size=tuple(float(v) for v in vs), description="lumbar vertebra phantom",
    )


def rater_rois(labels: np.ndarray, rng: np.random.Generator, *, shift_voxels: int = 0,
               drop_slice: bool = False) -> np.ndarray:
    """One observer's trabecular ROIs (labels 1-4 = L1-L4) from the phantom's labels.

    Each vertebral body eroded by one voxel; with ``shift_voxels`` each ROI is moved by a
    random in-plane offset of up to that many voxels (kept inside its vertebra), with
    ``drop_slice`` one random end slice of each ROI is left out (an observer drawing fewer
    slices). Returns an int16 label image."""
    out = np.zeros(labels.shape, dtype=np.int16)
    for k in range(1, 5):
        vertebra = labels == k
        roi = ndimage.binary_erosion(vertebra, iterations=1)
        if shift_voxels:
            for _ in range(10):
                dx, dy = rng.integers(-shift_voxels, shift_voxels + 1, 2)
                moved = np.roll(roi, (int(dx), int(dy)), axis=(0, 1))
                if np.all(vertebra[moved]):
                    roi = moved
                    break
        if drop_slice:
            slices = np.nonzero(roi.any(axis=(0, 1)))[0]
            if slices.size > 2:
                roi[:, :, slices[0] if rng.random() < 0.5 else slices[-1]] = False
        out[roi] = k
    return out


def simulate_study(
    n_participants: int = 8,
    *,
    model: TruthModel = TruthModel(),
    seed: int = 2024,
    **phantom_kwargs,
) -> list[StudyParticipant]:
    """Participants with per-vertebra BMD (mg/cm³), chi (ppm), R2* (1/s), age and sex,
    their phantom and the observers' ROIs on the phantom grid (``observer1`` and
    ``observer2`` for scan 1, ``observer1_scan2`` for scan 2).

    Participant mean BMDs are evenly spaced over ``model.bmd_range`` (shuffled) so the three
    QCT categories are represented; ages fall with BMD (about 0.25 year per mg/cm³)."""
    if n_participants < 3:
        raise ValueError(f"a study needs at least 3 participants, got {n_participants}")
    rng = np.random.default_rng(seed)
    means = np.linspace(*model.bmd_range, n_participants)
    rng.shuffle(means)
    participants = []
    for index, mean_bmd in enumerate(means, start=1):
        bmd = mean_bmd + rng.normal(0.0, model.bmd_vertebra_sd, 4)
        chi = (model.intercept_ppm + model.slope_ppm_per_mgcm3 * bmd
               + rng.normal(0.0, model.scatter_ppm, 4))
        r2star = model.r2star_intercept + model.r2star_slope * bmd
        age = float(np.clip(88.0 - 0.25 * mean_bmd + rng.normal(0.0, 5.0), 25, 90))
        phantom = vertebra_phantom(chi, r2star, **phantom_kwargs)
        participant = StudyParticipant(
            label=f"{index:02d}", age=round(age), sex=str(rng.choice(["F", "M"])),
            bmd=np.round(bmd, 1), chi=chi, r2star=r2star, phantom=phantom)
        participant.rois = {
            "observer1": rater_rois(phantom.labels, rng),
            "observer2": rater_rois(phantom.labels, rng, shift_voxels=1),
            # observer 1 again on the second scan, drawing one slice fewer per vertebra
            "observer1_scan2": rater_rois(phantom.labels, rng, drop_slice=True),
        }
        participants.append(participant)
    LOGGER.debug("simulated %d participants", n_participants)
    return participants


def reference_rows(participants: list[StudyParticipant]) -> list[dict]:
    """The QCT reference table rows: participant_id, roi, measure, value, unit."""
    return [{"participant_id": f"sub-{p.label}", "roi": name, "measure": "qct_bmd",
             "value": float(p.bmd[k]), "unit": "mg/cm3"}
            for p in participants for k, name in enumerate(VERTEBRAE)]
