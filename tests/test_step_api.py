"""The README's step-API example runs as written on a simulated head."""

from __future__ import annotations

import re

import nibabel as nb
import numpy as np

from conftest import REPO
from qsmprep.simulate.phantom import head_phantom
from qsmprep.simulate.signal import multi_echo_gre, oblique_affine


def test_readme_step_api_example(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Library use"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    phantom = head_phantom(voxel_size=(3, 3, 3))
    affine, direction = oblique_affine((3, 3, 3), (10, 0, 0), shape=phantom.chi_ppm.shape)
    echo_times = [0.004, 0.010, 0.016, 0.022]
    sim = multi_echo_gre(phantom, echo_times=echo_times, b0_tesla=3.0, b0_direction=direction,
                         snr=150, seed=1)
    monkeypatch.chdir(tmp_path)
    nb.Nifti1Image(sim.magnitude[..., 0], affine).to_filename("sub-01_echo-1_part-mag_MEGRE.nii.gz")
    namespace = {"magnitude": sim.magnitude, "phase_rad": sim.phase,
                 "echo_times_s": echo_times, "b0_tesla": 3.0}
    exec(compile(code, "README.md", "exec"), namespace)
    chi = namespace["chi_ppm"]
    eroded = namespace["eroded"]
    assert chi.dtype == np.float32 and chi.shape == phantom.chi_ppm.shape
    assert np.allclose(namespace["b0_direction"], direction, atol=1e-4)
    assert abs(float(chi[eroded].mean())) < 1e-4
    truth = phantom.chi_ppm[eroded] - phantom.chi_ppm[eroded].mean()
    assert np.corrcoef(chi[eroded], truth)[0, 1] > 0.6
