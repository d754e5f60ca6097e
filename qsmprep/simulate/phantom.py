"""Analytic numerical head phantom for QSM simulations.

The head is assembled from ellipsoids, tubes and level sets of smooth random fields on the
acquisition voxel grid (arrays ``[x, y, z]``: x left->right, y posterior->anterior,
z inferior->superior; voxel size in mm).  Susceptibility is in ppm relative to water-like
tissue (CSF = 0 is the reference), with the values of the QSM challenge 2.0 (RC2) head
phantom for the deep gray nuclei; proton density ``m0`` is relative (CSF = 1) and ``r2star``
is in 1/s (3 T values).  Label ids follow RC2's numbering:

    1 caudate, 2 globus pallidus, 3 putamen, 4 red nucleus, 5 dentate nucleus,
    6 substantia nigra, 7 thalamus, 8 white matter, 9 gray matter, 10 CSF, 11 veins,
    13 bone, 14 air (outside air, sinuses, ear canals), 15 soft tissue (scalp/muscle),
    16 calcification.  (12 = fat is not modelled.)

Geometry (mm, phantom frame centred on the head): scalp, a 6 mm skull with a skull base,
air-filled frontal, sphenoid and maxillary sinuses, a nasal cavity and (optionally) ear
canals, an intracranial space lined by a CSF layer, a cortex with random sulci, deep gray
nuclei, ventricles, dural sinuses and internal veins in CSF cuffs, and one calcification.
The brain mask is the intracranial space eroded by ``t_mask`` and the brain parenchyma
starts deeper still, so the mask boundary lies in CSF on both sides (no susceptibility
contrast across it; veins keep a CSF margin to it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

LOGGER = logging.getLogger("qsmprep")

#: label id -> (name, chi ppm, m0 relative, R2* 1/s at 3 T)
TISSUES: dict[int, tuple[str, float, float, float]] = {
    1: ("caudate", 0.044, 0.80, 25.0),
    2: ("globus_pallidus", 0.1305, 0.72, 40.0),
    3: ("putamen", 0.038, 0.78, 28.0),
    4: ("red_nucleus", 0.100, 0.74, 35.0),
    5: ("dentate_nucleus", 0.152, 0.74, 38.0),
    6: ("substantia_nigra", 0.111, 0.72, 38.0),
    7: ("thalamus", 0.020, 0.78, 21.0),
    8: ("white_matter", -0.030, 0.69, 20.0),
    9: ("gray_matter", 0.020, 0.80, 15.0),
    10: ("csf", 0.0, 1.00, 4.0),
    11: ("veins", 0.30, 0.75, 45.0),
    12: ("fat", 0.019, 0.90, 60.0),
    13: ("bone", -2.1, 0.02, 300.0),
    14: ("air", 9.2, 0.0, 0.0),
    15: ("soft_tissue", 0.0, 0.75, 30.0),
    16: ("calcification", -2.0, 0.30, 500.0),
}
AIR_CHI_PPM = 9.2
#: labels whose susceptibility/relaxation texture is varied when texture is requested
BRAIN_TISSUE_LABELS = (1, 2, 3, 4, 5, 6, 7, 8, 9)


@dataclass
class HeadPhantom:
    """A head phantom on a voxel grid.

    Attributes: ``chi_ppm`` susceptibility (ppm, float32), ``labels`` tissue ids (int16),
    ``label_names`` id -> name for the ids present, ``brain_mask`` (bool), ``m0`` proton
    density = magnitude at TE = 0 (relative, float32), ``r2star`` (1/s, float32),
    ``voxel_size`` (mm), ``background_chi_ppm`` the susceptibility of the medium that
    surrounds the field of view (air, ppm) used by the field simulation.
    """

    chi_ppm: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    brain_mask: np.ndarray
    m0: np.ndarray
    r2star: np.ndarray
    voxel_size: tuple[float, float, float]
    background_chi_ppm: float = AIR_CHI_PPM
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(nx, ny, nz)``."""
        return tuple(int(n) for n in self.labels.shape)  # type: ignore[return-value]

    def crop(self, slices: Sequence[slice]) -> "HeadPhantom":
        """Sub-volume ``[slices]`` (e.g. a slab field of view) as a new phantom."""
        sl = tuple(slices)
        if len(sl) != 3 or not all(isinstance(s, slice) for s in sl):
            raise ValueError("crop needs three slice objects")
        return HeadPhantom(
            chi_ppm=self.chi_ppm[sl].copy(), labels=self.labels[sl].copy(),
            label_names=dict(self.label_names), brain_mask=self.brain_mask[sl].copy(),
            m0=self.m0[sl].copy(), r2star=self.r2star[sl].copy(), voxel_size=self.voxel_size,
            background_chi_ppm=self.background_chi_ppm, description=self.description,
            extra=dict(self.extra),
        )

    def label_volume_ml(self) -> dict[str, float]:
        """Volume (mL) of every label present."""
        counts = np.bincount(self.labels.ravel().astype(np.int64))
        voxel_ml = float(np.prod(self.voxel_size)) / 1000.0
        return {
            name: float(counts[i]) * voxel_ml
            for i, name in self.label_names.items()
            if i < counts.size
        }


