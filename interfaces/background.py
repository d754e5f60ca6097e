"""Background field removal: total field (Hz) -> local field (Hz) on an eroded mask."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from qsmprep.recon import background
from qsmprep.recon import mask as mask_core
from qsmprep.recon.dipole import hz_to_ppm, ppm_to_hz
from qsmprep.references import reference

from .base import geometry, geometry_metadata, load, load_mask, save, threads


class _RemoveBackgroundInputSpec(BaseInterfaceInputSpec):
    field_hz = File(exists=True, mandatory=True, desc="total field (Hz)")
    mask = File(exists=True, mandatory=True, desc="brain mask")
    noise_hz = File(exists=True, desc="field noise (Hz), the data weight of PDF")
    b0_tesla = traits.Float(mandatory=True, desc="main field (T)")
    method = traits.Str("ismv", usedefault=True, desc="method (background.METHODS)")
    params = traits.Dict(desc="further keyword parameters of the method")
    vsharp_max_radius_mm = traits.Float(12.0, usedefault=True, desc="largest V-SHARP radius")
    erode_mm = traits.Float(0.0, usedefault=True, desc="mask erosion before removal (mm)")
    num_threads = traits.Int(1, usedefault=True, desc="threads")


class _RemoveBackgroundOutputSpec(TraitedSpec):
    local_field_hz = File(exists=True, desc="local field (Hz)")
    mask = File(exists=True, desc="mask on which the local field is valid")
    metadata = traits.Dict(desc="method and parameters")


class RemoveBackground(SimpleInterface):
    """Remove fields of sources outside the mask."""

    input_spec = _RemoveBackgroundInputSpec
    output_spec = _RemoveBackgroundOutputSpec

    def _run_interface(self, runtime):
        field_hz, image = load(self.inputs.field_hz)
        mask = load_mask(self.inputs.mask)
        voxel_size, direction = geometry(image)
        if self.inputs.erode_mm > 0:
            mask = mask_core.erode(mask, self.inputs.erode_mm, voxel_size=voxel_size)
        method = self.inputs.method
        params: dict = dict(self.inputs.params or {})
        if method == "vsharp":
            params["radii_mm"] = background.default_radii(voxel_size,
                                                          self.inputs.vsharp_max_radius_mm)
        if method == "pdf" and self.inputs.noise_hz:
            noise, _ = load(self.inputs.noise_hz)
            params["weight"] = background.weight_from_noise(noise, mask)
        b0 = self.inputs.b0_tesla
        with threads(self.inputs.num_threads):
            local_ppm, eroded = background.remove(
                hz_to_ppm(field_hz, b0), mask, voxel_size=voxel_size, b0_direction=direction,
                method=method, **params,
            )
        cwd = runtime.cwd
        self._results["local_field_hz"] = save(ppm_to_hz(local_ppm, b0), image,
                                               "local_field_hz.nii.gz", cwd=cwd)
        self._results["mask"] = save(eroded, image, "bfr_mask.nii.gz", cwd=cwd, dtype=np.uint8)
        shown = {k: (list(map(float, v)) if np.ndim(v) else v) for k, v in params.items()
                 if k != "weight"}
        self._results["metadata"] = {
            "BackgroundFieldRemoval": method,
            "BackgroundFieldRemovalReference": reference(method),
            "BackgroundFieldRemovalParameters": shown,
            "MaskErosionBeforeBackgroundRemoval": self.inputs.erode_mm,
            **geometry_metadata(image),
        }
        return runtime
