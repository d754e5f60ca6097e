"""The top-level workflow: one QSM sub-workflow (and its sinks) per acquisition."""

from __future__ import annotations

import logging
import re

from nipype.pipeline import engine as pe

from qsmprep import __version__
from qsmprep.bids import Acquisition
from qsmprep.config import Config
from qsmprep.reports.boilerplate import describe_qsm, describe_run
from qsmprep.study_io import scan_label

from .outputs import init_ds_qsm_wf
from .qsm import OUTPUT_FIELDS, QSM_FIELDS, WATERFAT_FIELDS, init_qsm_wf
from .resources import NodeMemory
from .roi import connect_roi_wf
from .sweep import connect_lambda_sweep

LOGGER = logging.getLogger("qsmprep")


def init_qsmprep_wf(
    config: Config,
    acquisitions: list[Acquisition],
    *,
    shapes: dict[str, tuple[int, ...]],
    provided_masks: dict[str, str] | None = None,
    reference_masks: dict[str, str] | None = None,
    rois: dict[str, list[dict]] | None = None,
    name: str = "qsmprep_wf",
) -> pe.Workflow:
    """Workflow over all acquisitions; ``shapes`` maps acquisition names to image shapes,
    ``rois`` acquisition names to their ROI sources (qsmprep.study_io.find_rois)."""
    workflow = pe.Workflow(name=name)
    workflow.base_dir = str(config.execution.work_dir)
    workflow.__desc__ = describe_run(version=__version__, n_acquisitions=len(acquisitions))
    provided_masks = provided_masks or {}
    reference_masks = reference_masks or {}
    omp_nthreads = config.nipype.omp_nthreads
    for acquisition in acquisitions:
        workflow.add_nodes([init_single_acquisition_wf(
            config, acquisition,
            shape=shapes[acquisition.name],
            provided_mask=provided_masks.get(acquisition.name),
            reference_mask=reference_masks.get(acquisition.name),
            omp_nthreads=omp_nthreads,
            rois=(rois or {}).get(acquisition.name),
        )])
    return workflow


def init_single_acquisition_wf(
    config: Config,
    acquisition: Acquisition,
    *,
    shape: tuple[int, ...],
    provided_mask: str | None,
    reference_mask: str | None = None,
    omp_nthreads: int,
    rois: list[dict] | None = None,
) -> pe.Workflow:
    """QSM and output workflows of one acquisition, connected."""
    name = re.sub(r"[^A-Za-z0-9]", "_", acquisition.name) + "_wf"
    workflow = pe.Workflow(name=name)
    voxels = int(shape[0]) * int(shape[1]) * int(shape[2])
    qsm = int(shape[2]) > 1
    if not qsm:
        LOGGER.warning("%s is a single slice: only the water-fat maps (field map, PDFF, water, "
                       "fat, R2*/T2*) are computed; QSM needs a 3D volume (the dipole field "
                       "reaches across slices).", acquisition.name)
    memory = NodeMemory(voxels, len(acquisition.echoes),
                        body=config.workflow.mask_type == "body")
    qsm_wf = init_qsm_wf(
        echo_times=acquisition.echo_times,
        b0_tesla=acquisition.b0_tesla,
        has_phase=acquisition.has_phase,
        phase_units=acquisition.phase_units or "auto",
        options=config.workflow,
        omp_nthreads=omp_nthreads,
        memory=memory,
        qsm=qsm,
    )
    qsm_wf.__desc__ = describe_qsm(  # methods boilerplate (logs/CITATION.md)
        config.workflow, echo_times=acquisition.echo_times, b0_tesla=acquisition.b0_tesla,
        has_phase=acquisition.has_phase, provided_mask=bool(provided_mask), qsm=qsm)
    inputnode = qsm_wf.get_node("inputnode")
    echoes = acquisition.echoes
    inputnode.inputs.magnitude_files = [e.magnitude for e in echoes if e.magnitude]
    inputnode.inputs.phase_files = [e.phase for e in echoes if e.phase]
    inputnode.inputs.real_files = [e.real for e in echoes if e.real]
    inputnode.inputs.imag_files = [e.imag for e in echoes if e.imag]
    inputnode.inputs.volumes = [-1 if e.volume is None else e.volume for e in echoes]
    if provided_mask:
        inputnode.inputs.provided_mask = provided_mask
    if reference_mask:
        inputnode.inputs.reference_mask = reference_mask
    ds_wf = init_ds_qsm_wf(
        output_dir=str(config.execution.output_dir),
        bids_dir=str(config.execution.bids_dir),
        entities=acquisition.output_entities,
        source_files=acquisition.source_files,
        echo_numbers=[e.number for e in echoes],
        echo_times=acquisition.echo_times,
        b0_tesla=acquisition.b0_tesla,
        has_phase=acquisition.has_phase,
        options=config.workflow,
        mask_dir=str(config.execution.mask_dir) if config.execution.mask_dir else None,
        qsm=qsm,
    )
    swi_fields = {"swi", "minip", "chi_mip", "swi_metadata"}
    r2star_fields = {"r2star", "t2star", "s0", "r2star_metadata"}
    fields = [f for f in OUTPUT_FIELDS if (acquisition.has_phase or f in _MAG_ONLY)
              and (config.workflow.swi or f not in swi_fields)
              and (len(echoes) >= 2 or f not in r2star_fields)
              and (config.workflow.fieldmap_method == "waterfat" or f not in WATERFAT_FIELDS)
              and (qsm or f not in QSM_FIELDS)]
    workflow.connect([(qsm_wf, ds_wf, [(f"outputnode.{f}", f"inputnode.{f}") for f in fields])])
    sweep_wf = None
    if acquisition.has_phase and config.workflow.lambda_sweep and qsm:
        sweep_wf = connect_lambda_sweep(
            workflow, qsm_wf, lambdas=config.workflow.lambda_sweep,
            output_dir=str(config.execution.output_dir), bids_dir=str(config.execution.bids_dir),
            entities=acquisition.output_entities, source_files=acquisition.source_files,
            echo_times=acquisition.echo_times, b0_tesla=acquisition.b0_tesla)
    if rois and not qsm:
        LOGGER.warning("%s: its ROIs are not measured (a single slice has no Chimap).",
                       acquisition.name)
    elif rois:
        connect_roi_wf(workflow, [ds_wf, sweep_wf], output_dir=str(config.execution.output_dir),
                       entities=acquisition.output_entities,
                       scan=scan_label(acquisition.output_entities), rois=rois)
    return workflow


_MAG_ONLY = {"magnitude", "mask", "r2star", "t2star", "s0", "r2star_metadata",
             "mask_metadata", "load_metadata"}
