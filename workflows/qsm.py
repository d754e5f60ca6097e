"""The per-acquisition QSM workflow: echoes -> mask -> field -> local field -> chi, and R2*."""

from __future__ import annotations

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from qsmprep.config import WorkflowConfig
from qsmprep.interfaces.background import RemoveBackground
from qsmprep.interfaces.bipolar import CorrectReadoutPolarity
from qsmprep.interfaces.fieldmap import EstimateField
from qsmprep.interfaces.inversion import InvertDipole
from qsmprep.interfaces.mask import BrainMask
from qsmprep.interfaces.phase import LoadEchoes
from qsmprep.interfaces.reference import ReferenceSusceptibility
from qsmprep.interfaces.relaxometry import FitR2star
from qsmprep.interfaces.swi import ComputeSWI, QSMVenography
from qsmprep.interfaces.waterfat import WaterFatField

from .resources import NodeMemory

OUTPUT_FIELDS = [
    "magnitude", "mask", "r2star", "t2star", "s0", "field_hz", "field_magnitude",
    "unwrapped_phase", "local_field_hz", "eroded_mask", "chi", "field_metadata",
    "bfr_metadata", "inversion_metadata", "reference_metadata", "r2star_metadata",
    "mask_metadata", "load_metadata", "swi", "minip", "chi_mip", "swi_metadata",
    "water", "fat", "pdff", "readout_metadata",
]

#: Outputs only the water-fat field mapping (``--fieldmap-method waterfat``) produces.
WATERFAT_FIELDS = {"water", "fat", "pdff"}

#: Outputs of the steps after the field map (none for a single slice).
QSM_FIELDS = {"local_field_hz", "eroded_mask", "chi", "bfr_metadata", "inversion_metadata",
              "reference_metadata", "swi", "minip", "chi_mip", "swi_metadata"}

#: Inversion methods with the calcaneus study's MIP data weight and |W - F| edge image.
STUDY_WEIGHT_METHODS = {"l2medi", "tvmedi"}


