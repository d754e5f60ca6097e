"""Write simulated multi-echo GRE acquisitions as a BIDS raw dataset with ground truth.

Layout (``[...]`` optional entities)::

    <root>/dataset_description.json, README, participants.tsv/.json, MEGRE.json
    <root>/sub-<s>/[ses-<t>/]anat/<entities>_echo-<n>_part-{mag,phase}_MEGRE.nii.gz (+ .json)
        with <entities> = sub-<s>[_ses-<t>][_acq-<a>][_run-<r>]
    <root>/derivatives/groundtruth/dataset_description.json, README
        sub-<s>/[ses-<t>/]anat/<entities>_Chimap.nii.gz           chi (ppm) in the brain mask
                              <entities>_desc-brain_mask.nii.gz
                              <entities>_desc-phantom_dseg.nii.gz (+ _dseg.tsv: index, name)
                              <entities>_R2starmap.nii.gz         R2* (1/s) in the head
                              <entities>_S0map.nii.gz             m0 in the raw magnitude units
        sub-<s>/[ses-<t>/]fmap/<entities>_desc-total_fieldmap.nii.gz  total field (Hz) in tissue
                              <entities>_desc-local_fieldmap.nii.gz  local field (Hz) in the mask
                              <entities>_desc-{total,local}_magnitude.nii.gz  (region, 0/1)

Sidecar inheritance: metadata shared by every acquisition (field strength, imaging
frequency, vendor, TR, flip angle, ...) go to the top-level ``MEGRE.json``; each echo's
sidecar holds ``EchoTime`` (s) and, for phase, ``Units``.  Images are gzip-compressed with
``mtime = 0`` so fixed seeds give identical bytes.  The affine (sform and qform, code 1)
encodes the acquisition orientation: ``dipole.b0_direction_from_affine`` recovers the
simulated B0 direction.

Storage: magnitude int16 (scaled so the noise standard deviation is ``magnitude_noise_units``
integer units; all echoes of a run share the scale) or float32; phase ``"arbitrary"`` =
int16 in [-4096, 4095] for (-pi, pi] (Siemens-like, ``Units: arbitrary``), ``"rad"`` = int16
with ``scl_slope = pi/4096`` (reads as rad, ``Units: rad``) or ``"rad-float32"``.  Ground
truth maps are int16 with a NIfTI ``scl_slope`` (steps of :data:`TRUTH_STEPS`: 1e-4 ppm,
0.01 Hz local / 0.05 Hz total field, 0.1 1/s, 0.5 magnitude units; coarser only where the
range needs it; stated in each sidecar as ``QuantizationStep``) or float32 with
``truth_dtype="float32"``.  With ``background_margin_mm`` the raw images are 0 beyond that
distance from the head (background suppression; the noise in air is incompressible).
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage

from qsmprep import __version__
from qsmprep.simulate.phantom import HeadPhantom
from qsmprep.simulate.signal import GreSimulation

LOGGER = logging.getLogger("qsmprep")

BIDS_VERSION = "1.10.0"
PHASE_INT_MAX = 4096
PhaseStorage = Literal["arbitrary", "rad", "rad-float32"]


@dataclass
class RunSpec:
    """One acquisition (one subject/session/run): phantom, simulation and orientation.

    ``affine`` is the 4x4 voxel-to-scanner matrix (mm) of the acquisition; ``metadata`` adds
    or overrides sidecar fields of this run (e.g. ``{"FlipAngle": 12}``).
    """

    phantom: HeadPhantom
    simulation: GreSimulation
    affine: np.ndarray
    session: str | None = None
    run: int | None = None
    acquisition: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class SubjectSpec:
    """A participant: BIDS label (without ``sub-``), its runs, participants.tsv columns."""

    label: str
    runs: list[RunSpec]
    participant: dict = field(default_factory=dict)


DEFAULT_ACQUISITION = {
    "Manufacturer": "Siemens",
    "ManufacturersModelName": "qsmprep numerical simulation",
    "PulseSequenceType": "Multi-echo gradient echo",
    "ScanningSequence": "GR",
    "MRAcquisitionType": "3D",
    "FlipAngle": 15,
    "RepetitionTime": 0.04,
}


# ----------------------------------------------------------------------------- file helpers

def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_json(path: Path, content: dict) -> None:
    """Write ``content`` as indented JSON with a trailing newline."""
    _write_bytes(path, (json.dumps(content, indent=2) + "\n").encode())


def write_tsv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """Write a tab-separated table (``n/a`` for None)."""
    lines = ["\t".join(header)]
    for row in rows:
        lines.append("\t".join("n/a" if v is None else str(v) for v in row))
    _write_bytes(path, ("\n".join(lines) + "\n").encode())


def save_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    slope: float | None = None,
) -> None:
    """Save ``data`` as gzipped NIfTI-1 with deterministic bytes (gzip mtime 0).

    ``data`` is written in its own dtype; ``slope`` sets ``scl_slope`` (intercept 0) so the
    stored integers read back as ``data * slope``.  sform and qform carry ``affine`` (code 1).
    """
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float))
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if slope is not None:
        img.header.set_slope_inter(float(slope), 0.0)
    raw = img.to_bytes()
    _write_bytes(path, gzip.compress(raw, compresslevel=9, mtime=0))


def quantize_int16(
    values: np.ndarray, step: float | None = None, *, max_code: int = 30000
) -> tuple[np.ndarray, float]:
    """Integers and slope with ``values ~= ints * slope``.

    The slope is ``step`` unless ``max|values| / max_code`` is larger (then that, rounded up
    to 3 significant digits), so the integers always fit int16.
    """
    vmax = float(np.max(np.abs(values))) if values.size else 0.0
    needed = vmax / max_code
    if step is None or step < needed:
        step = float(f"{needed:.3g}")
        if step < needed:
            step = float(f"{needed * 1.001:.3g}")
    if step <= 0:
        step = 1.0
    ints = np.clip(np.round(values / step), -32768, 32767).astype(np.int16)
    return ints, float(step)


def encode_phase(phase: np.ndarray, storage: PhaseStorage) -> tuple[np.ndarray, float | None, str]:
    """Stored array, NIfTI slope and ``Units`` for wrapped phase (rad) in ``storage`` mode."""
    if storage == "rad-float32":
        return phase.astype(np.float32), None, "rad"
    ints = np.clip(np.round(phase * (PHASE_INT_MAX / np.pi)), -PHASE_INT_MAX, PHASE_INT_MAX - 1)
    ints = ints.astype(np.int16)
    if storage == "arbitrary":
        return ints, None, "arbitrary"
    if storage == "rad":
        return ints, np.pi / PHASE_INT_MAX, "rad"
    raise ValueError(f"phase storage must be 'arbitrary', 'rad' or 'rad-float32', got {storage!r}")


def entity_prefix(subject: str, session: str | None, acquisition: str | None,
                  run: int | None) -> str:
    """``sub-<s>[_ses-<t>][_acq-<a>][_run-<r>]``."""
    parts = [f"sub-{subject}"]
    if session:
        parts.append(f"ses-{session}")
    if acquisition:
        parts.append(f"acq-{acquisition}")
    if run is not None:
        parts.append(f"run-{run}")
    return "_".join(parts)


def _check_label(label: str, what: str) -> None:
    if not label or not label.isalnum():
        raise ValueError(f"{what} label must be alphanumeric, got {label!r}")


def _round(value: float, digits: int = 6) -> float:
    return float(f"{value:.{digits}g}")


def _run_metadata(spec: RunSpec, acquisition_metadata: dict) -> dict:
    sim = spec.simulation
    meta = dict(acquisition_metadata)
    meta.setdefault("MagneticFieldStrength", float(round(sim.b0_tesla, 1)))
    meta.setdefault("ImagingFrequency", _round(sim.imaging_frequency_mhz, 7))
    meta.update(spec.metadata)
    return meta


# ----------------------------------------------------------------------------- writer

def write_bids_dataset(
    root: str | Path,
    subjects: Sequence[SubjectSpec],
    *,
    name: str,
    readme: str,
    phase_storage: PhaseStorage = "arbitrary",
    magnitude_dtype: Literal["int16", "float32"] = "int16",
    magnitude_noise_units: float = 2.0,
    truth_dtype: Literal["int16", "float32"] = "int16",
    acquisition_metadata: dict | None = None,
    license: str = "CC0",
    authors: Sequence[str] = ("qsmprep developers",),
    participants_json: dict | None = None,
    groundtruth: bool = True,
    background_margin_mm: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``subjects`` as a BIDS raw dataset at ``root`` (+ ground truth derivatives).

    ``acquisition_metadata`` overrides :data:`DEFAULT_ACQUISITION` (sidecar fields such as
    ``FlipAngle``, ``RepetitionTime`` in s); ``MagneticFieldStrength`` (nominal, T) and
    ``ImagingFrequency`` (MHz, from the simulated B0) are added per run unless given.
    ``participants_json`` describes extra participants.tsv columns.  With
    ``background_margin_mm`` magnitude and phase are set to 0 farther than that (mm) from
    the head (background suppression: noise only in a band around the head, much smaller
    files; None keeps the noise everywhere).  Ground truth of runs that share phantom,
    orientation and fields (repeated runs of a session) is written once, without the
    ``run`` entity.  With ``overwrite`` an existing ``root`` is removed first; otherwise it
    must not exist or be empty.  Returns ``root``.
    """
    root = Path(root)
    if not subjects:
        raise ValueError("subjects is empty")
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise ValueError(f"{root} exists and is not empty (pass overwrite=True)")
    if phase_storage not in ("arbitrary", "rad", "rad-float32"):
        raise ValueError(
            f"phase storage must be 'arbitrary', 'rad' or 'rad-float32', got {phase_storage!r}")
    if magnitude_dtype not in ("int16", "float32"):
        raise ValueError(f"magnitude_dtype must be 'int16' or 'float32', got {magnitude_dtype!r}")
    if truth_dtype not in ("int16", "float32"):
        raise ValueError(f"truth_dtype must be 'int16' or 'float32', got {truth_dtype!r}")
    if magnitude_noise_units <= 0:
        raise ValueError("magnitude_noise_units must be positive")
    if background_margin_mm is not None and background_margin_mm < 0:
        raise ValueError(f"background_margin_mm must be >= 0, got {background_margin_mm!r}")
    labels_seen = set()
    for subject in subjects:
        _check_label(subject.label, "subject")
        if subject.label in labels_seen:
            raise ValueError(f"duplicate subject {subject.label!r}")
        labels_seen.add(subject.label)
        if not subject.runs:
            raise ValueError(f"subject {subject.label!r} has no runs")
        keys = set()
        for spec in subject.runs:
            for lab, what in ((spec.session, "session"), (spec.acquisition, "acquisition")):
                if lab is not None:
                    _check_label(lab, what)
            key = (spec.session, spec.acquisition, spec.run)
            if key in keys:
                raise ValueError(f"subject {subject.label!r}: duplicate run {key}")
            keys.add(key)
            if spec.simulation.magnitude.shape[:3] != spec.phantom.shape:
                raise ValueError("simulation and phantom grids differ")
            if np.asarray(spec.affine).shape != (4, 4):
                raise ValueError("affine must be 4x4")
    sessions_used = {spec.session is not None for s in subjects for spec in s.runs}
    if len(sessions_used) > 1:
        raise ValueError("either every run or none has a session label")
    if root.exists() and any(root.iterdir()):
        shutil.rmtree(root)  # overwrite=True, arguments checked

    acq_meta = dict(DEFAULT_ACQUISITION)
    acq_meta.update(acquisition_metadata or {})
    run_meta = [_run_metadata(spec, acq_meta) for s in subjects for spec in s.runs]
    # fields identical in every run are inherited from the top-level MEGRE.json
    shared = {
        k: v for k, v in run_meta[0].items()
        if all(k in m and m[k] == v for m in run_meta)
    }

    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "dataset_description.json", {
        "Name": name,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": license,
        "Authors": list(authors),
        "GeneratedBy": [{
            "Name": "qsmprep.simulate",
            "Version": __version__,
            "Description": "Numerical head phantom and multi-echo GRE forward simulation",
        }],
    })
    _write_bytes(root / "README", (readme.rstrip() + "\n").encode())
    write_json(root / "MEGRE.json", shared)
    columns = sorted({k for s in subjects for k in s.participant})
    write_tsv(root / "participants.tsv", ["participant_id"] + columns,
              [[f"sub-{s.label}"] + [s.participant.get(c) for c in columns] for s in subjects])
    pjson = {"participant_id": {"Description": "Participant identifier"}}
    pjson.update(participants_json or {})
    write_json(root / "participants.json", pjson)

    truth_root = root / "derivatives" / "groundtruth"
    if groundtruth:
        write_json(truth_root / "dataset_description.json", {
            "Name": f"{name}: simulation ground truth",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{
                "Name": "qsmprep.simulate",
                "Version": __version__,
                "Description": "Phantom susceptibility, fields and relaxation used to "
                               "simulate the raw data",
            }],
            "SourceDatasets": [{"URL": "../../"}],
            "DatasetLinks": {"raw": "../../"},
        })
        _write_bytes(truth_root / "README", (GROUNDTRUTH_README.rstrip() + "\n").encode())

    for subject in subjects:
        gains = []
        for spec in subject.runs:
            gains.append(_write_raw_run(
                root, subject, spec, _run_metadata(spec, acq_meta), shared,
                phase_storage=phase_storage, magnitude_dtype=magnitude_dtype,
                magnitude_noise_units=magnitude_noise_units,
                background_margin_mm=background_margin_mm,
            ))
        if groundtruth:
            for group in _truth_groups(list(zip(subject.runs, gains))):
                _write_truth(truth_root, subject, group, _run_metadata(group[0][0], acq_meta),
                             truth_dtype=truth_dtype)
    LOGGER.info("wrote BIDS dataset %s (%d subjects)", root, len(subjects))
    return root


