"""Per-participant report ``sub-<label>.html`` (output root) with figures in
``sub-<label>/figures/``, assembled after the run from the written derivatives, their JSON
sidecars and the run's logs (``logs/config-*.toml``, ``logs/runtime-*.tsv``,
``logs/qsmprep-*.log``, ``logs/crash``) — never from the state of a running workflow, so
``--reports-only`` rebuilds the same page.

A figure that cannot be drawn is reported in the page's errors section and counted; it never
stops the other figures or the page.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import boilerplate, figures, runlog
from .html import esc, figure, key_values, page, table

LOGGER = logging.getLogger("qsmprep")

GAMMA_BAR_MHZ_PER_T = 42.57747892

#: Fixed display windows so that participants compare (brain / body-bone data).
CHI_WINDOW_PPM = {"brain": 0.15, "body": 1.0}
LOCAL_FIELD_WINDOW_PPM = {"brain": 0.05, "body": 0.5}
#: R2* window top per tesla (R2* grows about linearly with B0): 60 1/s for brain at 3 T
R2STAR_WINDOW_PER_S_PER_T = {"brain": 20.0, "body": 100.0}

MASK_DESCS = ("brain", "body")


@dataclass
class AcquisitionOutputs:
    """The written derivatives of one acquisition (``prefix``: its entities, e.g.
    ``sub-01_ses-2_run-1``)."""

    subject_dir: Path
    anat: Path
    prefix: str
    mask_desc: str

    @property
    def fmap(self) -> Path:
        return self.anat.parent / "fmap"

    def anat_file(self, suffix: str, desc: str | None = None) -> Path | None:
        name = f"{self.prefix}{'_desc-' + desc if desc else ''}_{suffix}"
        for extension in (".nii.gz", ".nii"):
            path = self.anat / (name + extension)
            if path.exists():
                return path
        return None

    def fmap_file(self, suffix: str, desc: str) -> Path | None:
        path = self.fmap / f"{self.prefix}_desc-{desc}_{suffix}.nii.gz"
        return path if path.exists() else None

    def sidecar(self, image: Path | None) -> dict[str, Any]:
        if image is None:
            return {}
        path = Path(re.sub(r"\.nii(\.gz)?$", ".json", str(image)))
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def lambda_maps(self) -> list[tuple[float, Path]]:
        out = []
        for path in sorted(self.anat.glob(f"{self.prefix}_desc-lambda*_Chimap.nii*")):
            value = self.sidecar(path).get("RegularizationParameter")
            if isinstance(value, (int, float)):
                out.append((float(value), path))
        return sorted(out)


def find_acquisitions(output_dir: Path, participant: str) -> list[AcquisitionOutputs]:
    """Acquisitions of ``participant`` with outputs (every acquisition writes its mask)."""
    subject_dir = Path(output_dir) / f"sub-{participant}"
    found = []
    for desc in MASK_DESCS:
        for path in sorted(subject_dir.glob(f"**/anat/*_desc-{desc}_mask.nii*")):
            prefix = re.sub(rf"_desc-{desc}_mask\.nii(\.gz)?$", "", path.name)
            found.append(AcquisitionOutputs(subject_dir, path.parent, prefix, desc))
    return sorted(found, key=lambda a: a.prefix)


def participants_with_outputs(output_dir: Path) -> list[str]:
    """Labels of the ``sub-*`` folders that hold derivatives."""
    labels = []
    for path in sorted(Path(output_dir).glob("sub-*")):
        if path.is_dir() and any(path.glob("**/anat/*_mask.nii*")):
            labels.append(path.name[4:])
    return labels


# ---------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------
@dataclass
class _Volume:
    data: np.ndarray  # closest-canonical (RAS) orientation
    zooms: tuple[float, float, float]
    affine: np.ndarray  # of the file (before reorientation)
    shape: tuple[int, ...]


def _load(path: Path | None) -> _Volume | None:
    if path is None:
        return None
    import nibabel as nb

    image = nb.load(str(path))
    canonical = nb.as_closest_canonical(image)
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    return _Volume(data, tuple(float(z) for z in canonical.header.get_zooms()[:3]),
                   image.affine, image.shape[:3])


def _canonical_like(labels: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nb

    image = nb.Nifti1Image(labels.astype(np.int32), affine)
    return np.asarray(nb.as_closest_canonical(image).dataobj).astype(np.int32)


def _robust_range(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------
@dataclass
class _Section:
    title: str
    anchor: str
    html: list[str] = field(default_factory=list)


@dataclass
class ReportResult:
    """Where the page is and what went wrong while building it."""

    html: Path
    figures: list[Path]
    failures: list[str]


class _Builder:
    def __init__(self, output_dir: Path, participant: str):
        self.output_dir = Path(output_dir)
        self.participant = participant
        self.figures_dir = self.output_dir / f"sub-{participant}" / "figures"
        self.written: list[Path] = []
        self.failures: list[str] = []

    def draw(self, name: str, make: Callable[[], Any]) -> str | None:
        """Draw and save a figure; returns its path relative to the output root, or None
        (failure recorded)."""
        try:
            fig = make()
            if fig is None:
                return None
            (path,) = figures.save_figure(fig, self.figures_dir / f"{name}.svg")
        except Exception as error:  # one failed figure must not stop the report
            LOGGER.warning("report figure %s failed: %s", name, error, exc_info=True)
            self.failures.append(f"figure {name}: {type(error).__name__}: {error}")
            return None
        self.written.append(path)
        return path.relative_to(self.output_dir).as_posix()


def build_participant_report(output_dir: Path, participant: str) -> ReportResult:
    """Write ``sub-<participant>.html`` and its figures from the outputs in ``output_dir``."""
    from qsmprep import __version__
    from qsmprep.bids import atomic_write_text

    output_dir = Path(output_dir)
    participant = participant.removeprefix("sub-")
    builder = _Builder(output_dir, participant)
    record = runlog.latest_run(output_dir, participant)
    workflow_options = record.workflow if record else {}
    acquisitions = find_acquisitions(output_dir, participant)
    since = record.config_file.stat().st_mtime if record else None

    summary_html: list[str] = []
    figure_sections: list[_Section] = []
    method_paragraphs: list[str] = []
    for acquisition in acquisitions:
        try:
            summary, facts = _summary(acquisition, record)
            summary_html.append(summary)
            method_paragraphs.extend(_methods(facts, workflow_options))
        except Exception as error:
            LOGGER.warning("report summary of %s failed: %s", acquisition.prefix, error,
                           exc_info=True)
            builder.failures.append(f"summary of {acquisition.prefix}: "
                                    f"{type(error).__name__}: {error}")
            facts = {}
        figure_sections.append(_figures(builder, acquisition, workflow_options, facts))

    sections: list[tuple[str, str, str]] = []
    overview = [f"<p>{len(acquisitions)} acquisition(s) with outputs in "
                f"<code>sub-{esc(participant)}/</code>.</p>"]
    if not acquisitions:
        overview.append('<div class="error">No derivatives were found for this participant '
                        "(see the errors below and the run log).</div>")
    overview.extend(summary_html)
    overview.append(_run_html(output_dir, participant, record))
    sections.append(("summary", "Summary", "\n".join(overview)))
    for section in figure_sections:
        sections.append((section.anchor, section.title, "\n".join(section.html)))
    paragraphs = [boilerplate.describe_run(version=__version__,
                                           n_acquisitions=len(acquisitions))]
    for paragraph in method_paragraphs:
        if paragraph not in paragraphs:
            paragraphs.append(paragraph)
    sections.append(("methods", "Methods",
                     '<div class="methods">' + boilerplate.to_html(paragraphs) + "</div>"))
    sections.append(("errors", "Errors", _errors_html(output_dir, participant, since,
                                                      builder.failures)))
    _remove_stale(builder)
    subtitle = (f"qsmprep {__version__} · run {record.run_id}" if record
                else f"qsmprep {__version__} · no run configuration found in logs/")
    path = output_dir / f"sub-{participant}.html"
    atomic_write_text(path, page(f"qsmprep: sub-{participant}", subtitle, sections))
    return ReportResult(path, list(builder.written), list(builder.failures))


def _remove_stale(builder: _Builder) -> None:
    """Delete figures of an earlier build that this build did not write (a renamed or
    no longer applicable figure must not linger next to the page)."""
    written = {p.name for p in builder.written}
    for path in builder.figures_dir.glob("*_desc-*_*.svg"):
        if path.name not in written:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------
def _summary(acquisition: AcquisitionOutputs, record: runlog.RunRecord | None
             ) -> tuple[str, dict[str, Any]]:
    chi = acquisition.anat_file("Chimap")
    r2star = acquisition.anat_file("R2starmap")
    mask = acquisition.anat_file("mask", acquisition.mask_desc)
    field = acquisition.fmap_file("fieldmap", "total")
    meta: dict[str, Any] = {}
    for image in (mask, r2star, field, chi):  # later (more complete) sidecars win
        meta.update(acquisition.sidecar(image))
    echo_times = meta.get("EchoTime") or []
    if isinstance(echo_times, (int, float)):
        echo_times = [echo_times]
    b0 = meta.get("MagneticFieldStrength")
    facts = {"echo_times": [float(t) for t in echo_times], "b0": b0,
             "has_phase": chi is not None, "meta": meta,
             "body": acquisition.mask_desc == "body" or "FieldMapping" in meta}
    shape = None
    if mask is not None:
        import nibabel as nb

        shape = nb.load(str(mask)).shape[:3]
    sources = meta.get("Sources") or []
    rows: list[tuple[str, Any]] = [
        ("Inputs found", "<br>".join(esc(s) for s in sources) or "not recorded"),
        ("Echoes", esc(f"{len(echo_times)}: TE = " + ", ".join(
            f"{1000 * float(t):g}" for t in echo_times) + " ms") if echo_times
         else "not recorded"),
        ("B0", esc(f"{b0:g} T") if isinstance(b0, (int, float)) else "not recorded"),
    ]
    direction = meta.get("B0Direction")
    if direction is not None:
        angle = meta.get("B0ObliquityAngle")
        rows.append(("B0 direction (voxel axes)", esc(
            "(" + ", ".join(f"{float(v):.4f}" for v in direction) + ")"
            + (f"; obliquity {float(angle):.1f}°" if angle is not None else ""))))
    voxel = meta.get("VoxelSize")
    if voxel:
        rows.append(("Voxel size", esc(" × ".join(f"{float(v):g}" for v in voxel) + " mm")))
    if shape is not None:
        rows.append(("Matrix", esc(" × ".join(str(n) for n in shape))))
    if meta.get("PhaseUnits"):
        rows.append(("Phase units (input)", esc(meta["PhaseUnits"])))
    if "PhaseSign" in meta:
        check = meta.get("PhaseSignCheck")
        rows.append(("Phase sign", esc(f"{meta['PhaseSign']}" + (f" ({check})" if check else ""))))
    polarity = meta.get("ReadoutPolarityCorrection")
    if isinstance(polarity, dict) and polarity.get("Message"):
        rows.append(("Readout polarity", esc(polarity["Message"])))
    rows.extend(_method_rows(acquisition, meta, chi, r2star, mask))
    swap = meta.get("SwapCheckMessage")
    if swap:
        verdict = _swap_verdict(swap)
        rows.append(("Water/fat swap check",
                     f'<span class="verdict-{esc(verdict)}">{esc(verdict)}</span> — '
                     f"{esc(swap)}"))
    html = (f"<h3>{esc(acquisition.prefix)}</h3>"
            + key_values(rows, raw_values=True, css_id=f"summary-{acquisition.prefix}"))
    return html, facts


def _swap_verdict(message: str) -> str:
    match = re.search(r"swap check: (\w+)", message)
    return match.group(1) if match else "unknown"


def _params(values: Any) -> str:
    if not isinstance(values, dict) or not values:
        return ""
    return ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                     for k, v in sorted(values.items()))


def _method_rows(acquisition, meta, chi, r2star, mask) -> list[tuple[str, str]]:
    rows = []
    mask_meta = acquisition.sidecar(mask)
    if mask_meta.get("Description"):
        rows.append(("Mask", esc(mask_meta["Description"])))
    if meta.get("FieldMapping"):
        text = meta["FieldMapping"]
        if meta.get("FatModel"):
            text += f" (fat model {meta['FatModel']})"
        rows.append(("Field mapping", esc(text)))
    elif meta.get("EchoCombination"):
        rows.append(("Field estimation", esc(meta["EchoCombination"])))
    if meta.get("PhaseUnwrapping"):
        rows.append(("Phase unwrapping", esc(meta["PhaseUnwrapping"])))
    if chi is not None:
        chi_meta = acquisition.sidecar(chi)
        bfr = chi_meta.get("BackgroundFieldRemoval")
        if bfr:
            extra = _params(chi_meta.get("BackgroundFieldRemovalParameters"))
            erosion = chi_meta.get("MaskErosionBeforeBackgroundRemoval")
            text = bfr + (f" ({extra})" if extra else "")
            if erosion:
                text += f"; mask eroded by {erosion:g} mm first"
            rows.append(("Background field removal", esc(text)))
        inversion = chi_meta.get("DipoleInversion")
        if inversion:
            text = inversion + f" ({_params(chi_meta.get('DipoleInversionParameters'))})"
            if chi_meta.get("RegularizationSelection"):
                text += f"; λ chosen by {chi_meta['RegularizationSelection']}"
            rows.append(("Dipole inversion", esc(text)))
        if chi_meta.get("SusceptibilityReference"):
            offset = chi_meta.get("SusceptibilityReferenceOffset")
            rows.append(("Susceptibility reference", esc(
                chi_meta["SusceptibilityReference"]
                + (f" (offset {offset:+.4f} ppm removed)" if isinstance(offset, float)
                   else ""))))
    if r2star is not None:
        r2_meta = acquisition.sidecar(r2star)
        fit = r2_meta.get("R2starFit") or r2_meta.get("EstimationAlgorithm")
        if fit:
            rows.append(("R2* fit", esc(fit)))
    return rows


def _methods(facts: dict[str, Any], workflow_options: dict[str, Any]) -> list[str]:
    """Boilerplate paragraph of one acquisition from the run's options and its sidecars."""
    from qsmprep.config import WorkflowConfig, set_value

    if not facts.get("echo_times") or not isinstance(facts.get("b0"), (int, float)):
        return []
    options = WorkflowConfig()
    for key, value in workflow_options.items():
        try:
            set_value(options, key, value)
        except Exception:  # an option of another qsmprep version: keep the default
            continue
    meta = facts.get("meta", {})
    if meta.get("DipoleInversion"):  # what actually ran wins over the configuration
        options.inversion_method = meta["DipoleInversion"]
        lam = (meta.get("DipoleInversionParameters") or {}).get("lam")
        if isinstance(lam, (int, float)) and not meta.get("RegularizationSelection"):
            options.inversion_lambda = float(lam)
    if meta.get("BackgroundFieldRemoval"):
        options.bfr_method = meta["BackgroundFieldRemoval"]
    return [boilerplate.describe_qsm(options, echo_times=facts["echo_times"],
                                     b0_tesla=float(facts["b0"]),
                                     has_phase=bool(facts.get("has_phase")))]


