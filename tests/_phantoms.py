"""Small numerical phantoms with known truth for the background-removal and inversion tests.

Geometry is defined in mm, susceptibility in ppm (relative to brain tissue), fields in ppm.
To avoid the "inverse crime" the susceptibility is drawn on a grid ``supersample`` times
finer, forward-simulated there and block-averaged to the acquisition grid (like an MRI
voxel integrates the field).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from qsmprep.recon.dipole import forward_field


@dataclass(frozen=True)
class Phantom:
    """A simulated acquisition (all arrays ``[x, y, z]`` on the coarse grid)."""

    voxel_size: tuple[float, float, float]  # mm
    b0_direction: tuple[float, float, float]  # unit vector, voxel axes
    mask: np.ndarray  # bool brain mask
    chi: np.ndarray  # ppm, inside the brain (zero outside): the inversion truth
    chi_background: np.ndarray  # ppm, sources outside the brain
    local: np.ndarray  # ppm, D * chi_inside (noise free), whole grid
    background: np.ndarray  # ppm, D * chi_outside (noise free), whole grid
    magnitude: np.ndarray  # a.u., ~1 in tissue
    noise_std: np.ndarray  # ppm, field noise standard deviation (inf outside the head)
    labels: np.ndarray  # int ROI labels (0 = none)

    def total(self, noise: bool = True, seed: int = 0) -> np.ndarray:
        """Total field (ppm) = local + background (+ Gaussian noise), zero outside mask."""
        f = self.local + self.background
        if noise:
            rng = np.random.default_rng(seed)
            f = f + rng.standard_normal(f.shape).astype(np.float32) * np.where(
                self.mask, self.noise_std, 0
            )
        return np.where(self.mask, f, 0).astype(np.float32)

    def local_noisy(self, seed: int = 0) -> np.ndarray:
        """Local field (ppm) plus Gaussian noise inside the mask."""
        rng = np.random.default_rng(seed)
        f = self.local + rng.standard_normal(self.local.shape).astype(np.float32) * np.where(
            self.mask, self.noise_std, 0
        )
        return np.where(self.mask, f, 0).astype(np.float32)


def _rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid(coords, center, axes, angles=(0, 0, 0)) -> np.ndarray:
    """Boolean ellipsoid on mm coordinates ``coords`` (3 broadcastable arrays)."""
    rot = _rotation(angles)
    d = [c - c0 for c, c0 in zip(coords, center)]
    inside = 0.0
    for i in range(3):
        u = rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2]
        inside = inside + (u / axes[i]) ** 2
    return inside <= 1.0


def _block_mean(a: np.ndarray, s: int) -> np.ndarray:
    if s == 1:
        return a.astype(np.float32)
    n = [d // s for d in a.shape]
    return a.reshape(n[0], s, n[1], s, n[2], s).mean(axis=(1, 3, 5), dtype=np.float64).astype(
        np.float32
    )


# label -> (name, chi ppm) of the structures inside the brain
STRUCTURES = {
    1: ("white matter", -0.03),
    2: ("caudate", 0.06),
    3: ("globus pallidus", 0.15),
    4: ("putamen", 0.05),
    5: ("vein", 0.30),
    6: ("calcification", -0.20),
    7: ("red nucleus", 0.10),
}


@lru_cache(maxsize=8)
def brain_phantom(
    shape: tuple[int, int, int] = (64, 64, 64),
    voxel_size: tuple[float, float, float] = (1.5, 1.5, 1.5),
    b0_direction: tuple[float, float, float] = (0.0, 0.0, 1.0),
    supersample: int = 2,
    noise_ppm: float = 0.001,
    white_matter_ppm: float = -0.03,
) -> Phantom:
    """Brain-like phantom: ellipsoidal structures inside a two-ellipsoid brain, skull, sinus.

    The brain periphery (grey matter) has chi = 0 like the tissue just outside the mask, so
    there is no susceptibility step across the mask boundary. Outside the mask: a skull shell
    (-2 ppm) separated from the brain by a gap, an air sinus and two ear canals (+9.2 ppm).
    ``noise_ppm`` is the field noise at magnitude 1; the noise scales as 1/magnitude.
    ``white_matter_ppm`` sets the large central white-matter region (0 leaves only compact
    inclusions, whose fields have a small harmonic part inside the mask).
    """
    s = int(supersample)
    vox = np.asarray(voxel_size, dtype=float)
    fine_vox = vox / s
    fine_shape = tuple(n * s for n in shape)
    coords = []
    for axis, (n, d) in enumerate(zip(fine_shape, fine_vox)):
        c = (np.arange(n) - (n - 1) / 2.0) * d
        view = [1, 1, 1]
        view[axis] = n
        coords.append(c.reshape(view))
    half = min(n * d for n, d in zip(shape, vox)) / 2.0  # mm, half the smallest FOV edge
    sc = lambda v: tuple(x * half for x in v)  # noqa: E731

    def ell(center, axes, angles=(0, 0, 0)):
        return _ellipsoid(coords, sc(center), sc(axes), angles)

    cerebrum_c, cerebrum_a = (0.0, 0.0, 0.10), (0.70, 0.78, 0.58)
    cereb_c, cereb_a = (0.0, -0.40, -0.36), (0.42, 0.28, 0.22)
    brain = ell(cerebrum_c, cerebrum_a) | ell(cereb_c, cereb_a)
    scale = lambda a, f: tuple(x * f for x in a)  # noqa: E731
    inner_skull = ell(cerebrum_c, scale(cerebrum_a, 1.10)) | ell(cereb_c, scale(cereb_a, 1.25))
    outer_skull = ell(cerebrum_c, scale(cerebrum_a, 1.20)) | ell(cereb_c, scale(cereb_a, 1.40))

    labels_fine = np.zeros(fine_shape, dtype=np.int16)
    wm = ell((0.0, 0.02, 0.14), (0.54, 0.62, 0.42)) & brain
    labels_fine[wm] = 1
    for sx in (-1, 1):
        labels_fine[ell((sx * 0.14, 0.20, 0.18), (0.06, 0.14, 0.08), (0, 0, sx * 15))] = 2
        labels_fine[ell((sx * 0.20, 0.02, 0.05), (0.05, 0.12, 0.08), (0, 0, sx * 10))] = 4
        labels_fine[ell((sx * 0.13, 0.00, 0.04), (0.04, 0.08, 0.06))] = 3
    labels_fine[ell((0.05, -0.20, -0.10), (0.035, 0.035, 0.04))] = 7
    labels_fine[ell((-0.02, -0.35, 0.25), (0.018, 0.30, 0.018), (25, 0, 10))] = 5
    labels_fine[ell((0.25, 0.35, 0.25), (0.04, 0.04, 0.04))] = 6
    labels_fine[~brain] = 0
    chi_fine = np.zeros(fine_shape, dtype=np.float32)
    for lab, (_, value) in STRUCTURES.items():
        chi_fine[labels_fine == lab] = white_matter_ppm if lab == 1 else value

    bg_fine = np.zeros(fine_shape, dtype=np.float32)
    bg_fine[outer_skull & ~inner_skull] = -2.0
    air = ell((0.0, 0.66, -0.50), (0.22, 0.14, 0.14))
    for sx in (-1, 1):
        air |= ell((sx * 0.70, -0.05, -0.45), (0.08, 0.08, 0.08))
    bg_fine[air & ~inner_skull] = 9.2
    bg_fine[brain] = 0.0

    b0 = np.asarray(b0_direction, dtype=float)
    b0 = b0 / np.linalg.norm(b0)
    local = _block_mean(forward_field(chi_fine, fine_vox, b0), s)
    background = _block_mean(forward_field(bg_fine, fine_vox, b0), s)

    mask = _block_mean(brain.astype(np.float32), s) >= 0.5
    chi = np.where(mask, _block_mean(chi_fine, s), 0).astype(np.float32)
    chi_bg = _block_mean(bg_fine, s)
    labels = np.zeros(shape, dtype=np.int16)
    for lab in STRUCTURES:
        frac = _block_mean((labels_fine == lab).astype(np.float32), s)
        labels[(frac >= 0.5) & mask] = lab

    head = _block_mean((outer_skull | inner_skull).astype(np.float32), s) >= 0.5
    magnitude = np.where(head, 0.6, 0.0).astype(np.float32)
    magnitude[mask] = 1.0
    magnitude[labels == 1] = 0.85
    magnitude = np.where(mask, np.clip(magnitude - 2.0 * np.maximum(chi, 0), 0.3, None), magnitude)
    magnitude = magnitude.astype(np.float32)
    with np.errstate(divide="ignore"):
        noise_std = np.where(magnitude > 0, noise_ppm / magnitude, np.inf).astype(np.float32)
    return Phantom(
        voxel_size=tuple(float(v) for v in vox),
        b0_direction=tuple(float(v) for v in b0),
        mask=mask,
        chi=chi,
        chi_background=chi_bg,
        local=local,
        background=background,
        magnitude=magnitude,
        noise_std=noise_std,
        labels=labels,
    )


def sphere_volume_fraction(
    shape, voxel_size, radius_mm: float, center_mm=None, supersample: int = 5
) -> np.ndarray:
    """Partial-volume fraction (0..1) of a sphere on a grid (mm; default centre: the middle)."""
    vox = np.asarray(voxel_size, dtype=float)
    if center_mm is None:
        center_mm = [(n - 1) / 2.0 * d for n, d in zip(shape, vox)]
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    frac = np.zeros(shape, dtype=np.float32)
    grids = [np.arange(n) * d - c for n, d, c in zip(shape, vox, center_mm)]
    for ox in offsets:
        x2 = ((grids[0] + ox * vox[0]) ** 2)[:, None, None]
        for oy in offsets:
            y2 = ((grids[1] + oy * vox[1]) ** 2)[None, :, None]
            for oz in offsets:
                z2 = ((grids[2] + oz * vox[2]) ** 2)[None, None, :]
                frac += (x2 + y2 + z2) <= radius_mm**2
    return frac / supersample**3


#: reference susceptibility (ppm) of the QSM challenge 2.0 head-phantom labels 1..16
RC2_CHI = {
    1: 0.044, 2: 0.1305, 3: 0.038, 4: 0.100, 5: 0.152, 6: 0.111, 7: 0.020, 8: -0.030,
    9: 0.020, 10: 0.019, 11: 0.190, 12: 0.019, 13: -2.1, 14: 9.2, 15: 0.0, 16: -3.3,
}
#: deep grey matter labels of the RC2 phantom (caudate, GP, putamen, RN, DN, SN/STN, thalamus)
RC2_DGM = (1, 2, 3, 4, 5, 6, 7)


@lru_cache(maxsize=2)
def rc2_phantom(folder: str, factor: int = 4, noise_ppm: float = 0.002) -> Phantom:
    """Head phantom from the QSM challenge 2.0 labels (0.64 mm) in ``folder``.

    Piecewise-constant chi (``RC2_CHI`` minus the grey-matter value, so the brain edge has
    little contrast) is averaged to ``0.64 * factor / 2`` mm, forward-simulated there and
    block-averaged once more to ``0.64 * factor`` mm. Air (+9.2 ppm) and bone (-2.1 ppm)
    outside the brain mask give the background field. Noise: ``noise_ppm`` / magnitude.
    """
    import nibabel as nib

    if factor % 2:
        raise ValueError("factor must be even")
    seg = np.asarray(nib.load(f"{folder}/SegmentedModel.nii.gz").dataobj).astype(np.int16)
    brain = np.asarray(nib.load(f"{folder}/BrainMask.nii.gz").dataobj) > 0.5
    lut = np.zeros(17, dtype=np.float32)
    for lab, value in RC2_CHI.items():
        lut[lab] = value - RC2_CHI[9]
    half = factor // 2
    vox = 0.64 * factor
    chi_mid = _block_mean(lut[seg], half)
    brain_mid = _block_mean(brain.astype(np.float32), half)
    inside_mid = chi_mid * brain_mid  # partial-volume split at the brain edge
    outside_mid = chi_mid * (1 - brain_mid)
    mid_vox = (vox / 2,) * 3
    local = _block_mean(forward_field(inside_mid, mid_vox, (0, 0, 1), pad=64), 2)
    background = _block_mean(forward_field(outside_mid, mid_vox, (0, 0, 1), pad=64), 2)
    mask = _block_mean(brain_mid, 2) >= 0.5
    labels = np.zeros(mask.shape, dtype=np.int16)
    for lab in range(1, 17):
        labels[(_block_mean((seg == lab).astype(np.float32), factor) >= 0.5) & mask] = lab
    chi = np.where(mask, _block_mean(inside_mid, 2), 0).astype(np.float32)
    # proton-density-like magnitude per tissue (air, bone dark)
    m0 = np.array(
        [0, .75, .6, .7, .6, .6, .6, .75, .65, .85, 1., .5, .9, .05, 0., .6, .1], dtype=np.float32
    )
    magnitude = _block_mean(m0[seg], factor)
    with np.errstate(divide="ignore"):
        noise_std = np.where(
            magnitude > 0, noise_ppm / np.maximum(magnitude, 0.2), np.inf
        ).astype(np.float32)
    return Phantom(
        voxel_size=(vox, vox, vox),
        b0_direction=(0.0, 0.0, 1.0),
        mask=mask,
        chi=chi,
        chi_background=_block_mean(outside_mid, 2),
        local=local,
        background=background,
        magnitude=magnitude,
        noise_std=noise_std,
        labels=labels,
    )