def _magnitude_gain(sim: GreSimulation, magnitude_dtype: str, noise_units: float) -> float:
    """Scale from simulated magnitude to stored values (noise sigma -> ``noise_units``)."""
    if magnitude_dtype != "int16":
        return 1.0
    peak = max(float(sim.magnitude.max()), 1e-12)
    gain = noise_units / sim.noise_sigma if sim.noise_sigma > 0 else 1000.0 / peak
    return float(f"{min(gain, 32000.0 / peak):.4g}")


def _rel_dir(subject: SubjectSpec, spec: RunSpec) -> Path:
    return Path(f"sub-{subject.label}") / (f"ses-{spec.session}" if spec.session else "")


def _write_raw_run(root: Path, subject: SubjectSpec, spec: RunSpec, meta: dict, shared: dict,
                   *, phase_storage, magnitude_dtype, magnitude_noise_units,
                   background_margin_mm) -> float:
    sim, phantom = spec.simulation, spec.phantom
    affine = np.asarray(spec.affine, dtype=float)
    prefix = entity_prefix(subject.label, spec.session, spec.acquisition, spec.run)
    anat = root / _rel_dir(subject, spec) / "anat"
    own = {k: v for k, v in meta.items() if k not in shared}
    gain = _magnitude_gain(sim, magnitude_dtype, magnitude_noise_units)
    support = None
    if background_margin_mm is not None:
        distance = ndimage.distance_transform_edt(phantom.labels == 14,
                                                  sampling=phantom.voxel_size)
        support = distance <= background_margin_mm
    for n, te in enumerate(sim.echo_times, start=1):
        stem = f"{prefix}_echo-{n}"
        mag = sim.magnitude[..., n - 1] * gain
        phase = sim.phase[..., n - 1]
        if support is not None:
            mag = np.where(support, mag, 0.0)
            phase = np.where(support, phase, 0.0)
        if magnitude_dtype == "int16":
            mag = np.clip(np.round(mag), 0, 32767).astype(np.int16)
        else:
            mag = mag.astype(np.float32)
        save_nifti(anat / f"{stem}_part-mag_MEGRE.nii.gz", mag, affine)
        write_json(anat / f"{stem}_part-mag_MEGRE.json", {**own, "EchoTime": _round(te)})
        data, slope, units = encode_phase(phase, phase_storage)
        save_nifti(anat / f"{stem}_part-phase_MEGRE.nii.gz", data, affine, slope=slope)
        write_json(anat / f"{stem}_part-phase_MEGRE.json",
                   {**own, "EchoTime": _round(te), "Units": units})
    return gain


