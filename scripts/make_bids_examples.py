#!/usr/bin/env python
"""Regenerate the simulated example datasets in ``bids_examples/``.

    python scripts/make_bids_examples.py [--out bids_examples] [--only brain_megre ...]

Datasets (all from :mod:`qsmprep.simulate`, deterministic for the fixed seeds below):

* ``brain_megre``: one subject, 4 echoes (TE 4/12/20/28 ms, as the QSM challenge 2.0),
  2 mm isotropic, slab tilted 12 deg about x, Siemens-like "3 T" (simulated B0 2.894 T,
  ImagingFrequency 123.22 MHz while MagneticFieldStrength says 3), SNR 100, int16 phase in
  arbitrary units (-4096..4095).
* ``brain_sessions``: one subject (``--session-subjects 2`` adds sub-02 with 20% more iron
  in the deep gray nuclei), two sessions (different head orientation) x two runs (separate
  acquisitions: different noise and phase offsets), 3 echoes (TE 5/12/19 ms), 3 mm
  isotropic, B0 3.0 T, phase in rad (int16 with scl_slope pi/4096).
* ``vertebra_study``: 8 participants x 2 scans of a lumbar-spine body phantom whose vertebral
  susceptibility follows a QCT-like BMD linearly (qsmprep.simulate.study), two observers'
  ROI label maps and the reference table, for the group level.

Fields are simulated on a field of view holding the whole head and neck and then cropped to
a slab around the brain; noise is kept in a band around the head (0 beyond) so that the
whole of ``bids_examples/`` stays below 10 MB.  Each dataset has ground truth in
``derivatives/groundtruth`` (see its README).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from qsmprep.datasets.bids import RunSpec, SubjectSpec, write_bids_dataset
from qsmprep.simulate.phantom import TISSUES, head_phantom
from qsmprep.simulate.signal import crop_affine, multi_echo_gre, oblique_affine

ECHOES_MEGRE = [0.004, 0.012, 0.020, 0.028]  # the QSM challenge 2.0 echo times
ECHOES_SESSIONS = [0.005, 0.012, 0.019]

LOGGER = logging.getLogger("qsmprep")

PARTICIPANTS_JSON = {
    "age": {"Description": "Age of the simulated participant", "Units": "year"},
    "sex": {"Description": "Sex of the simulated participant",
            "Levels": {"F": "female", "M": "male"}},
    "group": {"Description": "Simulation group",
              "Levels": {"reference": "RC2 deep-gray susceptibility",
                         "highiron": "deep-gray susceptibility x 1.2"}},
    "phantom_seed": {"Description": "Seed of qsmprep.simulate.phantom.head_phantom"},
}

README_MEGRE = """\
# brain_megre (simulated)

Numerical head phantom (qsmprep.simulate.phantom.head_phantom, seed 1) and a multi-echo
gradient-echo forward simulation (qsmprep.simulate.signal.multi_echo_gre). Not in-vivo data.

- 1 subject, {n_echoes} echoes, TE = {echo_ms} ms, 2 mm isotropic, {shape} voxels.
- Slab tilted 12 degrees about the scanner x axis: B0 is oblique in voxel space; read the
  direction from the NIfTI affine.
- "3 T" Siemens-like scanner: MagneticFieldStrength 3 but the simulated B0 is 2.894 T
  (ImagingFrequency 123.22 MHz). Use ImagingFrequency to convert Hz to ppm.
- SNR 100 (mean brain S0 / noise sigma per real/imaginary channel); smooth transmit/receive
  phase offset; background field from the air/tissue interfaces, sinuses and ear canals
  (phase wraps near the skull base); 2nd-order shim over the brain. Fields were simulated on
  a larger field of view (including the neck and face) and cropped to this slab.
- Noise in a band of 8 mm around the head; beyond it magnitude and phase are 0
  (background suppression, keeps the files small).
