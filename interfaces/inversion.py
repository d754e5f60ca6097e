"""Dipole inversion: local field (Hz) -> susceptibility (ppm)."""

from __future__ import annotations

import inspect

import numpy as np

from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from qsmprep.recon import inversion
from qsmprep.recon.inversion import lambda_choice
from qsmprep.recon.dipole import hz_to_ppm
from qsmprep.references import reference

from .base import geometry, geometry_metadata, load, load_mask, save, threads


class _InvertDipoleInputSpec(BaseInterfaceInputSpec):
    local_field_hz = File(exists=True, mandatory=True, desc="local field (Hz)")
    mask = File(exists=True, mandatory=True, desc="mask of the local field")
    magnitude = File(exists=True, desc="magnitude (3D or 4D) for edge/data weights")
    noise_hz = File(exists=True, desc="field noise (Hz) for the data weight")
    edge_image = File(exists=True, desc="image whose gradient gives the edge mask (methods "
                      "with an edge_image parameter, e.g. the opposed-phase |W - F|)")
    b0_tesla = traits.Float(mandatory=True, desc="main field (T)")
    echo_times = traits.List(traits.Float, desc="echo times (s): phase scale of nonlinear terms")
    method = traits.Str("tv", usedefault=True, desc="inversion method (inversion.METHODS)")
    lam = traits.Float(desc="regularisation weight (method default when unset: "
                       "0.15 x median field noise for TV)")
    lambda_rule = traits.Enum("", "lcurve", "discrepancy", usedefault=True,
                              desc="choose lam per acquisition with this rule")
    params = traits.Dict(desc="further keyword parameters of the method")
    num_threads = traits.Int(1, usedefault=True, desc="threads")


class _InvertDipoleOutputSpec(TraitedSpec):
    chi = File(exists=True, desc="susceptibility (ppm), not referenced")
    metadata = traits.Dict(desc="method and parameters")


class InvertDipole(SimpleInterface):
    """Solve the dipole deconvolution for susceptibility."""

    input_spec = _InvertDipoleInputSpec
    output_spec = _InvertDipoleOutputSpec

    def _run_interface(self, runtime):
        local_hz, image = load(self.inputs.local_field_hz)
        mask = load_mask(self.inputs.mask)
        voxel_size, direction = geometry(image)
        method = self.inputs.method
        params: dict = dict(self.inputs.params or {})
        if self.inputs.lam:
            params["lam"] = float(self.inputs.lam)
        accepted = inspect.signature(inversion.METHODS[method]).parameters
        if "phase_scale" in accepted and "phase_scale" not in params and self.inputs.echo_times:
            mean_te = float(np.mean(self.inputs.echo_times))
            params["phase_scale"] = inversion.phase_scale(self.inputs.b0_tesla, mean_te)
        magnitude = noise = None
        if self.inputs.magnitude:
            magnitude, _ = load(self.inputs.magnitude)
            if magnitude.ndim == 4:
                magnitude = magnitude[..., 0]
        if self.inputs.edge_image and "edge_image" in accepted:
            params["edge_image"], _ = load(self.inputs.edge_image)
        b0 = self.inputs.b0_tesla
        if self.inputs.noise_hz:
            noise_hz, _ = load(self.inputs.noise_hz)
            noise = hz_to_ppm(noise_hz, b0)
        local_ppm = hz_to_ppm(local_hz, b0)
        selection = {}
        with threads(self.inputs.num_threads):
            if self.inputs.lambda_rule:
                choice = lambda_choice.choose(
                    local_ppm, mask, rule=self.inputs.lambda_rule, voxel_size=voxel_size,
                    b0_direction=direction, method=method, magnitude=magnitude, noise=noise,
                    **{k: v for k, v in params.items() if k != "lam"},
                )
                params["lam"] = float(choice.lam)
                selection = {"RegularizationSelection": self.inputs.lambda_rule,
                             "RegularizationCandidates": [float(v) for v in choice.lambdas],
                             # the curve behind the choice, for the report's L-curve figure
                             "RegularizationCriterion": choice.criterion,
                             "RegularizationResidualNorms": [
                                 float(v) for v in choice.residual_norms],
                             "RegularizationNorms": [float(v) for v in choice.regulariser_norms],
                             **({"RegularizationCurvature": [
                                 float(v) for v in choice.curvature]}
                                if choice.curvature is not None else {}),
                             **({"RegularizationTarget": float(choice.target)}
                                if choice.target is not None else {})}
            elif "lam" not in params and method in inversion.NOISE_SCALED_LAMBDA:
                # resolved here so that the sidecar records the value that ran
                params["lam"] = inversion.default_lambda(method, noise, mask)
            chi = inversion.invert(
                local_ppm, mask, voxel_size=voxel_size, b0_direction=direction,
                method=method, magnitude=magnitude, noise=noise, **params,
            )
        self._results["chi"] = save(chi, image, "chi.nii.gz", cwd=runtime.cwd)
        self._results["metadata"] = {
            **selection,
            "DipoleInversion": method,
            "DipoleInversionReference": reference(method),
            "DipoleInversionParameters": inversion.effective_parameters(
                method, **{k: v for k, v in params.items() if k != "edge_image"}),
            **({"EdgeImage": "opposed-phase | |W| - |F| |"} if "edge_image" in params else {}),
            "MagneticFieldStrength": b0,
            **geometry_metadata(image),
        }
        return runtime
