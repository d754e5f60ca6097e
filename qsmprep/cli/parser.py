"""Command-line parser (BIDS-Apps contract plus the nipreps de-facto flags)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

from qsmprep import __version__
from qsmprep.config import (
    BackgroundMethod,
    Config,
    ConfigError,
    FieldmapMethod,
    InversionMethod,
    LambdaRule,
    MaskType,
    ReadoutPolarity,
    R2starMethod,
    ReferenceMethod,
    UnwrapMethod,
)

EXIT_CODES = {
    0: "success",
    1: "at least one participant/acquisition failed (the others completed)",
    3: "every map was written but a report (HTML page, figure, methods boilerplate) failed",
    16: "the input dataset failed BIDS validation",
    18: "the BIDS filters matched no input files",
    64: "command-line usage error (bad option, path or label)",
    66: "valid dataset without usable QSM inputs",
    70: "the workflow could not be built",
}

EPILOG = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        self.exit(64, f"qsmprep: error: {message}\n")

    def exit(self, status: int = 0, message: str | None = None):
        super().exit(64 if status else 0, message)


def _existing_dir(value: str) -> Path:
    path = Path(value).expanduser().absolute()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"'{value}' is not an existing directory.")
    return path


def _existing_file(value: str) -> Path:
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"'{value}' is not an existing file.")
    return path


def _path(value: str) -> Path:
    return Path(value).expanduser().absolute()


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not an integer.") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"'{value}' must be at least 1.")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number.") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"'{value}' must be positive.")
    return number


def _phase_sign(value: str) -> int | str:
    if value.strip().lower() == "auto":
        return "auto"
    if value.strip() in ("1", "+1", "-1"):
        return int(value)
    raise argparse.ArgumentTypeError(f"'{value}' is not one of +1, -1, auto.")


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number.") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"'{value}' must not be negative.")
    return number


def _memory_mb(value: str) -> float:
    """``--mem``: a size in MB, or with a unit (``16G``, ``16000M``, ``16GB``)."""
    text = value.strip().upper().removesuffix("B")
    scale = {"K": 1e-3, "M": 1.0, "G": 1e3, "T": 1e6}.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        return _positive_float(number) * (scale or 1.0)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a memory size (e.g. 8000, 8G).")


def _label(value: str) -> str:
    label = value.strip()
    for prefix in ("sub-", "ses-"):
        label = label.removeprefix(prefix)
    if not label.isalnum():
        raise argparse.ArgumentTypeError(f"'{value}' is not a valid BIDS label (alphanumeric).")
    return label


def _choice(values: tuple[str, ...]):
    def convert(value: str) -> str:
        normalised = value.strip().lower().replace("-", "_")
        if normalised not in values:
            raise argparse.ArgumentTypeError(
                f"'{value}' is not one of {', '.join(v.replace('_', '-') for v in values)}."
            )
        return normalised

    return convert


def _echo_list(value: str) -> str:
    """``--inphase-echoes``: comma-separated 1-based echo numbers."""
    try:
        numbers = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a list of echo numbers like 1,3,5.")
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"'{value}': echo numbers start at 1.")
    return ",".join(str(n) for n in sorted(set(numbers)))


#: ``--preset``: workflow defaults per body region (explicit options win).
PRESETS = {
    "body": {"fieldmap_method": "waterfat", "mask_type": "body", "bfr_method": "none",
             "bfr_erode_mm": 0.0, "inversion_method": "tfi", "reference": "water"},
}
#: a preset's settings when --bfr-method names a background removal (two-step QSM)
PRESET_TWO_STEP = {"body": {"bfr_method": "pdf", "inversion_method": "tv", "bfr_erode_mm": 1.0}}


def _lambda(value: str) -> float | str:
    if value.strip().lower() == "auto":
        return "auto"
    return _positive_float(value)


def _key_value(value: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as a number, true/false, or text."""
    key, sep, text = value.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"'{value}' is not KEY=VALUE.")
    text = text.strip()
    for convert in (int, float):
        try:
            return key, convert(text)
        except ValueError:
            pass
    lowered = text.lower()
    return key, {"true": True, "false": False}.get(lowered, text)


