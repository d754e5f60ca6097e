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
    try:
        return BIDSLayout(
            str(bids_dir),
            validate=False,
            indexer=BIDSLayoutIndexer(validate=False, ignore=ignore),
            **kwargs,
        )
    except Exception as error:  # pybids raises OSError/ValueError/... for broken datasets
        broken = _broken_json(Path(bids_dir))
        cause = "; ".join(broken[:5]) if broken else (
            f"{error}" + (f" ({error.__cause__})" if error.__cause__ else ""))
        raise BIDSInputError(
            f"cannot index the BIDS dataset {bids_dir}: {cause}. Fix the file(s): sidecars "
            "must be JSON objects (the BIDS validator lists every problem).", 16) from error


def _broken_json(root: Path) -> list[str]:
    """JSON files of a dataset (outside derivatives/sourcedata/code) that are not objects."""
    broken = []
    skip = {"derivatives", "sourcedata", "code", "stimuli", "models"}
    for path in sorted(root.rglob("*.json")):
        parts = path.relative_to(root).parts
        if parts[0] in skip or any(part.startswith(".") for part in parts):
            continue
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            broken.append(f"{path} is not valid JSON ({error})")
            continue
        if not isinstance(content, dict):
            broken.append(f"{path} holds a JSON {type(content).__name__}, not an object")
    return broken


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
        for item in value if isinstance(value, list) else [value]:
            if not (item is None or item == "*" or _is_label(item)):
                raise BIDSInputError(
                    f"{source}: '{key}' has the value {item!r}; use a BIDS label "
                    '(letters and digits, e.g. "01"), a list of labels, null (entity absent) '
                    'or "*" (any value).', 64)
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
        if subjects or sessions or filters:
            raise BIDSInputError(
                "no multi-echo gradient-echo files (MEGRE, or T2starw/T1w/MP2RAGE with "
                "part-mag/part-phase) matched the requested participants, sessions and filters "
                f"in {layout.root}; check the labels and the --bids-filter-file.",
                18,
            )
        raise BIDSInputError(
            f"{layout.root} holds no gradient-echo QSM input: qsmprep needs "
            "sub-<label>/[ses-<label>/]anat/*_echo-<n>_part-{mag,phase}_MEGRE.nii[.gz] "
            "(or T2starw/T1w/MP2RAGE with a part entity).",
            66,
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
        values = te if isinstance(te, list) else [te]
        if not values or not all(_is_number(v) for v in values):
            problems.append(f"{where}: 'EchoTime' is {te!r}; it must be a number (s) or, for "
                            "a 4D file with one echo per volume, a list of numbers.")
            continue
        if isinstance(te, list):
            for index, value in enumerate(te):
                echoes.append(Echo(index + 1, float(value), volume=index, **paths))
        else:
            number = int(label) if label.isdigit() else len(echoes) + 1
            echoes.append(Echo(number, float(te), **paths))
    echoes.sort(key=lambda e: e.echo_time)
    labelled = [e.number for e in echoes]
    times = [e.echo_time for e in echoes]
    first = next((f for e in echoes for f in (e.magnitude, e.phase, e.real, e.imag) if f),
                 members[0].path)
    if any(t >= 1.0 for t in times):  # a gradient echo at 1 s or later: milliseconds
        problems.append(
            f"{first} (and the other echoes): EchoTime values {times} look like milliseconds; "
            "BIDS requires seconds: divide them by 1000 in the sidecars."
        )
    elif any(not t > 0 for t in times):
        problems.append(f"{first} (and the other echoes): EchoTime values {times} must be "
                        "positive (s); fix the sidecars.")
    if len(set(times)) != len(times):
        duplicated = sorted({t for t in times if times.count(t) > 1})
        files = [f for e in echoes if e.echo_time in duplicated
                 for f in (e.magnitude or e.real or e.phase,) if f]
        problems.append(f"{', '.join(files)}: duplicate EchoTime {duplicated} (s); each echo "
                        "needs its own echo time: fix the sidecars.")
    elif labelled != sorted(labelled) and not any(e.volume is not None for e in echoes):
        LOGGER.warning("%s: in EchoTime order the echo-<index> labels are %s, not increasing; "
                       "qsmprep orders echoes by EchoTime %s s (check the conversion).",
                       first, labelled, times)
    if len(echoes) == 1 and not problems:
        LOGGER.warning(
            "%s: a single echo%s; processed as single-echo QSM (field = phase / (2 pi TE), "
            "which assumes no phase offset at TE = 0). R2*, T2* and S0 need at least 2 echoes "
            "and are not computed.", first,
            " although labelled MEGRE (multi-echo); BIDS names single-echo GRE 'T2starw'"
            if suffix == "MEGRE" else "")
    has_phase = [e.phase is not None or e.imag is not None for e in echoes]
    if any(has_phase) and not all(has_phase):
        problems.append("some echoes have phase and others do not; give every echo both parts.")
    for echo in echoes:
        if echo.phase and not echo.magnitude:
            problems.append(f"{echo.phase}: no matching part-mag file for this echo.")
    meta = by_echo[next(iter(by_echo))]["metadata"]
    phase_slots = [s for s in by_echo.values() if "phase_metadata" in s]
    declared = {s["phase"]: s["phase_metadata"].get("Units") for s in phase_slots}
    phase_units = None
    for path, units in declared.items():
        if units is not None and PHASE_UNITS.get(str(units).strip().lower()) is None:
            problems.append(
                f"{path}: phase 'Units' is {units!r}; qsmprep needs 'rad' or 'arbitrary' "
                "(rescaled to [-pi, pi]): fix the phase sidecars."
            )
            break
    else:
        found = {PHASE_UNITS[str(u).strip().lower()] for u in declared.values() if u is not None}
        if len(found) > 1 or (found and None in declared.values()):
            problems.append(
                f"{', '.join(declared)}: the phase echoes declare different 'Units' "
                f"({sorted(map(str, declared.values()))}); give every phase sidecar the same "
                "Units."
            )
        elif found:
            phase_units = found.pop()
    b0, b0_source = _field_strength(meta, b0_override)
    if b0 is None:
        problems.append(
            "neither 'ImagingFrequency' nor 'MagneticFieldStrength' is in the sidecars; add "
            "one, or pass --b0-tesla."
        )
    elif b0_override is None:  # --b0-tesla is checked with the configuration
        from qsmprep.recon.dipole import B0_RANGE_TESLA, check_b0_tesla

        try:
            check_b0_tesla(b0)
        except ValueError as error:
            if b0_source == "ImagingFrequency":
                problems.append(
                    f"{first}: 'ImagingFrequency' {meta['ImagingFrequency']:g} in its sidecar "
                    f"gives B0 = {b0:.3g} T, outside {B0_RANGE_TESLA[0]:g}-"
                    f"{B0_RANGE_TESLA[1]:g} T; ImagingFrequency is in MHz: fix the sidecars, "
                    "or pass --b0-tesla.")
            else:
                problems.append(f"{first}: 'MagneticFieldStrength' in its sidecar: {error} "
                                "Fix the sidecars, or pass --b0-tesla.")
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


def _is_label(value: Any) -> bool:
    """A BIDS label (alphanumeric text) or a non-negative integer index (e.g. run 1)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and value.isascii() and value.isalnum()


def _is_number(value: Any) -> bool:
    """A finite real number (JSON ``true``/``false`` are not numbers)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == value and abs(value) != float("inf"))


