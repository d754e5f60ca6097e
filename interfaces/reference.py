"""Susceptibility referencing (the unobservable DC offset)."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from qsmprep.recon import reference as reference_core

from .base import load, load_mask, save


class _ReferenceInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True, desc="susceptibility (ppm)")
    mask = File(exists=True, mandatory=True, desc="mask of valid susceptibility")
    method = traits.Enum("mean", "none", usedefault=True, desc="reference region")


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
        chi, offset = reference_core.reference(chi, mask, method=self.inputs.method)
        self._results["chi"] = save(chi, image, "chi_referenced.nii.gz", cwd=runtime.cwd)
        self._results["metadata"] = {
            "SusceptibilityReference": {"mean": "mean over the brain mask", "none": "none"}[
                self.inputs.method
            ],
            "SusceptibilityReferenceOffset": float(offset),
        }
        return runtime
