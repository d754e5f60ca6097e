"""Where the body/bone chi error comes from (issue 4 follow-up); numbers in RESULTS.md "Body chi".

Usage: python benchmarks/body_chi_benchmark.py

Through the step API against the phantoms' truth, trabecular ROI means minus the muscle
(soft tissue) mean (ppm), for three geometries: the bundled leg (qsmprep.simulate.body, 2 mm,
64x64x24, tibia parallel to B0, slab cut in z), the same leg tilted 15 deg to B0 with a 96 mm
slab and a 2 mm cortex, and the vertebra study phantom (qsmprep.simulate.study, no fat).
Stages: (1) TV from the exact local field of the tissue in the field of view, zero data
weight in the signal-free cortex, with the old 0.25 inversion padding and with the padding of
truncated axes (TRUNCATED_PAD_FRACTION); (2) total field inversion (TFI) of the true total
field, and background removal (PDF, LBV, iSMV) of it, then TV; (3) for the legs, the whole
chain of --preset body: water-fat field map (SNR 100) -> body mask -> TFI with the fit's
noise weights, and the former preset's PDF -> TV on the same field map.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.fft

from qsmprep.recon import background, inversion, mask as maskmod, waterfat
from qsmprep.recon.dipole import forward_field, hz_to_ppm
from qsmprep.recon.inversion import _common
from qsmprep.simulate import body, study
from qsmprep.simulate.phantom import AIR_CHI_PPM

TE = tuple(1.25e-3 + 0.9e-3 * n for n in range(6))


def report(tag, chi, labels, truth, mask, rois, soft):
    ref = (labels == soft) & mask
    parts, errors = [], []
    for label in rois:
        roi = (labels == label) & mask
        est = float(chi[roi].mean() - chi[ref].mean())
        true = float(truth[roi].mean() - truth[ref].mean())
        parts.append(f"{est:+.3f} ({true:+.3f})")
        errors.append(est - true)
    print(f"{tag:48s} {' '.join(parts)}  max |err| {max(map(abs, errors)):.3f}", flush=True)


def leg_case(fov_z, tilt_deg, cortex_mm):
    vs = (2.0, 2.0, 2.0)
    leg, fov = body.leg_phantom(voxel_size=vs, fov_mm=(128.0, 128.0, fov_z), cortex_mm=cortex_mm)
    a = np.deg2rad(tilt_deg)
    b0 = np.array([np.sin(a), 0.0, np.cos(a)])
    return vs, b0, leg, fov


def stages(name, vs, b0, total, labels, chi_t, tissue, weight_zero, rois, soft):
    exact = forward_field(np.where(tissue, chi_t, 0).astype(np.float32), vs, b0)
    # a relative noise (zero weight in the cortex), so lam is given: 2e-4, not noise-scaled
    noise = np.where(weight_zero, 1e6, 1.0).astype(np.float32)
    for pad in (0.0, 1.0):
        _common.TRUNCATED_PAD_FRACTION = pad
        chi = inversion.invert(exact, tissue, voxel_size=vs, b0_direction=b0, method="tv",
                               noise=noise, lam=inversion.DEFAULT_TV_LAMBDA)
        report(f"{name}: exact field -> TV, cut-axis pad {max(pad, 0.25)}", chi, labels, chi_t,
               tissue, rois, soft)
    _common.TRUNCATED_PAD_FRACTION = 1.0
    chi = inversion.invert(total, tissue, voxel_size=vs, b0_direction=b0, method="tfi",
                           noise=noise, lam=inversion.DEFAULT_TV_LAMBDA)
    report(f"{name}: true total -> TFI", chi, labels, chi_t, tissue, rois, soft)
    for method in ("pdf", "lbv", "ismv"):
        local, m = background.remove(total, tissue, voxel_size=vs, b0_direction=b0,
                                     method=method)
        chi = inversion.invert(local, m, voxel_size=vs, b0_direction=b0, method="tv",
                               noise=noise, lam=inversion.DEFAULT_TV_LAMBDA)
        report(f"{name}: true total -> {method} -> TV", chi, labels, chi_t, m, rois, soft)


def legs():
    for fov_z, tilt, cortex in ((48.0, 0.0, 3.0), (96.0, 15.0, 2.0)):
        vs, b0, leg, fov = leg_case(fov_z, tilt, cortex)
        name = f"leg z{fov_z:.0f}mm tilt {tilt:.0f} cortex {cortex:.0f}mm"
        sim, cropped = body.simulate_waterfat_gre(leg, echo_times=TE, b0_tesla=3.0,
                                                  b0_direction=b0, snr=100.0, seed=7, crop=fov)
        ph = cropped.phantom
        tissue = ph.labels != 14
        stages(name, vs, b0, sim.total_field_ppm, ph.labels, ph.chi_ppm, tissue,
               ph.labels == 13, (21, 22, 23), 15)
        start = time.perf_counter()
        mask = maskmod.body_mask(sim.magnitude, voxel_size=vs)
        fit = waterfat.separate(waterfat.as_complex(sim.magnitude, sim.phase), sim.echo_times,
                                mask, b0_tesla=3.0, voxel_size=vs, fat_model="ren_marrow")
        field, noise = hz_to_ppm(fit.field_hz, 3.0), hz_to_ppm(fit.noise_hz, 3.0)
        chi = inversion.invert(field, mask, voxel_size=vs, b0_direction=b0, method="tfi",
                               magnitude=sim.magnitude[..., 0], noise=noise)
        report(f"{name}: --preset body chain, TFI ({time.perf_counter() - start:.0f} s)", chi,
               ph.labels, ph.chi_ppm, mask, (21, 22, 23), 15)
        local, m = background.remove(field, mask, voxel_size=vs, b0_direction=b0, method="pdf")
        chi = inversion.invert(local, m, voxel_size=vs, b0_direction=b0, method="tv",
                               magnitude=sim.magnitude[..., 0], noise=noise)
        report(f"{name}: same field map, PDF -> TV (the former preset)", chi, ph.labels,
               ph.chi_ppm, m, (21, 22, 23), 15)


def vertebra():
    chi4 = np.array([-0.10, -0.05, 0.0, 0.05])
    ph = study.vertebra_phantom(chi4, np.full(4, 60.0))
    crop = (slice(None), slice(None), slice(20, 60))
    b0 = np.array([0.0, 0.0, 1.0])
    total = body.body_fields(ph, b0)[0][crop]
    sub = ph.crop(crop)
    tissue = np.asarray(sub.brain_mask, dtype=bool)  # the body eroded by 2 voxels, as the study
    stages("vertebra study phantom (3 mm, slab)", sub.voxel_size, b0, total, sub.labels,
           np.where(tissue, sub.chi_ppm, 0), tissue, np.zeros_like(tissue), (1, 2, 3, 4), 15)


if __name__ == "__main__":
    scipy.fft.set_workers(2)
    legs()
    vertebra()