def _field_strength(metadata: dict[str, Any], override: float | None) -> tuple[float | None, str]:
    """B0 (T): the user's override, else ImagingFrequency/gamma-bar, else the nominal field."""
    if override is not None:
        return float(override), "command line (--b0-tesla)"
    frequency = metadata.get("ImagingFrequency")
    if _is_number(frequency) and frequency > 0:
        return float(frequency) / GAMMA_BAR_MHZ_PER_T, "ImagingFrequency"
    nominal = metadata.get("MagneticFieldStrength")
    if _is_number(nominal) and nominal > 0:
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


def dataset_links(
    bids_dir: str | os.PathLike, mask_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """The derivatives' ``DatasetLinks``: ``raw`` the input dataset, ``masks`` the provided
    masks' folder (``--mask-dir``) where there is one."""
    links = {"raw": Path(bids_dir).resolve()}
    if mask_dir:
        links["masks"] = Path(mask_dir).resolve()
    return links


def bids_uri(path: str | os.PathLike, links: dict[str, Path]) -> str:
    """``bids:<name>:<relative path>`` URI of an input file under one of the resolved
    :func:`dataset_links`; a file under none of them keeps its absolute path."""
    resolved = Path(path).resolve()
    for name, root in links.items():
        if resolved.is_relative_to(root):
            return f"bids:{name}:{resolved.relative_to(root).as_posix()}"
    return str(resolved)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())  # on disk before the rename makes it visible
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
              "*_minIP.*", "*_PDFFmap.*", "*_stats.*")


