"""BIDS input discovery, derivative naming and the derivatives dataset's top-level files.

Input: multi-echo gradient-echo acquisitions (``MEGRE``, or single-echo ``T2starw``/``T1w`` and
``MP2RAGE`` echoes with a ``part`` entity; also 4D files whose sidecar lists several
``EchoTime`` values). Echoes are grouped into one acquisition by every entity except ``echo``
and ``part``, sorted by ``EchoTime`` (never by the label string); metadata come through
sidecar inheritance. Every ``ses``/``acq``/``run`` (any entity) is its own processing unit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from qsmprep import __version__

LOGGER = logging.getLogger("qsmprep")

GAMMA_BAR_MHZ_PER_T = 42.57747892  # keep in sync with qsmprep.recon.dipole (tested)

#: Suffixes that hold gradient-echo magnitude/phase data usable for QSM.
QSM_SUFFIXES = ("MEGRE", "T2starw", "T1w", "MP2RAGE")
#: Suffixes accepted only when they carry a ``part`` entity (else they are anatomical).
PART_REQUIRED_SUFFIXES = ("T1w", "MP2RAGE")
PARTS = ("mag", "phase", "real", "imag")
PHASE_UNITS = {"rad": "rad", "radian": "rad", "radians": "rad", "arbitrary": "arbitrary"}
#: Entities kept in derivative names (order of the BIDS specification).
OUTPUT_ENTITIES = ("subject", "session", "acquisition", "ceagent", "reconstruction", "run")
SHORT_NAMES = {
    "subject": "sub", "session": "ses", "task": "task", "acquisition": "acq", "ceagent": "ce",
    "reconstruction": "rec", "direction": "dir", "run": "run", "inv": "inv", "flip": "flip",
    "mt": "mt", "echo": "echo", "part": "part", "chunk": "chunk", "desc": "desc",
}
LONG_NAMES = {short: long for long, short in SHORT_NAMES.items()}


class BIDSInputError(Exception):
    """Input data cannot be used; ``exit_code`` follows the BIDS-Apps execution spec."""

    def __init__(self, message: str, exit_code: int = 66):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Echo:
    """One echo of an acquisition; ``volume`` indexes a 4D file (None for a 3D file)."""

    number: int
    echo_time: float  # s
    magnitude: str | None = None
    phase: str | None = None
    real: str | None = None
    imag: str | None = None
    volume: int | None = None


@dataclass
class Acquisition:
    """A multi-echo GRE acquisition: the unit that qsmprep processes."""

    entities: dict[str, str]  # long pybids names -> label as written in the file name
    suffix: str
    echoes: list[Echo]
    b0_tesla: float | None
    b0_source: str
    phase_units: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    output_entities: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def name(self) -> str:
        """Readable identifier, e.g. ``sub-01_ses-2_run-1_MEGRE``."""
        parts = [f"{SHORT_NAMES.get(k, k)}-{v}" for k, v in self.entities.items()]
        return "_".join(parts + [self.suffix])

    @property
    def echo_times(self) -> list[float]:
        return [echo.echo_time for echo in self.echoes]

    @property
    def has_phase(self) -> bool:
        return all(e.phase or (e.real and e.imag) for e in self.echoes)

    @property
    def source_files(self) -> list[str]:
        files: list[str] = []
        for echo in self.echoes:
            for path in (echo.magnitude, echo.phase, echo.real, echo.imag):
                if path and path not in files:
                    files.append(path)
        return files


def filename_entities(path: str | os.PathLike) -> dict[str, str]:
    """Entities of a BIDS file name as written (keeps zero padding), long pybids keys."""
    stem = Path(path).name.split(".")[0]
    entities = {}
    for token in stem.split("_")[:-1]:
        key, _, value = token.partition("-")
        if value:
            entities[LONG_NAMES.get(key, key)] = value
    return entities


def load_layout(bids_dir: Path, *, database_dir: Path | None = None, reset: bool = True):
    """A pybids layout without validation, ignoring code/sourcedata/derivatives."""
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    ignore = ["code", "stimuli", "sourcedata", "models", "derivatives", re.compile(r"^\.")]
    kwargs: dict[str, Any] = {}
    if database_dir is not None:
        Path(database_dir).mkdir(parents=True, exist_ok=True)
        kwargs = {"database_path": str(database_dir), "reset_database": reset}
    return BIDSLayout(
        str(bids_dir),
        validate=False,
        indexer=BIDSLayoutIndexer(validate=False, ignore=ignore),
        **kwargs,
    )


def read_filters(path: Path) -> dict[str, Any]:
    """Read a ``--bids-filter-file`` (JSON): entity filters for the QSM inputs.

    Either a flat ``{entity: value}`` dict or ``{"qsm": {entity: value}}``; ``null`` means
    "entity absent", ``"*"`` means "any value".
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BIDSInputError(f"cannot read BIDS filter file {path}: {error}", 64) from error
    if isinstance(data, dict) and isinstance(data.get("qsm"), dict):
        data = data["qsm"]
    if not isinstance(data, dict):
        raise BIDSInputError(f"BIDS filter file {path} must hold a JSON object.", 64)
    return data


