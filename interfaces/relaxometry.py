"""R2*, T2* and S0 maps from the multi-echo magnitude."""

from __future__ import annotations

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from qsmprep.recon import relaxometry
from qsmprep.references import reference

from .base import load, load_mask, save, threads


class _FitR2starInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude [x, y, z, echo]")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    mask = File(exists=True, mandatory=True, desc="voxels to fit")
    method = traits.Enum("nlls", "loglinear", "arlo", usedefault=True, desc="fitting method")
    num_threads = traits.Int(1, usedefault=True, desc="threads")


class _FitR2starOutputSpec(TraitedSpec):
    r2star = File(exists=True, desc="R2* (1/s)")
    t2star = File(exists=True, desc="T2* (s)")
    s0 = File(exists=True, desc="signal extrapolated to TE = 0 (magnitude units)")
    metadata = traits.Dict(desc="method and parameters")


class FitR2star(SimpleInterface):
    """Mono-exponential decay fit of the magnitude."""

    input_spec = _FitR2starInputSpec
    output_spec = _FitR2starOutputSpec

    def _run_interface(self, runtime):
        magnitude, image = load(self.inputs.magnitude)
        mask = load_mask(self.inputs.mask)
        method = self.inputs.method
        if len(self.inputs.echo_times) < 2:
            raise ValueError("R2* needs at least two echoes.")
        if method == "arlo" and len(self.inputs.echo_times) < 3:
            method = "nlls"
        with threads(self.inputs.num_threads):
            r2star, s0 = relaxometry.r2star(magnitude, self.inputs.echo_times, mask,
                                            method=method)
        t2star = relaxometry.t2star_from_r2star(r2star)
        cwd = runtime.cwd
        self._results["r2star"] = save(r2star, image, "r2star.nii.gz", cwd=cwd)
        self._results["t2star"] = save(t2star, image, "t2star.nii.gz", cwd=cwd)
        self._results["s0"] = save(s0, image, "s0.nii.gz", cwd=cwd)
        self._results["metadata"] = {
            "EstimationAlgorithm": method,
            "EstimationReference": reference(method),
            "EchoTime": list(self.inputs.echo_times),
        }
        return runtime