def write_dataset_files(output_dir: Path, bids_dir: Path, mask_dir: Path | None = None) -> None:
    """``dataset_description.json`` and ``.bidsignore`` of the derivatives dataset (atomic);
    ``mask_dir`` (provided masks) becomes the ``masks`` dataset link."""
    links = dataset_links(bids_dir, mask_dir)
    source = links["raw"]
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
        "SourceDatasets": [{"URL": root.as_uri()} for root in links.values()],
        "DatasetLinks": {name: root.as_uri() for name, root in links.items()},
        "License": raw_description.get("License", "n/a"),
    }
    atomic_write_text(Path(output_dir) / "dataset_description.json",
                      json.dumps(description, indent=2))
    readme = Path(output_dir) / "README.md"
    if not readme.exists():
        atomic_write_text(readme, README_TEXT.format(version=__version__, source=source))
    ignore_file = Path(output_dir) / ".bidsignore"
    existing = ignore_file.read_text().split() if ignore_file.exists() else []
    lines = list(dict.fromkeys([*existing, *BIDSIGNORE]))
    atomic_write_text(ignore_file, "\n".join(lines) + "\n")


def check_images(acquisition: Acquisition, *,
                 single_slice: bool = False) -> tuple[int, ...] | None:
    """Header-level checks of every image of ``acquisition`` (no voxel data are read).

    Problems are appended to ``acquisition.problems``, each naming the file, the problem and
    the fix: unreadable or non-NIfTI files, truncated data (file size, gzip trailer), not 3D
    (a single slice unless ``single_slice`` allows one; 5D), 4D files without one
    ``EchoTime`` per volume, implausible voxel sizes or a singular affine, and echoes/parts
    on different voxel grids. Returns the shape of the first image (a 2D image's as
    ``[x, y, 1]``), or None when a problem was found.
    """
    import nibabel as nb
    import numpy as np

    volumes = {}
    for echo in acquisition.echoes:
        for path in (echo.magnitude, echo.phase, echo.real, echo.imag):
            if path:
                volumes.setdefault(path, []).append(echo.volume)
    before = len(acquisition.problems)
    reference = None
    files_with = {}  # problem -> the files that have it, so that 32 echo files give one line
    for path, indices in volumes.items():
        try:
            image = nb.load(path)
            shape = tuple(int(n) for n in image.shape)
            affine = np.asarray(image.affine, dtype=float)
        except Exception as error:  # nibabel raises several types for bad files
            files_with.setdefault(
                f"cannot be read as NIfTI ({error}); the file is corrupt or not a NIfTI "
                "image: re-export it from DICOM (e.g. dcm2niix).", []).append(path)
            continue
        problem = (_shape_problem(shape, indices, single_slice=single_slice)
                   or _geometry_problem(affine))
        if problem is None:
            problem = _truncation_problem(path, image)
        if problem is not None:
            files_with.setdefault(problem, []).append(path)
            continue
        grid = (shape + (1,))[:3]  # a 2D image (one slice) as [x, y, 1]
        if reference is None:
            reference = (path, grid + shape[3:], affine)
            continue
        ref_path, ref_shape, ref_affine = reference
        if grid != ref_shape[:3]:
            acquisition.problems.append(
                f"{path}: voxel grid {grid} differs from {ref_shape[:3]} of {ref_path}; "
                "all echoes and parts of an acquisition must share one grid: re-export them "
                "from the same series.")
        elif not np.allclose(affine, ref_affine, atol=1e-3, rtol=1e-4):
            shift = float(np.abs(affine[:3] - ref_affine[:3]).max())
            acquisition.problems.append(
                f"{path}: affine (voxel-to-scanner matrix) differs from that of {ref_path} "
                f"(by up to {shift:.3g}); all echoes and parts of an acquisition must share "
                "one grid: re-export them from the same series.")
    for problem, paths in files_with.items():
        others = f" (and {len(paths) - 1} more of its images)" if len(paths) > 1 else ""
        acquisition.problems.append(f"{paths[0]}{others}: {problem}")
    if len(acquisition.problems) > before or reference is None:
        return None
    return reference[1]


