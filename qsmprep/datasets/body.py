"""Write a simulated water-fat body acquisition as BIDS, with water-fat ground truth.

Reuses :func:`qsmprep.datasets.bids.write_bids_dataset` for the raw echoes and the standard
ground truth (``Chimap`` over the tissue, labels, R2*, S0, total/local field maps) and adds,
in ``derivatives/groundtruth/sub-<s>/anat``::

    <entities>_PDFFmap.nii.gz           proton-density fat fraction (%)
    <entities>_desc-water_M0map.nii.gz  water proton density (raw magnitude units)
    <entities>_desc-fat_M0map.nii.gz    fat proton density (raw magnitude units)
    <entities>_desc-bvtv_mask.nii.gz    trabecular bone volume fraction x 1000 (int16)

and per-label properties (chi ppm, PDFF %, BV/TV, R2* 1/s) as extra columns of the
``_desc-phantom_dseg.tsv``. The sidecars state the fat model and B0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from qsmprep.datasets.bids import (
    RunSpec,
    SubjectSpec,
    _magnitude_gain,
    entity_prefix,
    quantize_int16,
    save_nifti,
    write_bids_dataset,
    write_json,
    write_tsv,
)
from qsmprep.recon import waterfat
from qsmprep.simulate.body import BodyPhantom
from qsmprep.simulate.signal import GreSimulation

BODY_TRUTH_README = """\
Ground truth of the simulated water-fat body acquisition (qsmprep.simulate.body).

- anat/*_Chimap.nii.gz: susceptibility (ppm, relative to water/muscle = 0) in the tissue
  (cortical bone included, 0 in air).
- anat/*_desc-brain_mask.nii.gz: the tissue mask of the phantom (named as the generic writer
  names it; for this body phantom it is the whole leg in the field of view).
- anat/*_desc-phantom_dseg.nii.gz + .tsv: labels 12 subcutaneous fat, 13 cortical bone,
  14 air, 15 muscle, 21-23 tibial marrow regions (distal, middle, proximal thirds of the
  field of view), 24 fibular marrow; the .tsv lists chi (ppm), PDFF (%), BV/TV and R2* (1/s).
- anat/*_PDFFmap.nii.gz (%), *_desc-water_M0map / *_desc-fat_M0map (raw magnitude units),
  anat/*_R2starmap.nii.gz (1/s), anat/*_S0map.nii.gz (water + fat).
- fmap/*_desc-total_fieldmap.nii.gz: total field (Hz) where tissue gives signal (air and
  cortical bone excluded): the field map a water-fat separation must recover.
- fmap/*_desc-local_fieldmap.nii.gz: field (Hz) of the tissue susceptibility (not demeaned).
Signal: s_n = exp(i phi0) (W + F c_n) exp((-R2* + i 2 pi f) TE_n) + complex Gaussian noise,
c_n the fat spectrum named in the sidecars; phase grows as +2 pi f t.
"""


def write_body_dataset(
    root: str | Path,
    simulation: GreSimulation,
    body: BodyPhantom,
    affine: np.ndarray,
    *,
    subject: str = "01",
    fat_model: str = "ren_marrow",
    name: str = "qsmprep simulated leg (water-fat)",
    readme: str = "",
    background_margin_mm: float | None = 6.0,
    overwrite: bool = False,
    acquisition_metadata: dict | None = None,
) -> Path:
    """Write one water-fat body acquisition (``subject``) as a BIDS dataset at ``root``."""
    root = write_bids_dataset(
        root, [SubjectSpec(subject, [RunSpec(body.phantom, simulation, affine)])],
        name=name, readme=readme or BODY_TRUTH_README, background_margin_mm=background_margin_mm,
        overwrite=overwrite, acquisition_metadata={
            "BodyPart": "LEG", "PulseSequenceType": "Multi-echo gradient echo (water-fat)",
            **(acquisition_metadata or {}),
        },
    )
    truth = root / "derivatives" / "groundtruth"
    (truth / "README").write_text(BODY_TRUTH_README)
    (truth / ".bidsignore").write_text("*_PDFFmap.*\n")
    prefix = entity_prefix(subject, None, None, None)
    anat = truth / f"sub-{subject}" / "anat"
    model = waterfat.get_fat_model(fat_model)
    # the truth sidecars written for the raw data name its sources
    s0_sidecar = json.loads((anat / f"{prefix}_S0map.json").read_text())
    gain = _magnitude_gain(simulation, "int16", 2.0)  # the writer's raw magnitude scale
    common = {
        "FatModel": model.name, "FatPeaksPpm": list(model.ppm),
        "FatPeakAmplitudes": [round(a, 6) for a in model.amplitude],
        "SimulatedB0": simulation.b0_tesla, "Sources": s0_sidecar.get("Sources", []),
    }
    tissue = body.phantom.labels != 14
    for path, values, step, sidecar in (
        (anat / f"{prefix}_PDFFmap.nii.gz", body.pdff * tissue, 0.01,
         {"Description": "True proton-density fat fraction (%)", "Units": "percent"}),
        (anat / f"{prefix}_desc-water_M0map.nii.gz", body.water * gain, 0.5,
         {"Description": "True water proton density (raw magnitude units)",
          "Units": "arbitrary", "SkullStripped": False}),
        (anat / f"{prefix}_desc-fat_M0map.nii.gz", body.fat * gain, 0.5,
         {"Description": "True fat proton density (raw magnitude units)",
          "Units": "arbitrary", "SkullStripped": False}),
    ):
        ints, slope = quantize_int16(np.asarray(values, np.float32), step)
        save_nifti(path, ints, affine, slope=slope)
        write_json(path.with_name(path.name.replace(".nii.gz", ".json")),
                   {**sidecar, **common, "QuantizationStep": slope})
    bvtv = np.round(body.bvtv * 1000).astype(np.int16)
    save_nifti(anat / f"{prefix}_desc-bvtv_mask.nii.gz", bvtv, affine)
    write_json(anat / f"{prefix}_desc-bvtv_mask.json", {
        "Description": "Trabecular bone volume fraction BV/TV x 1000 (cortical bone 1000)",
        "Sources": common["Sources"],
    })
    rows = []
    for label, label_name in sorted(body.phantom.label_names.items()):
        props = body.regions.get(label, {})
        rows.append([label, label_name, *(round(props.get(k, 0.0), 6)
                                          for k in ("chi", "pdff", "bvtv", "r2star"))])
    write_tsv(anat / f"{prefix}_desc-phantom_dseg.tsv",
              ["index", "name", "chi_ppm", "pdff_percent", "bvtv", "r2star_per_s"], rows)
    return root


def leg_affine(shape: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """Axial leg slab: voxel axes = scanner axes (B0 along the leg, z), centred grid."""
    from qsmprep.simulate.signal import oblique_affine

    affine, _ = oblique_affine(voxel_size, (0.0, 0.0, 0.0), shape=shape)
    return affine