def _run_html(output_dir: Path, participant: str, record: runlog.RunRecord | None) -> str:
    out = ["<h3>Run</h3>"]
    if record is None:
        out.append('<div class="warning">No run configuration in logs/ covers this '
                   "participant; versions and run times are unknown.</div>")
        return "\n".join(out)
    pairs = [("Run", record.run_id), ("Configuration", f"logs/{record.config_file.name}"),
             ("Command", record.command or "not recorded"),
             ("Versions", ", ".join(record.versions) or "not recorded")]
    out.append(key_values(pairs, css_id="run-info"))
    rows = runlog.read_runtime(output_dir, record.run_id, participant)
    if rows:
        steps = [r for r in rows if not r["step"].split(".")[-1].startswith(("ds_", "inputnode",
                                                                             "outputnode"))]
        steps = sorted(steps, key=lambda r: (r["acquisition"], r["start"]))
        total = sum(float(r["duration_s"]) for r in steps if r["cached"] == "0")
        out.append(f"<p>Run time per step (nipype runtime; total of computed steps "
                   f"{total:.1f} s):</p>")
        memory = any(r.get("peak_mem_gb") for r in steps)  # with --resource-monitor
        out.append(table(
            ("acquisition", "step", "duration (s)", *(("peak memory (GB)",) if memory else ()),
             "note"),
            [(r["acquisition"], r["step"], f"{float(r['duration_s']):.2f}",
              *((r["peak_mem_gb"] or "",) if memory else ()),
              "reused from an earlier run" if r["cached"] == "1" else "") for r in steps],
            numeric=(2, 3) if memory else (2,), css_id="runtime"))
    else:
        out.append("<p>Run times per step were not recorded for this run.</p>")
    messages = runlog.log_messages(output_dir, record.run_id, participant)
    out.append("<h3>Warnings</h3>")
    if messages:
        out.extend(f'<div class="{"error" if level == "ERROR" else "warning"}">'
                   f"{esc(level)}: {esc(message)}</div>" for level, message in messages)
    else:
        out.append('<div class="ok">No warnings were logged for this participant.</div>')
    return "\n".join(out)