def _pybids_filters(layout, filters: dict[str, Any], source: str) -> dict[str, Any]:
    from bids.layout import Query

    valid = set(layout.get_entities())
    converted = {}
    for key, value in filters.items():
        if key not in valid:
            raise BIDSInputError(
                f"{source}: unknown BIDS entity '{key}' in filters; use one of "
                f"{', '.join(sorted(valid))}.",
                64,
            )
        if key in ("suffix", "datatype", "extension", "part", "echo"):
            raise BIDSInputError(f"{source}: filtering on '{key}' is not supported.", 64)
        converted[key] = Query.NONE if value is None else Query.ANY if value == "*" else value
    return converted


def discover(
    layout,
    *,
    participant_label: Iterable[str] = (),
    session_label: Iterable[str] = (),
    filters: dict[str, Any] | None = None,
    b0_tesla: float | None = None,
    filter_source: str = "--bids-filter-file",
) -> list[Acquisition]:
    """Find every QSM acquisition in ``layout``; problems are recorded per acquisition.

    Raises :class:`BIDSInputError` (exit code 18) when the filters match no QSM file.
    """
    query: dict[str, Any] = _pybids_filters(layout, filters or {}, filter_source)
    subjects = [label.removeprefix("sub-") for label in participant_label]
    sessions = [label.removeprefix("ses-") for label in session_label]
    if subjects:
        query["subject"] = subjects
    if sessions:
        query["session"] = sessions
    files = layout.get(
        datatype="anat",
        suffix=list(QSM_SUFFIXES),
        extension=[".nii", ".nii.gz"],
        return_type="object",
        **query,
    )
    groups: dict[tuple, list] = {}
    for bids_file in files:
        entities = filename_entities(bids_file.path)
        part = entities.pop("part", None)
        if bids_file.entities["suffix"] in PART_REQUIRED_SUFFIXES and part is None:
            continue
        entities.pop("echo", None)
        key = (bids_file.entities["suffix"], tuple(entities.items()))
        groups.setdefault(key, []).append(bids_file)
    if not groups:
        raise BIDSInputError(
            "no multi-echo gradient-echo files (MEGRE, or T2starw/T1w/MP2RAGE with part-mag/"
            "part-phase) matched the requested participants, sessions and filters in "
            f"{layout.root}.",
            18,
        )
    acquisitions = []
    for (suffix, entities), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        acquisition = _make_acquisition(layout, suffix, dict(entities), members, b0_tesla)
        if suffix in PART_REQUIRED_SUFFIXES and not acquisition.echoes:
            LOGGER.warning("skipping %s: no EchoTime in its sidecars, not a gradient-echo "
                           "input for QSM.", acquisition.name)
            continue
        acquisitions.append(acquisition)
    if not acquisitions:
        raise BIDSInputError(f"no usable gradient-echo acquisition in {layout.root}.", 66)
    _assign_output_entities(acquisitions)
    return acquisitions


