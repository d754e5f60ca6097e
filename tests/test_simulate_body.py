"""The water-fat leg phantom, its forward simulation and its BIDS writer (known truth)."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest

from qsmprep.recon import waterfat
from qsmprep.simulate import body
from qsmprep.datasets.body import leg_affine, write_body_dataset


@pytest.fixture(scope="module")
def small_leg():
    return body.leg_dataset(voxel_size=(4.0, 4.0, 4.0), fov_mm=(128.0, 128.0, 48.0),
                            echo_times=(1.2e-3, 2.1e-3, 3.0e-3, 3.9e-3), snr=None)


def test_marrow_properties_follow_the_model():
    props = body.marrow_properties(0.2, 50.0)
    assert props["chi"] == pytest.approx(0.8 * 0.5 * body.FAT_CHI_PPM + 0.2 * body.BONE_CHI_PPM)
    assert props["r2star"] == pytest.approx(40 + 800 * 0.2)
    assert props["pd"] == pytest.approx(0.8 * body.MARROW_PD)
    with pytest.raises(ValueError, match="BV/TV"):
        body.marrow_properties(1.2, 50)
    with pytest.raises(ValueError, match="PDFF"):
        body.marrow_properties(0.1, 120)


def test_leg_phantom_regions(small_leg):
    simulation, leg = small_leg
    labels = leg.phantom.labels
    assert set(np.unique(labels)) == {12, 13, 14, 15, 21, 22, 23, 24}
    # the leg continues beyond the field of view: tissue on the first and last slice
    assert (labels[..., 0] != 14).any() and (labels[..., -1] != 14).any()
    for label, (bvtv, pdff) in body.DEFAULT_MARROW.items():
        region = labels == label
        assert np.allclose(leg.pdff[region], pdff) and np.allclose(leg.bvtv[region], bvtv)
        assert np.allclose(leg.phantom.chi_ppm[region], body.marrow_properties(bvtv, pdff)["chi"])
    assert np.allclose(leg.water + leg.fat, leg.phantom.m0)
    assert 30 <= min(v[1] for v in body.DEFAULT_MARROW.values())  # PDFF 30-100%
    # three tibial regions of decreasing bone density along the leg
    assert body.DEFAULT_MARROW[21][0] > body.DEFAULT_MARROW[22][0] > body.DEFAULT_MARROW[23][0]


def test_noise_free_signal_is_the_water_fat_model(small_leg):
    simulation, leg = small_leg
    tissue = leg.phantom.m0 > 0.2
    te = simulation.echo_times
    c = waterfat.fat_signal(te, 3.0, "ren_marrow")
    f = simulation.total_field_hz
    predicted = (leg.water[..., None] + leg.fat[..., None] * c) * np.exp(
        (-leg.phantom.r2star[..., None] + 2j * np.pi * f[..., None]) * te)
    measured = simulation.magnitude * np.exp(1j * simulation.phase)
    ratio = measured[tissue] / predicted[tissue]
    # a common phase offset per voxel (phi0), unit magnitude
    assert np.allclose(np.abs(ratio), 1.0, atol=1e-3)
    assert np.allclose(np.angle(ratio / ratio[:, :1]), 0.0, atol=1e-3)
    # the background field from the air around the leg is present (and shimmed)
    assert np.ptp(simulation.background_field_ppm[tissue]) > 0.1


def test_body_bids_writer(tmp_path, small_leg):
    simulation, leg = small_leg
    root = write_body_dataset(tmp_path / "leg", simulation, leg,
                              leg_affine(leg.phantom.shape, leg.phantom.voxel_size))
    anat = root / "sub-01" / "anat"
    assert len(list(anat.glob("*_part-phase_MEGRE.nii.gz"))) == 4
    truth = root / "derivatives" / "groundtruth" / "sub-01" / "anat"
    pdff = np.asarray(nb.load(str(truth / "sub-01_PDFFmap.nii.gz")).dataobj, dtype=np.float32)
    assert np.allclose(pdff, leg.pdff * (leg.phantom.labels != 14), atol=0.01)
    table = (truth / "sub-01_desc-phantom_dseg.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["index", "name", "chi_ppm", "pdff_percent", "bvtv",
                                    "r2star_per_s"]
    row21 = [line for line in table if line.startswith("21\t")][0].split("\t")
    assert float(row21[4]) == pytest.approx(body.DEFAULT_MARROW[21][0])
    sidecar = json.loads((truth / "sub-01_PDFFmap.json").read_text())
    assert sidecar["FatModel"] == "ren_marrow" and sidecar["Units"] == "percent"
    megre = json.loads((root / "MEGRE.json").read_text())
    assert megre["MagneticFieldStrength"] == 3.0


def test_trabecular_spheres_mean_chi_linear_in_bvtv_and_r2prime_grows():
    from qsmprep.simulate import trabecular

    models = [trabecular.simulate_spheres(32, n, (2.0, 5.0), factor=3, seed=seed)
              for seed, n in enumerate((10, 20, 35, 55))]
    bvtv = [m.bvtv for m in models]
    assert bvtv == sorted(bvtv) and bvtv[0] > 0.02 and bvtv[-1] < 0.4
    rows = trabecular.trabecular_table(models, (-0.5, -1.0, -2.0))
    for dchi in (-0.5, -1.0, -2.0):
        subset = [r for r in rows if r["delta_chi"] == dchi]
        slope, _, r2 = trabecular.linear_fit([r["bvtv"] for r in subset],
                                             [r["chi_mean"] for r in subset])
        assert r2 >= 0.98
        assert abs(slope / dchi - 1) <= 0.25, slope / dchi  # the study: about 0.81
        r2prime = [r["r2prime"] for r in subset]
        assert all(b > a for a, b in zip(r2prime, r2prime[1:])), r2prime
    # a Lorentzian of known width is recovered
    rng = np.random.default_rng(0)
    samples = 20.0 / 2 * np.tan(np.pi * (rng.uniform(size=200000) - 0.5))
    assert trabecular.lorentzian_fwhm_hz(samples) == pytest.approx(20.0, rel=0.1)


def test_dilute_spheres_follow_static_dephasing_theory():
    """Small spheres at volume fractions 0.02-0.2: R2' is linear in BV/TV with the slope of
    Yablonskiy & Haacke's static-dephasing formula (measured over 6 geometries: 0.97 +- 0.08
    of it, seed 0: 1.075); voxels near the box faces, which see no spheres beyond, are left
    out (without that the slope is 0.82-0.89)."""
    from qsmprep.simulate import trabecular

    box, radius, margin = 64, 2.5, 12
    sphere_volume = 4.0 / 3.0 * np.pi * radius**3
    models = [trabecular.simulate_spheres(
        box, round(-np.log(1 - fraction) * box**3 / sphere_volume), (radius, radius), seed=0)
        for fraction in (0.02, 0.05, 0.1, 0.2)]
    rows = trabecular.trabecular_table(models, (-1.0,), margin=margin)
    fraction = np.array([r["bvtv_r2prime"] for r in rows])
    r2prime = np.array([r["r2prime"] for r in rows])
    assert np.all(np.diff(r2prime) > 0), r2prime
    slope = fraction @ r2prime / (fraction @ fraction)
    theory = trabecular.static_dephasing_r2prime(1.0, -1.0, 3.0)
    assert theory == pytest.approx(323.5, rel=1e-3)  # 2 pi/(3 sqrt 3) * 2 pi * 127.73 Hz / 3
    assert slope / theory == pytest.approx(1.0, abs=0.2), slope / theory
    with pytest.raises(ValueError, match="margin"):
        trabecular.trabecular_table(models, (-1.0,), margin=box // 2)
