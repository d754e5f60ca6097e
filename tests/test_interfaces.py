"""Every interface on a small simulated head: shapes, affines, units and errors."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest

from qsmprep.interfaces.background import RemoveBackground
from qsmprep.interfaces.fieldmap import EstimateField
from qsmprep.interfaces.inversion import InvertDipole
from qsmprep.interfaces.mask import BrainMask
from qsmprep.interfaces.phase import InputDataError, LoadEchoes
from qsmprep.interfaces.reference import ReferenceSusceptibility
from qsmprep.interfaces.relaxometry import FitR2star
from qsmprep.recon.dipole import b0_direction_from_affine, ppm_to_hz
from qsmprep.simulate.phantom import head_phantom
from qsmprep.simulate.signal import multi_echo_gre, oblique_affine

ECHO_TIMES = [0.004, 0.009, 0.014, 0.019]
B0 = 2.89


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A 4 mm head, 4 echoes, 15 degrees oblique, phase as int16 'arbitrary' units."""
    root = tmp_path_factory.mktemp("sim")
    phantom = head_phantom(voxel_size=(4, 4, 4))
    affine, direction = oblique_affine((4, 4, 4), (15, 0, 0), shape=phantom.chi_ppm.shape)
    sim = multi_echo_gre(phantom, echo_times=ECHO_TIMES, b0_tesla=B0, b0_direction=direction,
                         snr=200, seed=3)
    magnitude_files, phase_files = [], []
    for n in range(len(ECHO_TIMES)):
        mag = root / f"mag{n}.nii.gz"
        nb.Nifti1Image(sim.magnitude[..., n], affine).to_filename(str(mag))
        scaled = np.round(sim.phase[..., n] / np.pi * 4095).astype(np.int16)
        pha = root / f"pha{n}.nii.gz"
        nb.Nifti1Image(scaled, affine).to_filename(str(pha))
        magnitude_files.append(str(mag))
        phase_files.append(str(pha))
    return phantom, sim, affine, magnitude_files, phase_files


def _run(interface, tmp_path):
    return interface.run(cwd=str(tmp_path)).outputs


def test_chain_of_interfaces(simulated, tmp_path):
    phantom, sim, affine, magnitude_files, phase_files = simulated
    assert np.allclose(b0_direction_from_affine(affine), sim.b0_direction, atol=1e-4)
    loaded = _run(LoadEchoes(magnitude_files=magnitude_files, phase_files=phase_files,
                             phase_units="arbitrary"), tmp_path)
    phase = nb.load(loaded.phase)
    assert phase.shape == phantom.chi_ppm.shape + (4,)
    assert np.allclose(phase.affine, affine, atol=1e-5)
    assert np.abs(phase.get_fdata()).max() <= np.pi + 1e-5
    assert loaded.metadata["PhaseUnits"] == "arbitrary"

    mask = _run(BrainMask(magnitude=loaded.magnitude, finite_mask=loaded.finite_mask), tmp_path)
    brain = nb.load(mask.mask).get_fdata() > 0
    for mask_type, kind in (("brain", "Brain"), ("body", "ROI")):  # a provided mask's type
        (tmp_path / mask_type).mkdir()
        provided = BrainMask(magnitude=loaded.magnitude, provided_mask=mask.mask,
                             mask_type=mask_type).run(cwd=str(tmp_path / mask_type)).outputs
        assert provided.metadata["Type"] == kind
    dice = 2 * (brain & phantom.brain_mask).sum() / (brain.sum() + phantom.brain_mask.sum())
    assert dice > 0.8  # the magnitude mask also covers the outer CSF (coarse 4 mm grid)

    r2 = _run(FitR2star(magnitude=loaded.magnitude, echo_times=ECHO_TIMES, mask=mask.mask),
              tmp_path)
    r2star = nb.load(r2.r2star).get_fdata()
    inner = brain & phantom.brain_mask & (phantom.labels == 8)  # white matter
    assert np.median(np.abs(r2star[inner] - phantom.r2star[inner])) < 2.0  # 1/s

    field = _run(EstimateField(magnitude=loaded.magnitude, phase=loaded.phase,
                               echo_times=ECHO_TIMES, mask=mask.mask), tmp_path)
    field_hz = nb.load(field.field_hz).get_fdata()
    truth_hz = ppm_to_hz(sim.total_field_ppm, B0)
    core = brain & phantom.brain_mask
    error = (field_hz - truth_hz)[core]
    assert np.median(np.abs(error - np.median(error))) < 0.5  # Hz
    assert len(field.unwrapped_phase) == 4
    assert field.metadata["B0ObliquityAngle"] == pytest.approx(15, abs=0.01)

    bfr = _run(RemoveBackground(field_hz=field.field_hz, mask=mask.mask, noise_hz=field.noise_hz,
                                b0_tesla=B0, erode_mm=4.0), tmp_path)
    eroded = nb.load(bfr.mask).get_fdata() > 0
    assert eroded.sum() < brain.sum()
    inv = _run(InvertDipole(local_field_hz=bfr.local_field_hz, mask=bfr.mask, b0_tesla=B0,
                            magnitude=field.magnitude, noise_hz=field.noise_hz), tmp_path)
    ref = _run(ReferenceSusceptibility(chi=inv.chi, mask=bfr.mask), tmp_path)
    chi = nb.load(ref.chi).get_fdata()
    assert abs(chi[eroded].mean()) < 1e-4
    truth = phantom.chi_ppm - phantom.chi_ppm[eroded].mean()
    # a coarse 4 mm check of sign and scale: veins/nuclei vs white matter
    assert np.corrcoef(chi[eroded], truth[eroded])[0, 1] > 0.5
    assert ref.metadata["SusceptibilityReference"] == "mean over the brain mask"


