"""Tiny synthetic multi-echo GRE BIDS datasets (24^3 voxels) for fast CLI-level tests.

A sphere of "tissue" (radius 20 mm, 2 mm voxels) with two susceptibility inclusions, forward
simulated with :func:`qsmprep.recon.dipole.forward_field` and written with the BIDS writers of
:mod:`qsmprep.datasets.bids` (deterministic gzip bytes). :func:`add_participant` writes one
participant; :func:`clone_participant` copies it under another label (fast), so that a test
can give each participant its own defect and run them all in one ``qsmprep`` call.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from qsmprep.recon.dipole import forward_field, ppm_to_hz
from qsmprep.datasets.bids import encode_phase, save_nifti, write_json

SHAPE = (24, 24, 24)
VOXEL_MM = 2.0
ECHO_TIMES = (0.004, 0.010, 0.016)
B0_TESLA = 3.0
AFFINE = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
AFFINE[:3, 3] = -VOXEL_MM * (np.asarray(SHAPE) - 1) / 2


def signal(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude (int16-range float) and wrapped phase (rad), both [x, y, z, echo]."""
    rng = np.random.default_rng(seed)
    centre = (np.asarray(SHAPE) - 1) / 2
    grid = (np.indices(SHAPE).T - centre).T * VOXEL_MM  # mm, [3, x, y, z]
    radius = np.sqrt((grid ** 2).sum(0))
    tissue = radius < 20.0
    chi = np.zeros(SHAPE, np.float32)
    chi[np.sqrt(((grid.T - (6.0, 0, 0)).T ** 2).sum(0)) < 5.0] = 0.15
    chi[np.sqrt(((grid.T - (-6.0, 4.0, 2.0)).T ** 2).sum(0)) < 4.0] = -0.1
    field_hz = ppm_to_hz(forward_field(chi * tissue, (VOXEL_MM,) * 3, (0, 0, 1)), B0_TESLA)
    te = np.asarray(ECHO_TIMES, np.float32)
    magnitude = 800.0 * np.exp(-25.0 * te) * tissue[..., None].astype(np.float32)
    phase = 2 * np.pi * field_hz[..., None] * te + 0.3
    noise = 8.0 * (rng.standard_normal(magnitude.shape) + 1j * rng.standard_normal(magnitude.shape))
    complex_signal = magnitude * np.exp(1j * phase) + noise
    return np.abs(complex_signal).astype(np.float32), np.angle(complex_signal).astype(np.float32)


def new_dataset(root: Path) -> Path:
    """An empty BIDS dataset (description, README, top-level MEGRE.json with the field)."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "dataset_description.json",
               {"Name": "tiny", "BIDSVersion": "1.10.0", "DatasetType": "raw", "License": "CC0"})
    (root / "README").write_text("Tiny synthetic multi-echo GRE dataset for qsmprep tests.\n")
    write_json(root / "MEGRE.json", {"MagneticFieldStrength": B0_TESLA, "FlipAngle": 15,
                                     "RepetitionTime": 0.03})
    return root


def add_participant(root: Path, label: str, *, seed: int = 0) -> list[Path]:
    """Write ``sub-<label>`` (3 echoes, int16 magnitude, arbitrary-unit phase); its files."""
    magnitude, phase = signal(seed)
    anat = root / f"sub-{label}" / "anat"
    written = []
    for n, te in enumerate(ECHO_TIMES, start=1):
        stem = anat / f"sub-{label}_echo-{n}"
        mag = np.clip(np.round(magnitude[..., n - 1]), 0, 32767).astype(np.int16)
        save_nifti(Path(f"{stem}_part-mag_MEGRE.nii.gz"), mag, AFFINE)
        write_json(Path(f"{stem}_part-mag_MEGRE.json"), {"EchoTime": te})
        data, slope, units = encode_phase(phase[..., n - 1], "arbitrary")
        save_nifti(Path(f"{stem}_part-phase_MEGRE.nii.gz"), data, AFFINE, slope=slope)
        write_json(Path(f"{stem}_part-phase_MEGRE.json"), {"EchoTime": te, "Units": units})
        written += [Path(f"{stem}_part-{p}_MEGRE.{e}") for p in ("mag", "phase")
                    for e in ("nii.gz", "json")]
    return written


def clone_participant(root: Path, source: str, label: str) -> Path:
    """Copy ``sub-<source>`` to ``sub-<label>`` (renaming files); its anat folder."""
    target = root / f"sub-{label}"
    shutil.copytree(root / f"sub-{source}", target)
    for path in sorted(target.rglob(f"sub-{source}_*")):
        path.rename(path.with_name(path.name.replace(f"sub-{source}_", f"sub-{label}_", 1)))
    return target / "anat"


def edit_sidecar(path: Path, **changes) -> None:
    """Change (value) or delete (``None``) sidecar fields."""
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta, indent=2) + "\n")


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> hex digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def image_digests(out: Path, pattern: str = "*.nii.gz") -> dict[str, str]:
    """sha256 of the derivative images under ``out`` (the bytes, as written)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(out).rglob(pattern)) if "logs" not in p.parts}