def init_qsm_wf(
    *,
    echo_times: list[float],
    b0_tesla: float,
    has_phase: bool,
    phase_units: str,
    options: WorkflowConfig,
    omp_nthreads: int,
    memory: NodeMemory,
    qsm: bool = True,
    name: str = "qsm_wf",
) -> pe.Workflow:
    """Build the QSM workflow of one acquisition (``qsm`` False: stop at the field map and
    the water-fat maps, as for a single slice).

    Inputs (``inputnode``): ``magnitude_files``, ``phase_files``, ``real_files``,
    ``imag_files``, ``volumes``, ``provided_mask``, ``reference_mask``. Outputs: see
    ``OUTPUT_FIELDS``.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        IdentityInterface(fields=["magnitude_files", "phase_files", "real_files",
                                  "imag_files", "volumes", "provided_mask", "reference_mask"]),
        name="inputnode",
    )
    outputnode = pe.Node(IdentityInterface(fields=OUTPUT_FIELDS), name="outputnode")

    load = pe.Node(LoadEchoes(phase_units=phase_units or "auto", single_slice=not qsm),
                   name="load_echoes",
                   mem_gb=memory.gb("load_echoes"))
    mask = pe.Node(BrainMask(erode_mm=options.mask_erode_mm, mask_type=options.mask_type),
                   name="brain_mask",
                   mem_gb=memory.gb("brain_mask"))
    if options.mask_threshold is not None:
        mask.inputs.threshold = options.mask_threshold
    r2star = pe.Node(
        FitR2star(echo_times=echo_times, method=options.r2star_method,
                  num_threads=omp_nthreads),
        name="fit_r2star", n_procs=omp_nthreads, mem_gb=memory.gb("fit_r2star"),
    )
    if len(echo_times) < 2:  # single echo: no R2* fit (QSM from phase / TE only)
        r2star = None
    waterfat = has_phase and options.fieldmap_method == "waterfat"
    if waterfat:  # R2* comes from the water-fat fit (the magnitude fit is biased by fat)
        r2star = None
    workflow.connect([*([] if r2star is None else [
        (load, r2star, [("magnitude", "magnitude")]),
        (mask, r2star, [("mask", "mask")]),
        (r2star, outputnode, [("r2star", "r2star"), ("t2star", "t2star"), ("s0", "s0"),
                              ("metadata", "r2star_metadata")]),
    ]),
        (inputnode, load, [("magnitude_files", "magnitude_files"),
                           ("phase_files", "phase_files"),
                           ("real_files", "real_files"),
                           ("imag_files", "imag_files"),
                           ("volumes", "volumes")]),
        (inputnode, mask, [("provided_mask", "provided_mask")]),
        (load, mask, [("magnitude", "magnitude"), ("finite_mask", "finite_mask")]),
        (load, outputnode, [("magnitude", "magnitude"), ("metadata", "load_metadata")]),
        (mask, outputnode, [("mask", "mask"), ("metadata", "mask_metadata")]),
    ])
    if not has_phase:
        return workflow
    # only the water-fat/in-phase field mapping can tell the sign from the fat signal (SWI
    # then takes the sign it resolved)
    fixed_sign = 1 if options.phase_sign == "auto" else options.phase_sign

    if options.fieldmap_method in ("waterfat", "inphase"):
        field = pe.Node(
            WaterFatField(echo_times=echo_times, b0_tesla=b0_tesla,
                          method=options.fieldmap_method, fat_model=options.fat_model,
                          phase_sign=options.phase_sign, smoothness=options.waterfat_smoothness,
                          unwrap_method=options.unwrap_method, num_threads=omp_nthreads),
            name="estimate_field", n_procs=omp_nthreads, mem_gb=memory.gb("waterfat"),
        )
        if options.water_ppm is not None:
            field.inputs.water_ppm = options.water_ppm
        if options.inphase_echoes:
            field.inputs.echoes = [int(e) for e in options.inphase_echoes.split(",")]
    else:
        field = pe.Node(
            EstimateField(echo_times=echo_times, method=options.fieldmap_method,
                          unwrap_method=options.unwrap_method, phase_sign=fixed_sign,
                          num_threads=omp_nthreads),
            name="estimate_field", n_procs=omp_nthreads, mem_gb=memory.gb("estimate_field"),
        )
    phase_source = load
    checked = 4 if options.readout_polarity == "auto" else 2  # bipolar: the step's own error
    if options.readout_polarity != "monopolar" and len(echo_times) >= checked:
        fat = options.fieldmap_method in ("waterfat", "inphase")
        polarity = pe.Node(
            CorrectReadoutPolarity(echo_times=echo_times, b0_tesla=b0_tesla,
                                   fat_model=options.fat_model if fat else "",
                                   phase_sign=options.phase_sign if fat else 1,
                                   mode=options.readout_polarity, num_threads=omp_nthreads),
            name="readout_polarity", n_procs=omp_nthreads,
            mem_gb=memory.gb("readout_polarity"))
        if fat and options.water_ppm is not None:
            polarity.inputs.water_ppm = options.water_ppm
        workflow.connect([
            (load, polarity, [("magnitude", "magnitude"), ("phase", "phase")]),
            (mask, polarity, [("mask", "mask")]),
            (polarity, outputnode, [("metadata", "readout_metadata")]),
        ])
        phase_source = polarity
    workflow.connect([
        (load, field, [("magnitude", "magnitude")]),
        (phase_source, field, [("phase", "phase")]),
        (mask, field, [("mask", "mask")]),
        (field, outputnode, [("field_hz", "field_hz"), ("magnitude", "field_magnitude"),
                             ("unwrapped_phase", "unwrapped_phase"),
                             ("metadata", "field_metadata")]),
    ])
    if waterfat:
        workflow.connect([
            (field, outputnode, [("r2star", "r2star"), ("t2star", "t2star"), ("s0", "s0"),
                                 ("r2star_metadata", "r2star_metadata"), ("water", "water"),
                                 ("fat", "fat"), ("pdff", "pdff")]),
        ])
    if not qsm:
        return workflow
    # the calcaneus study's weights: MIP over TE (data), opposed-phase |W - F| (edges)
    study = options.study_weights and options.inversion_method in STUDY_WEIGHT_METHODS
    weights = [("mip", "magnitude")] if study and options.fieldmap_method in (
        "waterfat", "inphase") else [("noise_hz", "noise_hz"), ("magnitude", "magnitude")]
    bfr = pe.Node(
        RemoveBackground(b0_tesla=b0_tesla, method=options.bfr_method,
                         erode_mm=options.bfr_erode_mm, params=options.bfr_params,
                         vsharp_max_radius_mm=options.vsharp_max_radius_mm,
                         num_threads=omp_nthreads),
        name="remove_background", n_procs=omp_nthreads, mem_gb=memory.gb("remove_background"),
    )
    invert = pe.Node(
        InvertDipole(b0_tesla=b0_tesla, echo_times=echo_times, method=options.inversion_method,
                     params=options.inversion_params, lambda_rule=options.lambda_rule or "",
                     num_threads=omp_nthreads),
        name="invert_dipole", n_procs=omp_nthreads, mem_gb=memory.gb("invert_dipole"),
    )
    if options.inversion_lambda is not None and not options.lambda_rule:
        invert.inputs.lam = options.inversion_lambda
    reference = pe.Node(ReferenceSusceptibility(method=options.reference),
                        name="reference_chi", mem_gb=memory.gb("reference_chi"))
    workflow.connect([
        # water-fat noise maps rise steeply with R2* (marrow): as PDF weights they bias the
        # marrow field on the body phantom (benchmarks/RESULTS.md), so PDF runs unweighted
        (field, bfr, [("field_hz", "field_hz")]
         + ([] if options.fieldmap_method == "waterfat" else [("noise_hz", "noise_hz")])),
        (mask, bfr, [("mask", "mask")]),
        (bfr, invert, [("local_field_hz", "local_field_hz"), ("mask", "mask")]),
        (field, invert, weights),
        (invert, reference, [("chi", "chi")]),
        (bfr, reference, [("mask", "mask")]),
        *([] if r2star is None else [(r2star, reference, [("r2star", "r2star")])]),
        (inputnode, reference, [("reference_mask", "roi")]),
        (bfr, outputnode, [("local_field_hz", "local_field_hz"), ("mask", "eroded_mask"),
                           ("metadata", "bfr_metadata")]),
        (invert, outputnode, [("metadata", "inversion_metadata")]),
        (reference, outputnode, [("chi", "chi"), ("metadata", "reference_metadata")]),
    ])
    if waterfat:
        workflow.connect([
            (field, reference, [("r2star", "r2star"), ("pdff", "pdff")]),
            *([(field, invert, [("opposed_phase", "edge_image")])] if study else []),
        ])
    if options.swi:
        swi = pe.Node(ComputeSWI(echo_times=echo_times, phase_sign=fixed_sign,
                                 slab_mm=options.mip_slab_mm, num_threads=omp_nthreads),
                      name="compute_swi", n_procs=omp_nthreads,
                      mem_gb=memory.gb("compute_swi"))
        venography = pe.Node(QSMVenography(slab_mm=options.mip_slab_mm), name="venography",
                             mem_gb=memory.gb("venography"))
        if options.fieldmap_method in ("waterfat", "inphase"):  # the sign it resolved
            workflow.connect(field, "phase_sign", swi, "phase_sign")
        workflow.connect([
            (load, swi, [("magnitude", "magnitude")]),
            (phase_source, swi, [("phase", "phase")]),
            (mask, swi, [("mask", "mask")]),
            (reference, venography, [("chi", "chi")]),
            (swi, outputnode, [("swi", "swi"), ("minip", "minip"),
                               ("metadata", "swi_metadata")]),
            (venography, outputnode, [("mip", "chi_mip")]),
        ])
    return workflow