- Phase: int16 in [-4096, 4095] for (-pi, pi] (Units "arbitrary"); phase = +2 pi f TE.
- Ground truth (susceptibility, masks, labels, fields in Hz, R2*, S0): derivatives/groundtruth.

Regenerate with `python scripts/make_bids_examples.py`.
"""

README_SESSIONS = """\
# brain_sessions (simulated)

Numerical head phantom(s) (qsmprep.simulate.phantom.head_phantom) and multi-echo
gradient-echo forward simulations for test-retest designs. Not in-vivo data.

- {subjects}; 2 sessions each with a different head orientation, 2 runs per
  session (separate acquisitions: different noise and phase offsets).{highiron}
- {n_echoes} echoes, TE = {echo_ms} ms, 3 mm isotropic, {shape} voxels, B0 3.0 T, SNR 80.
- Noise in a band of 6 mm around the head, 0 beyond (background suppression).
- Phase stored as int16 with scl_slope = pi/4096, i.e. it reads as rad (Units "rad");
  phase = +2 pi f TE.
- Ground truth per session (shared by its two runs) in derivatives/groundtruth.

Regenerate with `python scripts/make_bids_examples.py`.
"""


def _describe(echo_times, shape) -> dict:
    return {
        "n_echoes": len(echo_times),
        "echo_ms": ", ".join(f"{1000 * t:g}" for t in echo_times),
        "shape": " x ".join(str(n) for n in shape),
    }


def slab(phantom, *, margin_vox: int = 2, below_brain_mm: float = 8.0) -> tuple[slice, ...]:
    """Field of view around the head in x/y and from below the brain to the vertex in z."""
    head = np.nonzero(phantom.labels != 14)
    brain_z = np.nonzero(phantom.brain_mask.any(axis=(0, 1)))[0]
    out = []
    for axis, idx in enumerate(head):
        lo, hi = int(idx.min()) - margin_vox, int(idx.max()) + 1 + margin_vox
        if axis == 2:
            lo = int(brain_z.min()) - int(round(below_brain_mm / phantom.voxel_size[2]))
        out.append(slice(max(lo, 0), min(hi, phantom.shape[axis])))
    return tuple(out)


def simulate_slab(phantom, angles, *, crop, **kwargs):
    """Simulate on the full grid (fields include every source) and crop to the slab."""
    affine, b0_dir = oblique_affine(phantom.voxel_size, angles, shape=phantom.shape)
    sim = multi_echo_gre(phantom, b0_direction=b0_dir, **kwargs)
    return phantom.crop(crop), sim.crop(crop), crop_affine(affine, crop)


def make_brain_megre(out: Path) -> Path:
    """Write ``brain_megre`` under ``out``."""
    voxel = (2.0, 2.0, 2.0)
    full = head_phantom(voxel_size=voxel, fov_mm=(176.0, 216.0, 192.0), seed=1,
                        chi_texture_ppm=0.004)
    phantom, sim, affine = simulate_slab(
        full, (12.0, 0.0, 0.0), crop=slab(full), echo_times=ECHOES_MEGRE,
        b0_tesla=2.894, snr=100.0, seed=101,
    )
    subject = SubjectSpec("01", [RunSpec(phantom, sim, affine)],
                          participant={"age": 34, "sex": "F", "group": "reference",
                                       "phantom_seed": 1})
    return write_bids_dataset(
        out / "brain_megre", [subject], name="qsmprep simulated brain MEGRE",
        readme=README_MEGRE.format(**_describe(ECHOES_MEGRE, phantom.shape)),
        phase_storage="arbitrary",
        acquisition_metadata={"MagneticFieldStrength": 3, "RepetitionTime": 0.035,
                              "FlipAngle": 15},
        participants_json=PARTICIPANTS_JSON, background_margin_mm=8.0, overwrite=True,
    )


def make_brain_sessions(out: Path, n_subjects: int = 1) -> Path:
    """Write ``brain_sessions`` (``n_subjects`` = 1 or 2) under ``out``."""
    if n_subjects not in (1, 2):
        raise ValueError(f"n_subjects must be 1 or 2, got {n_subjects!r}")
    voxel = (3.0, 3.0, 3.0)
    deep_gray = (1, 2, 3, 4, 5, 6)
    orientations = {"01": (0.0, 0.0, 0.0), "02": (-8.0, 5.0, 0.0)}
    subjects = []
    for k, (label, group, age, sex) in enumerate(
        (("01", "reference", 29, "M"), ("02", "highiron", 61, "F"))[:n_subjects]
    ):
        seed = 11 + k
        overrides = {i: TISSUES[i][1] * 1.2 for i in deep_gray} if group == "highiron" else None
        full = head_phantom(voxel_size=voxel, fov_mm=(168.0, 204.0, 192.0), seed=seed,
                            chi_overrides=overrides, chi_texture_ppm=0.004)
        crop = slab(full)
        phantom = full.crop(crop)
        runs = []
        for s, (session, angles) in enumerate(orientations.items()):
            for run in (1, 2):
                _, sim, affine = simulate_slab(
                    full, angles, crop=crop, echo_times=ECHOES_SESSIONS, b0_tesla=3.0,
                    snr=80.0, seed=1000 * seed + 10 * s + run,
                )
                runs.append(RunSpec(phantom, sim, affine, session=session, run=run))
        subjects.append(SubjectSpec(label, runs, participant={
            "age": age, "sex": sex, "group": group, "phantom_seed": seed}))
    return write_bids_dataset(
        out / "brain_sessions", subjects, name="qsmprep simulated brain MEGRE sessions",
        readme=README_SESSIONS.format(
            subjects="1 subject" if n_subjects == 1 else "2 subjects",
            **_describe(ECHOES_SESSIONS, phantom.shape),
            highiron=" sub-02 has 20% more susceptibility in the deep gray nuclei."
            if n_subjects == 2 else "",
        ),
        phase_storage="rad",
        acquisition_metadata={"MagneticFieldStrength": 3, "RepetitionTime": 0.025,
                              "FlipAngle": 12},
        participants_json=PARTICIPANTS_JSON, background_margin_mm=6.0, overwrite=True,
    )


README_STUDY = """\
# vertebra_study (simulated)