def _same_truth(first: tuple[RunSpec, float], other: tuple[RunSpec, float]) -> bool:
    (a, gain_a), (b, gain_b) = first, other
    sa, sb = a.simulation, b.simulation
    return (
        gain_a == gain_b
        and a.phantom is b.phantom
        and np.allclose(a.affine, b.affine)
        and sa.b0_tesla == sb.b0_tesla
        and sa.phase_sign == sb.phase_sign
        and np.array_equal(sa.echo_times, sb.echo_times)
        and np.array_equal(sa.total_field_ppm, sb.total_field_ppm)
    )


def _truth_groups(runs: Sequence[tuple[RunSpec, float]]) -> list[list[tuple[RunSpec, float]]]:
    """(run, gain) pairs of one session/acquisition sharing phantom, orientation, fields and
    magnitude scale are grouped (one ground truth); others stay single."""
    groups: dict[tuple, list[tuple[RunSpec, float]]] = {}
    for item in runs:
        groups.setdefault((item[0].session, item[0].acquisition), []).append(item)
    out = []
    for members in groups.values():
        if len(members) > 1 and all(_same_truth(members[0], m) for m in members[1:]):
            out.append(members)
        else:
            out.extend([m] for m in members)
    return out


#: quantisation steps of the ground-truth maps (int16 storage)
TRUTH_STEPS = {"chi": 1e-4, "local": 0.01, "total": 0.05, "r2star": 0.1, "s0": 0.5}


