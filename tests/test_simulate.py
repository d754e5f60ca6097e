"""Tests of qsmprep.simulate: phantoms, forward GRE simulation, BIDS writer, examples."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qsmprep.recon.dipole import GAMMA_BAR_MHZ_PER_T, b0_direction_from_affine
from qsmprep.datasets.bids import RunSpec, SubjectSpec, write_bids_dataset
from qsmprep.simulate.phantom import TISSUES, HeadPhantom, head_phantom
from qsmprep.simulate.signal import (
    crop_affine,
    multi_echo_gre,
    oblique_affine,
    simulate_fields,
    wrap_phase,
)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RC2 = DATA / "rc2_head_phantom"
OBLIQUE = (0.15, 0.2, 0.97)


@pytest.fixture(scope="module")
def phantom4() -> HeadPhantom:
    """Plain analytic phantom at 4 mm (44 x 54 x 48)."""
    return head_phantom(voxel_size=(4.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def phantom2() -> HeadPhantom:
    """Analytic phantom at 2 mm (88 x 108 x 96), no texture."""
    return head_phantom(voxel_size=(2.0, 2.0, 2.0))


def _laplacian(f: np.ndarray, vs: float) -> np.ndarray:
    return sum(np.roll(f, 1, a) + np.roll(f, -1, a) - 2 * f for a in range(3)) / vs**2


# ----------------------------------------------------------------------------- phantom

def test_phantom_labels_values_and_sizes(phantom2):
    p = phantom2
    assert p.shape == (88, 108, 96)
    assert p.chi_ppm.dtype == np.float32 and p.m0.dtype == np.float32
    assert p.r2star.dtype == np.float32 and p.brain_mask.dtype == bool
    expected = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16}
    assert set(p.label_names) == expected
    assert set(np.unique(p.labels)) == expected
    # every deep gray nucleus is resolved at 2 mm: >= 25 voxels per hemisphere
    nx = p.shape[0]
    for label in (1, 2, 3, 4, 5, 6, 7):
        left = np.count_nonzero(p.labels[: nx // 2] == label)
        right = np.count_nonzero(p.labels[nx // 2:] == label)
        assert min(left, right) >= 25, (label, left, right)
    # chi / m0 / R2* are the tabulated values (no texture)
    for label in expected - {11, 16}:
        sel = p.labels == label
        assert np.allclose(p.chi_ppm[sel], TISSUES[label][1]), label
        assert np.allclose(p.m0[sel], TISSUES[label][2]), label
        assert np.allclose(p.r2star[sel], TISSUES[label][3]), label
    assert np.isclose(p.chi_ppm[p.labels == 2][0], 0.1305)
    assert np.isclose(p.chi_ppm[p.labels == 14][0], 9.2)
    assert np.all((p.chi_ppm[p.labels == 11] >= 0.19) & (p.chi_ppm[p.labels == 11] <= 0.35))
    assert np.allclose(p.chi_ppm[p.labels == 16], -2.0)
    assert p.r2star[p.labels == 16].min() > 300 and p.m0[p.labels == 14].max() == 0
    # volumes (mL): brain mask 1.2-1.8 L, veins and calcification small but present
    ml = p.label_volume_ml()
    assert 1200 < p.brain_mask.sum() * 8e-3 < 1800
    assert 300 < ml["white_matter"] < 900 and 300 < ml["gray_matter"] < 900
    assert 3 < ml["veins"] < 30 and 0.03 < ml["calcification"] < 0.5
    # sinus air inside the head (air voxels not connected to the outside)
    air = p.labels == 14
    lab, _ = ndimage.label(air)
    outside = lab[0, 0, -1]
    assert np.count_nonzero(air & (lab != outside)) * 8e-3 > 10.0


def test_phantom_mask_boundary_in_csf(phantom2, phantom4):
    for p in (phantom2, phantom4):
        m = p.brain_mask
        inner = m & ~ndimage.binary_erosion(m)
        outer = ndimage.binary_dilation(m) & ~m
        assert np.all(p.labels[inner] == 10) and np.all(p.labels[outer] == 10)
        assert np.all(p.chi_ppm[inner] == 0) and np.all(p.chi_ppm[outer] == 0)
        # veins keep a CSF margin (>= 2.5 mm and not face-adjacent) to the mask boundary
        depth = ndimage.distance_transform_edt(m, sampling=p.voxel_size)
        assert depth[p.labels == 11].min() >= max(2.5, 1.4 * p.voxel_size[0])


def test_phantom_deterministic_and_texture():
    a = head_phantom(voxel_size=(4, 4, 4), seed=3, chi_texture_ppm=0.005,
                     relaxation_texture=0.05)
    b = head_phantom(voxel_size=(4, 4, 4), seed=3, chi_texture_ppm=0.005,
                     relaxation_texture=0.05)
    c = head_phantom(voxel_size=(4, 4, 4), seed=4)
    assert np.array_equal(a.chi_ppm, b.chi_ppm) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    wm = a.labels == 8
    assert 0.003 < a.chi_ppm[wm].std() < 0.008
    assert abs(a.chi_ppm[wm].mean() + 0.030) < 0.002
    # texture never touches the CSF that carries the mask boundary
    assert np.all(a.chi_ppm[a.labels == 10] == 0)
    high = head_phantom(voxel_size=(4, 4, 4), seed=3, chi_overrides={2: 0.2})
    assert np.allclose(high.chi_ppm[high.labels == 2], 0.2)


def test_phantom_bad_arguments():
    with pytest.raises(ValueError, match="voxel_size"):
        head_phantom(voxel_size=(2, 2))
    with pytest.raises(ValueError, match="too coarse"):
        head_phantom(voxel_size=(8, 8, 8))
    with pytest.raises(ValueError, match="calcification"):
        head_phantom(voxel_size=(4, 4, 4), calcification_ppm=1.0)
    with pytest.raises(ValueError, match="unknown label"):
        head_phantom(voxel_size=(4, 4, 4), chi_overrides={99: 0.1})


# ----------------------------------------------------------------------------- fields

@pytest.mark.parametrize("b0", [(0.0, 0.0, 1.0), OBLIQUE])
def test_background_is_harmonic_in_eroded_mask(phantom4, b0):
    p = phantom4
    total, local, background, coef = simulate_fields(p, b0)
    assert np.allclose(total, local + background, atol=1e-6)
    assert coef is not None and coef.size == 9
    # shim removes the low-order part over the mask
    assert abs(float(total[p.brain_mask].mean())) < 1e-3
    lap_bg = _laplacian(background, 4.0)
    lap_local = _laplacian(local, 4.0)
    eroded = ndimage.binary_erosion(p.brain_mask, iterations=3)
    ratio = lap_bg[eroded].std() / lap_local[eroded].std()
    assert ratio < 0.05, ratio
    lap_total = _laplacian(total, 4.0)
    assert abs(lap_total[eroded].std() / lap_local[eroded].std() - 1) < 0.05
    # the background (air, bone, sinuses) dominates the local field in the mask
    assert background[p.brain_mask].std() > 2 * local[p.brain_mask].std()
    assert 0.01 < np.abs(local[p.brain_mask]).max() < 1.0


def test_background_needs_antialiasing_for_oblique_b0(phantom4):
    """Without smoothing the 9 ppm air steps ring (non-harmonic) deep inside the brain."""
    eroded = ndimage.binary_erosion(phantom4.brain_mask, iterations=3)
    ratios = []
    for smoothing in (0.0, 1.0):
        _, local, background, _ = simulate_fields(phantom4, OBLIQUE,
                                                  background_smoothing_vox=smoothing)
        ratios.append(_laplacian(background, 4.0)[eroded].std()
                      / _laplacian(local, 4.0)[eroded].std())
    assert ratios[0] > 1.0 and ratios[1] < 0.05


def test_local_field_is_dipole_of_masked_chi(phantom4):
    from qsmprep.recon.dipole import forward_field

    p = phantom4
    _, local, _, _ = simulate_fields(p, OBLIQUE, shim_order=None, pad_factor=1.0)
    margin = list(p.shape)
    expected = forward_field(p.chi_ppm * p.brain_mask, p.voxel_size, OBLIQUE, pad=margin)
    assert np.allclose(local, expected, atol=1e-6)


# ----------------------------------------------------------------------------- signal

def test_noise_free_magnitude_and_phase(phantom4):
    p = phantom4
    te = np.array([0.004, 0.012, 0.020, 0.028])
    sim = multi_echo_gre(p, echo_times=te, b0_tesla=3.0, b0_direction=OBLIQUE, snr=None,
                         seed=5)
    assert sim.magnitude.shape == p.shape + (4,) and sim.magnitude.dtype == np.float32
    assert sim.phase.dtype == np.float32
    expected = p.m0[..., None] * np.exp(-p.r2star[..., None] * te)
    assert np.allclose(sim.magnitude, expected, rtol=1e-5, atol=1e-7)
    # log-linear fit of the decay recovers the set R2* (globus pallidus 40 1/s, WM 20 1/s)
    for label, r2s in ((2, 40.0), (8, 20.0), (10, 4.0)):
        sel = p.labels == label
        decay = sim.magnitude[sel].astype(np.float64).mean(axis=0)
        slope = np.polyfit(te, np.log(decay), 1)[0]
        assert abs(-slope - r2s) < 1e-3 * r2s
    f_hz = sim.total_field_ppm.astype(np.float64) * GAMMA_BAR_MHZ_PER_T * 3.0
    phi = sim.phase_offset[..., None] + 2 * np.pi * f_hz[..., None] * te
    diff = np.angle(np.exp(1j * (sim.phase - phi)))
    body = p.m0 > 0
    assert np.abs(diff[body]).max() < 2e-4
    assert np.all(sim.phase <= np.pi) and np.all(sim.phase > -np.pi)
    assert np.abs(wrap_phase(sim.phase - wrap_phase(phi))[body]).max() < 2e-4
    # opposite precession sign conjugates the phase evolution
    neg = multi_echo_gre(p, echo_times=te, b0_direction=OBLIQUE, snr=None, seed=5,
                         phase_sign=-1)
    phi_neg = sim.phase_offset[..., None] - 2 * np.pi * f_hz[..., None] * te
    assert np.abs(np.angle(np.exp(1j * (neg.phase - phi_neg))))[body].max() < 2e-4
    # the field of the sinuses wraps the phase at the last echo
    brain = p.brain_mask
    assert np.abs(f_hz[brain]).max() * te[-1] > 0.5


def test_wrap_phase_range():
    x = np.linspace(-20, 20, 10001)
    w = wrap_phase(x)
    assert np.all(w > -np.pi - 1e-6) and np.all(w <= np.pi + 1e-6)
    assert np.allclose(np.exp(1j * w), np.exp(1j * x), atol=1e-5)


def test_noise_sigma_matches_snr(phantom4):
    p = phantom4
    te = [0.005, 0.015]
    kwargs = dict(echo_times=te, b0_direction=(0, 0, 1), seed=9, phase_offset="zero")
    clean = multi_echo_gre(p, snr=None, **kwargs)
    noisy = multi_echo_gre(p, snr=50.0, **kwargs)
    sigma = p.m0[p.brain_mask].mean() / 50.0
    assert np.isclose(noisy.noise_sigma, sigma)
    resid = noisy.complex_signal() - clean.complex_signal()
    assert abs(resid.real.std() / sigma - 1) < 0.02
    assert abs(resid.imag.std() / sigma - 1) < 0.02
    assert abs(resid.real.mean()) < 0.02 * sigma
    # magnitude in air is Rayleigh: mean = sigma sqrt(pi/2)
    air = (p.m0 == 0)
    assert abs(noisy.magnitude[air].mean() / (sigma * np.sqrt(np.pi / 2)) - 1) < 0.02
    # same seed, same data
    again = multi_echo_gre(p, snr=50.0, **kwargs)
    assert np.array_equal(again.phase, noisy.phase)


def test_oblique_affine_and_crop():
    affine, b0 = oblique_affine((2.0, 2.0, 2.5), (12.0, -5.0, 20.0), shape=(40, 50, 30))
    assert np.allclose(b0_direction_from_affine(affine), b0)
    rot = affine[:3, :3] / np.array([2.0, 2.0, 2.5])
    assert np.allclose(rot.T @ rot, np.eye(3), atol=1e-12)
    assert np.isclose(np.degrees(np.arccos(b0 @ [0, 0, 1])), np.degrees(np.arccos(
        np.cos(np.radians(12)) * np.cos(np.radians(5)))), atol=1e-6)
    centre = affine @ np.array([19.5, 24.5, 14.5, 1.0])
    assert np.allclose(centre[:3], 0)
    sl = (slice(3, 30), slice(5, 40), slice(2, 20))
    cropped = crop_affine(affine, sl)
    assert np.allclose(cropped @ [0, 0, 0, 1], affine @ [3, 5, 2, 1])
    with pytest.raises(ValueError):
        oblique_affine((2.0, 2.0), (0, 0, 0))


def test_signal_bad_arguments(phantom4):
    with pytest.raises(ValueError, match="seconds"):
        multi_echo_gre(phantom4, echo_times=[4, 8])
    with pytest.raises(ValueError, match="positive"):
        multi_echo_gre(phantom4, echo_times=[-0.001])
    with pytest.raises(ValueError, match="b0_direction"):
        multi_echo_gre(phantom4, echo_times=[0.01], b0_direction=(0, 0, 0))
    with pytest.raises(ValueError, match="snr"):
        multi_echo_gre(phantom4, echo_times=[0.01], snr=-1)
    with pytest.raises(ValueError, match="phase_offset"):
        multi_echo_gre(phantom4, echo_times=[0.01], phase_offset="random")
    with pytest.raises(ValueError, match="shim"):
        multi_echo_gre(phantom4, echo_times=[0.01], shim_order=3)


# ----------------------------------------------------------------------------- BIDS writer

def _metadata(path: Path, root: Path) -> dict:
    """Sidecar with inheritance: top-level <suffix>.json, then the file's own sidecar."""
    meta = json.loads((root / "MEGRE.json").read_text())
    meta.update(json.loads(Path(str(path).replace(".nii.gz", ".json")).read_text()))
    return meta