def _shape_problem(shape: tuple[int, ...], volumes: list[int | None], *,
                   single_slice: bool = False) -> str | None:
    """Dimensionality problems of an image holding the given echo volumes (None: 3D, or one
    slice ``[x, y]``/``[x, y, 1]`` where ``single_slice`` allows it)."""
    spatial = (tuple(shape) + (1, 1))[:3]
    extra = shape[3:]
    while extra and extra[-1] == 1:
        extra = extra[:-1]
    one_slice = single_slice and min(spatial[:2]) >= 2 and spatial[2] == 1
    if not one_slice and (len(shape) < 3 or min(spatial) < 2):
        return (f"shape {shape} is not a 3D volume (a single slice or a 2D image); QSM needs "
                "3D data with at least 2 voxels along every axis: convert the whole series "
                "(a single slice gives water-fat maps only, with --fieldmap-method waterfat).")
    if len(extra) > 1:
        return (f"{len(shape)}D image (shape {shape}); qsmprep reads 3D images, or 4D images "
                "with one echo per volume: split the extra dimensions into separate files.")
    listed = [v for v in volumes if v is not None]
    if extra and not listed:
        return (f"4D image with {extra[0]} volumes but its sidecar gives a single EchoTime; "
                "give one EchoTime per volume (a list, in s) or split the echoes into "
                "echo-<index> files.")
    if listed and (not extra or max(listed) >= extra[0]):
        count = extra[0] if extra else 1
        return (f"its sidecar lists {max(listed) + 1} EchoTime values but the image has "
                f"{count} volume(s) (shape {shape}); make the EchoTime list match the volumes.")
    return None


def _geometry_problem(affine) -> str | None:
    """Implausible voxel sizes or a singular/non-finite affine."""
    import numpy as np

    from qsmprep.recon.dipole import VOXEL_SIZE_RANGE_MM

    low, high = VOXEL_SIZE_RANGE_MM
    if not np.all(np.isfinite(affine)) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        return ("the affine (sform/qform) is singular or not finite; fix the NIfTI header "
                "(re-export the series, e.g. with dcm2niix).")
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if sizes.min() < low or sizes.max() > high:
        text = ", ".join(f"{v:.4g}" for v in sizes)
        return (f"voxel size ({text}) mm is implausible (expected {low}-{high} mm); the NIfTI "
                "header (pixdim/sform) is wrong: fix the conversion or the header units.")
    return None


def _truncation_problem(path: str, image) -> str | None:
    """Data shorter than the header promises (uncompressed size or gzip trailer)."""
    import zlib

    import numpy as np

    header = image.header
    offset = int(getattr(image.dataobj, "offset", 0) or 0)  # where the voxel data start
    expected = offset + int(np.prod(image.shape)) * header.get_data_dtype().itemsize
    fix = "the file is truncated or corrupt: copy or convert it again."
    size = os.path.getsize(path)
    if not str(path).endswith(".gz"):
        if size < expected:
            return f"{size} bytes but the header needs {expected}; {fix}"
        return None
    with open(path, "rb") as stream:
        stream.seek(max(size - 4, 0))
        trailer = int.from_bytes(stream.read(4), "little")
    if trailer == expected % 2**32:
        return None
    # multi-member gzip or trailing bytes: decompress to be sure (rare)
    total, decompressor = 0, zlib.decompressobj(wbits=31)
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                while chunk:
                    total += len(decompressor.decompress(chunk))
                    if not decompressor.eof:
                        break
                    chunk = decompressor.unused_data
                    if chunk[:2] != b"\x1f\x8b":
                        break
                    decompressor = zlib.decompressobj(wbits=31)
    except zlib.error as error:
        return f"gzip data cannot be decompressed ({error}); {fix}"
    if total < expected:
        return f"{total} bytes after decompression but the header needs {expected}; {fix}"
    return None


def image_shape(acquisition: Acquisition) -> tuple[int, ...]:
    """Shape of the acquisition's first image after :func:`check_images`; errors name files."""
    shape = check_images(acquisition)
    if shape is None:
        raise BIDSInputError("\n".join(acquisition.problems), 66)
    return shape


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
