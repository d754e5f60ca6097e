"""Shared helpers of the interfaces: NIfTI I/O, geometry and thread settings."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import nibabel as nb
import numpy as np
import scipy.fft

from qsmprep.recon.dipole import b0_direction_from_affine, obliquity_deg, voxel_size_from_affine


def load(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, nb.Nifti1Image]:
    """Image data as ``dtype`` and the image (for its affine and header)."""
    image = nb.load(str(path))
    return np.asarray(image.dataobj, dtype=dtype), image


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask image as a boolean array (> 0.5)."""
    return np.asarray(nb.load(str(path)).dataobj, dtype=np.float32) > 0.5


def save(
    data: np.ndarray,
    reference: nb.Nifti1Image,
    name: str,
    *,
    cwd: str | os.PathLike,
    dtype=np.float32,
) -> str:
    """Write ``data`` on the grid of ``reference`` into ``cwd/name``; returns the path.

    Intermediate files in the work directory are uncompressed (``name`` without ``.gz``):
    gzip level 1 of a 256x256x176x6 float32 stack took ~10 s per file, and uncompressed
    images are memory-mapped when read; ``DerivativesDataSink`` compresses final outputs.
    """
    header = reference.header.copy()
    array = np.asarray(data, dtype=dtype)
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(1.0, 0.0)
    image = nb.Nifti1Image(array, reference.affine, header)
    sform, sform_code = reference.get_sform(coded=True)
    qform, qform_code = reference.get_qform(coded=True)
    image.set_sform(reference.affine, int(sform_code) or 1)
    image.set_qform(reference.affine, int(qform_code) or 1)
    image.header.set_xyzt_units("mm", "sec")
    path = Path(cwd) / name.removesuffix(".gz")
    image.to_filename(str(path))
    return str(path)


def geometry(image: nb.Nifti1Image) -> tuple[tuple[float, float, float], tuple[float, ...]]:
    """Voxel size (mm) and B0 direction (unit vector in voxel axes) of an image."""
    # float32 affines of rotated grids give e.g. 1.9999998 mm: round to 0.1 micrometre
    voxel_size = tuple(round(float(v), 4) for v in voxel_size_from_affine(image.affine))
    direction = tuple(float(v) for v in b0_direction_from_affine(image.affine))
    return voxel_size, direction


def geometry_metadata(image: nb.Nifti1Image) -> dict[str, object]:
    """Sidecar fields describing the acquisition geometry used by the dipole model."""
    voxel_size, direction = geometry(image)
    return {
        "B0Direction": [round(v, 6) for v in direction],
        "B0ObliquityAngle": round(obliquity_deg(direction), 3),
        "VoxelSize": [round(v, 6) for v in voxel_size],
    }


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run the numerics with ``count`` FFT/numba threads (0 or less: all CPUs)."""
    count = int(count) if count and count > 0 else (os.cpu_count() or 1)
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        numba = None
    previous = numba.get_num_threads() if numba else None
    if numba:
        numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    try:
        with scipy.fft.set_workers(count):
            yield
    finally:
        if numba and previous:
            numba.set_num_threads(previous)
