"""Head phantom from the QSM challenge 2.0 (RC2) tissue segmentation.

Built from the arrays of ``SegmentedModel.nii.gz`` (labels 1-16 at 0.64 mm),
``BrainMask.nii.gz`` and the ``chiref`` table of ``SusceptibilityValues.mat`` (ppm), which
:mod:`qsmprep.datasets.rc2` reads from an RC2 phantom folder. Labels are resampled to the
target voxel size by area-weighted majority (the mode of the 0.64 mm labels overlapping each
target voxel); susceptibility, ``m0`` and ``R2*`` are area-weighted averages of the
per-label values (partial volume, so small structures such as the 0.02 mL calcification
keep their magnetic moment at 2 mm). Outside the brain mask, a shell of ``shell_mm`` takes
the susceptibility of the nearest voxel inside the mask, so there is no susceptibility
contrast across the mask boundary (METHODS §3 caveat); labels keep the anatomy.

:func:`add_head_fat` and :func:`simulate_waterfat_head` give the head subcutaneous fat and
skull marrow and simulate its water-fat signal (benchmarks/waterfat_benchmark.py).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse
from scipy import ndimage

from qsmprep.simulate.phantom import AIR_CHI_PPM, TISSUES, HeadPhantom

LOGGER = logging.getLogger("qsmprep")

#: voxel size (mm) of the RC2 segmentation
RC2_SOURCE_VOXEL_MM = 0.64


def _overlap_matrix(n_src: int, d_src: float, n_dst: int, d_dst: float) -> scipy.sparse.csr_matrix:
    """Sparse (n_dst x n_src) matrix of overlap fractions of centred 1-D voxel grids."""
    src_edges = (np.arange(n_src + 1) - n_src / 2.0) * d_src
    dst_edges = (np.arange(n_dst + 1) - n_dst / 2.0) * d_dst
    rows, cols, vals = [], [], []
    for j in range(n_dst):
        lo, hi = dst_edges[j], dst_edges[j + 1]
        i0 = max(int(np.floor((lo - src_edges[0]) / d_src)), 0)
        i1 = min(int(np.ceil((hi - src_edges[0]) / d_src)), n_src)
        for i in range(i0, i1):
            ov = min(hi, src_edges[i + 1]) - max(lo, src_edges[i])
            if ov > 0:
                rows.append(j)
                cols.append(i)
                vals.append(ov / d_dst)
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(n_dst, n_src), dtype=np.float32)


def _apply_axis(matrix: scipy.sparse.csr_matrix, volume: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(volume, axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    out = (matrix @ flat).reshape((matrix.shape[0],) + moved.shape[1:])
    return np.moveaxis(out, 0, axis)


def area_fractions(
    volume: np.ndarray, matrices: Sequence[scipy.sparse.csr_matrix]
) -> np.ndarray:
    """Average ``volume`` (float) over target voxels with per-axis overlap matrices."""
    out = volume.astype(np.float32, copy=False)
    # reduce the largest downsampling first to keep intermediates small
    order = np.argsort([m.shape[0] / m.shape[1] for m in matrices])
    for axis in order:
        out = _apply_axis(matrices[axis], out, int(axis))
    return np.asarray(out, dtype=np.float32)


def resample_labels(
    labels: np.ndarray,
    source_voxel: Sequence[float],
    target_voxel: Sequence[float],
    values: dict[str, dict[int, float]] | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
    """Area-weighted mode resampling of a label volume to ``target_voxel`` (mm).

    The grids share their centre; the target shape is ``round(n * source / target)``.
    ``values`` maps a property name to label -> value; each is returned as the area-weighted
    average over the labels (partial volume).  ``mask`` is returned as its fraction.
    """
    shape_src = labels.shape
    shape_dst = tuple(
        max(1, int(round(n * s / t))) for n, s, t in zip(shape_src, source_voxel, target_voxel)
    )
    mats = [
        _overlap_matrix(n, s, m, t)
        for n, s, m, t in zip(shape_src, source_voxel, shape_dst, target_voxel)
    ]
    best = np.full(shape_dst, -1.0, dtype=np.float32)
    out_labels = np.zeros(shape_dst, dtype=np.int16)
    props = {k: np.zeros(shape_dst, dtype=np.float32) for k in (values or {})}
    offset = int(labels.min()) - 1
    boxes = ndimage.find_objects(np.asarray(labels, dtype=np.int64) - offset if offset else labels)
    for k, box in enumerate(boxes, start=1):
        if box is None:
            continue
        lab = k + offset
        # restrict the work to the label's bounding box (columns of the overlap matrices)
        sub_mats = [m[:, b.start:b.stop] for m, b in zip(mats, box)]
        frac = area_fractions(labels[box] == lab, sub_mats)
        better = frac > best
        out_labels[better] = lab
        best[better] = frac[better]
        for key, table in (values or {}).items():
            props[key] += frac * np.float32(table.get(int(lab), 0.0))
    mask_frac = None if mask is None else area_fractions(mask, mats)
    return out_labels, props, mask_frac


def rc2_phantom(
    labels_src: np.ndarray,
    mask_src: np.ndarray,
    *,
    source_voxel_size: Sequence[float],
    chiref: dict[int, tuple[str, float]],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    shell_mm: float = 4.0,
    calcification_ppm: float | None = None,
) -> HeadPhantom:
    """RC2 head phantom resampled to ``voxel_size`` (mm) from its segmentation.

    ``labels_src`` (RC2 ``SegmentedModel`` label ids) and ``mask_src`` (its ``BrainMask``) on
    the source grid of ``source_voxel_size`` (mm); ``chiref`` label id -> (name, chi ppm),
    RC2's table (CSF 0.019, air 9.2, bone -2.1, calcification -3.3 unless
    ``calcification_ppm`` is given). ``m0`` and ``R2*`` per label are the 3 T values of
    :data:`qsmprep.simulate.phantom.TISSUES`. ``shell_mm`` is the thickness of the shell
    outside the mask that copies the nearest in-mask susceptibility (0 disables it).
    ``qsmprep.datasets.rc2.rc2_phantom`` reads these from the challenge's files.
    """
    vs = tuple(float(v) for v in voxel_size)
    if len(vs) != 3 or min(vs) <= 0:
        raise ValueError(f"voxel_size must be 3 positive values (mm), got {voxel_size!r}")
    if min(vs) < RC2_SOURCE_VOXEL_MM * 0.99:
        raise ValueError(f"voxel_size {vs} is finer than the RC2 model ({RC2_SOURCE_VOXEL_MM} mm)")
    if shell_mm < 0:
        raise ValueError(f"shell_mm must be >= 0, got {shell_mm!r}")
    src_voxel = tuple(float(v) for v in source_voxel_size)
    labels_src = np.asarray(labels_src, dtype=np.int16)
    mask_src = np.asarray(mask_src, dtype=bool)
    if labels_src.shape != mask_src.shape:
        raise ValueError("RC2 SegmentedModel and BrainMask grids differ")

    chi_table = {i: chi for i, (_, chi) in chiref.items()}
    if calcification_ppm is not None:
        chi_table[16] = float(calcification_ppm)
    m0_table = {i: TISSUES[i][2] for i in TISSUES}
    r2s_m0_table = {i: TISSUES[i][2] * TISSUES[i][3] for i in TISSUES}
    labels, props, mask_frac = resample_labels(
        labels_src, src_voxel, vs,
        values={"chi": chi_table, "m0": m0_table, "r2s_m0": r2s_m0_table},
        mask=mask_src,
    )
    chi = props["chi"]
    m0 = props["m0"]
    # R2* averaged with m0 weights (air and m0 = 0 voxels get 0)
    r2star = np.divide(props["r2s_m0"], m0, out=np.zeros_like(m0), where=m0 > 1e-6)
    brain_mask = mask_frac >= 0.5

    if shell_mm > 0 and brain_mask.any():
        dist, index = ndimage.distance_transform_edt(~brain_mask, sampling=vs, return_indices=True)
        shell = (dist > 0) & (dist <= shell_mm)
        chi[shell] = chi[tuple(ix[shell] for ix in index)]

    names = {int(i): TISSUES[int(i)][0] for i in np.unique(labels)}
    LOGGER.debug("rc2_phantom: %s at %s mm, labels %s", labels.shape, vs, sorted(names))
    return HeadPhantom(
        chi_ppm=chi.astype(np.float32),
        labels=labels,
        label_names=names,
        brain_mask=brain_mask,
        m0=m0.astype(np.float32),
        r2star=r2star.astype(np.float32),
        voxel_size=vs,  # type: ignore[arg-type]
        background_chi_ppm=chi_table.get(14, AIR_CHI_PPM),
        description="QSM challenge 2.0 (RC2) head phantom segmentation",
        extra={"rc2_label_names": {i: name for i, (name, _) in chiref.items()},
               "chi_table_ppm": chi_table},
    )


def add_head_fat(
    phantom: HeadPhantom,
    *,
    scalp_mm: float = 4.5,
    scalp_pdff: float = 0.9,
    marrow_depth_mm: float = 1.0,
    marrow_pdff: float = 0.6,
    marrow_r2star: float = 120.0,
) -> tuple[HeadPhantom, np.ndarray]:
    """Fat for the (fat-free) RC2 head: the outer ``scalp_mm`` of its soft tissue (label
    15) becomes subcutaneous fat (proton density 0.9, PDFF ``scalp_pdff``, R2* 40/s), bone
    (label 13) deeper than ``marrow_depth_mm`` the skull's marrow (proton density and PDFF
    ``marrow_pdff``, R2* ``marrow_r2star`` 1/s). Returns the phantom with ``m0`` and
    ``r2star`` updated and the PDFF (0-1, float32)."""
    # air connected to the grid's faces (not the sinuses or ear canals)
    exterior = ~ndimage.binary_fill_holes(~np.isin(phantom.labels, (0, 14)))
    depth = ndimage.distance_transform_edt(~exterior, sampling=phantom.voxel_size)
    bone = phantom.labels == 13
    scalp = (phantom.labels == 15) & (depth <= scalp_mm)
    marrow = bone & (ndimage.distance_transform_edt(bone, sampling=phantom.voxel_size)
                     > marrow_depth_mm)
    m0, r2star = phantom.m0.copy(), phantom.r2star.copy()
    pdff = np.zeros(phantom.shape, dtype=np.float32)
    for region, fraction, density, rate in ((scalp, scalp_pdff, 0.9, 40.0),
                                            (marrow, marrow_pdff, marrow_pdff, marrow_r2star)):
        pdff[region], m0[region], r2star[region] = fraction, density, rate
    return dataclasses.replace(phantom, m0=m0, r2star=r2star), pdff


@dataclass(frozen=True)
class WaterFatHeadSimulation:
    """Multi-echo water-fat signal of a head (:func:`simulate_waterfat_head`) on the coarse
    grid: ``signal`` (x, y, z, echo) complex64, the truth per voxel: ``field_hz`` (the
    proton-density-weighted mean of its sub-voxels), ``pdff`` (percent) and
    ``proton_density``; ``voxel_size`` (mm)."""

    signal: np.ndarray
    field_hz: np.ndarray
    pdff: np.ndarray
    proton_density: np.ndarray
    voxel_size: tuple[float, float, float]


def simulate_waterfat_head(
    phantom: HeadPhantom,
    pdff: np.ndarray,
    echo_times: Sequence[float],
    *,
    b0_tesla: float,
    snr: float = 40.0,
    average: int = 2,
    neck_mm: float = 40.0,
    shim_order: int = 2,
    fat_model: str = "ismrm",
    seed: int = 0,
) -> WaterFatHeadSimulation:
    """Water-fat GRE of a head phantom with fat (:func:`add_head_fat`), B0 along the third
    axis: the field of its susceptibility (the lowest slice continued ``neck_mm`` below, the
    surrounding air as the FFT's zero padding), shimmed to ``shim_order`` over the tissue
    (``m0 > 0.2``); the signal of every echo on the phantom's grid, averaged over blocks of
    ``average`` voxels per axis (intravoxel dephasing at air boundaries), plus complex noise
    of the mean coarse tissue proton density over ``snr``."""
    from qsmprep.recon import waterfat
    from qsmprep.recon.dipole import forward_field, ppm_to_hz
    from qsmprep.simulate.signal import shim, smooth_phase_offset

    te = np.asarray(echo_times, dtype=np.float64).ravel()
    neck = int(round(neck_mm / phantom.voxel_size[2]))
    relative = np.pad(phantom.chi_ppm - phantom.background_chi_ppm, ((0, 0), (0, 0), (neck, 0)),
                      mode="edge")
    field_ppm = forward_field(relative, phantom.voxel_size, (0.0, 0.0, 1.0))[:, :, neck:]
    fitted, _ = shim(field_ppm, phantom.m0 > 0.2, phantom.voxel_size, shim_order)
    field = ppm_to_hz(field_ppm - fitted, b0_tesla).astype(np.float32)
    rng = np.random.default_rng(seed)
    phase0 = smooth_phase_offset(phantom.shape, phantom.voxel_size, rng).astype(np.float32)

    def blocks(values: np.ndarray) -> np.ndarray:
        n = [size // average * average for size in values.shape]
        values = values[: n[0], : n[1], : n[2]]
        return values.reshape(n[0] // average, average, n[1] // average, average,
                              n[2] // average, average).mean(axis=(1, 3, 5))

    density = blocks(phantom.m0)
    tissue = density > 0.2
    sigma = float(density[tissue].mean()) / float(snr)
    c = waterfat.fat_signal(te, b0_tesla, fat_model)
    echoes = []
    for n, t in enumerate(te):  # loop over echoes only
        fine = (phantom.m0 * (1 - pdff + pdff * c[n]) * np.exp(-phantom.r2star * t)
                * np.exp(1j * (phase0 + 2 * np.pi * field * t))).astype(np.complex64)
        coarse = blocks(fine)
        noise = rng.standard_normal(coarse.shape + (2,), dtype=np.float32)
        echoes.append((coarse + sigma * (noise[..., 0] + 1j * noise[..., 1])).astype(np.complex64))
    weighted = np.maximum(density, 1e-12)

    def mean_over_density(values: np.ndarray) -> np.ndarray:
        return np.where(density > 0, blocks(phantom.m0 * values) / weighted, 0).astype(np.float32)

    return WaterFatHeadSimulation(
        signal=np.stack(echoes, axis=-1),
        field_hz=mean_over_density(field),
        pdff=100 * mean_over_density(pdff),
        proton_density=density.astype(np.float32),
        voxel_size=tuple(average * v for v in phantom.voxel_size),  # type: ignore[arg-type]
    )