A small simulated lumbar-spine QSM study for the group level (qsmprep.simulate.study;
not in-vivo data): {n} participants, two scans each (ses-1, ses-2: a repeat scan with new
noise and phase offsets, field of view shifted by one slice), four vertebral bodies L1-L4.

- Truth: chi = {intercept} + ({slope}) x BMD + e ppm, e ~ N(0, {scatter} ppm), BMD in
  mg/cm3 (QCT-like reference); R2* = {r2i} + {r2s} x BMD (1/s). Per-participant values and
  the model: derivatives/groundtruth/study_truth.json.
- {n_echoes} echoes, TE = {echo_ms} ms, 3 mm isotropic, {shape} voxels, B0 3 T along the
  body axis, SNR {snr}, phase in rad (int16, scl_slope pi/4096).
- ROIs (derivatives/rois): observer1 and observer2 on ses-1, observer1 on ses-2
  (`desc-<observer>_dseg` + `.tsv` index/name); observer2's ses-1 ROIs are mapped onto
  ses-2 by qsmprep (same scanner space).
- Reference table: derivatives/reference/qct.tsv (participant_id, roi, measure, value, unit).

Run the study:

    qsmprep bids_examples/vertebra_study out participant \\
        --roi-dir bids_examples/vertebra_study/derivatives/rois \\
        --lambda-sweep 2e-5 2e-4 2e-3
    qsmprep bids_examples/vertebra_study out group \\
        --reference-table bids_examples/vertebra_study/derivatives/reference/qct.tsv

