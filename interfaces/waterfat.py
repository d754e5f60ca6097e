"""Chemical-shift-encoded field mapping: water-fat separation or the in-phase baseline."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from qsmprep.recon import fieldmap, waterfat
from qsmprep.references import reference

from .base import geometry, geometry_metadata, load, load_mask, save, threads

LOGGER = logging.getLogger("qsmprep")

WATERFAT_REFERENCE = (
    "Hernando D, et al. Joint estimation of water/fat images and field inhomogeneity map. "
    "Magn Reson Med 2008;59:571-580 (VARPRO); Hernando D, Kellman P, Haldar JP, Liang ZP. "
    "Robust water/fat separation in the presence of large field inhomogeneities using a graph "
    "cut algorithm. Magn Reson Med 2010;63:79-90 (graph-cut regularisation); Berglund J, "
    "Skorpil M. Magn Reson Med 2017;78:941-949 (multi-scale graph cut); Hamilton G, et al. "
    "NMR Biomed 2011;24:784-790 and "
    "Ren J, et al. J Lipid Res 2008;49:2055-2062 (fat spectra)."
)


def resolve_fat_model(spec: str, water_ppm: float | None = None) -> waterfat.FatModel:
    """A fat model from a built-in name, a table file (two columns: ppm, amplitude) or an
    inline table ``"ppm:amplitude,ppm:amplitude"``; errors name the problem and the fix."""
    text = str(spec).strip()
    if not text:
        raise ValueError("empty fat model: give a name (ismrm, ren_marrow, scanner7, single) "
                         "or a table.")
    path = Path(text).expanduser()
    if path.is_file():
        try:
            return waterfat.parse_fat_table(path.read_text(), water_ppm=water_ppm or 4.7)
        except ValueError as error:
            raise ValueError(f"fat model table {path}: {error}") from None
    if ":" in text:
        return waterfat.parse_fat_table(text, water_ppm=water_ppm or 4.7)
    return waterfat.get_fat_model(text)


class _WaterFatInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude [x, y, z, echo]")
    phase = File(exists=True, mandatory=True, desc="4D phase (rad)")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    mask = File(exists=True, mandatory=True, desc="tissue mask")
    b0_tesla = traits.Float(mandatory=True, desc="main field (T)")
    method = traits.Enum("waterfat", "inphase", usedefault=True,
                         desc="water-fat separation or single-frequency fit of in-phase echoes")
    fat_model = traits.Str("ren_marrow", usedefault=True,
                           desc="fat spectrum: name, table file or 'ppm:amp,...'")
    water_ppm = traits.Float(desc="water chemical shift of the scan (ppm)")
    phase_sign = traits.Enum("auto", 1, -1, usedefault=True,
                             desc="+1: phase = +2 pi f TE; -1: the opposite handedness; auto: the "
                             "sign the fat signal supports (+1 where inconclusive)")
    echoes = traits.List(traits.Int, desc="inphase: 1-based echo numbers (default: automatic)")
    smoothness = traits.Float(0.1, usedefault=True, desc="water-fat regularisation weight")
    unwrap_method = traits.Str("region_growing", usedefault=True,
                               desc="inphase: spatial unwrapping method")
    num_threads = traits.Int(1, usedefault=True, desc="threads")


class _WaterFatOutputSpec(TraitedSpec):
    field_hz = File(exists=True, desc="total field (Hz)")
    noise_hz = File(exists=True, desc="standard deviation of the field (Hz)")
    magnitude = File(exists=True, desc="first-echo magnitude (for the field map)")
    mip = File(exists=True, desc="maximum-intensity projection of the magnitude over echoes")
    unwrapped_phase = OutputMultiObject(File(exists=True), desc="unwrapped phase per echo (rad)")
    r2star = File(desc="R2* (1/s) of the water-fat fit")
    t2star = File(desc="T2* = 1/R2* (s)")
    s0 = File(desc="|W| + |F| at TE = 0")
    water = File(desc="water amplitude |W| at TE = 0")
    fat = File(desc="fat amplitude |F| at TE = 0")
    pdff = File(desc="proton-density fat fraction (%)")
    opposed_phase = File(desc="| |W| - |F| | (edge image of the calcaneus study)")
    metadata = traits.Dict(desc="methods and parameters")
    r2star_metadata = traits.Dict(desc="R2* fit description")
    phase_sign = traits.Enum(1, -1, desc="the phase sign used (resolved from 'auto')")


class WaterFatField(SimpleInterface):
    """Field map (Hz) with water-fat separation, or the in-phase single-frequency baseline."""

    input_spec = _WaterFatInputSpec
    output_spec = _WaterFatOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        magnitude, image = load(inputs.magnitude)
        phase, _ = load(inputs.phase)
        mask = load_mask(inputs.mask)
        voxel_size, _ = geometry(image)
        times = np.asarray(inputs.echo_times, dtype=float)
        water_ppm = inputs.water_ppm if inputs.water_ppm else None
        model = resolve_fat_model(inputs.fat_model, water_ppm)
        cwd = runtime.cwd
        if magnitude.ndim != 4:
            raise ValueError(f"{inputs.magnitude}: water-fat field mapping needs a 4D "
                             "multi-echo series; use --fieldmap-method nlfit for one echo.")
        results = self._results
        results["magnitude"] = save(magnitude[..., 0], image, "magnitude_echo1.nii.gz", cwd=cwd)
        results["mip"] = save(magnitude.max(axis=3), image, "magnitude_mip.nii.gz", cwd=cwd)
        common = {
            "FieldMapping": inputs.method,
            "FatModel": model.name,
            "FatPeaksPpm": list(model.ppm),
            "FatPeakAmplitudes": [round(a, 6) for a in model.amplitude],
            "WaterPpm": model.water_ppm if water_ppm is None else water_ppm,
            "EchoTime": times.tolist(),
            "MaskedVoxels": int(np.count_nonzero(mask)),
            **geometry_metadata(image),
        }
        with threads(inputs.num_threads):
            if inputs.method == "inphase":
                echoes = [e - 1 for e in inputs.echoes] if inputs.echoes else None
                sign, check = 1 if inputs.phase_sign == "auto" else inputs.phase_sign, None
                if times.size >= 3:
                    check = waterfat.check_phase_sign(
                        waterfat.as_complex(magnitude, phase), times, mask,
                        b0_tesla=inputs.b0_tesla, fat_model=model, water_ppm=water_ppm,
                        phase_sign=inputs.phase_sign)
                    sign = waterfat.resolve_phase_sign(inputs.phase_sign, check)
                estimate, used = waterfat.inphase_field(
                    magnitude, phase, times, mask, voxel_size=voxel_size,
                    b0_tesla=inputs.b0_tesla, echoes=echoes, fat_model=model,
                    water_ppm=water_ppm, phase_sign=sign,
                    unwrap_method=inputs.unwrap_method)
                field, noise = estimate.field_hz, estimate.noise_hz
                p1 = field * np.float32(2 * np.pi * sign)
                unwrapped = fieldmap._consistent_unwrapped_phase(
                    np.asarray(phase, np.float32), mask, estimate.phase_offset, p1, times)
                results["metadata"] = {
                    **common,
                    "FieldMappingDescription": "Single-frequency nonlinear fit of the echoes "
                    "in phase with the main fat peak; chemical shift ignored (biased where "
                    "fat is present, growing with the fat fraction).",
                    "PhaseSign": int(sign),
                    "PhaseSignCheck": check.message if check else "not checked (< 3 echoes)",
                    "FieldMappingEchoes": [e + 1 for e in used],
                    "EchoCombination": "nlfit",
                    "EchoCombinationReference": reference("nlfit"),
                    "PhaseUnwrapping": inputs.unwrap_method,
                }
            else:
                signal = waterfat.as_complex(magnitude, phase)
                del magnitude  # the signal holds it (the node's peak is in separate)
                result = waterfat.separate(
                    signal, times, mask, b0_tesla=inputs.b0_tesla, voxel_size=voxel_size,
                    fat_model=model, water_ppm=water_ppm, phase_sign=inputs.phase_sign,
                    smoothness=inputs.smoothness)
                field, noise = result.field_hz, result.noise_hz
                unwrapped = _model_unwrapped_phase(phase, mask, result)
                water, fat = np.abs(result.water), np.abs(result.fat)
                results["r2star"] = save(result.r2star, image, "r2star.nii.gz", cwd=cwd)
                with np.errstate(divide="ignore"):
                    t2star = np.where(result.r2star > 0, 1.0 / result.r2star, 0)
                results["t2star"] = save(np.where(mask, t2star, 0), image, "t2star.nii.gz",
                                         cwd=cwd)
                results["s0"] = save(water + fat, image, "s0.nii.gz", cwd=cwd)
                results["water"] = save(water, image, "water.nii.gz", cwd=cwd)
                results["fat"] = save(fat, image, "fat.nii.gz", cwd=cwd)
                results["pdff"] = save(result.pdff, image, "pdff.nii.gz", cwd=cwd)
                results["opposed_phase"] = save(result.opposed_phase, image,
                                                "opposed_phase.nii.gz", cwd=cwd)
                results["metadata"] = {
                    **common, **result.parameters,
                    "FieldMappingDescription": "Water-fat separation with a multi-peak fat "
                    "model and one R2*: VARPRO grid search, coarse-to-fine graph-cut "
                    "regularisation of the water/fat ambiguity (jump moves by max-flow, which "
                    "also unwrap the field), continuous refinement.",
                    "FieldMappingReference": WATERFAT_REFERENCE,
                    "SwapCheckMessage": result.swaps.message,
                }
                results["r2star_metadata"] = {
                    "R2starFit": "water-fat VARPRO (one R2* for water and fat)",
                    "R2starFitReference": WATERFAT_REFERENCE,
                    "FatModel": model.name,
                }
        results["phase_sign"] = int(results["metadata"]["PhaseSign"])
        results["field_hz"] = save(field, image, "field_hz.nii.gz", cwd=cwd)
        results["noise_hz"] = save(noise, image, "noise_hz.nii.gz", cwd=cwd)
        results["unwrapped_phase"] = [
            save(unwrapped[..., n], image, f"unwrapped_echo{n + 1}.nii.gz", cwd=cwd)
            for n in range(unwrapped.shape[-1])
        ]
        return runtime


def _model_unwrapped_phase(phase, mask, result: waterfat.WaterFatResult) -> np.ndarray:
    """Input phase plus the 2 pi multiples closest to the water-fat model's phase.

    Model phase of echo n: ``2 pi psi t_n + arg(W + F c_n)`` (continuous in psi), in the
    input's handedness.
    """
    times = result.echo_times
    sign = int(result.parameters.get("PhaseSign", 1))
    c = waterfat.fat_signal(times, result.b0_tesla, result.fat_model,
                            water_ppm=result.parameters.get("WaterPpm"))
    phase = np.asarray(phase, dtype=np.float32)
    out = phase.copy()
    water, fat = result.water[mask], result.fat[mask]
    psi = result.field_hz[mask].astype(np.float64)
    for n, t in enumerate(times):
        model = 2 * np.pi * psi * t + np.angle(water + fat * c[n])
        measured = phase[..., n][mask] * sign
        turns = np.round((model - measured) / (2 * np.pi))
        out[..., n][mask] = sign * (measured + 2 * np.pi * turns)
    return out
