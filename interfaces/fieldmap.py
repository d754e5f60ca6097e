"""Multi-echo total field estimation (echo combination + spatial unwrapping)."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from qsmprep.recon import fieldmap
from qsmprep.references import reference

from .base import geometry, geometry_metadata, load, load_mask, save, threads


class _EstimateFieldInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude [x, y, z, echo]")
    phase = File(exists=True, mandatory=True, desc="4D phase (rad)")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    method = traits.Enum("nlfit", "linear", usedefault=True, desc="echo combination")
    unwrap_method = traits.Enum("region_growing", "romeo", "laplacian", "reliability",
                                usedefault=True,
                                desc="spatial phase unwrapping")
    phase_sign = traits.Enum(1, -1, usedefault=True,
                             desc="+1: phase = +2 pi f TE; -1 for the opposite handedness")
    num_threads = traits.Int(1, usedefault=True, desc="threads")


class _EstimateFieldOutputSpec(TraitedSpec):
    field_hz = File(exists=True, desc="unwrapped total field (Hz)")
    noise_hz = File(exists=True, desc="standard deviation of the field estimate (Hz)")
    magnitude = File(exists=True, desc="first-echo magnitude (for the field map)")
    unwrapped_phase = OutputMultiObject(File(exists=True), desc="unwrapped phase per echo (rad)")
    metadata = traits.Dict(desc="methods and parameters")


class EstimateField(SimpleInterface):
    """Fit the field from all echoes and unwrap it spatially."""

    input_spec = _EstimateFieldInputSpec
    output_spec = _EstimateFieldOutputSpec

    def _run_interface(self, runtime):
        magnitude, image = load(self.inputs.magnitude)
        phase, _ = load(self.inputs.phase)
        mask = load_mask(self.inputs.mask)
        voxel_size, _ = geometry(image)
        with threads(self.inputs.num_threads):
            estimate = fieldmap.estimate(
                magnitude, phase, self.inputs.echo_times, mask,
                voxel_size=voxel_size,
                method=self.inputs.method,
                unwrap_method=self.inputs.unwrap_method,
                phase_sign=self.inputs.phase_sign,
            )
        cwd = runtime.cwd
        self._results["field_hz"] = save(estimate.field_hz, image, "field_hz.nii.gz", cwd=cwd)
        self._results["noise_hz"] = save(estimate.noise_hz, image, "noise_hz.nii.gz", cwd=cwd)
        self._results["magnitude"] = save(magnitude[..., 0], image, "magnitude_echo1.nii.gz",
                                          cwd=cwd)
        self._results["unwrapped_phase"] = [
            save(estimate.unwrapped_phase[..., n], image, f"unwrapped_echo{n + 1}.nii.gz",
                 cwd=cwd)
            for n in range(estimate.unwrapped_phase.shape[-1])
        ]
        self._results["metadata"] = {
            "EchoCombination": self.inputs.method,
            "EchoCombinationReference": reference(self.inputs.method),
            "PhaseUnwrapping": self.inputs.unwrap_method,
            "PhaseUnwrappingReference": reference(self.inputs.unwrap_method),
            "PhaseSign": int(self.inputs.phase_sign),
            "EchoTime": list(self.inputs.echo_times),
            "MaskedVoxels": int(np.count_nonzero(mask)),
            **geometry_metadata(image),
        }
        return runtime