Regenerate with `python scripts/make_bids_examples.py --only vertebra_study`.
"""

ECHOES_STUDY = [0.003, 0.008, 0.013]
STUDY_SNR = 100.0


def make_vertebra_study(out: Path, n_participants: int = 8) -> Path:
    """Write ``vertebra_study`` (participants x 2 scans, ROIs, reference table) under ``out``."""
    import dataclasses

    from qsmprep.datasets.bids import save_nifti, write_json, write_tsv
    from qsmprep.simulate.study import VERTEBRAE, TruthModel, reference_rows, simulate_study

    model = TruthModel()
    participants = simulate_study(n_participants, model=model, seed=2024)
    # a 120 mm slab of the 240 mm long body; the second scan's slab is one slice lower
    crops = {"1": (slice(None), slice(None), slice(20, 60)),
             "2": (slice(None), slice(None), slice(19, 59))}
    subjects = []
    for p in participants:
        runs = []
        for s, (session, crop) in enumerate(crops.items()):
            affine, b0_dir = oblique_affine(p.phantom.voxel_size, (0.0, 0.0, 0.0),
                                            shape=p.phantom.shape)
            sim = multi_echo_gre(p.phantom, echo_times=ECHOES_STUDY, b0_tesla=3.0,
                                 b0_direction=b0_dir, snr=STUDY_SNR,
                                 seed=5000 + 10 * int(p.label) + s)
            runs.append(RunSpec(p.phantom.crop(crop), sim.crop(crop), crop_affine(affine, crop),
                                session=session))
        subjects.append(SubjectSpec(p.label, runs, participant={"age": p.age, "sex": p.sex}))
    shape = runs[0].phantom.shape
    root = write_bids_dataset(
        out / "vertebra_study", subjects, name="qsmprep simulated vertebra study",
        readme=README_STUDY.format(
            n=n_participants, intercept=model.intercept_ppm, slope=model.slope_ppm_per_mgcm3,
            scatter=model.scatter_ppm, r2i=model.r2star_intercept, r2s=model.r2star_slope,
            snr=int(STUDY_SNR), **_describe(ECHOES_STUDY, shape)),
        phase_storage="rad",
        acquisition_metadata={"MagneticFieldStrength": 3, "RepetitionTime": 0.02,
                              "FlipAngle": 10},
        participants_json={k: PARTICIPANTS_JSON[k] for k in ("age", "sex")},
        background_margin_mm=6.0, overwrite=True,
    )
    rois = root / "derivatives" / "rois"
    write_json(rois / "dataset_description.json", {
        "Name": "vertebra_study: observers' vertebral body ROIs", "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsmprep.simulate.study", "Description": "simulated "
                         "observers: vertebral bodies eroded by one voxel; observer2 shifted "
                         "by up to one voxel; observer1 on ses-2 one slice fewer"}],
    })
    for p in participants:
        for session, rater, key in (("1", "observer1", "observer1"),
                                    ("1", "observer2", "observer2"),
                                    ("2", "observer1", "observer1_scan2")):
            anat = rois / f"sub-{p.label}" / f"ses-{session}" / "anat"
            stem = f"sub-{p.label}_ses-{session}_desc-{rater}_dseg"
            crop = crops[session]
            affine, _ = oblique_affine(p.phantom.voxel_size, (0.0, 0.0, 0.0),
                                       shape=p.phantom.shape)
            save_nifti(anat / f"{stem}.nii.gz", p.rois[key][crop].astype(np.int16),
                       crop_affine(affine, crop))
            write_tsv(anat / f"{stem}.tsv", ["index", "name"],
                      [[k + 1, name] for k, name in enumerate(VERTEBRAE)])
            write_json(anat / f"{stem}.json", {"Description": f"Vertebral body ROIs drawn by "
                                               f"{rater} on ses-{session}"})
    reference = root / "derivatives" / "reference"
    rows = reference_rows(participants)
    write_tsv(reference / "qct.tsv", ["participant_id", "roi", "measure", "value", "unit"],
              [[r["participant_id"], r["roi"], r["measure"], r["value"], r["unit"]]
               for r in rows])
    write_json(reference / "qct.json", {
        "participant_id": {"Description": "Participant"},
        "roi": {"Description": "Vertebra (ROI name in the ROI label tables)"},
        "measure": {"Description": "qct_bmd: volumetric bone mineral density by QCT"},
        "value": {"Description": "Measured value"},
        "unit": {"Description": "Unit of value"},
    })
    write_json(root / "derivatives" / "groundtruth" / "study_truth.json", {
        "model": dataclasses.asdict(model),
        "participants": [{"participant_id": f"sub-{p.label}", "age": p.age, "sex": p.sex,
                          **{f"{name}_bmd": float(p.bmd[k]) for k, name in enumerate(VERTEBRAE)},
                          **{f"{name}_chi_ppm": round(float(p.chi[k]), 6)
                             for k, name in enumerate(VERTEBRAE)},
                          **{f"{name}_r2star": round(float(p.r2star[k]), 4)
                             for k, name in enumerate(VERTEBRAE)}}
                         for p in participants],
    })
    return root


README_LEG = """\
# body_leg (simulated)

