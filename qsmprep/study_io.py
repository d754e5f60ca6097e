"""BIDS side of the study analyses: ROI discovery, λ-sweep labels, and the tables the group
level reads (ROI statistics in the derivatives, the reference table, ``participants.tsv``).

ROIs are label images ``<entities>[_desc-<rater>]_dseg.nii[.gz]`` with a ``.tsv`` of
``index``/``name`` next to them, or binary masks
``<entities>_label-<roi>[_desc-<rater>]_mask.nii[.gz]``, in the input dataset's
``sub-*/[ses-*/]anat`` folders or in a derivatives folder (``--roi-dir``). The ``desc`` entity
names the rater (observer); without it the rater is ``n/a``. An acquisition uses the ROIs of
each rater drawn on it (same entities); for a rater who drew none on it, those the rater drew
on another acquisition of the same participant (same session first), brought onto the map's
grid through the affines at run time (``roi_mapping``: ``transferred``).
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from qsmprep.bids import OUTPUT_ENTITIES, SHORT_NAMES, Acquisition, filename_entities

LOGGER = logging.getLogger("qsmprep")

NO_RATER = "n/a"
ROI_TABLE_SUFFIX = "_desc-rois_stats.tsv"
#: columns a --reference-table must have (session is optional)
REFERENCE_COLUMNS = ("participant_id", "roi", "measure", "value", "unit")


class StudyInputError(Exception):
    """A study input (ROI file, reference table) cannot be used; the message says why."""

    def __init__(self, message: str, exit_code: int = 64):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class ROISource:
    """One ROI image: a ``dseg`` label image (``names``: index -> ROI name) or a mask."""

    path: str
    kind: str  # "dseg" or "mask"
    rater: str
    entities: dict[str, str]
    names: dict[int, str] = field(default_factory=dict)
    mapping: str = "native"  # "native" (drawn on this acquisition) or "transferred"

    def as_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "rater": self.rater,
                "names": {str(k): v for k, v in self.names.items()}, "mapping": self.mapping}


def lambda_label(value: float) -> str:
    """The ``desc`` label of a λ-sweep map: ``lambda`` + the decimal value with ``p`` for the
    point (2e-4 -> ``lambda0p0002``)."""
    value = float(value)
    if not value > 0 or not np.isfinite(value):
        raise ValueError(f"a regularisation weight must be positive, got {value!r}")
    text = np.format_float_positional(value, trim="-")
    return "lambda" + text.replace(".", "p")


def parse_lambda_label(label: str) -> float | None:
    """Inverse of :func:`lambda_label` (None when ``label`` is not a λ label)."""
    match = re.fullmatch(r"lambda(\d+(?:p\d+)?)", label or "")
    return float(match.group(1).replace("p", ".")) if match else None


def _read_names(tsv: Path) -> dict[int, str]:
    with open(tsv, newline="") as stream:
        reader = csv.DictReader(stream, delimiter="\t")
        if not reader.fieldnames or "index" not in reader.fieldnames or \
                "name" not in reader.fieldnames:
            raise StudyInputError(f"{tsv}: a dseg table needs the columns 'index' and 'name' "
                                  f"(found {reader.fieldnames}).")
        names = {}
        for row in reader:
            try:
                index = int(row["index"])
            except (TypeError, ValueError):
                raise StudyInputError(f"{tsv}: index {row['index']!r} is not an integer.") \
                    from None
            names[index] = str(row["name"]).strip()
    return {k: v for k, v in names.items() if k != 0}


def scan_roi_files(root: Path) -> list[ROISource]:
    """Every ROI image under ``root/sub-*/[ses-*/]anat``."""
    sources = []
    root = Path(root)
    for path in sorted(root.glob("sub-*/**/anat/*")):
        name = path.name
        if not (name.endswith(".nii.gz") or name.endswith(".nii")):
            continue
        stem = name.split(".")[0]
        suffix = stem.rsplit("_", 1)[-1]
        entities = filename_entities(path)
        rater = entities.pop("desc", NO_RATER)
        if suffix == "dseg":
            tsv = path.with_name(stem + ".tsv")
            if tsv.exists():
                names = _read_names(tsv)
            else:
                LOGGER.warning("%s has no %s: ROIs are named by their label index.", path,
                               tsv.name)
                names = {}
            sources.append(ROISource(str(path), "dseg", rater, entities, names))
        elif suffix == "mask" and "label" in entities:
            label = entities.pop("label")
            sources.append(ROISource(str(path), "mask", rater, entities, {1: label}))
    return sources


def _key(entities: dict[str, str]) -> tuple:
    return tuple((k, entities[k]) for k in OUTPUT_ENTITIES if k in entities)


def find_rois(
    acquisitions: Iterable[Acquisition], roots: Iterable[Path]
) -> dict[str, list[dict]]:
    """ROIs for every acquisition (by name) from the ``roots`` (input dataset, ``--roi-dir``).

    Returns ``{acquisition.name: [ROISource.as_dict(), ...]}``; acquisitions without any ROI
    of their participant are left out (and logged).
    """
    sources: list[ROISource] = []
    for root in roots:
        if root is not None and Path(root).is_dir():
            sources.extend(scan_roi_files(Path(root)))
    by_subject: dict[str, list[ROISource]] = {}
    for source in sources:
        subject = source.entities.get("subject")
        if subject:
            by_subject.setdefault(subject, []).append(source)
    found: dict[str, list[dict]] = {}
    for acquisition in acquisitions:
        own_key = _key(acquisition.output_entities)
        candidates = by_subject.get(acquisition.subject, [])
        if not candidates:
            continue
        chosen: list[ROISource] = []
        for rater in sorted({s.rater for s in candidates}):
            mine = [s for s in candidates if s.rater == rater]
            native = [s for s in mine if _key(s.entities) == own_key]
            if native:
                chosen.extend(native)
                continue
            session = acquisition.output_entities.get("session")
            others = sorted({_key(s.entities) for s in mine},
                            key=lambda k: (dict(k).get("session") != session, k))
            picked = [s for s in mine if _key(s.entities) == others[0]]
            for s in picked:
                chosen.append(ROISource(s.path, s.kind, s.rater, s.entities, s.names,
                                        mapping="transferred"))
            LOGGER.info("%s: %s's ROIs come from %s (mapped by the affines).",
                        acquisition.name, rater, Path(picked[0].path).name)
        found[acquisition.name] = [s.as_dict() for s in chosen]
    missing = [a.name for a in acquisitions if a.name not in found]
    if sources and missing:
        LOGGER.warning("no ROIs for %s.", ", ".join(missing))
    return found


def scan_label(entities: dict[str, str]) -> str:
    """Identifier of an acquisition within its participant, e.g. ``ses-1_run-2`` (``n/a``)."""
    parts = [f"{SHORT_NAMES.get(k, k)}-{v}" for k, v in entities.items()
             if k in OUTPUT_ENTITIES and k != "subject"]
    return "_".join(parts) or NO_RATER


# ----------------------------------------------------------------------------- group level

def read_tsv(path: Path):
    """A BIDS TSV as a DataFrame of strings/numbers (``n/a`` -> NaN)."""
    import pandas as pd

    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False,
                           dtype={"participant_id": str, "session": str, "run": str,
                                  "acquisition": str, "scan": str, "rater": str, "roi": str,
                                  "map_desc": str})
    except (OSError, ValueError) as error:
        raise StudyInputError(f"cannot read {path}: {error}") from None


def read_roi_tables(output_dir: Path):
    """All participant ROI tables under ``output_dir`` concatenated (tidy long table)."""
    import pandas as pd

    files = sorted(Path(output_dir).glob(f"sub-*/**/*{ROI_TABLE_SUFFIX}"))
    if not files:
        raise StudyInputError(
            f"no ROI statistics (*{ROI_TABLE_SUFFIX}) in {output_dir}: run the participant "
            "level with ROIs first (--roi-dir, or *_dseg / *_label-<roi>_mask images in the "
            "input dataset).", 66)
    frames = [read_tsv(path) for path in files]
    table = pd.concat(frames, ignore_index=True)
    for column in ("session", "acquisition", "run", "map_desc", "rater", "scan"):
        if column in table:
            table[column] = table[column].fillna(NO_RATER).astype(str)
    return table


def read_reference_table(path: Path):
    """The ``--reference-table``: participant_id, [session], roi, measure, value, unit."""
    import pandas as pd

    table = read_tsv(path)
    missing = [c for c in REFERENCE_COLUMNS if c not in table.columns]
    if missing:
        raise StudyInputError(
            f"{path}: the reference table lacks the column(s) {', '.join(missing)}; it needs "
            f"{', '.join(REFERENCE_COLUMNS)} (and optionally session), one row per "
            "participant x ROI x measure.")
    table["participant_id"] = table["participant_id"].astype(str).map(
        lambda s: s if s.startswith("sub-") else f"sub-{s}")
    values = pd.to_numeric(table["value"], errors="coerce")
    bad = table.loc[values.isna() & table["value"].notna(), "value"]
    if len(bad):
        raise StudyInputError(f"{path}: non-numeric values in 'value' (e.g. {bad.iloc[0]!r}); "
                              "write numbers, or n/a for a missing measurement.")
    table["value"] = values
    if "session" in table.columns:
        table["session"] = table["session"].fillna(NO_RATER).astype(str).str.removeprefix(
            "ses-")
    table["roi"] = table["roi"].fillna(NO_RATER).astype(str)
    duplicated = table.duplicated([c for c in ("participant_id", "session", "roi", "measure")
                                   if c in table.columns])
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise StudyInputError(f"{path}: more than one value for {row['participant_id']} / "
                              f"{row['roi']} / {row['measure']}.")
    return table


def read_participants(bids_dir: Path):
    """``participants.tsv`` of the input dataset (None when absent)."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.exists():
        return None
    table = read_tsv(path)
    if "participant_id" not in table.columns:
        raise StudyInputError(f"{path} has no participant_id column.")
    return table