def _write_truth(truth_root: Path, subject: SubjectSpec, group: list[tuple[RunSpec, float]],
                 meta: dict, *, truth_dtype: str) -> None:
    first, gain = group[0]
    sim, phantom = first.simulation, first.phantom
    affine = np.asarray(first.affine, dtype=float)
    run = first.run if len(group) == 1 else None
    prefix = entity_prefix(subject.label, first.session, first.acquisition, run)
    rel = _rel_dir(subject, first)
    t_anat = truth_root / rel / "anat"
    t_fmap = truth_root / rel / "fmap"
    mask = phantom.brain_mask
    head = phantom.labels != 14
    common = {
        "B0Direction": [round(float(v), 6) for v in sim.b0_direction],
        "MagneticFieldStrength": meta.get("MagneticFieldStrength"),
        "ImagingFrequency": meta.get("ImagingFrequency"),
        "SimulatedB0": _round(sim.b0_tesla),
    }
    sources = []
    for spec, _ in group:
        raw_prefix = entity_prefix(subject.label, spec.session, spec.acquisition, spec.run)
        sources += [f"bids:raw:{rel.as_posix()}/anat/{raw_prefix}_echo-{n}_part-{p}_MEGRE.nii.gz"
                    for n in range(1, sim.echo_times.size + 1) for p in ("mag", "phase")]

    def save_truth(path: Path, values: np.ndarray, step: float, sidecar: dict) -> None:
        values = np.asarray(values, dtype=np.float32)
        if truth_dtype == "int16":
            ints, slope = quantize_int16(values, step)
            save_nifti(path, ints, affine, slope=slope)
            sidecar = {**sidecar, "QuantizationStep": slope}
        else:
            save_nifti(path, values, affine)
        write_json(path.with_name(path.name.replace(".nii.gz", ".json")), sidecar)

    save_truth(t_anat / f"{prefix}_Chimap.nii.gz", phantom.chi_ppm * mask, TRUTH_STEPS["chi"], {
        "Description": "True susceptibility inside the brain mask (0 outside)",
        "Units": "ppm",
        "SkullStripped": True,
        "ReferenceRegion": "none (relative to water-like tissue; analytic phantom: CSF = 0)",
        "Sources": sources,
        **common,
    })
    save_nifti(t_anat / f"{prefix}_desc-brain_mask.nii.gz", mask.astype(np.uint8), affine)
    reference = {"Sources": sources, "SpatialReference": sources[0]}
    write_json(t_anat / f"{prefix}_desc-brain_mask.json", {
        "Type": "Brain",
        "Description": "Phantom brain mask; its boundary lies in CSF (no chi contrast across it)",
        **reference,
    })
    save_nifti(t_anat / f"{prefix}_desc-phantom_dseg.nii.gz", phantom.labels.astype(np.int16),
               affine)
    write_json(t_anat / f"{prefix}_desc-phantom_dseg.json", {
        "Description": "Phantom tissue labels (RC2 numbering; see the .tsv)", **reference,
    })
    write_tsv(t_anat / f"{prefix}_desc-phantom_dseg.tsv", ["index", "name"],
              [[i, n] for i, n in sorted(phantom.label_names.items())])
    save_truth(t_anat / f"{prefix}_R2starmap.nii.gz", phantom.r2star * head,
               TRUTH_STEPS["r2star"], {
                   "Description": "True R2* in the head (0 in air)", "Units": "1/s",
                   "SkullStripped": False, "Sources": sources,
               })
    s0 = phantom.m0 * gain
    save_truth(t_anat / f"{prefix}_S0map.nii.gz", s0, TRUTH_STEPS["s0"], {
        "Description": "True magnitude at TE = 0 in the units of the raw magnitude images",
        "Units": "arbitrary", "SkullStripped": False, "Sources": sources,
    })
    signal = head & (phantom.m0 >= 0.1 * float(phantom.m0.max()))
    for desc, values, region, text in (
        ("total", sim.total_field_hz, signal,
         "Total field (local + background after shimming) where tissue gives signal "
         "(head without air and bone), 0 elsewhere"),
        ("local", sim.local_field_hz, mask,
         "Local field D*(chi x brain mask), not demeaned, inside the brain mask"),
    ):
        save_truth(t_fmap / f"{prefix}_desc-{desc}_fieldmap.nii.gz", values * region,
                   TRUTH_STEPS[desc], {
                       "Description": text, "Units": "Hz", "SkullStripped": desc == "local",
                       "PhaseSign": sim.phase_sign,
                       "EchoTime": [_round(t) for t in sim.echo_times],
                       "Sources": sources, **common,
                   })
        save_nifti(t_fmap / f"{prefix}_desc-{desc}_magnitude.nii.gz",
                   region.astype(np.uint8), affine)
        write_json(t_fmap / f"{prefix}_desc-{desc}_magnitude.json", {
            "Description": f"Region (1) where the {desc} field map is defined",
            "Units": "arbitrary", "SkullStripped": desc == "local", **reference,
        })


