"""Reader of the QSM challenge 2.0 (RC2) head-phantom files for :mod:`qsmprep.simulate.rc2`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import scipy.io

from qsmprep.simulate import rc2 as rc2_core
from qsmprep.simulate.phantom import HeadPhantom


def _find(folder: Path, name: str) -> Path:
    hits = sorted(folder.rglob(name))
    if not hits:
        raise FileNotFoundError(f"{name} not found under {folder}")
    return hits[0]


def load_rc2_chiref(mat_path: str | Path) -> dict[int, tuple[str, float]]:
    """Label id (1-based) -> (name, chiref ppm) from RC2's ``SusceptibilityValues.mat``."""
    data = scipy.io.loadmat(str(mat_path), squeeze_me=True, struct_as_record=False)
    if "label" not in data:
        raise ValueError(f"{mat_path}: no 'label' struct")
    out = {}
    for i, entry in enumerate(np.atleast_1d(data["label"]), start=1):
        out[i] = (str(entry.name), float(entry.chiref))
    return out


def rc2_phantom(
    folder: str | Path,
    *,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    shell_mm: float = 4.0,
    calcification_ppm: float | None = None,
) -> HeadPhantom:
    """RC2 head phantom resampled to ``voxel_size`` (mm) from the files in ``folder``
    (possibly in sub-folders): ``SegmentedModel.nii.gz``, ``BrainMask.nii.gz`` and
    ``SusceptibilityValues.mat``; see :func:`qsmprep.simulate.rc2.rc2_phantom`."""
    folder = Path(folder)
    segmentation = nib.load(str(_find(folder, "SegmentedModel.nii.gz")))
    mask = nib.load(str(_find(folder, "BrainMask.nii.gz")))
    return rc2_core.rc2_phantom(
        np.asarray(segmentation.dataobj, dtype=np.int16),
        np.asarray(mask.dataobj) > 0.5,
        source_voxel_size=segmentation.header.get_zooms()[:3],
        chiref=load_rc2_chiref(_find(folder, "SusceptibilityValues.mat")),
        voxel_size=voxel_size, shell_mm=shell_mm, calcification_ppm=calcification_ppm,
    )
