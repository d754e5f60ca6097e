"""ROI statistics of the written maps (core: :mod:`qsmprep.analysis.roi`) and their sink."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nb
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from qsmprep.analysis import roi as roi_core
from qsmprep.bids import atomic_write_text, derivative_path, filename_entities

LOGGER = logging.getLogger("qsmprep")

#: Columns of the per-acquisition ROI table and their data dictionary.
COLUMNS = {
    "participant_id": "Participant (sub-<label>)",
    "session": "Session label (n/a: none)",
    "acquisition": "Acquisition label (n/a: none)",
    "run": "Run index (n/a: none)",
    "scan": "The acquisition within the participant: its entities without sub (n/a: none)",
    "map": "Map suffix (Chimap, R2starmap, PDFFmap, ...)",
    "map_desc": "desc entity of the map (e.g. lambda0p0002 for a --lambda-sweep map; n/a)",
    "units": "Unit of the map and of the statistics mean ... p95",
    "rater": "Observer who drew the ROI (the ROI file's desc entity; n/a: none)",
    "roi": "ROI name (dseg .tsv name, or the mask's label entity)",
    "roi_index": "Label index of the ROI in its image",
    "roi_source": "ROI image the statistics come from",
    "roi_mapping": "native: drawn on this acquisition's grid; resampled: same acquisition, "
                   "other grid; transferred: drawn on another acquisition of the participant "
                   "(nearest neighbour through the affines, no registration)",
    "roi_voxels": "Voxels of the ROI on the map grid",
    "n_voxels": "Voxels used: ROI inside the map's valid mask (QSM mask for Chimap, brain "
                "mask otherwise) with a finite value",
    "volume_mm3": "Volume of the voxels used (mm3)",
    "mean": "Mean", "sd": "Sample standard deviation (ddof 1)", "median": "Median",
    "min": "Minimum", "max": "Maximum",
    "p5": "5th percentile (linear interpolation)", "p95": "95th percentile",
    "cv": "Coefficient of variation SD/|mean| (ratio)",
}


class _ROIStatsInputSpec(BaseInterfaceInputSpec):
    in_maps = InputMultiObject(File(exists=True), mandatory=True,
                               desc="written map derivatives (*map.nii.gz with sidecars)")
    rois = traits.List(traits.Dict, mandatory=True,
                       desc="ROI sources (qsmprep.study_io.ROISource.as_dict())")
    qsm_mask = File(exists=True, desc="mask where Chimap is valid")
    brain_mask = File(exists=True, desc="mask where the other maps are valid")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the acquisition")
    scan = traits.Str(mandatory=True, desc="acquisition label within the participant")


class _ROIStatsOutputSpec(TraitedSpec):
    out_tsv = File(exists=True, desc="tidy table: one row per map x ROI x rater")
    out_json = File(exists=True, desc="data dictionary of the table")


def _map_name(path: str) -> tuple[str, str]:
    stem = Path(path).name.split(".")[0]
    return stem.rsplit("_", 1)[-1], filename_entities(path).get("desc", "n/a")


class ROIStats(SimpleInterface):
    """Statistics of every map in every ROI of every rater (one tidy TSV)."""

    input_spec = _ROIStatsInputSpec
    output_spec = _ROIStatsOutputSpec

    def _run_interface(self, runtime):
        import pandas as pd

        inputs = self.inputs
        maps = []
        for path in inputs.in_maps:
            image = nb.load(path)
            sidecar = Path(path).with_name(Path(path).name.split(".")[0] + ".json")
            units = "n/a"
            if sidecar.exists():
                units = str(json.loads(sidecar.read_text()).get("Units", "n/a"))
            maps.append((path, image, units))
        reference = maps[0][1]
        masks = {}
        for name in ("qsm_mask", "brain_mask"):
            value = getattr(inputs, name)
            if value:
                masks[name] = np.asarray(nb.load(value).dataobj) > 0.5
        rows = []
        entities = inputs.entities
        for source in inputs.rois:
            labels, resampled = self._labels_on_grid(source, reference)
            names = {int(k): v for k, v in source["names"].items()}
            index = sorted(names) if names else sorted(int(i) for i in np.unique(labels) if i)
            mapping = source["mapping"]
            if mapping == "native" and resampled:
                mapping = "resampled"
            for path, image, units in maps:
                if image.shape[:3] != reference.shape[:3]:
                    raise ValueError(f"{path}: grid {image.shape} differs from the "
                                     f"acquisition's {reference.shape}.")
                suffix, desc = _map_name(path)
                valid = masks.get("qsm_mask" if suffix == "Chimap" else "brain_mask")
                values = np.asarray(image.dataobj, dtype=np.float32)
                if values.ndim != 3:
                    continue
                stats = roi_core.roi_statistics(
                    values, labels, index, valid=valid,
                    voxel_volume_mm3=roi_core.voxel_volume(image.affine))
                for position, label in enumerate(index):
                    rows.append({
                        "participant_id": f"sub-{entities['subject']}",
                        "session": entities.get("session", "n/a"),
                        "acquisition": entities.get("acquisition", "n/a"),
                        "run": entities.get("run", "n/a"),
                        "scan": inputs.scan, "map": suffix, "map_desc": desc, "units": units,
                        "rater": source["rater"], "roi": names.get(label, str(label)),
                        "roi_index": label, "roi_source": Path(source["path"]).name,
                        "roi_mapping": mapping,
                        **{key: float(stats[key][position]) for key in roi_core.STATISTICS},
                    })
        table = pd.DataFrame(rows, columns=list(COLUMNS))
        for column in ("roi_voxels", "n_voxels", "roi_index"):
            table[column] = table[column].astype("Int64")
        out_tsv = Path(runtime.cwd) / "rois_stats.tsv"
        table.to_csv(out_tsv, sep="\t", index=False, na_rep="n/a", float_format="%.7g")
        out_json = Path(runtime.cwd) / "rois_stats.json"
        out_json.write_text(json.dumps({k: {"Description": v} for k, v in COLUMNS.items()},
                                       indent=2))
        self._results["out_tsv"] = str(out_tsv)
        self._results["out_json"] = str(out_json)
        return runtime

    @staticmethod
    def _labels_on_grid(source: dict, reference: nb.Nifti1Image) -> tuple[np.ndarray, bool]:
        """The ROI labels on the maps' grid, and whether they had to be resampled."""
        path = source["path"]
        try:
            image = nb.load(path)
        except Exception as error:  # nibabel raises several types
            raise ValueError(f"ROI image {path} cannot be read ({error}).") from None
        data = np.asarray(image.dataobj)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise ValueError(f"ROI image {path} is {data.ndim}D; ROIs must be 3D label images "
                             "or masks.")
        if source["kind"] == "mask":
            data = (data > 0.5).astype(np.uint8)
        else:
            rounded = np.rint(data)
            if not np.allclose(rounded, data):
                raise ValueError(f"ROI image {path} holds non-integer values; a dseg must hold "
                                 "integer labels.")
            data = rounded.astype(np.int32)
        if roi_core.same_grid(image.affine, data.shape, reference.affine, reference.shape):
            return data, False
        out = roi_core.resample_labels(data, image.affine, reference.affine, reference.shape)
        before, after = np.count_nonzero(data), np.count_nonzero(out)
        if before and not after:
            raise ValueError(
                f"the ROIs of {path} fall outside the field of view of the maps (grid "
                f"{reference.shape[:3]}); they cannot be matched. ROIs must be drawn in the "
                "same scanner space as the acquisition (the same participant and session, or "
                "a repeat scan without repositioning); register them first otherwise.")
        voxel_ratio = roi_core.voxel_volume(image.affine) / roi_core.voxel_volume(
            reference.affine)
        kept = after / (before * voxel_ratio) if before else 1.0
        if kept < 0.9:
            LOGGER.warning("%s: only %.0f%% of the ROI volume lies in the maps' field of view.",
                           path, 100 * kept)
        return out, True


class _TableSinkInputSpec(BaseInterfaceInputSpec):
    base_directory = traits.Directory(mandatory=True, desc="derivatives dataset root")
    in_tsv = File(exists=True, mandatory=True, desc="table to write")
    in_json = File(exists=True, desc="its data dictionary")
    entities = traits.Dict(mandatory=True, desc="BIDS entities (long names)")
    suffix = traits.Str("stats", usedefault=True, desc="BIDS-like suffix")
    desc = traits.Str("rois", usedefault=True, desc="desc entity")


class _TableSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="written table")


class DerivativesTableSink(SimpleInterface):
    """Write a TSV (and its JSON dictionary) under a BIDS-like derivative name, atomically."""

    input_spec = _TableSinkInputSpec
    output_spec = _TableSinkOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        relative = derivative_path(inputs.entities, inputs.suffix, desc=inputs.desc or None,
                                   extension=".tsv")
        out_file = Path(inputs.base_directory) / relative
        atomic_write_text(out_file, Path(inputs.in_tsv).read_text())
        if inputs.in_json:
            atomic_write_text(out_file.with_suffix(".json"), Path(inputs.in_json).read_text())
        self._results["out_file"] = str(out_file)
        return runtime
