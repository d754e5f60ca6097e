"""Load the echoes of an acquisition: stack to 4D, scale phase to radians, flag bad voxels."""

from __future__ import annotations

import logging

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from qsmprep.recon import phase as phase_core

from .base import save

LOGGER = logging.getLogger("qsmprep")


class InputDataError(ValueError):
    """Input images cannot be used together (the message names the files and the fix)."""


class _LoadEchoesInputSpec(BaseInterfaceInputSpec):
    magnitude_files = InputMultiObject(File(exists=True), desc="magnitude image per echo")
    phase_files = InputMultiObject(File(exists=True), desc="phase image per echo")
    real_files = InputMultiObject(File(exists=True), desc="real part per echo")
    imag_files = InputMultiObject(File(exists=True), desc="imaginary part per echo")
    volumes = traits.List(traits.Int, desc="volume index per echo in 4D files (-1: 3D file)")
    phase_units = traits.Enum("auto", "rad", "arbitrary", usedefault=True,
                              desc="phase units from the sidecar ('auto': infer from range)")
    single_slice = traits.Bool(False, usedefault=True,
                               desc="accept one slice [x, y] / [x, y, 1] (water-fat maps only)")


class _LoadEchoesOutputSpec(TraitedSpec):
    magnitude = File(exists=True, desc="4D magnitude [x, y, z, echo] (float32)")
    phase = File(desc="4D phase in rad, wrapped to (-pi, pi] (float32)")
    finite_mask = File(exists=True, desc="voxels finite in every input image")
    metadata = traits.Dict(desc="what was done (units, rescaling, non-finite voxels)")


class LoadEchoes(SimpleInterface):
    """Stack per-echo images into 4D float32 arrays with phase in radians."""

    input_spec = _LoadEchoesInputSpec
    output_spec = _LoadEchoesOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        volumes = list(inputs.volumes) if inputs.volumes else None
        if inputs.real_files and inputs.imag_files:
            real, reference = _stack(inputs.real_files, volumes, flat=inputs.single_slice)
            imag, _ = _stack(inputs.imag_files, volumes, like=(reference, inputs.real_files[0]),
                             flat=inputs.single_slice)
            magnitude, phase, units = np.hypot(real, imag), np.angle(real + 1j * imag), "rad"
        else:
            magnitude, reference = _stack(inputs.magnitude_files, volumes,
                                          flat=inputs.single_slice)
            phase, units = None, None
            if inputs.phase_files:
                like = (reference, inputs.magnitude_files[0])
                phase, _ = _stack(inputs.phase_files, volumes, like=like,
                                  flat=inputs.single_slice)
                units = inputs.phase_units
        finite = phase_core.finite_mask(magnitude, *([] if phase is None else [phase]))
        bad = int(finite.size - finite.sum())
        metadata = {"NonFiniteVoxels": bad}
        sources = list(inputs.real_files or inputs.magnitude_files) + list(
            inputs.imag_files or inputs.phase_files or [])
        if bad:
            LOGGER.warning("%s: %d voxels hold NaN/Inf values; they are masked out of every "
                           "map (check the conversion).", _names(sources), bad)
        all_finite = bool(finite.all())  # the usual case: skip full-size 4D passes
        if not all_finite:
            magnitude = np.where(finite[..., None], np.nan_to_num(magnitude), 0)
        if magnitude.min() < 0:
            magnitude = np.abs(magnitude)
        values = magnitude if all_finite else magnitude[finite]
        if values.size == 0 or float(values.max()) == float(values.min()):
            level = "no finite voxel" if values.size == 0 else f"every voxel is {values.max():g}"
            raise InputDataError(
                f"{_names(list(inputs.real_files or inputs.magnitude_files))}: the magnitude "
                f"is constant ({level}); a brain mask and R2* need image contrast: check that "
                "these are the magnitude images of the series and re-export them.")
        if phase is not None:
            if units == "auto":
                units = phase_core.infer_units(phase[finite])
                LOGGER.warning("%s: phase 'Units' missing from the sidecar; inferred '%s' from "
                               "the value range. Add \"Units\" to the phase sidecars.",
                               _names(inputs.phase_files), units)
            try:
                phase = phase_core.to_radians(phase, units)
                if not all_finite:
                    phase[~finite] = 0.0
            except ValueError as error:
                raise InputDataError(f"{_names(inputs.phase_files)}: {error}") from None
            metadata["PhaseUnits"] = units
            self._results["phase"] = save(phase, reference, "phase.nii.gz", cwd=runtime.cwd)
        self._results["magnitude"] = save(magnitude, reference, "magnitude.nii.gz",
                                          cwd=runtime.cwd)
        self._results["finite_mask"] = save(finite, reference, "finite_mask.nii.gz",
                                            cwd=runtime.cwd, dtype=np.uint8)
        self._results["metadata"] = metadata
        return runtime


def _names(files) -> str:
    """The input files of a message: the first, and how many others."""
    files = [str(f) for f in files or []]
    if len(files) <= 1:
        return files[0] if files else "(no files)"
    return f"{files[0]} (and {len(files) - 1} more)"


def _stack(files, volumes, like=None, flat: bool = False) -> tuple[np.ndarray, nb.Nifti1Image]:
    """Read one 3D volume per echo into [x, y, z, echo] (``flat``: also one slice, ``z`` 1);
    checks grids agree."""
    arrays = []
    reference = like[0] if like else None
    reference_file = like[1] if like else files[0]
    for index, path in enumerate(files):
        try:
            image = nb.load(path)
            shape = image.shape
        except Exception as error:  # nibabel raises many types for corrupt files
            raise InputDataError(f"{path}: cannot be read as NIfTI ({error}); re-export it "
                                 "(e.g. with dcm2niix).") from error
        volume = volumes[index] if volumes and volumes[index] >= 0 else None
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if flat and len(shape) == 2:  # one slice stored as a 2D image
            shape = shape + (1,)
        if volume is None and len(shape) != 3:
            raise InputDataError(f"{path}: expected a 3D image, found shape {shape}; a 4D "
                                 "multi-echo file needs a list of EchoTime values in its sidecar.")
        if volume is not None and (len(shape) != 4 or volume >= shape[3]):
            raise InputDataError(f"{path}: EchoTime lists {volume + 1}+ echoes but the image "
                                 f"has shape {shape}.")
        if len(shape) < 3 or min(shape[:2]) < 2 or (shape[2] < 2 and not flat):
            raise InputDataError(f"{path}: shape {shape} is not a 3D volume; QSM needs 3D data.")
        if reference is None:
            reference = image
        elif shape[:3] != reference.shape[:3] or not np.allclose(
            image.affine, reference.affine, atol=1e-3
        ):
            raise InputDataError(
                f"{path} and {reference_file} have different grids (shape {shape[:3]} vs "
                f"{reference.shape[:3]} or different affines); all echoes and parts must share "
                "one voxel grid."
            )
        try:
            data = image.dataobj[..., volume] if volume is not None else image.dataobj
            arrays.append(np.asarray(data, dtype=np.float32).reshape(shape[:3]))
        except Exception as error:
            raise InputDataError(f"{path}: image data cannot be read ({error}); the file is "
                                 "truncated or corrupt.") from error
    return np.stack(arrays, axis=-1), reference