def test_load_echoes_errors_and_nan(simulated, tmp_path):
    _, sim, affine, magnitude_files, phase_files = simulated
    other = tmp_path / "shifted.nii.gz"
    shifted = affine.copy()
    shifted[0, 3] += 10
    nb.Nifti1Image(sim.magnitude[..., 0], shifted).to_filename(str(other))
    with pytest.raises(InputDataError, match="different grids"):
        _run(LoadEchoes(magnitude_files=[magnitude_files[0]], phase_files=[str(other)],
                        phase_units="arbitrary"), tmp_path)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not a nifti")
    with pytest.raises(InputDataError, match="cannot be read"):
        _run(LoadEchoes(magnitude_files=[str(corrupt)]), tmp_path)
    with_nan = sim.phase[..., 0].copy()
    with_nan[0, 0, 0] = np.nan
    nan_file = tmp_path / "nan.nii.gz"
    nb.Nifti1Image(with_nan, affine).to_filename(str(nan_file))
    out = _run(LoadEchoes(magnitude_files=[magnitude_files[0]], phase_files=[str(nan_file)],
                          phase_units="auto"), tmp_path)
    assert out.metadata["NonFiniteVoxels"] == 1 and out.metadata["PhaseUnits"] == "rad"
    assert nb.load(out.finite_mask).get_fdata()[0, 0, 0] == 0


def test_load_echoes_from_4d_volumes(simulated, tmp_path):
    _, sim, affine, _, _ = simulated
    mag4d = tmp_path / "mag4d.nii.gz"
    pha4d = tmp_path / "pha4d.nii.gz"
    nb.Nifti1Image(sim.magnitude, affine).to_filename(str(mag4d))
    nb.Nifti1Image(sim.phase, affine).to_filename(str(pha4d))
    out = _run(LoadEchoes(magnitude_files=[str(mag4d)] * 4, phase_files=[str(pha4d)] * 4,
                          volumes=[0, 1, 2, 3], phase_units="rad"), tmp_path)
    np.testing.assert_allclose(nb.load(out.phase).get_fdata(), sim.phase, atol=1e-6)