def _errors_html(output_dir: Path, participant: str, since: float | None,
                 failures: list[str]) -> str:
    out = []
    found = runlog.crashes(output_dir, participant, since)
    for crash in found:
        out.append(f'<div class="error"><b>{esc(crash.node)}</b>: {esc(crash.message)}'
                   f"<details><summary>crash file logs/crash/{esc(crash.path.name)}</summary>"
                   f"<pre>{esc(crash.text[-20000:])}</pre></details></div>")
    for failure in failures:
        out.append(f'<div class="error">report: {esc(failure)}</div>')
    if not out:
        return '<div class="ok" id="no-errors">No errors: every step of this participant ' \
               "completed and every figure was drawn.</div>"
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------
def _figures(builder: _Builder, acquisition: AcquisitionOutputs,
             workflow_options: dict[str, Any], facts: dict[str, Any]) -> _Section:
    section = _Section(f"Figures: {acquisition.prefix}", f"figures-{acquisition.prefix}")
    kind = _kind(acquisition, workflow_options, facts)
    p = acquisition.prefix
    try:
        mask = _load(acquisition.anat_file("mask", acquisition.mask_desc))
        qsm_mask = _load(acquisition.anat_file("mask", "qsm"))
        magnitude = (_load(acquisition.fmap_file("magnitude", "total"))
                     or _load(acquisition.anat_file("S0map")))
    except Exception as error:
        builder.failures.append(f"loading the masks of {p}: {type(error).__name__}: {error}")
        section.html.append('<div class="error">The masks could not be read.</div>')
        return section
    if mask is None:
        return section
    brain = mask.data > 0
    valid = qsm_mask.data > 0 if qsm_mask is not None else brain
    zooms = mask.zooms
    b0 = facts.get("b0") if isinstance(facts.get("b0"), (int, float)) else None
    hz_per_ppm = GAMMA_BAR_MHZ_PER_T * b0 if b0 else None

    def add(name: str, make: Callable[[], Any], caption: str, *, plot: bool = False) -> None:
        src = builder.draw(f"{p}_desc-{name}_{'plot' if plot else 'mosaic'}", make)
        if src is not None:
            section.html.append(figure(src, caption, alt=f"{p} {name}", plot=plot))
        else:
            section.html.append(f'<div class="error">Figure {esc(name)} could not be drawn '
                                "(see Errors).</div>")

    if magnitude is not None:
        def make_mask():
            lo, hi = _robust_range(magnitude.data[brain], 0.5, 99.5)
            outlines = [figures.Outline(figures.outline_volume(brain),
                                        figures.OUTLINE_COLOURS["mask"], "mask")]
            if qsm_mask is not None:
                outlines.append(figures.Outline(figures.outline_volume(valid),
                                                figures.OUTLINE_COLOURS["qsm"], "qsm"))
            return figures.mosaic(figures.Layer(magnitude.data, 0.0, hi, "gray"),
                                  extent_mask=brain, voxel_size=zooms, outlines=outlines,
                                  title=f"{acquisition.mask_desc} mask over the magnitude")
        valid_text = (" and the mask where the local field and susceptibility are valid "
                      "(cyan, after the erosion by background field removal)"
                      if qsm_mask is not None else "")
        add("mask", make_mask,
            f"{esc(acquisition.mask_desc.capitalize())} mask (orange){valid_text} over the "
            "first-echo magnitude. Check that no tissue is cut and no skull, air or vessel "
            "outside is included.")

    field = _load(acquisition.fmap_file("fieldmap", "total"))
    if field is not None:
        def make_field():
            lo, hi = _robust_range(field.data[brain], 1, 99)
            return figures.mosaic(figures.Layer(field.data, lo, hi, "RdBu_r",
                                                "total field (Hz)", brain),
                                  extent_mask=brain, voxel_size=zooms,
                                  title="total field")
        add("totalfield", make_field,
            "Total field (Hz) inside the mask, window 1st–99th percentile. Look for "
            "unwrapping errors: sharp steps or islands of a different level.")

    local = _load(acquisition.anat_file("localfield"))
    if local is not None:
        def make_local():
            if hz_per_ppm:
                half = LOCAL_FIELD_WINDOW_PPM[kind] * hz_per_ppm
            else:
                half = _robust_range(np.abs(local.data[valid]), 0, 99)[1]
            return figures.mosaic(figures.Layer(local.data, -half, half, "RdBu_r",
                                                "local field (Hz)", valid),
                                  extent_mask=brain, voxel_size=zooms, title="local field")
        window = (f"±{LOCAL_FIELD_WINDOW_PPM[kind]:g} ppm (±{LOCAL_FIELD_WINDOW_PPM[kind] * hz_per_ppm:.1f} Hz)"
                  if hz_per_ppm else "robust")
        add("localfield", make_local,
            f"Local (tissue) field after background field removal, fixed window {window}. "
            "Residual background shows as smooth gradients towards the mask edge.")

    chi = _load(acquisition.anat_file("Chimap"))
    chi_half = CHI_WINDOW_PPM[kind]
    if chi is not None:
        def make_chi():
            return figures.mosaic(figures.Layer(chi.data, -chi_half, chi_half, "gray",
                                                "χ (ppm)", valid),
                                  extent_mask=brain, voxel_size=zooms,
                                  title="susceptibility (Chimap)")
        add("chimap", make_chi,
            f"Susceptibility (ppm), fixed window ±{chi_half:g} ppm ({kind} data) so that "
            "participants compare. Look for streaks around strong sources (calcifications, "
            "haemorrhage, bone) and for residual background at the edges.")

    r2star = _load(acquisition.anat_file("R2starmap"))
    if r2star is not None:
        top = float(round(R2STAR_WINDOW_PER_S_PER_T[kind] * (b0 or 3.0), -1))

        def make_r2():
            return figures.mosaic(figures.Layer(r2star.data, 0.0, top, "inferno",
                                                "R2* (1/s)", brain),
                                  extent_mask=brain, voxel_size=zooms, title="R2*")
        add("r2star", make_r2, f"R2* (1/s), fixed window 0–{top:g} 1/s "
            f"({R2STAR_WINDOW_PER_S_PER_T[kind]:g} 1/s per tesla, {kind} data).")

    water = _load(acquisition.anat_file("M0map", "water"))
    fat = _load(acquisition.anat_file("M0map", "fat"))
    pdff = _load(acquisition.anat_file("PDFFmap"))
    swap = facts.get("meta", {}).get("SwapCheckMessage", "")
    if water is not None or fat is not None or pdff is not None:
        section.html.append("<h3>Water–fat separation</h3>")
        if swap:
            verdict = _swap_verdict(swap)
            section.html.append(
                f'<p id="swap-verdict-{esc(p)}">Swap detector: <span class="verdict-'
                f'{esc(verdict)}">{esc(verdict)}</span> — {esc(swap)}</p>')
        signal_top = _robust_range(np.concatenate(
            [v.data[brain] for v in (water, fat) if v is not None]), 0, 99.5)[1]
        for name, volume, label in (("water", water, "water |W|"), ("fat", fat, "fat |F|")):
            if volume is None:
                continue
            add(name, lambda volume=volume, label=label: figures.mosaic(
                figures.Layer(volume.data, 0.0, signal_top, "gray", label, brain),
                extent_mask=brain, voxel_size=zooms, title=label),
                f"{label.split()[0].capitalize()} signal amplitude at TE = 0; the same window "
                "for water and fat. A swap shows as fat-bright regions inside water tissue "
                "(or the reverse).")
        if pdff is not None:
            add("pdff", lambda: figures.mosaic(
                figures.Layer(pdff.data, 0.0, 100.0, "viridis", "PDFF (%)", brain),
                extent_mask=brain, voxel_size=zooms,
                title="proton-density fat fraction" + (f" — swap check: {_swap_verdict(swap)}"
                                                       if swap else "")),
                "Proton-density fat fraction (%), fixed window 0–100%.")

    if chi is not None:
        chi_meta = acquisition.sidecar(acquisition.anat_file("Chimap"))
        residual = chi_meta.get("RegularizationResidualNorms")
        norms = chi_meta.get("RegularizationNorms")
        lambdas = chi_meta.get("RegularizationCandidates")
        if residual and norms and lambdas and len(residual) == len(norms) == len(lambdas):
            chosen = (chi_meta.get("DipoleInversionParameters") or {}).get("lam")
            criterion = chi_meta.get("RegularizationSelection", "")
            add("lcurve", lambda: figures.lcurve(
                lambdas, residual, norms, chosen=chosen, criterion=criterion,
                curvature=chi_meta.get("RegularizationCurvature"),
                target=chi_meta.get("RegularizationTarget")),
                f"Regularisation weight choice ({esc(criterion)}): L-curve of the "
                "regulariser norm against the data residual over the candidate λ (left) and "
                "the residual against λ (right); the chosen λ is circled.", plot=True)
        sweep = acquisition.lambda_maps()
        if sweep:
            def make_sweep():
                layers = []
                for value, path in sweep:
                    volume = _load(path)
                    layers.append((f"λ = {value:.3g}", figures.Layer(
                        volume.data, -chi_half, chi_half, "gray", "", valid)))
                layers.append(("main map", figures.Layer(chi.data, -chi_half, chi_half,
                                                         "gray", "", valid)))
                return figures.thumbnails(layers, extent_mask=brain, voxel_size=zooms,
                                          title="λ sweep (central slice)")
            add("lambdasweep", make_sweep,
                f"The λ sweep (<code>--lambda-sweep</code>): the central slice of the "
                f"susceptibility map for each λ, window ±{chi_half:g} ppm. Small λ: noise "
                "and streaks; large λ: blurred, flattened contrast.")
        _roi_figures(builder, section, acquisition, chi, valid, brain, zooms, chi_half, add)
    return section