@pytest.mark.parametrize("storage", ["arbitrary", "rad", "rad-float32"])
def test_bids_round_trip(tmp_path, phantom4, storage):
    p = phantom4
    te = [0.004, 0.010, 0.016]
    affine, b0 = oblique_affine(p.voxel_size, (10.0, 4.0, 0.0), shape=p.shape)
    runs = [RunSpec(p, multi_echo_gre(p, echo_times=te, b0_tesla=2.89, b0_direction=b0,
                                      snr=100, seed=s), affine, session="01", run=s)
            for s in (1, 2)]
    root = write_bids_dataset(
        tmp_path / "ds", [SubjectSpec("01", runs, participant={"age": 30})], name="test",
        readme="test dataset", phase_storage=storage,
        acquisition_metadata={"MagneticFieldStrength": 3},
    )
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.10.0" and desc["DatasetType"] == "raw"
    assert (root / "participants.tsv").read_text().splitlines()[1] == "sub-01\t30"
    anat = root / "sub-01" / "ses-01" / "anat"
    sim = runs[1].simulation
    for n, t in enumerate(te, start=1):
        mag_path = anat / f"sub-01_ses-01_run-2_echo-{n}_part-mag_MEGRE.nii.gz"
        ph_path = anat / f"sub-01_ses-01_run-2_echo-{n}_part-phase_MEGRE.nii.gz"
        meta = _metadata(ph_path, root)
        assert meta["EchoTime"] == pytest.approx(t)
        assert meta["MagneticFieldStrength"] == 3
        assert meta["ImagingFrequency"] == pytest.approx(2.89 * GAMMA_BAR_MHZ_PER_T, rel=1e-6)
        assert meta["Units"] == ("arbitrary" if storage == "arbitrary" else "rad")
        assert _metadata(mag_path, root)["EchoTime"] == pytest.approx(t)
        img = nib.load(ph_path)
        assert np.allclose(b0_direction_from_affine(img.affine), b0, atol=1e-6)
        assert np.allclose(img.affine, affine, atol=1e-5)
        phase = img.get_fdata()
        if storage == "arbitrary":
            assert phase.min() >= -4096 and phase.max() <= 4095
            phase = phase * np.pi / 4096
        err = np.angle(np.exp(1j * (phase - sim.phase[..., n - 1])))
        assert np.abs(err).max() < 1e-3
        mag = nib.load(mag_path)
        assert mag.get_data_dtype() == np.int16
        ratio = mag.get_fdata() / np.maximum(sim.magnitude[..., n - 1], 1e-9)
        gain = np.median(ratio[p.brain_mask])
        assert np.allclose(mag.get_fdata() / gain, sim.magnitude[..., n - 1],
                           atol=0.51 / gain)
    truth = root / "derivatives" / "groundtruth"
    tdesc = json.loads((truth / "dataset_description.json").read_text())
    assert tdesc["DatasetType"] == "derivative"
    t_anat = truth / "sub-01" / "ses-01" / "anat"
    # the two runs share phantom, orientation and fields: one truth without the run entity
    assert not list(t_anat.glob("*run-*"))
    chi = nib.load(t_anat / "sub-01_ses-01_Chimap.nii.gz").get_fdata()
    assert np.abs(chi - p.chi_ppm * p.brain_mask).max() <= 0.6e-4
    assert np.array_equal(
        nib.load(t_anat / "sub-01_ses-01_desc-brain_mask.nii.gz").get_fdata() > 0, p.brain_mask)
    assert np.array_equal(
        nib.load(t_anat / "sub-01_ses-01_desc-phantom_dseg.nii.gz").get_fdata(), p.labels)
    tsv = (t_anat / "sub-01_ses-01_desc-phantom_dseg.tsv").read_text().splitlines()
    assert tsv[0] == "index\tname" and "2\tglobus_pallidus" in tsv
    local = nib.load(truth / "sub-01" / "ses-01" / "fmap"
                     / "sub-01_ses-01_desc-local_fieldmap.nii.gz")
    assert np.abs(local.get_fdata() - sim.local_field_hz * p.brain_mask).max() <= 0.006
    side = json.loads((t_anat / "sub-01_ses-01_Chimap.json").read_text())
    assert side["Units"] == "ppm" and np.allclose(side["B0Direction"], b0, atol=1e-6)


