"""Brain mask from the multi-echo magnitude, or a provided mask resampled to nothing."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from qsmprep.recon import mask as mask_core

from .base import geometry, load, load_mask, save


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude [x, y, z, echo]")
    finite_mask = File(exists=True, desc="voxels with finite input values")
    provided_mask = File(exists=True, desc="user mask on the same grid (used instead)")
    threshold = traits.Float(desc="magnitude threshold as a fraction of the robust maximum")
    erode_mm = traits.Float(0.0, usedefault=True, desc="extra erosion of the mask (mm)")
    mask_type = traits.Enum("brain", "body", usedefault=True,
                            desc="brain extraction, or a body/limb signal mask (several parts)")


class _BrainMaskOutputSpec(TraitedSpec):
    mask = File(exists=True, desc="brain mask (uint8)")
    metadata = traits.Dict(desc="how the mask was made")


class BrainMask(SimpleInterface):
    """Magnitude-based brain mask (robust threshold + morphology) or a provided mask."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        magnitude, image = load(self.inputs.magnitude)
        voxel_size, _ = geometry(image)
        if self.inputs.provided_mask:
            mask = load_mask(self.inputs.provided_mask)
            if mask.shape != magnitude.shape[:3]:
                raise ValueError(f"{self.inputs.provided_mask}: mask shape {mask.shape} does "
                                 f"not match the data {magnitude.shape[:3]}; resample it.")
            metadata = {"Type": "ROI" if self.inputs.mask_type == "body" else "Brain",
                        "Sources": [str(self.inputs.provided_mask)],
                        "Description": "Provided mask."}
        else:
            threshold = self.inputs.threshold if self.inputs.threshold else None
            if self.inputs.mask_type == "body":
                mask = mask_core.body_mask(magnitude, voxel_size=voxel_size, threshold=threshold)
                metadata = {"Type": "ROI",
                            "Description": "Magnitude-based body mask: Otsu threshold of the "
                            "log echo-combined magnitude, small parts removed, holes "
                            "filled."}
            else:
                mask = mask_core.brain_mask(magnitude, voxel_size=voxel_size,
                                            threshold=threshold)
                metadata = {"Type": "Brain",
                            "Description": "Magnitude-based brain mask: robust threshold of "
                            "the echo-combined magnitude and morphological cleaning."}
        if self.inputs.finite_mask:
            mask &= load_mask(self.inputs.finite_mask)
        if self.inputs.erode_mm > 0:
            mask = mask_core.erode(mask, self.inputs.erode_mm, voxel_size=voxel_size)
            metadata["ErosionMillimeters"] = self.inputs.erode_mm
        if not mask.any():
            raise ValueError("the brain mask is empty: the magnitude may be all zero or "
                             "constant; check the input, or pass --mask-threshold.")
        self._results["mask"] = save(mask, image, "mask.nii.gz", cwd=runtime.cwd,
                                     dtype=np.uint8)
        self._results["metadata"] = metadata
        return runtime