def _kind(acquisition: AcquisitionOutputs, options: dict[str, Any],
          facts: dict[str, Any]) -> str:
    """'body' for body/bone data (wider windows), else 'brain'."""
    if options.get("mask_type") == "body" or options.get("fieldmap_method") in (
            "waterfat", "inphase"):
        return "body"
    return "body" if facts.get("body") else "brain"


def _roi_figures(builder, section, acquisition, chi, valid, brain, zooms, chi_half, add):
    """ROI outlines over the Chimap and the Chimap rows of the ROI statistics table."""
    sources = _roi_sources(builder.output_dir, acquisition)
    stats_path = acquisition.anat / f"{acquisition.prefix}_desc-rois_stats.tsv"
    if not sources and not stats_path.exists():
        return
    section.html.append("<h3>Regions of interest</h3>")
    for rater, items in sorted(sources.items()):
        try:
            labels, names = _roi_labels(items, chi)
        except Exception as error:
            builder.failures.append(f"ROIs of {acquisition.prefix} ({rater}): "
                                    f"{type(error).__name__}: {error}")
            continue
        if not labels.any():
            continue
        colours = figures.label_colours(int(labels.max()))
        legend = " ".join(
            f'<span class="swatch" style="background: rgb({int(255 * colours[k - 1][0])},'
            f'{int(255 * colours[k - 1][1])},{int(255 * colours[k - 1][2])})"></span>'
            f"{esc(names.get(k, str(k)))}" for k in sorted(names) if k <= len(colours))
        name = "rois" + re.sub(r"[^A-Za-z0-9]", "", rater)
        add(name, lambda labels=labels: figures.mosaic(
            figures.Layer(chi.data, -chi_half, chi_half, "gray", "χ (ppm)", valid),
            extent_mask=brain, voxel_size=zooms,
            outlines=[figures.Outline(labels, None, "rois")],
            title=f"ROIs ({rater}) over the susceptibility map"),
            f"ROIs drawn by rater <b>{esc(rater)}</b> over the susceptibility map: {legend}")
    if stats_path.exists():
        section.html.append(_roi_table(stats_path))