A simulated lower leg for water-fat body/bone QSM (qsmprep.simulate.body; not in-vivo data):
subcutaneous fat, muscle, a tibia with a cortical shell around marrow whose trabecular bone
volume fraction (BV/TV 0.25, 0.14, 0.05) and fat fraction (40, 70, 92%) change along the
leg in thirds, and a fibula with fatty marrow (BV/TV 0.10, PDFF 100%), in air.
{n_echoes} echoes, TE = {echo_ms} ms, {voxel} mm isotropic, {shape} voxels, B0 3 T along the leg,
9-peak marrow fat spectrum (Ren et al. 2008), SNR {snr}. Ground truth (susceptibility, PDFF,
water/fat, R2*, fields, BV/TV) in derivatives/groundtruth. Process with
`qsmprep bids_examples/body_leg out participant --preset body`.
"""


def make_body_leg(out: Path) -> Path:
    """``body_leg``: the water-fat leg phantom, 6 echoes, 2 mm (bundled, < 3 MB)."""
    from qsmprep.simulate.body import leg_dataset
    from qsmprep.datasets.body import leg_affine, write_body_dataset

    echo_times = tuple(round(1.25e-3 + 0.9e-3 * n, 6) for n in range(6))
    voxel, snr = (2.0, 2.0, 2.0), 100.0
    simulation, body = leg_dataset(voxel_size=voxel, fov_mm=(128.0, 128.0, 48.0),
                                   echo_times=echo_times, snr=snr, seed=7)
    shape = body.phantom.shape
    readme = README_LEG.format(
        n_echoes=len(echo_times), echo_ms=", ".join(f"{1e3 * t:.2f}" for t in echo_times),
        voxel=voxel[0], shape="x".join(map(str, shape)), snr=int(snr))
    return write_body_dataset(out / "body_leg", simulation, body, leg_affine(shape, voxel),
                              readme=readme, overwrite=True, fat_model="ren_marrow")


DATASETS = {"brain_megre": make_brain_megre, "brain_sessions": make_brain_sessions,
            "body_leg": make_body_leg,
            "vertebra_study": make_vertebra_study}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]
                        / "bids_examples", help="output folder")
    parser.add_argument("--only", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS),
                        help="datasets to (re)generate")
    parser.add_argument("--session-subjects", type=int, choices=(1, 2), default=1,
                        help="subjects in brain_sessions (the committed examples use 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        start = time.perf_counter()
        if name == "brain_sessions":
            path = make_brain_sessions(args.out, args.session_subjects)
        else:
            path = DATASETS[name](args.out)
        LOGGER.info("%s: %s in %.1f s", name, path, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