GROUNDTRUTH_README = """\
Ground truth of the simulated acquisitions (qsmprep.simulate).

Per acquisition (same entities as the raw echoes, same affine and grid; repeated runs of a
session that share phantom, orientation and fields have one truth without the run entity):
- anat/*_Chimap.nii.gz: susceptibility (ppm) inside the brain mask, 0 outside; analytic
  phantom: relative to CSF = 0 (RC2 phantom: relative to water-like tissue, CSF 0.019).
- anat/*_desc-brain_mask.nii.gz: brain mask (its boundary lies in CSF).
- anat/*_desc-phantom_dseg.nii.gz + .tsv: tissue labels (RC2 numbering: 1 caudate,
  2 globus pallidus, 3 putamen, 4 red nucleus, 5 dentate, 6 substantia nigra, 7 thalamus,
  8 white matter, 9 gray matter, 10 CSF, 11 veins, 13 bone, 14 air, 15 soft tissue,
  16 calcification).
- anat/*_R2starmap.nii.gz (1/s), anat/*_S0map.nii.gz (raw magnitude units).
- fmap/*_desc-total_fieldmap.nii.gz: total field (Hz) = local + background, after a
  2nd-order solid-harmonic shim over the brain mask, where tissue gives signal (0 in air
  and bone); fmap/*_desc-{total,local}_magnitude.nii.gz mark the region (0/1).
- fmap/*_desc-local_fieldmap.nii.gz: local field (Hz) = D * (chi x mask), not demeaned,
  inside the brain mask; total - local is harmonic inside the mask.
Signal model: s_n = S0 exp(-R2* TE_n) exp(i (phi0 + 2 pi f TE_n)) + complex Gaussian noise;
phase sign +1 (phase grows as +2 pi f t). Field (Hz) = 42.57747892 MHz/T x B0 x field (ppm);
the simulated B0 (T) is the sidecar's SimulatedB0 and ImagingFrequency / 42.57747892.
Integer images carry a NIfTI scl_slope; the sidecar's QuantizationStep is that slope.
"""