def _check_voxel_fov(voxel_size: Sequence[float], fov_mm: Sequence[float]) -> tuple:
    vs = tuple(float(v) for v in voxel_size)
    fov = tuple(float(f) for f in fov_mm)
    if len(vs) != 3 or len(fov) != 3:
        raise ValueError(f"voxel_size and fov_mm need 3 values, got {voxel_size!r}, {fov_mm!r}")
    if min(vs) <= 0 or min(fov) <= 0:
        raise ValueError(f"voxel_size and fov_mm must be positive, got {vs}, {fov}")
    if max(vs) > 6.0:
        raise ValueError(f"voxel_size {vs} mm is too coarse for a head phantom (max 6 mm)")
    shape = tuple(max(8, int(round(f / v))) for f, v in zip(fov, vs))
    return vs, fov, shape


class _Canvas:
    """Voxel volumes painted structure by structure (later paints win)."""

    def __init__(self, coords, shape):
        self.x, self.y, self.z = coords
        self.labels = np.full(shape, 14, dtype=np.int16)
        self.chi = np.full(shape, TISSUES[14][1], dtype=np.float32)
        self.m0 = np.zeros(shape, dtype=np.float32)
        self.r2s = np.zeros(shape, dtype=np.float32)

    def paint(self, region: np.ndarray, label: int, chi: float | None = None,
              m0: float | None = None, r2s: float | None = None) -> None:
        _, chi0, m00, r2s0 = TISSUES[label]
        self.labels[region] = label
        self.chi[region] = chi0 if chi is None else chi
        self.m0[region] = m00 if m0 is None else m0
        self.r2s[region] = r2s0 if r2s is None else r2s

    def ellipsoid(self, center, semi, rot_z_deg: float = 0.0, rot_x_deg: float = 0.0):
        """Boolean ellipsoid, optionally rotated about z then x (degrees)."""
        dx = self.x - center[0]
        dy = self.y - center[1]
        dz = self.z - center[2]
        if rot_z_deg:
            c, s = np.cos(np.radians(rot_z_deg)), np.sin(np.radians(rot_z_deg))
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        if rot_x_deg:
            c, s = np.cos(np.radians(rot_x_deg)), np.sin(np.radians(rot_x_deg))
            dy, dz = c * dy + s * dz, -s * dy + c * dz
        return (dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2 <= 1.0

    def tube(self, points: np.ndarray, radius: float) -> np.ndarray:
        """Voxels within ``radius`` mm of the polyline through ``points`` (K x 3, mm)."""
        xs, ys, zs = self.x.ravel(), self.y.ravel(), self.z.ravel()
        out = np.zeros(self.labels.shape, dtype=bool)
        pts = np.asarray(points, dtype=float)
        for p0, p1 in zip(pts[:-1], pts[1:]):
            lo = np.minimum(p0, p1) - radius
            hi = np.maximum(p0, p1) + radius
            sl = []
            for axis_vals, a, b in zip((xs, ys, zs), lo, hi):
                idx = np.nonzero((axis_vals >= a) & (axis_vals <= b))[0]
                if idx.size == 0:
                    break
                sl.append(slice(idx[0], idx[-1] + 1))
            if len(sl) < 3:
                continue
            px = xs[sl[0]][:, None, None] - p0[0]
            py = ys[sl[1]][None, :, None] - p0[1]
            pz = zs[sl[2]][None, None, :] - p0[2]
            seg = p1 - p0
            length2 = float(seg @ seg)
            t = np.clip((px * seg[0] + py * seg[1] + pz * seg[2]) / max(length2, 1e-12), 0, 1)
            d2 = (px - t * seg[0]) ** 2 + (py - t * seg[1]) ** 2 + (pz - t * seg[2]) ** 2
            out[tuple(sl)] |= d2 <= radius**2
        return out


def _smooth_field(shape, voxel_size, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean unit-variance Gaussian random field with correlation length ``sigma_mm``."""
    noise = rng.standard_normal(shape).astype(np.float32)
    sigma = [sigma_mm / v for v in voxel_size]
    smooth = ndimage.gaussian_filter(noise, sigma, mode="wrap")
    smooth -= smooth.mean()
    return smooth / max(float(smooth.std()), 1e-12)


def _arc(center_yz, semi_yz, theta_deg: Sequence[float], n: int = 40) -> np.ndarray:
    """Points of an elliptic arc in the mid-sagittal plane (x = 0), theta from +z towards +y."""
    theta = np.radians(np.linspace(theta_deg[0], theta_deg[1], n))
    return np.stack(
        [np.zeros_like(theta),
         center_yz[0] + semi_yz[0] * np.sin(theta),
         center_yz[1] + semi_yz[1] * np.cos(theta)],
        axis=1,
    )


def head_phantom(
    *,
    voxel_size: Sequence[float] = (2.0, 2.0, 2.0),
    fov_mm: Sequence[float] = (176.0, 216.0, 192.0),
    seed: int = 0,
    ear_canals: bool = True,
    calcification_ppm: float = -2.0,
    chi_overrides: Mapping[int, float] | None = None,
    chi_texture_ppm: float = 0.0,
    relaxation_texture: float = 0.0,
) -> HeadPhantom:
    """Analytic 3D head phantom on a grid of ``fov_mm / voxel_size`` voxels.

    Parameters: ``voxel_size`` (mm), ``fov_mm`` field of view (mm; the head, about
    152 x 200 x 170 mm plus neck, is centred in x/y and sits 8 mm below the top of the FOV),
    ``seed`` (cortical folding and texture), ``ear_canals`` (air tubes through the scalp),
    ``calcification_ppm`` (chi of the calcification, ppm), ``chi_overrides`` (label id ->
    chi in ppm, e.g. a subject with more iron), ``chi_texture_ppm`` (std of a smooth random
    chi texture added inside brain tissue, ppm; CSF, veins and the mask boundary are left
    unchanged), ``relaxation_texture`` (relative std of smooth m0/R2* variations in tissue).
    Deterministic for a given seed and grid.
    """
    vs, fov, shape = _check_voxel_fov(voxel_size, fov_mm)
    if not -5.0 <= calcification_ppm <= 0.0:
        raise ValueError(f"calcification_ppm must be in [-5, 0] ppm, got {calcification_ppm}")
    if chi_texture_ppm < 0 or relaxation_texture < 0 or relaxation_texture > 0.5:
        raise ValueError("chi_texture_ppm must be >= 0 and relaxation_texture in [0, 0.5]")
    overrides = dict(chi_overrides or {})
    for key in overrides:
        if key not in TISSUES:
            raise ValueError(f"chi_overrides: unknown label id {key!r}")
    rng = np.random.default_rng(seed)

    # voxel-centre coordinates (mm) in the phantom frame; head top 8 mm below the FOV top
    z_shift = fov[2] / 2.0 - 8.0 - 84.0
    axes = [(np.arange(n) - (n - 1) / 2.0) * v for n, v in zip(shape, vs)]
    axes[2] = axes[2] - z_shift
    coords = np.ix_(*[a.astype(np.float32) for a in axes])
    cv = _Canvas(coords, shape)
    x, y, z = cv.x, cv.y, cv.z

    # ---- head: scalp/soft tissue (vault, face, neck) ----
    head = cv.ellipsoid((0, 0, 0), (76, 96, 84))
    head |= cv.ellipsoid((0, 52, -48), (56, 50, 48))
    head |= ((x / 50.0) ** 2 + ((y + 5.0) / 54.0) ** 2 <= 1.0) & (z <= -40.0)
    cv.paint(head, 15)

    # ---- skull with a skull base; bone shells around the sinuses ----
    floor = -30.0 - 60.0 * np.clip((25.0 - y) / 30.0, 0.0, 1.0)  # skull-base height (mm)
    skull = cv.ellipsoid((0, 0, 0), (72, 92, 80)) & ~((z < floor - 7.0) & (y > -10.0))
    sinuses = {
        "frontal": ((0, 88, -22), (12, 3.2, 8)),
        "sphenoid": ((0, 26, -47), (11, 10, 8)),
        "maxillary_l": ((-24, 58, -66), (12, 15, 13)),
        "maxillary_r": ((24, 58, -66), (12, 15, 13)),
        "nasal": ((0, 66, -58), (6, 22, 15)),
    }
    for center, semi in sinuses.values():
        skull |= cv.ellipsoid(center, tuple(s + 3.0 for s in semi)) & head
    if ear_canals:
        for side in (-1, 1):
            skull |= cv.ellipsoid((side * 50, 0, -50), (10, 14, 10)) & head
    cv.paint(skull, 13)

    # ---- intracranial space (CSF), brain mask and brain envelope from its depth ----
    intracranial = cv.ellipsoid((0, 0, 0), (66, 86, 74)) & (z > floor)
    cv.paint(intracranial, 10)
    depth = ndimage.distance_transform_edt(intracranial, sampling=vs).astype(np.float32)
    t_mask = max(3.0, 2.01 * max(vs))  # mask boundary depth (mm) inside the CSF layer
    t_brain = t_mask + max(2.0, 1.01 * max(vs))  # parenchyma starts deeper still
    brain_mask = depth > t_mask
    bumps = _smooth_field(shape, vs, 8.0, rng)
    envelope = depth > t_brain + np.clip(0.75 + 0.75 * bumps, 0.0, 1.5)

    # ---- cortex: random sulci, interhemispheric fissure, gray ribbon ----
    gyri = _smooth_field(shape, vs, 5.0, rng)
    sulci = envelope & (depth < t_brain + 16.0) & (np.abs(gyri) < 0.16)
    callosum_top = 24.0 - 64.0 * np.clip((np.abs(y) - 32.0) / 20.0, 0.0, 1.0)
    fissure = (np.abs(x) < max(2.0, 0.51 * vs[0])) & (z > callosum_top)
    outer_csf = ~envelope | sulci | (fissure & intracranial)
    depth_in_brain = ndimage.distance_transform_edt(~outer_csf, sampling=vs)
    parenchyma = intracranial & ~outer_csf
    gm_thickness = max(3.5, 1.5 * max(vs))
    cv.paint(parenchyma & (depth_in_brain <= gm_thickness), 9)
    cv.paint(parenchyma & (depth_in_brain > gm_thickness), 8)

    # ---- ventricles (CSF) and deep gray nuclei (semi-axes >= 4 mm: resolved at 2 mm),
    # kept inside the brain envelope so the mask boundary stays in CSF at any voxel size ----
    deep = [
        ((0, -12, 2), (2.2, 12, 8), 0, 0, 10),
        ((0, -40, -36), (6, 4.5, 6), 0, 0, 10),
    ]
    for side in (-1, 1):
        deep += [
            ((side * 8.5, 2, 16), (4.5, 26, 7), 0, -8, 10),
            ((side * 16, -26, 9), (4, 9, 5), side * 25, 0, 10),
        ]
    for side in (-1, 1):
        deep += [
            ((side * 13.5, 16, 10), (5, 11, 8), side * 10, 0, 1),
            ((side * 24, 4, 2), (5.5, 14, 9), -side * 10, 0, 3),
            ((side * 17, 1, -1), (4.5, 8, 6), -side * 10, 0, 2),
            ((side * 10, -20, 5), (7, 12, 8), 0, 0, 7),
            ((side * 5, -16, -13), (4, 4.5, 4), 0, 0, 4),
            ((side * 10.5, -13, -18.5), (4, 8, 4), side * 20, 0, 6),
            ((side * 14, -52, -36), (6, 8, 6), side * 30, 0, 5),
        ]
    for center, semi, rot_z, rot_x, label in sorted(deep, key=lambda d: d[4] != 10):
        cv.paint(cv.ellipsoid(center, semi, rot_z, rot_x) & envelope, label)

    # ---- veins in CSF cuffs (chi .19-.35), kept away from the mask boundary ----
    sss_depth = t_mask + 2.0 + 3.5 + 0.5 * max(vs)
    sss = _arc((0.0, 0.0), (86.0 - sss_depth, 74.0 - sss_depth), (55.0, -118.0))
    straight = np.array([[0, -36, 10], [0, -52, 0], [0, -64, -12], sss[-1]], dtype=float)
    internal = [
        np.array([[s * 2.5, 2, 10.5], [s * 2.5, -18, 11], [s * 1.5, -30, 10.5], [0, -36, 10]])
        for s in (-1, 1)
    ]
    thalamostriate = [
        np.array([[s * 12, 8, 19], [s * 9, 2, 16], [s * 2.5, 2, 10.5]]) for s in (-1, 1)
    ]
    cuff = max(2.0, 0.75 * max(vs))
    veins = [(sss, 3.5, 0.30), (straight, 2.5, 0.30)]
    veins += [(p, 2.0, 0.25) for p in internal] + [(p, 1.5, 0.22) for p in thalamostriate]
    for points, radius, _chi in veins[:2]:
        cv.paint(cv.tube(points, radius + cuff) & intracranial & brain_mask, 10)
    for points, radius, chi in veins:
        cv.paint(cv.tube(points, radius) & brain_mask, 11, chi=chi)

    # ---- calcification (right posterior white matter) ----
    radius = max(3.0, 0.8 * max(vs))
    cv.paint(cv.ellipsoid((28, -30, 22), (radius,) * 3) & envelope, 16, chi=calcification_ppm)

    # ---- air cavities (after everything else; outside the intracranial space) ----
    for center, semi in sinuses.values():
        cv.paint(cv.ellipsoid(center, semi) & ~intracranial, 14)
    if ear_canals:
        for side in (-1, 1):
            canal = cv.tube(np.array([[side * 53.0, 0, -50], [side * 85.0, 0, -50]]), 3.5)
            cv.paint(canal & ~intracranial, 14)

    # ---- per-label overrides and texture ----
    for label, chi in overrides.items():
        cv.chi[cv.labels == label] = chi
    tissue = np.isin(cv.labels, BRAIN_TISSUE_LABELS) & brain_mask
    if chi_texture_ppm > 0:
        # parenchyma lies deeper than the mask boundary: the texture adds no contrast there
        texture = _smooth_field(shape, vs, 4.0, rng) * chi_texture_ppm
        cv.chi[tissue] += texture[tissue]
    if relaxation_texture > 0:
        rel = 1.0 + relaxation_texture * np.clip(_smooth_field(shape, vs, 6.0, rng), -3, 3)
        body = cv.labels != 14
        cv.m0[body] *= rel[body]
        cv.r2s[body] *= rel[body]

    present = sorted(int(v) for v in np.unique(cv.labels))
    names = {i: TISSUES[i][0] for i in present}
    LOGGER.debug("head_phantom: shape %s, voxel %s mm, labels %s", shape, vs, present)
    return HeadPhantom(
        chi_ppm=cv.chi,
        labels=cv.labels,
        label_names=names,
        brain_mask=brain_mask,
        m0=cv.m0,
        r2star=cv.r2s,
        voxel_size=vs,  # type: ignore[arg-type]
        background_chi_ppm=AIR_CHI_PPM,
        description=f"qsmprep analytic head phantom (seed {seed})",
    )
