"""One typed configuration for a qsmprep run, with a TOML round trip.

The configuration has three sections: ``execution`` (what to process and where), ``nipype``
(how to run it) and ``workflow`` (which QSM method runs at each step, with its parameters).
It is saved as ``logs/config-<run>.toml`` with every run so the run can be reproduced with
``qsmprep ... --config-file``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import tomli_w

FieldmapMethod = Literal["nlfit", "linear", "waterfat", "inphase"]
MaskType = Literal["brain", "body"]
ReadoutPolarity = Literal["auto", "monopolar", "bipolar"]
UnwrapMethod = Literal["region_growing", "romeo", "laplacian", "reliability"]
BackgroundMethod = Literal["vsharp", "pdf", "lbv", "resharp", "ismv", "sharp", "none"]
InversionMethod = Literal[
    "tv", "nltv", "medi", "l2medi", "tvmedi", "tgv", "rts", "ndi", "ilsqr", "l2", "tkd", "tsvd",
    "tfi",
]
ReferenceMethod = Literal["mean", "csf", "roi", "water", "none"]
LambdaRule = Literal["lcurve", "discrepancy"]
R2starMethod = Literal["loglinear", "arlo", "nlls"]


class ConfigError(ValueError):
    """A configuration value or key is invalid (the message names it)."""


@dataclass
class ExecutionConfig:
    """Inputs, outputs and BIDS filtering."""

    bids_dir: Path | None = None
    output_dir: Path | None = None
    analysis_level: Literal["participant", "group"] = "participant"
    work_dir: Path | None = None
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    bids_filter_file: Path | None = None
    bids_database_dir: Path | None = None
    mask_dir: Path | None = None
    roi_dir: Path | None = None  # derivatives folder with *_dseg / *_label-<roi>_mask ROIs
    skip_bids_validation: bool = False
    clean_workdir: bool = False
    write_graph: bool = False
    stop_on_first_crash: bool = False
    resource_monitor: bool = False
    low_mem: bool = False
    verbosity: int = 0


@dataclass
class NipypeConfig:
    """Execution plugin and resources."""

    nprocs: int = 0  # 0: all available CPUs
    omp_nthreads: int = 0  # 0: nprocs shared among the acquisitions, at most 8
    mem_gb: float | None = None
    plugin: str = "MultiProc"
    plugin_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkflowConfig:
    """QSM method per step and its parameters (defaults: the measured best combination)."""

    # auto: the sign the fat signal supports in water-fat/in-phase mapping, +1 otherwise
    phase_sign: Literal[1, -1, "auto"] = "auto"
    b0_tesla: float | None = None
    mask_threshold: float | None = None
    mask_erode_mm: float = 0.0
    fieldmap_method: FieldmapMethod = "nlfit"
    # bipolar: remove the phase of the second-polarity echoes; auto: where the data show it
    readout_polarity: ReadoutPolarity = "auto"
    mask_type: MaskType = "brain"
    fat_model: str = "ren_marrow"  # waterfat/inphase: built-in name, or a (ppm, amplitude) table
    water_ppm: float | None = None  # water shift of the scan (ppm); None: the fat table's own
    inphase_echoes: str = ""  # inphase: 1-based echo numbers "2,3,4"; empty: automatic
    waterfat_smoothness: float = 0.1
    study_weights: bool = False  # l2medi/tvmedi: MIP data weight, |W - F| edge image
    unwrap_method: UnwrapMethod = "region_growing"
    bfr_method: BackgroundMethod = "ismv"
    bfr_erode_mm: float = 3.0
    vsharp_max_radius_mm: float = 12.0
    inversion_method: InversionMethod = "tv"
    inversion_lambda: float | None = None
    lambda_rule: LambdaRule | None = None
    lambda_sweep: list[float] = field(default_factory=list)  # extra Chimap per lambda
    inversion_params: dict[str, Any] = field(default_factory=dict)
    bfr_params: dict[str, Any] = field(default_factory=dict)
    reference: ReferenceMethod = "mean"
    r2star_method: R2starMethod = "nlls"
    swi: bool = False
    mip_slab_mm: float = 16.0

    def validate(self) -> None:
        """Check method parameters against the core functions (names the offending key)."""
        from qsmprep.recon import background, inversion
        from qsmprep.recon.dipole import check_b0_tesla

        if self.b0_tesla is not None:
            try:
                check_b0_tesla(self.b0_tesla)
            except ValueError as error:
                raise ConfigError(f"--b0-tesla: {error}") from None
        if self.reference == "water" and self.fieldmap_method != "waterfat":
            raise ConfigError(
                "--reference water references to soft tissue of low fat fraction, which needs "
                f"--fieldmap-method waterfat (got '{self.fieldmap_method}'); use --reference "
                "mean or roi.")
        total_field = self.inversion_method in inversion.TOTAL_FIELD_METHODS
        if total_field != (self.bfr_method == "none"):
            raise ConfigError(
                f"--inversion-method {self.inversion_method} inverts the total field and needs "
                "--bfr-method none" if total_field else
                f"--bfr-method none leaves the background field in, which only a total field "
                f"inversion models: use --inversion-method "
                f"{' or '.join(inversion.TOTAL_FIELD_METHODS)} or a background removal method.")
        if total_field and self.lambda_rule:
            raise ConfigError(
                f"--lambda auto is not available for --inversion-method "
                f"{self.inversion_method}: its rules compare the fit with the field, and the "
                "map of a total field inversion leaves out the background sources it fitted; "
                "give --lambda a value or keep the noise-scaled default.")
        for step, registry, method, params in (
            ("inversion", inversion.METHODS, self.inversion_method, self.inversion_params),
            ("bfr", background.METHODS, self.bfr_method, self.bfr_params),
        ):
            accepted = _keyword_parameters(registry[method])
            if step == "inversion" and "lam" not in accepted and (
                self.inversion_lambda is not None or self.lambda_rule or self.lambda_sweep
            ):
                raise ConfigError(
                    f"inversion method '{method}' has no regularisation weight lambda; set "
                    f"its parameters with --inversion-param ({', '.join(sorted(accepted))})."
                )
            for key in params:
                if key not in accepted:
                    raise ConfigError(
                        f"{step} method '{method}' has no parameter '{key}'; it accepts: "
                        f"{', '.join(sorted(accepted))}."
                    )


@dataclass
class GroupConfig:
    """Group level (study statistics): reference measurements, groups, covariates."""

    reference_table: Path | None = None  # TSV: participant_id, [session], roi, measure, value, unit
    group_by: str | None = None  # participants.tsv column holding the groups
    group_measure: str | None = None  # reference measure whose thresholds define groups
    group_cutoffs: list[float] = field(default_factory=lambda: [80.0, 120.0])  # QCT mg/cm3
    group_names: list[str] = field(
        default_factory=lambda: ["osteoporosis", "osteopenia", "normal"])
    covariates: list[str] = field(default_factory=list)  # participants.tsv columns (ANCOVA)


def _keyword_parameters(function) -> set[str]:
    """Tunable keyword-only parameters of a core method (data arguments excluded)."""
    import inspect

    fixed = {"voxel_size", "b0_direction", "magnitude", "noise", "weight", "radii_mm"}
    return {
        name for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY and name not in fixed
    }


@dataclass
class Config:
    """A complete run configuration."""

    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    nipype: NipypeConfig = field(default_factory=NipypeConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    group: GroupConfig = field(default_factory=lambda: GroupConfig())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain TOML-ready dict (paths as strings, unset values omitted)."""
        return {
            section.name: _plain(dataclasses.asdict(getattr(self, section.name)))
            for section in dataclasses.fields(self)
        }

    def to_toml(self) -> str:
        """Serialise to TOML text."""
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "configuration") -> Config:
        """Build from a nested dict, validating every key and value."""
        config = cls()
        for section_name, values in data.items():
            if section_name not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(
                    f"{source}: unknown section [{section_name}]; "
                    "valid sections are [execution], [nipype], [workflow] and [group]."
                )
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section_name}] must be a table of key = value.")
            section = getattr(config, section_name)
            for key, value in values.items():
                set_value(section, key, value, source=f"{source} [{section_name}]")
        config.workflow.validate()
        return config

    @classmethod
    def from_toml(cls, path: Path) -> Config:
        """Read a TOML file written by :meth:`to_toml` (or by hand)."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from error
        return cls.from_dict(data, source=str(path))


def set_value(section: Any, key: str, value: Any, *, source: str = "configuration") -> None:
    """Set ``section.key = value`` after checking the key exists and the value's type."""
    hints = get_type_hints(type(section))
    key = key.replace("-", "_")
    if key not in hints:
        valid = ", ".join(sorted(hints))
        raise ConfigError(f"{source}: unknown key '{key}'. Valid keys: {valid}.")
    setattr(section, key, _coerce(hints[key], value, f"{source} '{key}'"))


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check/convert ``value`` against a (simple) type hint."""
    origin, args = get_origin(hint), get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: a value is required.")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}.")
        return value
    if args and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if hint is Path:
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}.")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        return hint(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        convert = float if args and args[0] is float else str
        try:
            return [convert(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a list of numbers, got {value!r}.") from None
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}.")
        return dict(value)
    if hint is str:
        return str(value)
    return value


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` (TOML has no null) and stringify paths."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = str(value) if isinstance(value, Path) else value
    return out