def _roi_sources(output_dir: Path, acquisition: AcquisitionOutputs) -> dict[str, list]:
    """ROI images of this acquisition by rater (input dataset and ``--roi-dir``), from the
    ROI statistics' data dictionary or by scanning the folders of the run's configuration."""
    try:
        from qsmprep import study_io
    except ImportError:  # ROI support not installed in this version
        return {}
    record = runlog.latest_run(output_dir, acquisition.prefix.split("_")[0][4:])
    roots = []
    if record is not None:
        execution = record.config.get("execution", {})
        for key in ("bids_dir", "roi_dir"):
            if execution.get(key):
                roots.append(Path(execution[key]))
    from qsmprep.bids import filename_entities

    wanted = filename_entities(f"{acquisition.prefix}_x.nii.gz")
    sources = [source for root in roots if root.exists()
               for source in study_io.scan_roi_files(root)]
    by_rater: dict[str, list] = {}
    stats = acquisition.anat / f"{acquisition.prefix}_desc-rois_stats.tsv"
    if stats.exists():  # the ROIs the statistics used, transferred ones included
        import csv

        by_name = {Path(s.path).name: s for s in sources}
        with stats.open(newline="") as stream:
            used = sorted({(row.get("rater", ""), row.get("roi_source", ""))
                           for row in csv.DictReader(stream, delimiter="\t")})
        for rater, name in used:
            if name in by_name and by_name[name] not in by_rater.get(rater, []):
                by_rater.setdefault(rater, []).append(by_name[name])
        if by_rater:
            return by_rater
    for source in sources:  # no table: the ROIs drawn on this acquisition
        entities = {k: v for k, v in source.entities.items()
                    if k in wanted or k in ("subject", "session", "run", "acquisition")}
        if all(entities.get(k) == v for k, v in wanted.items()) and all(
                k in wanted for k in entities):
            by_rater.setdefault(source.rater, []).append(source)
    return by_rater


