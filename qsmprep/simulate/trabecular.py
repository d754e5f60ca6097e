"""Trabecular-bone model of the calcaneus study (METHODS.md section 7).

Random overlapping spheres (bone, susceptibility ``delta_chi`` ppm relative to marrow) in a
cubic box of ``box`` voxels, centred in a cube ``factor`` times larger (marrow, 0 ppm); the
field (ppm of B0) of the whole cube by the dipole kernel; inside the box:

- BV/TV: the fraction of box voxels inside a sphere;
- R2' (1/s): a Lorentzian fitted to the histogram of the field (Hz) outside the spheres;
  its full width at half maximum ``FWHM`` (Hz) gives ``R2' = pi FWHM``;
- mean chi recovered by closed-form L2 inversion of the field of the whole cube (the DC of
  chi is unobservable; the cube is mostly marrow, so its mean stays near 0), averaged over
  the box; the study found it linear in BV/TV with a slope of about 0.81 |delta_chi|.

The field is linear in ``delta_chi``: :func:`simulate_spheres` computes it once per geometry
for 1 ppm (:func:`trabecular_table` scales it). Study sizes (box 128, factor 3, N 100-300, r
5-20 voxels) need ~1 GB and minutes; tests use box 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import optimize

from qsmprep.recon.dipole import forward_field, ppm_to_hz
from qsmprep.recon.inversion import closed_form_l2


@dataclass
class SphereModel:
    """One geometry: ``bvtv``; ``field_ppm_per_ppm`` field inside the box for delta_chi = 1;
    ``spheres`` bone mask of the box; ``chi_mean_per_ppm`` mean recovered chi in the box for
    delta_chi = 1."""

    bvtv: float
    field_ppm_per_ppm: np.ndarray
    spheres: np.ndarray
    chi_mean_per_ppm: float


def random_spheres(box: int, n_spheres: int, radius_range: Sequence[float], *,
                   seed: int = 0) -> np.ndarray:
    """Boolean box (``box``^3 voxels) of ``n_spheres`` overlapping spheres, centres uniform
    in the box, radii uniform in ``radius_range`` (voxels)."""
    if box < 4 or n_spheres < 1:
        raise ValueError(f"need box >= 4 and n_spheres >= 1, got {box}, {n_spheres}.")
    low, high = float(radius_range[0]), float(radius_range[1])
    if not 0 < low <= high:
        raise ValueError(f"radius_range must satisfy 0 < low <= high, got {radius_range}.")
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, box, size=(n_spheres, 3))
    radii = rng.uniform(low, high, size=n_spheres)
    grid = np.arange(box, dtype=np.float32) + 0.5
    inside = np.zeros((box,) * 3, dtype=bool)
    for (cx, cy, cz), r in zip(centres, radii):  # loop over spheres, not voxels
        sl = [slice(max(int(c - r), 0), min(int(c + r) + 2, box)) for c in (cx, cy, cz)]
        gx, gy, gz = (grid[s] for s in sl)
        d2 = ((gx - cx)[:, None, None] ** 2 + (gy - cy)[None, :, None] ** 2
              + (gz - cz)[None, None, :] ** 2)
        inside[tuple(sl)] |= d2 <= r * r
    return inside


def simulate_spheres(
    box: int = 128,
    n_spheres: int = 200,
    radius_range: Sequence[float] = (5.0, 20.0),
    *,
    factor: int = 3,
    lam: float = 0.05,
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    seed: int = 0,
) -> SphereModel:
    """Field and L2-recovered mean chi of one random-sphere geometry (delta_chi = 1 ppm).

    ``lam``: closed-form L2 regularisation weight (gradient regulariser, 1 mm voxels).
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}.")
    spheres = random_spheres(box, n_spheres, radius_range, seed=seed)
    size = box * factor
    start = (size - box) // 2
    core = (slice(start, start + box),) * 3
    chi = np.zeros((size,) * 3, dtype=np.float32)
    chi[core] = spheres
    field = forward_field(chi, (1.0, 1.0, 1.0), b0_direction, pad=0)
    mask = np.ones(chi.shape, dtype=bool)
    recovered = closed_form_l2(field, mask, voxel_size=(1.0, 1.0, 1.0),
                               b0_direction=b0_direction, lam=lam, pad_fraction=0.0)
    return SphereModel(
        bvtv=float(spheres.mean()), field_ppm_per_ppm=field[core].astype(np.float32),
        spheres=spheres, chi_mean_per_ppm=float(recovered[core].mean()),
    )