class _MergeDict(argparse.Action):
    """Collect repeated KEY=VALUE options into one dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        merged = dict(getattr(namespace, self.dest, None) or {})
        key, value = values
        merged[key] = value
        setattr(namespace, self.dest, merged)


def _metavar(choices) -> str:
    return "{" + ",".join(v.replace("_", "-") for v in get_args(choices)) + "}"


def _aliases(flag: str) -> list[str]:
    """A ``--multi-word`` flag and its ``--multi_word`` alias."""
    return [flag, "--" + flag[2:].replace("-", "_")]


def build_parser() -> argparse.ArgumentParser:
    """The qsmprep argument parser; option ``dest`` names are ``section.key`` of the config."""
    defaults = Config()
    wf = defaults.workflow
    parser = _Parser(
        prog="qsmprep",
        description="qsmprep: quantitative susceptibility mapping (QSM) from a BIDS dataset of "
        "multi-echo gradient-echo MRI, written as a BIDS derivatives dataset.",
        formatter_class=lambda prog: _Formatter(prog, max_help_position=40),
        epilog=EPILOG,
    )
    parser.add_argument("bids_dir", type=_existing_dir, help="root of the input BIDS dataset")
    parser.add_argument("output_dir", type=_path, help="root of the derivatives dataset to write")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="'participant' maps susceptibility per acquisition; 'group' "
                        "computes study statistics from the derivatives")
    parser.add_argument("--version", action="version", version=f"qsmprep {__version__}")
    parser.add_argument("-v", "--verbose", dest="execution.verbosity", action="count",
                        default=0, help="more log output (repeat for more)")

    g = parser.add_argument_group("BIDS filtering")
    g.add_argument(*_aliases("--participant-label"), dest="execution.participant_label",
                   nargs="+", type=_label, default=[], metavar="LABEL",
                   help="participants to process (with or without 'sub-'); default: all")
    g.add_argument(*_aliases("--session-label"), dest="execution.session_label", nargs="+",
                   type=_label, default=[], metavar="LABEL", help="sessions to process")
    g.add_argument(*_aliases("--bids-filter-file"), dest="execution.bids_filter_file",
                   type=_existing_file, metavar="FILE",
                   help='JSON entity filters, e.g. {"acquisition": "qsm", "run": null} '
                   '(null: entity absent, "*": any)')
    g.add_argument(*_aliases("--bids-database-dir"), dest="execution.bids_database_dir",
                   type=_path, metavar="DIR", help="reuse/keep the pybids index here")
    g.add_argument(*_aliases("--skip-bids-validation"), dest="execution.skip_bids_validation",
                   action="store_true", help="do not validate the input dataset")
    g.add_argument(*_aliases("--mask-dir"), dest="execution.mask_dir", type=_existing_dir,
                   metavar="DIR", help="derivatives folder with <entities>_desc-brain_mask "
                   "(desc-body_mask with --mask-type body) "
                   "images to use instead of computed masks")
    g.add_argument(*_aliases("--roi-dir"), dest="execution.roi_dir", type=_existing_dir,
                   metavar="DIR", help="derivatives folder with ROIs for ROI statistics: "
                   "<entities>[_desc-<rater>]_dseg images with a .tsv (index, name), or "
                   "<entities>_label-<roi>[_desc-<rater>]_mask images (ROIs in the input "
                   "dataset's anat folders are used too)")

    g = parser.add_argument_group("performance")
    g.add_argument("--nprocs", "--n-cpus", "--n_cpus", "--nthreads", dest="nipype.nprocs",
                   type=_positive_int, metavar="N", help="CPUs for all processes (default: all)")
    g.add_argument(*_aliases("--omp-nthreads"), dest="nipype.omp_nthreads", type=_positive_int,
                   metavar="N", help="threads per process (FFT workers; default: the CPUs shared "
                   "among the acquisitions that can run at once, at most 8)")
    g.add_argument("--mem", "--mem-mb", "--mem_mb", dest="nipype.mem_gb", type=_memory_mb,
                   metavar="SIZE", help="memory limit for scheduling (MB, or 8G)")
    g.add_argument(*_aliases("--low-mem"), dest="execution.low_mem", action="store_true",
                   help="trade speed for memory: nodes share a 2.5 GB budget (MultiProc), so "
                   "memory-heavy steps run one at a time (a 256x256x176, 6-echo run stays "
                   "within 3 GB)")
    g.add_argument(*_aliases("--use-plugin"), dest="use_plugin", type=_existing_file,
                   metavar="FILE", help="nipype plugin settings (TOML/JSON/YAML: plugin, "
                   "plugin_args), e.g. SLURM or SGE")

    g = parser.add_argument_group("QSM methods")
    g.add_argument(*_aliases("--config-file"), dest="config_file", type=_existing_file,
                   metavar="FILE", help="TOML configuration (as written to logs/ by every run); "
                   "command-line options override it")
    g.add_argument(*_aliases("--phase-sign"), dest="workflow.phase_sign", type=_phase_sign,
                   metavar="{+1,-1,auto}", default=wf.phase_sign,
                   help="phase convention: +1 if phase = +2*pi*f*TE, -1 for the opposite "
                   "handedness (a wrong sign flips the susceptibility; with fat, it swaps "
                   "water and fat everywhere). auto (default): with --fieldmap-method "
                   "waterfat/inphase the sign the fat signal supports (logged; +1 where there "
                   "is too little fat to tell), +1 otherwise")
    g.add_argument(*_aliases("--b0-tesla"), dest="workflow.b0_tesla", type=_positive_float,
                   metavar="T", help="main field (T) when sidecars lack ImagingFrequency and "
                   "MagneticFieldStrength, or to override them")
    g.add_argument(*_aliases("--mask-threshold"), dest="workflow.mask_threshold",
                   type=_positive_float, metavar="FRACTION",
                   help="brain-mask threshold as a fraction of the robust maximum magnitude "
                   "(default: automatic)")
    g.add_argument(*_aliases("--mask-erode-mm"), dest="workflow.mask_erode_mm",
                   type=_non_negative_float, default=wf.mask_erode_mm, metavar="MM",
                   help="extra erosion of the brain mask")
    g.add_argument(*_aliases("--fieldmap-method"), dest="workflow.fieldmap_method",
                   type=_choice(get_args(FieldmapMethod)), metavar=_metavar(FieldmapMethod), default=wf.fieldmap_method,
                   help="multi-echo field estimation: nlfit (nonlinear complex fit), linear "
                   "(weighted linear fit of unwrapped phase), waterfat (water-fat separation "
                   "with a multi-peak fat model and R2*: body/bone; writes PDFF, water and fat "
                   "maps), inphase (single-frequency fit of the echoes in phase with fat, "
                   "the lumbar-spine study's baseline; biased where fat is present)")
    g.add_argument(*_aliases("--readout-polarity"), dest="workflow.readout_polarity",
                   type=_choice(get_args(ReadoutPolarity)), metavar=_metavar(ReadoutPolarity),
                   default=wf.readout_polarity,
                   help="multi-echo readout: bipolar (alternating polarity: the phase of the "
                   "2nd, 4th, ... echoes, a constant plus a ramp, is estimated with the signal "
                   "model and removed; >= 4 echoes), monopolar (no correction), auto (default: "
                   "corrected where the bipolar model removes at least 25%% of the fit "
                   "residual; logged and written to the sidecars)")
    g.add_argument("--preset", dest="preset", choices=sorted(PRESETS), default=None,
                   help="method defaults for a body region (explicit options override): "
                   "body = " + ", ".join(f"{k.replace('_', '-')} {v}"
                                         for k, v in PRESETS["body"].items()))
    g.add_argument(*_aliases("--mask-type"), dest="workflow.mask_type",
                   type=_choice(get_args(MaskType)), metavar=_metavar(MaskType),
                   default=wf.mask_type, help="automatic mask: brain (brain extraction) or "
                   "body (signal threshold, hole filling; limbs/trunks with several parts)")
    g.add_argument(*_aliases("--fat-model"), dest="workflow.fat_model", default=wf.fat_model,
                   metavar="NAME|FILE|TABLE",
                   help="fat spectrum of waterfat/inphase: ismrm (6-peak liver), ren-marrow "
                   "(9-peak bone marrow), scanner7, single, a file with two columns (ppm, "
                   "relative amplitude), or inline 'ppm:amp,ppm:amp' (ppm relative to water)")
    g.add_argument(*_aliases("--water-ppm"), dest="workflow.water_ppm", type=_positive_float,
                   metavar="PPM", help="water chemical shift of the scan (about 4.65 ppm at "
                   "body temperature; default: the fat table's reference)")
    g.add_argument(*_aliases("--inphase-echoes"), dest="workflow.inphase_echoes",
                   type=_echo_list, metavar="N[,N...]",
                   help="echo numbers (1-based) for --fieldmap-method inphase, e.g. 1,3,5 "
                   "(default: the echoes in phase with the main fat peak)")
    g.add_argument(*_aliases("--waterfat-smoothness"), dest="workflow.waterfat_smoothness",
                   type=_non_negative_float, default=wf.waterfat_smoothness, metavar="W",
                   help="weight of the field smoothness that resolves water/fat ambiguity")
    g.add_argument(*_aliases("--study-weights"), dest="workflow.study_weights",
                   action="store_true", help="l2medi/tvmedi with waterfat: the calcaneus "
                   "study's data weight (maximum over echoes of the magnitude) and edge mask "
                   "(opposed-phase |W - F|) instead of the field-noise weight")
    g.add_argument(*_aliases("--unwrap-method"), dest="workflow.unwrap_method",
                   type=_choice(get_args(UnwrapMethod)), metavar=_metavar(UnwrapMethod), default=wf.unwrap_method,
                   help="spatial unwrapping: region-growing (quality-guided, exact), romeo "
                   "(multi-echo weights: template echo spatially, others temporally), "
                   "laplacian, reliability (scikit-image)")
    g.add_argument("--bfr-method", "--bfr_method", "--background-method", dest="workflow.bfr_method",
                   type=_choice(get_args(BackgroundMethod)), metavar=_metavar(BackgroundMethod), default=wf.bfr_method,
                   help="background field removal: vsharp (variable-radius SHARP), pdf "
                   "(projection onto dipole fields), lbv (Laplacian boundary value), resharp "
                   "(Tikhonov SHARP), ismv (iterative SMV), sharp, none (keep the total "
                   "field: only with --inversion-method tfi)")
    g.add_argument(*_aliases("--bfr-erode-mm"), dest="workflow.bfr_erode_mm",
                   type=_non_negative_float, default=wf.bfr_erode_mm, metavar="MM",
                   help="erode the brain mask by this much before background field removal: "
                   "voxels against the skull hold partial-volume bone/air sources and "
                   "unreliable phase")
    g.add_argument(*_aliases("--vsharp-max-radius-mm"), dest="workflow.vsharp_max_radius_mm",
                   type=_positive_float, default=wf.vsharp_max_radius_mm, metavar="MM",
                   help="largest V-SHARP kernel radius")
    g.add_argument(*_aliases("--inversion-method"), dest="workflow.inversion_method",
                   type=_choice(get_args(InversionMethod)), metavar=_metavar(InversionMethod), default=wf.inversion_method,
                   help="dipole inversion: tv (weighted total variation, ADMM), nltv "
                   "(nonlinear TV), medi (MEDI, L1 with edge mask), l2medi / tvmedi (the "
                   "calcaneus study's L2-MEDI by CG and TV-MEDI by Nesterov), tgv, rts, ndi "
                   "(nonlinear dipole inversion), ilsqr, l2 (closed-form Tikhonov), tkd / "
                   "tsvd (truncated k-space division / SVD), tfi (total field inversion of "
                   "the field without background removal: --bfr-method none; the body "
                   "preset's default)")
    g.add_argument("--lambda", "--inversion-lambda", "--inversion_lambda", dest="lambda_value",
                   type=_lambda, metavar="LAMBDA|auto",
                   help="regularisation weight of the inversion, or 'auto' to choose it per "
                   "acquisition (see --lambda-rule); default: 0.15 x the median field noise "
                   "(ppm) for tv, nltv and tfi, else the method's measured default")
    g.add_argument(*_aliases("--lambda-rule"), dest="workflow.lambda_rule",
                   type=_choice(get_args(LambdaRule)), metavar=_metavar(LambdaRule),
                   help="rule of --lambda auto: discrepancy (weighted residual = noise level; "
                   "the default with auto) or lcurve (maximum curvature; unreliable on QSM "
                   "phantoms in our measurements)")
    g.add_argument(*_aliases("--inversion-param"), dest="workflow.inversion_params",
                   type=_key_value, action=_MergeDict, metavar="KEY=VALUE",
                   help="extra parameter of the inversion method (repeatable), e.g. "
                   "threshold=0.15 for tkd, max_iter=300 for tv")
    g.add_argument(*_aliases("--lambda-sweep"), dest="workflow.lambda_sweep", nargs="+",
                   type=_positive_float, metavar="LAMBDA",
                   help="also write one <entities>_desc-lambda<value>_Chimap per weight (e.g. "
                   "2e-5 2e-4 2e-3); the group level relates their agreement with the "
                   "reference to lambda")
    g.add_argument(*_aliases("--bfr-param"), dest="workflow.bfr_params", type=_key_value,
                   action=_MergeDict, metavar="KEY=VALUE",
                   help="extra parameter of the background removal method (repeatable), e.g. "
                   "tol=1e-4 for pdf")
    g.add_argument("--reference", dest="workflow.reference",
                   type=_choice(get_args(ReferenceMethod)), metavar=_metavar(ReferenceMethod), default=wf.reference,
                   help="susceptibility reference: mean (mask mean = 0), csf (lateral "
                   "ventricles by low R2*), roi (<entities>_desc-reference_mask in --mask-dir), "
                   "water (body data with --fieldmap-method waterfat: soft tissue with fat "
                   "fraction < 10%%, i.e. muscle = 0), none")
    g.add_argument(*_aliases("--r2star-method"), dest="workflow.r2star_method",
                   type=_choice(get_args(R2starMethod)), metavar=_metavar(R2starMethod), default=wf.r2star_method,
                   help="R2* fit: nlls, loglinear, arlo")

    g.add_argument("--swi", dest="workflow.swi", action="store_true",
                   help="also write SWI, its minimum intensity projection and QSM venography "
                   "(maximum intensity projection of the Chimap)")
    g.add_argument(*_aliases("--mip-slab-mm"), dest="workflow.mip_slab_mm",
                   type=_positive_float, default=wf.mip_slab_mm, metavar="MM",
                   help="slab thickness of the minimum/maximum intensity projections")

    g = parser.add_argument_group("group level (study statistics)")
    g.add_argument(*_aliases("--reference-table"), dest="group.reference_table",
                   type=_existing_file, metavar="FILE",
                   help="TSV of reference measurements with columns participant_id, "
                   "[session,] roi, measure, value, unit (e.g. QCT BMD in mg/cm3 per vertebra)")
    g.add_argument(*_aliases("--group-by"), dest="group.group_by", metavar="COLUMN",
                   help="participants.tsv column holding the groups to compare")
    g.add_argument(*_aliases("--group-measure"), dest="group.group_measure", metavar="MEASURE",
                   help="reference measure whose participant mean is cut at --group-cutoffs "
                   "into groups (default: the only measure of the reference table)")
    g.add_argument(*_aliases("--group-cutoffs"), dest="group.group_cutoffs", nargs="+",
                   type=float, metavar="VALUE", help="ascending thresholds of "
                   "--group-measure (default 80 120: QCT BMD mg/cm3)")
    g.add_argument(*_aliases("--group-names"), dest="group.group_names", nargs="+",
                   metavar="NAME", help="names of the groups below, between and above the "
                   "cutoffs (default osteoporosis osteopenia normal)")
    g.add_argument("--covariates", dest="group.covariates", nargs="+", metavar="COLUMN",
                   help="participants.tsv columns adjusted for in the ANCOVA (e.g. age)")

    g = parser.add_argument_group("other options")
    g.add_argument("-w", "--work-dir", "--work_dir", dest="execution.work_dir", type=_path,
                   metavar="DIR", help="working directory (intermediate results; reruns "
                   "resume from it); default: <output_dir>/../qsmprep_work")
    g.add_argument(*_aliases("--clean-workdir"), dest="execution.clean_workdir",
                   action="store_true", help="delete the work directory after success")
    g.add_argument(*_aliases("--write-graph"), dest="execution.write_graph",
                   action="store_true", help="write the workflow graph (needs graphviz)")
    g.add_argument(*_aliases("--stop-on-first-crash"), dest="execution.stop_on_first_crash",
                   action="store_true", help="stop at the first failing step")
    g.add_argument(*_aliases("--resource-monitor"), dest="execution.resource_monitor",
                   action="store_true", help="record time and memory of every step")
    g.add_argument("--notrack", action="store_true", help="no-op: qsmprep never phones home")
    g.add_argument(*_aliases("--reports-only"), dest="reports_only", action="store_true",
                   help="only (re)build the HTML reports (sub-<label>.html; group/index.html "
                   "at the group level) from the outputs already in output_dir")
    g.add_argument(*_aliases("--boilerplate-only"), dest="boilerplate_only",
                   action="store_true", help="only write the methods boilerplate "
                   "(logs/CITATION.md and .bib) of the selected data and options; no "
                   "processing")
    return parser


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in help (when they say something), and the exit-code table kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [], False) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line (and ``--config-file``) into a :class:`Config`."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    config = Config()
    if namespace.config_file:
        try:
            config = Config.from_toml(namespace.config_file)
        except ConfigError as error:
            parser.error(str(error))
        explicit = _explicit_dests(parser, argv)
    else:
        explicit = None
    if namespace.preset:
        given = explicit if explicit is not None else _explicit_dests(parser, argv)
        preset = dict(PRESETS[namespace.preset])
        from qsmprep.recon.inversion import TOTAL_FIELD_METHODS

        two_step = (
            "workflow.bfr_method" in given and getattr(namespace, "workflow.bfr_method") != "none"
        ) or ("workflow.inversion_method" in given and getattr(
            namespace, "workflow.inversion_method") not in TOTAL_FIELD_METHODS)
        if two_step:  # a background removal or local-field inversion was asked for
            preset.update(PRESET_TWO_STEP.get(namespace.preset, {}))
        for key, value in preset.items():
            if f"workflow.{key}" not in given:
                setattr(config.workflow, key, value)
                setattr(namespace, f"workflow.{key}", None)  # keep the preset value
    for dest, value in vars(namespace).items():
        if "." not in dest or value is None:
            continue
        if explicit is not None and dest not in explicit:
            continue  # the config file wins over a parser default
        section, key = dest.split(".", 1)
        setattr(getattr(config, section), key, value)
    if namespace.lambda_value == "auto":
        config.workflow.lambda_rule = config.workflow.lambda_rule or "discrepancy"
    elif namespace.lambda_value is not None:
        config.workflow.inversion_lambda = namespace.lambda_value
        config.workflow.lambda_rule = None
    try:
        config.workflow.validate()
    except ConfigError as error:
        parser.error(str(error))
    if config.workflow.fieldmap_method in ("waterfat", "inphase"):
        from qsmprep.interfaces.waterfat import resolve_fat_model

        try:
            resolve_fat_model(config.workflow.fat_model, config.workflow.water_ppm)
        except ValueError as error:
            parser.error(f"--fat-model: {error}")
    execution = config.execution
    for key in ("participant_label", "session_label"):  # also when read from --config-file
        try:
            setattr(execution, key, [_label(str(v)) for v in getattr(execution, key)])
        except argparse.ArgumentTypeError as error:
            parser.error(f"{key}: {error}")
    execution.bids_dir = namespace.bids_dir
    execution.output_dir = namespace.output_dir
    execution.analysis_level = namespace.analysis_level
    return config, namespace


def _explicit_dests(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations given explicitly on the command line (not parser defaults)."""
    sentinel = object()
    probe = build_parser()
    for action in probe._actions:
        if action.dest not in ("help", "version") and action.option_strings:
            action.default = sentinel
    namespace, _ = probe.parse_known_args(argv)
    return {dest for dest, value in vars(namespace).items() if value is not sentinel}