def _make_acquisition(layout, suffix, entities, members, b0_override) -> Acquisition:
    problems: list[str] = []
    by_echo: dict[str, dict[str, Any]] = {}
    for bids_file in members:
        name_entities = filename_entities(bids_file.path)
        part = name_entities.get("part", "mag")
        echo_label = name_entities.get("echo", "")
        metadata = layout.get_metadata(bids_file.path)
        slot = by_echo.setdefault(echo_label, {"metadata": metadata})
        if part in slot:
            problems.append(f"two '{part}' files for echo '{echo_label}': {bids_file.path}")
        slot[part] = bids_file.path
        if part == "phase":
            slot["phase_metadata"] = metadata
    echoes: list[Echo] = []
    for label, slot in by_echo.items():
        meta = slot["metadata"]
        te = meta.get("EchoTime")
        paths = {
            "magnitude": slot.get("mag"),
            "phase": slot.get("phase"),
            "real": slot.get("real"),
            "imag": slot.get("imag"),
        }
        where = next(p for p in paths.values() if p)
        if te is None:
            problems.append(f"{where}: 'EchoTime' is missing from the sidecar; add it (in s).")
            continue
        if isinstance(te, list):
            if len(te) < 1:
                problems.append(f"{where}: 'EchoTime' is an empty list.")
                continue
            for index, value in enumerate(te):
                echoes.append(Echo(index + 1, float(value), volume=index, **paths))
        else:
            number = int(label) if label.isdigit() else len(echoes) + 1
            echoes.append(Echo(number, float(te), **paths))
    echoes.sort(key=lambda e: e.echo_time)
    times = [e.echo_time for e in echoes]
    if any(t > 1.0 for t in times):
        problems.append(
            f"EchoTime values {times} look like milliseconds; BIDS requires seconds "
            "(divide by 1000 in the sidecars)."
        )
    elif any(t <= 0 for t in times):
        problems.append(f"EchoTime values {times} must be positive (s).")
    if len(set(times)) != len(times):
        problems.append(f"duplicate EchoTime values {times}; each echo needs its own time.")
    has_phase = [e.phase is not None or e.imag is not None for e in echoes]
    if any(has_phase) and not all(has_phase):
        problems.append("some echoes have phase and others do not; give every echo both parts.")
    for echo in echoes:
        if echo.phase and not echo.magnitude:
            problems.append(f"{echo.phase}: no matching part-mag file for this echo.")
    meta = by_echo[next(iter(by_echo))]["metadata"]
    phase_meta = next((s["phase_metadata"] for s in by_echo.values() if "phase_metadata" in s), {})
    units = phase_meta.get("Units")
    phase_units = None
    if units is not None:
        phase_units = PHASE_UNITS.get(str(units).strip().lower())
        if phase_units is None:
            problems.append(
                f"phase 'Units' is {units!r}; qsmprep needs 'rad' or 'arbitrary' "
                "(rescaled to [-pi, pi]); fix the phase sidecars."
            )
    b0, b0_source = _field_strength(meta, b0_override)
    if b0 is None:
        problems.append(
            "neither 'ImagingFrequency' nor 'MagneticFieldStrength' is in the sidecars; add "
            "one, or pass --b0-tesla."
        )
    return Acquisition(
        entities=entities,
        suffix=suffix,
        echoes=echoes,
        b0_tesla=b0,
        b0_source=b0_source,
        phase_units=phase_units,
        metadata={k: v for k, v in meta.items() if k != "EchoTime"},
        problems=problems,
    )


def _field_strength(metadata: dict[str, Any], override: float | None) -> tuple[float | None, str]:
    """B0 (T): the user's override, else ImagingFrequency/gamma-bar, else the nominal field."""
    if override is not None:
        return float(override), "command line (--b0-tesla)"
    frequency = metadata.get("ImagingFrequency")
    if isinstance(frequency, (int, float)) and frequency > 0:
        return float(frequency) / GAMMA_BAR_MHZ_PER_T, "ImagingFrequency"
    nominal = metadata.get("MagneticFieldStrength")
    if isinstance(nominal, (int, float)) and nominal > 0:
        return float(nominal), "MagneticFieldStrength"
    return None, "missing"


def _assign_output_entities(acquisitions: list[Acquisition]) -> None:
    """Derivative entities per acquisition, made unique by folding the source into ``acq``."""
    seen: dict[tuple, list[Acquisition]] = {}
    for acq in acquisitions:
        acq.output_entities = {k: v for k, v in acq.entities.items() if k in OUTPUT_ENTITIES}
        seen.setdefault(tuple(sorted(acq.output_entities.items())), []).append(acq)
    for clashing in seen.values():
        if len(clashing) < 2:
            continue
        for acq in clashing:
            extra = [acq.suffix] + [
                f"{SHORT_NAMES.get(k, k)}{v}"
                for k, v in acq.entities.items()
                if k not in OUTPUT_ENTITIES
            ]
            label = acq.output_entities.get("acquisition", "") + "".join(extra)
            acq.output_entities["acquisition"] = re.sub(r"[^A-Za-z0-9]", "", label)


PATH_PATTERN = (
    "sub-{subject}[/ses-{session}]/{datatype}/sub-{subject}[_ses-{session}]"
    "[_acq-{acquisition}][_ce-{ceagent}][_rec-{reconstruction}][_run-{run}][_echo-{echo}]"
    "[_part-{part}][_desc-{desc}]_{suffix}{extension}"
)
FIGURE_PATTERN = (
    "sub-{subject}/figures/sub-{subject}[_ses-{session}][_acq-{acquisition}][_ce-{ceagent}]"
    "[_rec-{reconstruction}][_run-{run}][_desc-{desc}]_{suffix}{extension}"
)


