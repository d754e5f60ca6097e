"""Susceptibility-weighted imaging and intensity projections (optional by-products)."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from qsmprep.recon import swi as swi_core

from .base import geometry, load, load_mask, save, threads


class _ComputeSWIInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude [x, y, z, echo]")
    phase = File(exists=True, mandatory=True, desc="4D phase (rad)")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    filter_size_mm = traits.Float(12.0, usedefault=True, desc="homodyne high-pass size (mm)")
    phase_sign = traits.Enum(1, -1, usedefault=True, desc="phase convention (+1: +2 pi f TE)")
    slab_mm = traits.Float(16.0, usedefault=True, desc="minimum intensity projection slab (mm)")
    num_threads = traits.Int(1, usedefault=True, desc="threads")


class _ComputeSWIOutputSpec(TraitedSpec):
    swi = File(exists=True, desc="SWI (magnitude units)")
    minip = File(exists=True, desc="sliding-slab minimum intensity projection of the SWI")
    metadata = traits.Dict(desc="method and parameters")


class ComputeSWI(SimpleInterface):
    """Multi-echo SWI (homodyne high-pass phase mask on the echo-combined magnitude)."""

    input_spec = _ComputeSWIInputSpec
    output_spec = _ComputeSWIOutputSpec

    def _run_interface(self, runtime):
        magnitude, image = load(self.inputs.magnitude)
        phase, _ = load(self.inputs.phase)
        mask = load_mask(self.inputs.mask)
        voxel_size, direction = geometry(image)
        axis = int(np.argmax(np.abs(direction)))  # project along the axis closest to B0
        with threads(self.inputs.num_threads):
            weighted = swi_core.swi(magnitude, phase, mask, echo_times=self.inputs.echo_times,
                                    voxel_size=voxel_size,
                                    filter_size_mm=self.inputs.filter_size_mm,
                                    phase_sign=self.inputs.phase_sign)
        minip = swi_core.minimum_intensity_projection(
            weighted, slab_mm=self.inputs.slab_mm, voxel_size=voxel_size, axis=axis)
        self._results["swi"] = save(weighted, image, "swi.nii.gz", cwd=runtime.cwd)
        self._results["minip"] = save(minip, image, "minip.nii.gz", cwd=runtime.cwd)
        self._results["metadata"] = {
            "SWIHighPassFilterMillimeters": self.inputs.filter_size_mm,
            "SWIPhaseMaskPower": 4,
            "PhaseSign": int(self.inputs.phase_sign),
            "ProjectionSlabMillimeters": self.inputs.slab_mm,
            "ProjectionAxis": "ijk"[axis],
            "EchoTime": list(self.inputs.echo_times),
        }
        return runtime


class _VenographyInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True, desc="susceptibility (ppm)")
    slab_mm = traits.Float(16.0, usedefault=True, desc="projection slab (mm)")


class _VenographyOutputSpec(TraitedSpec):
    mip = File(exists=True, desc="sliding-slab maximum intensity projection (ppm)")
    metadata = traits.Dict(desc="parameters")


class QSMVenography(SimpleInterface):
    """Maximum intensity projection of the susceptibility map over slabs (veins bright)."""

    input_spec = _VenographyInputSpec
    output_spec = _VenographyOutputSpec

    def _run_interface(self, runtime):
        chi, image = load(self.inputs.chi)
        voxel_size, direction = geometry(image)
        axis = int(np.argmax(np.abs(direction)))
        mip = swi_core.maximum_intensity_projection(chi, slab_mm=self.inputs.slab_mm,
                                                    voxel_size=voxel_size, axis=axis)
        self._results["mip"] = save(mip, image, "chi_mip.nii.gz", cwd=runtime.cwd)
        self._results["metadata"] = {"ProjectionSlabMillimeters": self.inputs.slab_mm,
                                     "ProjectionAxis": "ijk"[axis]}
        return runtime
