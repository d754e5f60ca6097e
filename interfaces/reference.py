"""Susceptibility referencing (the unobservable DC offset)."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from qsmprep.recon import reference as reference_core

from .base import geometry, load, load_mask, save

DESCRIPTIONS = {
    "mean": "mean over the brain mask",
    "csf": "mean over the lateral ventricles (central low-R2* CSF)",
    "roi": "mean over a provided reference mask",
    "water": "mean over water-dominant soft tissue (fat fraction below 10%, eroded)",
    "none": "none",
}


class _ReferenceInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True, desc="susceptibility (ppm)")
    mask = File(exists=True, mandatory=True, desc="mask of valid susceptibility")
    method = traits.Enum("mean", "csf", "roi", "water", "none", usedefault=True,
                         desc="reference region")
    r2star = File(exists=True, desc="R2* map (1/s), for method 'csf'")
    roi = File(exists=True, desc="reference mask, for method 'roi'")
    pdff = File(exists=True, desc="fat fraction (%) from the water-fat fit, for method 'water'")


class _ReferenceOutputSpec(TraitedSpec):
    chi = File(exists=True, desc="referenced susceptibility (ppm)")
    metadata = traits.Dict(desc="reference and offset")


class ReferenceSusceptibility(SimpleInterface):
    """Shift susceptibility so that the reference region has zero mean."""

    input_spec = _ReferenceInputSpec
    output_spec = _ReferenceOutputSpec

    def _run_interface(self, runtime):
        chi, image = load(self.inputs.chi)
        mask = load_mask(self.inputs.mask)
        voxel_size, _ = geometry(image)
        method = self.inputs.method
        extra = {}
        if method == "csf":
            if not self.inputs.r2star:
                raise ValueError("CSF referencing needs the R2* map (two or more echoes).")
            extra = {"r2star": load(self.inputs.r2star)[0], "voxel_size": voxel_size}
        if method == "roi":
            if not self.inputs.roi:
                raise ValueError("ROI referencing needs <entities>_desc-reference_mask in "
                                 "--mask-dir.")
            extra = {"roi": load_mask(self.inputs.roi)}
        if method == "water":
            if not self.inputs.pdff:
                raise ValueError("water referencing needs the fat-fraction map of "
                                 "--fieldmap-method waterfat.")
            extra = {"pdff": load(self.inputs.pdff)[0]}
        chi, offset = reference_core.reference(chi, mask, method=method, **extra)
        self._results["chi"] = save(chi, image, "chi_referenced.nii.gz", cwd=runtime.cwd)
        self._results["metadata"] = {
            "SusceptibilityReference": DESCRIPTIONS[method],
            "SusceptibilityReferenceOffset": float(offset),
        }
        return runtime
