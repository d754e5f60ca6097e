"""The dipole forward model, B0 geometry and field-unit conversions.

Conventions (see DESIGN.md): arrays are ``[x, y, z]`` in the acquired voxel grid, voxel size in
mm, the B0 direction is a unit vector in voxel axes, fields are in ppm of B0 when handed to
dipole inversion and in Hz in files, susceptibility is in ppm.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import scipy.fft

#: Reduced gyromagnetic ratio of the proton, gamma / (2 pi), in MHz/T.
GAMMA_BAR_MHZ_PER_T = 42.57747892

KernelKind = Literal["continuous", "discrete"]


def voxel_size_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel edge lengths (mm) of a 4x4 voxel-to-world affine."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def b0_direction_from_affine(affine: np.ndarray) -> np.ndarray:
    """Unit B0 direction (scanner z) expressed in the voxel axes of ``affine``.

    ``b = R^T [0, 0, 1]`` with ``R`` the affine's 3x3 part divided column-wise by the voxel
    sizes, so oblique and rotated acquisitions get the right dipole orientation.
    """
    rotation = np.asarray(affine, dtype=float)[:3, :3] / voxel_size_from_affine(affine)
    direction = rotation.T @ np.array([0.0, 0.0, 1.0])
    return direction / np.linalg.norm(direction)


def obliquity_deg(b0_direction: Sequence[float]) -> float:
    """Angle (degrees) between B0 and the nearest voxel axis."""
    b = np.abs(np.asarray(b0_direction, dtype=float))
    return float(np.degrees(np.arccos(np.clip(b.max() / np.linalg.norm(b), -1.0, 1.0))))


#: Voxel sizes accepted (mm): microscopy-grade ex vivo QSM to very coarse clinical slabs.
VOXEL_SIZE_RANGE_MM = (0.01, 20.0)


def check_voxel_size(voxel_size: Sequence[float]) -> np.ndarray:
    """``voxel_size`` as three floats (mm); a ValueError unless each lies in
    ``VOXEL_SIZE_RANGE_MM`` (a size in m or in um would scale every radius and kernel)."""
    sizes = np.asarray(voxel_size, dtype=float).ravel()
    low, high = VOXEL_SIZE_RANGE_MM
    if sizes.size != 3 or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ValueError(f"voxel_size must be three positive numbers (mm), got {voxel_size!r}.")
    if np.any(sizes < low) or np.any(sizes > high):
        raise ValueError(f"voxel_size {sizes.tolist()} is outside {low:g}-{high:g} mm: give "
                         "it in mm (not m or um).")
    return sizes


#: Main fields accepted (T): low-field MRI up to the strongest preclinical magnets.
B0_RANGE_TESLA = (0.01, 25.0)


def check_b0_tesla(b0_tesla: float) -> float:
    """``b0_tesla`` as a float; a ValueError outside ``B0_RANGE_TESLA`` that recognises a
    proton frequency in MHz or Hz given in place of the field (a silent factor of 42.6 or
    4.3e7 on every ppm value otherwise)."""
    value = float(b0_tesla)
    low, high = B0_RANGE_TESLA
    if low <= value <= high:
        return value
    hint = ""
    for unit, per_mhz in (("MHz", 1.0), ("Hz", 1e6)):
        tesla = value / (GAMMA_BAR_MHZ_PER_T * per_mhz)
        if low <= tesla <= high:
            hint = f"; {value:g} {unit} is the proton frequency at {tesla:.3g} T"
    raise ValueError(f"main field B0 = {value:g} T is outside {low:g}-{high:g} T{hint}: give "
                     "B0 in tesla.")


def hz_to_ppm(field_hz: np.ndarray | float, b0_tesla: float) -> np.ndarray | float:
    """Convert a field offset in Hz to ppm of the main field ``b0_tesla`` (T)."""
    return field_hz / (GAMMA_BAR_MHZ_PER_T * check_b0_tesla(b0_tesla))


def ppm_to_hz(field_ppm: np.ndarray | float, b0_tesla: float) -> np.ndarray | float:
    """Convert a field offset in ppm of ``b0_tesla`` (T) to Hz."""
    return field_ppm * (GAMMA_BAR_MHZ_PER_T * check_b0_tesla(b0_tesla))


def padded_shape(shape: Sequence[int], margin: Sequence[int] | int = 0) -> tuple[int, ...]:
    """Smallest FFT-friendly shape holding ``shape`` plus ``margin`` voxels per axis."""
    margins = np.broadcast_to(np.asarray(margin, dtype=int), (len(shape),))
    return tuple(scipy.fft.next_fast_len(int(n + m), real=True) for n, m in zip(shape, margins))


def kspace_grid(
    shape: Sequence[int], voxel_size: Sequence[float], *, half: bool = True
) -> list[np.ndarray]:
    """Broadcastable spatial-frequency axes (cycles/mm) of an FFT grid.

    With ``half=True`` the last axis is the non-negative half used by ``rfftn``.
    """
    axes = []
    for axis, (n, d) in enumerate(zip(shape, voxel_size)):
        last = axis == len(shape) - 1
        k = scipy.fft.rfftfreq(n, d=d) if (half and last) else scipy.fft.fftfreq(n, d=d)
        view = [1] * len(shape)
        view[axis] = k.size
        axes.append(k.reshape(view).astype(np.float64))
    return axes


def dipole_kernel(
    shape: Sequence[int],
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    *,
    half: bool = True,
    kind: KernelKind = "continuous",
) -> np.ndarray:
    """Unit dipole kernel ``D(k) = 1/3 - (k.b)^2 / |k|^2`` (float32), ``D(0) = 0``.

    ``kind="discrete"`` replaces ``k_i^2`` by the symbol of the second central difference,
    ``(2 - 2 cos(2 pi k_i d_i)) / d_i^2 / (2 pi)^2``, consistent with finite-difference
    regularisers. ``half=True`` returns the ``rfftn`` half-space.
    """
    b = np.asarray(b0_direction, dtype=float)
    b = b / np.linalg.norm(b)
    axes = kspace_grid(shape, voxel_size, half=half)
    if kind == "discrete":
        squares = [
            (2.0 - 2.0 * np.cos(2.0 * np.pi * k * d)) / (2.0 * np.pi * d) ** 2
            for k, d in zip(axes, voxel_size)
        ]
        # Directional term: the projection of the discrete gradient symbol on b.
        signs = [np.sign(k) for k in axes]
        roots = [np.sqrt(s) * sg for s, sg in zip(squares, signs)]
        k_dot_b = sum(r * bi for r, bi in zip(roots, b))
        k2 = sum(squares)
    else:
        k_dot_b = sum(k * bi for k, bi in zip(axes, b))
        k2 = sum(k**2 for k in axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = 1.0 / 3.0 - k_dot_b**2 / k2
    kernel[(0,) * len(shape)] = 0.0
    return kernel.astype(np.float32)


def forward_field(
    chi_ppm: np.ndarray,
    voxel_size: Sequence[float],
    b0_direction: Sequence[float],
    *,
    pad: Sequence[int] | int | None = None,
    kind: KernelKind = "continuous",
) -> np.ndarray:
    """Field perturbation (ppm of B0) of a susceptibility distribution ``chi_ppm`` (ppm).

    The convolution is done with real FFTs on a zero-padded grid (default margin: half the
    array on each axis) so that periodic wrap-around does not reach the volume.
    """
    chi = np.asarray(chi_ppm, dtype=np.float32)
    margin = [n // 2 for n in chi.shape] if pad is None else pad
    shape = padded_shape(chi.shape, margin)
    kernel = dipole_kernel(shape, voxel_size, b0_direction, kind=kind)
    spectrum = scipy.fft.rfftn(chi, s=shape)
    spectrum *= kernel
    field = scipy.fft.irfftn(spectrum, s=shape)
    return np.ascontiguousarray(field[tuple(slice(0, n) for n in chi.shape)], dtype=np.float32)
