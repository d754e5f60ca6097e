"""Dipole kernel, forward model, B0 geometry and unit conversions against analytic truth."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from qsmprep.recon import dipole
from _phantoms import sphere_volume_fraction

B20X = (0.0, np.sin(np.radians(20.0)), np.cos(np.radians(20.0)))


def _sphere_field_error(shape, vox, b0, radius=10.0):
    """Max |numerical - analytic| field (ppm) of a chi = 1 ppm sphere, inside and outside."""
    vox = np.asarray(vox, dtype=float)
    b = np.asarray(b0, dtype=float) / np.linalg.norm(b0)
    chi = sphere_volume_fraction(shape, vox, radius)
    with scipy.fft.set_workers(2):
        field = dipole.forward_field(chi, vox, b)
    assert field.dtype == np.float32 and field.shape == tuple(shape)
    centre = [(n - 1) / 2.0 * d for n, d in zip(shape, vox)]
    grids = np.meshgrid(
        *[np.arange(n) * d - c for n, d, c in zip(shape, vox, centre)], indexing="ij"
    )
    r = np.sqrt(sum(g**2 for g in grids))
    cos = sum(g * bi for g, bi in zip(grids, b)) / np.maximum(r, 1e-9)
    # Lorentz-corrected kernel: zero inside, dipole pattern outside
    analytic = np.where(r > radius, radius**3 / np.maximum(r, 1e-9) ** 3 * (3 * cos**2 - 1) / 3, 0)
    err = np.abs(field - analytic)
    fov = min(n * d for n, d in zip(shape, vox)) / 2.0 - 2.0
    inside = r <= radius - 3.0
    outside = (r >= radius + 3.0) & (r < fov)
    return float(err[inside].max()), float(err[outside].max()), float(np.abs(analytic).max())


@pytest.mark.parametrize(
    "shape, vox, b0, tol_in, tol_out",
    [
        # measured: 0.0016 / 0.0015 (iso), 0.0034 / 0.0055 (1x1x2 mm)
        ((64, 64, 64), (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), 0.004, 0.004),
        ((64, 64, 32), (1.0, 1.0, 2.0), (0.0, 0.0, 1.0), 0.007, 0.009),
        # oblique B0 (20 deg): the continuous kernel is discontinuous at the k-space edge,
        # so the staircase sphere rings more: measured 0.022 / 0.0071 and 0.027 / 0.019
        ((64, 64, 64), (1.0, 1.0, 1.0), B20X, 0.035, 0.012),
        ((64, 64, 32), (1.0, 1.0, 2.0), B20X, 0.04, 0.03),
    ],
)
def test_sphere_matches_analytic_field(shape, vox, b0, tol_in, tol_out):
    err_in, err_out, peak = _sphere_field_error(shape, vox, b0)
    assert peak > 0.45  # analytic field at the grid point nearest the pole (2/3 at r = a)
    assert err_in < tol_in
    assert err_out < tol_out


def test_forward_field_is_linear_and_sign_correct():
    shape, vox = (48, 48, 48), (1.0, 1.0, 1.0)
    chi = sphere_volume_fraction(shape, vox, 6.0)
    f1 = dipole.forward_field(chi, vox, (0, 0, 1))
    f2 = dipole.forward_field(-2.5 * chi, vox, (0, 0, 1))
    np.testing.assert_allclose(f2, -2.5 * f1, atol=1e-6)
    c = 24
    # paramagnetic sphere: field above the pole (along B0) positive, at the equator negative
    assert f1[c, c, c + 10] > 0.1 and f1[c + 10, c, c] < -0.05


def _rotation_x(deg):
    a = np.radians(deg)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def _rotation_y(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (0.5, 0.5, 2.0)])
def test_b0_direction_from_rotated_affines(vox):
    for rot, expected in [
        (np.eye(3), (0.0, 0.0, 1.0)),
        (_rotation_x(20.0), (0.0, np.sin(np.radians(20)), np.cos(np.radians(20)))),
        (_rotation_y(-30.0), (np.sin(np.radians(30)), 0.0, np.cos(np.radians(30)))),
        (_rotation_x(90.0), (0.0, 1.0, 0.0)),  # sagittal-like: B0 along the 2nd voxel axis
        (np.diag([-1.0, 1.0, 1.0]), (0.0, 0.0, 1.0)),  # LAS flip keeps z
        (np.diag([1.0, 1.0, -1.0]), (0.0, 0.0, -1.0)),  # flipped slice axis
    ]:
        affine = np.eye(4)
        affine[:3, :3] = rot @ np.diag(vox)
        affine[:3, 3] = [-90.0, 20.0, 5.0]
        np.testing.assert_allclose(dipole.voxel_size_from_affine(affine), vox, atol=1e-12)
        b = dipole.b0_direction_from_affine(affine)
        np.testing.assert_allclose(b, expected, atol=1e-12)
    composite = _rotation_x(20.0) @ _rotation_y(10.0)
    affine = np.eye(4)
    affine[:3, :3] = composite @ np.diag(vox)
    b = dipole.b0_direction_from_affine(affine)
    # the voxel axes are the rotated columns: b_i = column_i . z
    np.testing.assert_allclose(b, composite[2, :], atol=1e-12)
    assert dipole.obliquity_deg(b) == pytest.approx(
        np.degrees(np.arccos(np.cos(np.radians(20)) * np.cos(np.radians(10)))), abs=1e-6
    )


def test_obliquity():
    assert dipole.obliquity_deg((0, 0, 1)) == pytest.approx(0.0)
    assert dipole.obliquity_deg(B20X) == pytest.approx(20.0)
    assert dipole.obliquity_deg((0, 0, -1)) == pytest.approx(0.0)


def test_hz_ppm_conversions():
    assert dipole.ppm_to_hz(1.0, 3.0) == pytest.approx(127.73243676)
    assert dipole.hz_to_ppm(127.73243676, 3.0) == pytest.approx(1.0)
    # a nominal "3 T" Siemens at 123.2 MHz: 2.894 T
    b0 = 123.2 / dipole.GAMMA_BAR_MHZ_PER_T
    assert b0 == pytest.approx(2.8935, abs=1e-3)
    x = np.linspace(-3, 3, 7, dtype=np.float32)
    np.testing.assert_allclose(dipole.hz_to_ppm(dipole.ppm_to_hz(x, 1.5), 1.5), x, rtol=1e-6)


@pytest.mark.parametrize("vox", [(1.0, 1.0, 1.0), (0.6, 0.8, 2.0)])
@pytest.mark.parametrize("b0", [(0.0, 0.0, 1.0), B20X])
def test_kernel_values_and_discrete_agree_at_low_k(vox, b0):
    shape = (64, 48, 40)
    cont = dipole.dipole_kernel(shape, vox, b0)
    disc = dipole.dipole_kernel(shape, vox, b0, kind="discrete")
    assert cont.dtype == np.float32 and cont.shape == (64, 48, 21)  # rfftn half-space
    assert cont[0, 0, 0] == 0 and disc[0, 0, 0] == 0
    assert cont.min() >= -2.0 / 3.0 - 1e-6 and cont.max() <= 1.0 / 3.0 + 1e-6
    full = dipole.dipole_kernel(shape, vox, b0, half=False)
    assert full.shape == shape
    # same values on the shared half-space (the Nyquist plane k_z = -+1/2d excepted)
    np.testing.assert_allclose(full[..., :20], cont[..., :20], atol=1e-7)
    k = dipole.kspace_grid(shape, vox)
    kd = np.sqrt(sum((ki * d) ** 2 for ki, d in zip(k, vox)))  # cycles per voxel
    low = (kd > 0) & (kd < 0.05)
    assert low.sum() > 20
    assert np.abs(cont - disc)[low].max() < 0.02
    # and they differ at high k (the discrete symbol is not the continuous one)
    assert np.abs(cont - disc)[kd > 0.4].max() > 0.05


def test_kernel_axis_values():
    shape, vox = (32, 32, 32), (1.0, 1.0, 1.0)
    d = dipole.dipole_kernel(shape, vox, (0, 0, 1), half=False)
    assert d[0, 0, 5] == pytest.approx(-2.0 / 3.0)  # k parallel to B0
    assert d[5, 0, 0] == pytest.approx(1.0 / 3.0)  # k perpendicular to B0
    assert d[5, 0, 5] == pytest.approx(1.0 / 3.0 - 0.5, abs=1e-6)  # 45 degrees


def test_padded_shape_is_fast_and_large_enough():
    for shape, margin in [((97, 101, 45), 0), ((128, 128, 128), 64), ((50, 60, 70), (3, 8, 21))]:
        out = dipole.padded_shape(shape, margin)
        m = np.broadcast_to(margin, (3,))
        for n, mm, o in zip(shape, m, out):
            assert o >= n + mm
            assert o == scipy.fft.next_fast_len(o, real=True)


def test_a_frequency_given_for_the_field_is_refused():
    """B0 outside 0.01-25 T is an error that recognises a frequency in MHz or Hz (it would
    scale every ppm value by 42.6 or 4.3e7 without a word)."""
    assert dipole.hz_to_ppm(127.74, 3.0) == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError, match="127.7 MHz is the proton frequency at 3 T"):
        dipole.hz_to_ppm(10.0, 127.7)
    with pytest.raises(ValueError, match="Hz is the proton frequency at 1.5 T"):
        dipole.ppm_to_hz(1.0, 63.87e6)
    with pytest.raises(ValueError, match="outside 0.01-25 T: give B0 in tesla"):
        dipole.hz_to_ppm(10.0, 0.0)


def test_a_voxel_size_in_metres_is_refused_by_every_step():
    """Voxel sizes outside 0.01-20 mm (metres or micrometres) are a ValueError in every step,
    not a silently rescaled radius or kernel."""
    from qsmprep.recon import background, fieldmap, inversion, mask, unwrap

    shape = (16, 16, 12)
    inside = np.zeros(shape, bool)
    inside[4:12, 4:12, 3:9] = True
    field = np.zeros(shape, np.float32)
    phase = np.zeros(shape + (3,), np.float32)
    metres = (0.001, 0.001, 0.001)
    steps = [
        lambda: dipole.check_voxel_size(metres),
        lambda: mask.body_mask(np.ones(shape), voxel_size=metres),
        lambda: unwrap.unwrap(phase[..., 0], inside, method="laplacian", voxel_size=metres),
        lambda: fieldmap.estimate(np.ones(shape + (3,)), phase, [0.004, 0.008, 0.012], inside,
                                  voxel_size=metres),
        lambda: background.remove(field, inside, voxel_size=metres, b0_direction=(0, 0, 1),
                                  method="ismv"),
        lambda: inversion.invert(field, inside, voxel_size=metres, b0_direction=(0, 0, 1),
                                 method="tkd"),
        lambda: inversion.invert(field, inside, voxel_size=(1, 1, 1000), b0_direction=(0, 0, 1),
                                 method="tkd"),
    ]
    for step in steps:
        with pytest.raises(ValueError, match="outside 0.01-20 mm: give it in mm"):
            step()
    assert dipole.check_voxel_size([0.5, 0.5, 2]).tolist() == [0.5, 0.5, 2.0]