def lorentzian_fwhm_hz(field_hz: np.ndarray, *, bins: int = 201) -> float:
    """FWHM (Hz) of a Lorentzian fitted to the histogram of ``field_hz`` values."""
    values = np.asarray(field_hz, dtype=np.float64).ravel()
    spread = np.percentile(values, [2, 98])
    half = max(abs(spread[0]), abs(spread[1]), 1e-6)
    counts, edges = np.histogram(values, bins=bins, range=(-half, half))
    centres = 0.5 * (edges[1:] + edges[:-1])
    density = counts / counts.max()

    def lorentz(f, amplitude, f0, gamma):
        return amplitude / (1 + ((f - f0) / (gamma / 2)) ** 2)

    guess = (1.0, float(np.median(values)), float(np.subtract(*np.percentile(values, [75, 25]))))
    params, _ = optimize.curve_fit(lorentz, centres, density, p0=guess, maxfev=5000)
    return float(abs(params[2]))


def static_dephasing_r2prime(bvtv: float, delta_chi: float, b0_tesla: float = 3.0) -> float:
    """R2' (1/s) of dilute randomly placed spheres of volume fraction ``bvtv`` and
    susceptibility difference ``delta_chi`` (ppm) in the static-dephasing regime (Yablonskiy &
    Haacke 1994): ``2 pi / (3 sqrt 3) * bvtv * dw``, ``dw = 2 pi gamma |delta_chi| B0 / 3``
    (rad/s). Valid for small ``bvtv``; the reference for the sphere model's dilute limit."""
    delta_omega = 2.0 * np.pi * abs(ppm_to_hz(delta_chi, b0_tesla)) / 3.0
    return float(2.0 * np.pi / (3.0 * np.sqrt(3.0)) * bvtv * delta_omega)


def trabecular_table(
    models: Sequence[SphereModel],
    delta_chis: Sequence[float] = (-0.5, -1.0, -1.5, -2.0),
    *,
    b0_tesla: float = 3.0,
    margin: int = 0,
) -> list[dict[str, float]]:
    """Rows (delta_chi ppm, BV/TV, mean recovered chi ppm, R2' 1/s, BV/TV where R2' is
    measured) for every geometry and susceptibility (fields scale linearly with delta_chi).

    ``margin``: voxels left out at each face of the box when measuring R2' (there are no
    spheres beyond the box, so voxels near its faces see fewer neighbours); ``bvtv`` and the
    mean chi stay those of the whole box, ``bvtv_r2prime`` is that of the inner box.
    """
    measured = []  # per geometry: the inner box's BV/TV and its field outside the spheres
    for model in models:
        box = model.spheres.shape[0]
        if not 0 <= 2 * margin < box - 2:
            raise ValueError(f"margin {margin} leaves no box of {box} voxels.")
        inner = (slice(margin, box - margin),) * 3
        spheres = model.spheres[inner]
        measured.append((float(spheres.mean()), model.field_ppm_per_ppm[inner][~spheres]))
    rows = []
    for dchi in delta_chis:
        for model, (bvtv_inner, outside_ppm) in zip(models, measured):
            fwhm = lorentzian_fwhm_hz(ppm_to_hz(outside_ppm * dchi, b0_tesla))
            rows.append({"delta_chi": float(dchi), "bvtv": model.bvtv,
                         "chi_mean": model.chi_mean_per_ppm * dchi,
                         "r2prime": float(np.pi * fwhm), "bvtv_r2prime": bvtv_inner})
    return rows


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Slope, intercept and R^2 of an ordinary least-squares line."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    r2 = 1 - residual.var() / max(y.var(), 1e-30)
    return float(slope), float(intercept), float(r2)
