"""Phase correction of bipolar multi-echo readouts (alternating readout polarity)."""

from __future__ import annotations

import logging

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from qsmprep.recon import bipolar, waterfat
from qsmprep.references import reference

from .base import geometry, load, load_mask, save, threads
from .waterfat import resolve_fat_model

LOGGER = logging.getLogger("qsmprep")


class _ReadoutPolarityInputSpec(BaseInterfaceInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude [x, y, z, echo]")
    phase = File(exists=True, mandatory=True, desc="4D phase (rad)")
    mask = File(exists=True, mandatory=True, desc="tissue mask (the estimate's voxels)")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    b0_tesla = traits.Float(mandatory=True, desc="main field (T)")
    fat_model = traits.Str("", usedefault=True,
                           desc="fat spectrum of the signal model ('': water only)")
    water_ppm = traits.Float(desc="water chemical shift of the scan (ppm)")
    phase_sign = traits.Enum("auto", 1, -1, usedefault=True,
                             desc="phase handedness (auto: from the fat signal, +1 without fat)")
    mode = traits.Enum("auto", "bipolar", usedefault=True,
                       desc="bipolar: always correct; auto: where the data show it")
    num_threads = traits.Int(1, usedefault=True, desc="threads")


class _ReadoutPolarityOutputSpec(TraitedSpec):
    phase = File(exists=True, desc="4D phase (rad) with the bipolar phase removed (or the input)")
    metadata = traits.Dict(desc="the estimate and whether it was applied")


class CorrectReadoutPolarity(SimpleInterface):
    """Estimate the phase of the second-polarity echoes and remove it from the phase."""

    input_spec = _ReadoutPolarityInputSpec
    output_spec = _ReadoutPolarityOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        times = np.asarray(inputs.echo_times, dtype=float)
        results = self._results
        results["phase"] = inputs.phase
        if times.size < bipolar.BIPOLAR_MIN_ECHOES and inputs.mode == "auto":
            message = (f"readout polarity: not checked ({times.size} echoes; the bipolar model "
                       f"needs >= {bipolar.BIPOLAR_MIN_ECHOES})")
            LOGGER.info(message)
            results["metadata"] = {"ReadoutPolarityCorrection": {"Applied": False,
                                                                 "Message": message}}
            return runtime
        magnitude, image = load(inputs.magnitude)
        phase, _ = load(inputs.phase)
        mask = load_mask(inputs.mask)
        voxel_size, _ = geometry(image)
        signal = waterfat.as_complex(magnitude, phase)
        water_ppm = inputs.water_ppm if inputs.water_ppm else None
        model = resolve_fat_model(inputs.fat_model, water_ppm) if inputs.fat_model else None
        with threads(inputs.num_threads):
            sign = 1 if inputs.phase_sign == "auto" else inputs.phase_sign
            if model is not None and inputs.phase_sign == "auto":
                sign = waterfat.check_phase_sign(
                    signal, times, mask, b0_tesla=inputs.b0_tesla, fat_model=model,
                    water_ppm=water_ppm).preferred or 1
            estimate = bipolar.estimate_bipolar_phase(
                signal, times, mask, voxel_size=voxel_size, b0_tesla=inputs.b0_tesla,
                fat_model=model, water_ppm=water_ppm, phase_sign=sign, mode=inputs.mode)
        del signal
        LOGGER.info("%s: %s", inputs.phase, estimate.message)
        metadata = estimate.metadata()
        metadata["ReadoutPolarityCorrection"]["Reference"] = reference("bipolar")
        results["metadata"] = metadata
        if estimate.applied:
            corrected = bipolar.correct_bipolar_phase(phase, estimate, voxel_size)
            results["phase"] = save(corrected, image, "phase_polarity_corrected.nii.gz",
                                    cwd=runtime.cwd)
        return runtime