def derivative_path(
    entities: dict[str, str],
    suffix: str,
    *,
    desc: str | None = None,
    echo: int | None = None,
    part: str | None = None,
    datatype: str = "anat",
    extension: str = ".nii.gz",
) -> str:
    """Relative path of a derivative, e.g. ``sub-01/anat/sub-01_Chimap.nii.gz``."""
    from bids.layout.writing import build_path

    values = {k: v for k, v in entities.items() if k in OUTPUT_ENTITIES}
    values.update(suffix=suffix, datatype=datatype, extension=extension)
    for key, value in (("desc", desc), ("echo", echo), ("part", part)):
        if value is not None:
            values[key] = str(value)
    for key, value in values.items():
        if key != "extension" and not re.fullmatch(r"[A-Za-z0-9]+", str(value)):
            raise ValueError(f"BIDS entity {key}={value!r} must be alphanumeric.")
    path = build_path(values, [PATH_PATTERN], strict=False)
    if path is None:
        raise ValueError(f"cannot build a derivative path from {values}.")
    return path


def bids_uri(path: str | os.PathLike, bids_dir: str | os.PathLike) -> str:
    """``bids:raw:<relative path>`` URI of an input file."""
    return f"bids:raw:{Path(path).resolve().relative_to(Path(bids_dir).resolve()).as_posix()}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


README_TEXT = """# qsmprep derivatives

Quantitative susceptibility maps and by-products computed by qsmprep {version} from the BIDS
dataset at {source}. Every image has a JSON sidecar naming its units, sources, and the methods
and parameters that made it; `logs/config-*.toml` holds the configuration of each run.
"""

BIDSIGNORE = ("figures", "logs", "group", "*.html", "*_localfield.*", "*_noisemap.*", "*_swi.*",
              "*_minIP.*")


def write_dataset_files(output_dir: Path, bids_dir: Path) -> None:
    """``dataset_description.json`` and ``.bidsignore`` of the derivatives dataset (atomic)."""
    source = Path(bids_dir).resolve()
    raw_description = {}
    description_file = source / "dataset_description.json"
    if description_file.exists():
        try:
            raw_description = json.loads(description_file.read_text())
        except json.JSONDecodeError:
            raw_description = {}
    generated_by = {
        "Name": "qsmprep",
        "Version": __version__,
        "CodeURL": "https://github.com/qsmprep/qsmprep",
    }
    if os.environ.get("QSMPREP_DOCKER_TAG"):
        generated_by["Container"] = {"Type": "docker", "Tag": os.environ["QSMPREP_DOCKER_TAG"]}
    description = {
        "Name": f"qsmprep derivatives of {raw_description.get('Name', source.name)}",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [{"URL": source.as_uri()}],
        "DatasetLinks": {"raw": source.as_uri()},
        "License": raw_description.get("License", "n/a"),
    }
    atomic_write_text(Path(output_dir) / "dataset_description.json", json.dumps(description, indent=2))
    readme = Path(output_dir) / "README.md"
    if not readme.exists():
        atomic_write_text(readme, README_TEXT.format(version=__version__, source=source))
    ignore_file = Path(output_dir) / ".bidsignore"
    existing = ignore_file.read_text().split() if ignore_file.exists() else []
    lines = list(dict.fromkeys([*existing, *BIDSIGNORE]))
    atomic_write_text(ignore_file, "\n".join(lines) + "\n")


def image_shape(acquisition: Acquisition) -> tuple[int, ...]:
    """Shape of the acquisition's first image (header only); errors name the file."""
    import nibabel as nb

    path = acquisition.source_files[0]
    try:
        shape = nb.load(path).shape
    except Exception as error:  # nibabel raises several types for bad files
        raise BIDSInputError(f"{path}: cannot be read as NIfTI ({error}); re-export it from "
                             "DICOM (e.g. dcm2niix).", 66) from error
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise BIDSInputError(f"{path}: shape {shape} is not a 3D volume; QSM needs 3D data.", 66)
    if len(shape) > 4:
        raise BIDSInputError(f"{path}: {len(shape)}D image; expected 3D (or 4D with echoes).", 66)
    return tuple(int(n) for n in shape)


def find_masks(
    mask_dir: Path, acquisitions: list[Acquisition], *, desc: str = "brain"
) -> dict[str, str]:
    """Provided ``<entities>_desc-<desc>_mask`` images in ``mask_dir``, by acquisition name."""
    masks = {}
    for acquisition in acquisitions:
        relative = derivative_path(acquisition.output_entities, "mask", desc=desc)
        for extension in (".nii.gz", ".nii"):
            candidate = Path(mask_dir) / relative.replace(".nii.gz", extension)
            if candidate.exists():
                masks[acquisition.name] = str(candidate)
                break
        else:
            LOGGER.warning("no mask %s in %s.", relative, mask_dir)
    return masks