def _roi_labels(sources: list, chi: _Volume) -> tuple[np.ndarray, dict[int, str]]:
    """One label image (on the Chimap grid, RAS) of a rater's ROI files, and label names."""
    import nibabel as nb

    labels = np.zeros(chi.shape, np.int32)
    names: dict[int, str] = {}
    for source in sorted(sources, key=lambda s: s.path):
        image = nb.load(source.path)
        data = np.rint(np.asarray(image.dataobj)).astype(np.int32)
        data = figures.resample_labels(data, image.affine, chi.shape, chi.affine)
        if source.kind == "dseg":
            for value in np.unique(data[data > 0]):
                new = len(names) + 1
                names[new] = source.names.get(int(value), str(int(value)))
                labels[(data == value) & (labels == 0)] = new
        else:
            new = len(names) + 1
            names[new] = source.entities.get("label", Path(source.path).name)
            labels[(data > 0) & (labels == 0)] = new
    return _canonical_like(labels, chi.affine), names


def _roi_table(path: Path, limit: int = 60) -> str:
    import csv

    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream, delimiter="\t"))
    chi_rows = [r for r in rows if r.get("map") == "Chimap"
                and r.get("map_desc") in ("", "n/a", None)] or rows
    columns = [c for c in ("rater", "roi", "roi_mapping", "n_voxels", "mean", "sd", "median",
                           "units")
               if chi_rows and c in chi_rows[0]]
    if not columns:
        columns = list(chi_rows[0])[:8] if chi_rows else []
    shown = chi_rows[:limit]
    note = (f"<p>First {limit} of {len(chi_rows)} rows; the full table is "
            f"<code>{esc(path.name)}</code>.</p>" if len(chi_rows) > limit else "")
    body = table(columns, ([_fmt(r.get(c, "")) for c in columns] for r in shown),
                 numeric=tuple(i for i, c in enumerate(columns)
                               if c in ("n_voxels", "mean", "sd", "median")))
    return (f"<p>ROI statistics of the susceptibility map "
            f"(<code>{esc(path.name)}</code>):</p>" + body + note)


def _fmt(value: str) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return f"{number:.4g}"