def test_bids_writer_is_deterministic_and_checks(tmp_path, phantom4):
    p = phantom4
    sim = multi_echo_gre(p, echo_times=[0.005], snr=100, seed=1)
    affine, _ = oblique_affine(p.voxel_size, (0, 0, 0), shape=p.shape)
    spec = [SubjectSpec("01", [RunSpec(p, sim, affine)])]
    a = write_bids_dataset(tmp_path / "a", spec, name="x", readme="x")
    b = write_bids_dataset(tmp_path / "b", spec, name="x", readme="x")
    files_a = sorted(f.relative_to(a) for f in a.rglob("*") if f.is_file())
    files_b = sorted(f.relative_to(b) for f in b.rglob("*") if f.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    with pytest.raises(ValueError, match="not empty"):
        write_bids_dataset(tmp_path / "a", spec, name="x", readme="x")
    with pytest.raises(ValueError, match="alphanumeric"):
        write_bids_dataset(tmp_path / "c", [SubjectSpec("0-1", [RunSpec(p, sim, affine)])],
                           name="x", readme="x")
    with pytest.raises(ValueError, match="phase storage"):
        write_bids_dataset(tmp_path / "d", spec, name="x", readme="x",
                           phase_storage="degrees")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- RC2

@pytest.mark.skipif(not RC2.exists(), reason="shared RC2 phantom data not present")
def test_rc2_phantom_at_2mm():
    from qsmprep.datasets.rc2 import rc2_phantom

    p = rc2_phantom(RC2, voxel_size=(2.0, 2.0, 2.0))
    assert p.shape == (82, 102, 102)
    assert {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15} <= set(p.label_names)
    assert 1100 < p.brain_mask.sum() * 8e-3 < 1500
    # partial-volume chi: the median over a label is the RC2 reference value
    for label, chi in ((2, 0.1305), (3, 0.038), (8, -0.030), (10, 0.019), (14, 9.2)):
        assert abs(np.median(p.chi_ppm[p.labels == label]) - chi) < 0.01, label
    # partial volume keeps the calcification's moment: 72 voxels of 0.64 mm at -3.3 ppm
    # in tissue of about 0.02 ppm (the mode labels may lose it at 2 mm)
    centre = np.unravel_index(np.argmin(np.where(p.brain_mask, p.chi_ppm, 0)), p.shape)
    box = tuple(slice(c - 2, c + 3) for c in centre)
    chi_box = p.chi_ppm[box]
    moment = (chi_box - np.median(chi_box)).sum() * 8.0  # ppm mm^3
    expected = (-3.3 - 0.02) * 72 * 0.64**3
    assert abs(moment / expected - 1) < 0.25, (moment, expected)
    # no chi contrast across the mask boundary: outside neighbours copy the inside
    m = p.brain_mask
    for axis in range(3):
        for shift in (1, -1):
            inside = np.roll(m, shift, axis) & ~m  # outside voxels with an inside neighbour
            nb = np.roll(p.chi_ppm, shift, axis)
            diff = np.abs(p.chi_ppm[inside] - nb[inside])
            assert np.percentile(diff, 99) < 0.2
            assert np.median(diff) < 0.01
    assert np.median(p.r2star[p.labels == 14]) == 0
    assert abs(np.median(p.r2star[p.labels == 2]) - 40) < 1
    total, local, background, _ = simulate_fields(p, (0, 0, 1))
    eroded = ndimage.binary_erosion(m, iterations=3)
    ratio = _laplacian(background, 2.0)[eroded].std() / _laplacian(local, 2.0)[eroded].std()
    assert ratio < 0.05


# ----------------------------------------------------------------------------- examples

def _load_script():
    spec = importlib.util.spec_from_file_location(
        "make_bids_examples", REPO / "scripts" / "make_bids_examples.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _compare_trees(committed: Path, fresh: Path) -> None:
    files_c = sorted(f.relative_to(committed) for f in committed.rglob("*") if f.is_file())
    files_f = sorted(f.relative_to(fresh) for f in fresh.rglob("*") if f.is_file())
    assert files_c == files_f
    for rel in files_c:
        a, b = committed / rel, fresh / rel
        if rel.name.endswith(".nii.gz"):
            ia, ib = nib.load(a), nib.load(b)
            assert np.allclose(ia.affine, ib.affine, atol=1e-6), rel
            assert ia.dataobj.slope == ib.dataobj.slope, rel
            da, db = np.asarray(ia.dataobj.get_unscaled()), np.asarray(ib.dataobj.get_unscaled())
            assert da.shape == db.shape and da.dtype == db.dtype, rel
            if da.dtype.kind == "f":
                assert np.allclose(da, db, rtol=1e-4, atol=1e-6), rel
                continue
            diff = np.abs(da.astype(np.int64) - db.astype(np.int64))
            if "part-phase" in rel.name:  # a code may flip across the +-pi wrap
                diff = np.minimum(diff, np.abs(8192 - diff))
            # floating-point/FFT differences between machines may move a rounding by 1
            assert diff.max() <= 2 and np.count_nonzero(diff) <= 1e-3 * diff.size, rel
        elif rel.suffix == ".json":
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            assert ja.keys() == jb.keys(), rel
            for key in ja:
                if isinstance(ja[key], (float, list)) and not isinstance(ja[key], str):
                    try:
                        assert np.allclose(ja[key], jb[key], rtol=1e-3), (rel, key)
                        continue
                    except TypeError:
                        pass
                assert ja[key] == jb[key], (rel, key)
        else:
            assert a.read_text() == b.read_text(), rel


@pytest.mark.skipif(not (REPO / "bids_examples" / "brain_megre").exists(),
                    reason="bids_examples not generated")
def test_examples_match_script(tmp_path):
    module = _load_script()
    fresh_megre = module.make_brain_megre(tmp_path)
    fresh_sessions = module.make_brain_sessions(tmp_path)
    _compare_trees(REPO / "bids_examples" / "brain_megre", fresh_megre)
    _compare_trees(REPO / "bids_examples" / "brain_sessions", fresh_sessions)
    total = sum(f.stat().st_size for f in (REPO / "bids_examples").rglob("*") if f.is_file())
    # size budget of the four bundled examples (brain 9.9 MB, body_leg 1.2 MB, vertebra
    # study 3.1 MB): the repository stays small enough to clone quickly
    assert total < 15e6


@pytest.mark.skipif(shutil.which("bids-validator-deno") is None,
                    reason="bids-validator-deno not installed")
@pytest.mark.parametrize("dataset", ["brain_megre", "brain_sessions"])
def test_examples_pass_bids_validator(dataset):
    root = REPO / "bids_examples" / dataset
    if not root.exists():
        pytest.skip("bids_examples not generated")
    for path in (root, root / "derivatives" / "groundtruth"):
        result = subprocess.run(["bids-validator-deno", str(path)], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.skipif(not (REPO / "bids_examples" / "brain_megre").exists(),
                    reason="bids_examples not generated")
def test_example_ground_truth_consistent():
    """The committed example's truth agrees with its raw data and sidecars."""
    root = REPO / "bids_examples" / "brain_megre"
    truth = root / "derivatives" / "groundtruth" / "sub-01"
    total = nib.load(truth / "fmap" / "sub-01_desc-total_fieldmap.nii.gz")
    meta = json.loads((root / "MEGRE.json").read_text())
    f0 = meta["ImagingFrequency"]
    assert meta["MagneticFieldStrength"] == 3 and abs(f0 / GAMMA_BAR_MHZ_PER_T - 2.894) < 1e-4
    echoes = sorted((root / "sub-01" / "anat").glob("*_part-phase_MEGRE.nii.gz"))
    assert len(echoes) == 4
    ph = [nib.load(e) for e in echoes]
    mags = [nib.load(str(e).replace("part-phase", "part-mag")).get_fdata() for e in echoes]
    tes = [_metadata(e, root)["EchoTime"] for e in echoes]
    assert np.allclose(b0_direction_from_affine(ph[0].affine),
                       json.loads((truth / "anat" / "sub-01_Chimap.json").read_text())
                       ["B0Direction"], atol=1e-6)
    # the phase difference between echoes 2 and 1 is 2 pi f dTE (noise aside) in the brain
    mask = nib.load(truth / "anat" / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    f = total.get_fdata()
    d = (ph[1].get_fdata() - ph[0].get_fdata()) * np.pi / 4096
    err = np.angle(np.exp(1j * (d - 2 * np.pi * f * (tes[1] - tes[0]))))
    assert np.median(np.abs(err[mask])) < 0.03
    assert mags[0][mask].mean() > mags[3][mask].mean()
