"""Writing the derivatives of one acquisition (the only place where outputs are written)."""

from __future__ import annotations

from nipype.interfaces.utility import IdentityInterface, Merge
from nipype.pipeline import engine as pe

from qsmprep.config import WorkflowConfig
from qsmprep.interfaces.bids import DerivativesDataSink
from qsmprep.references import reference

from .qsm import OUTPUT_FIELDS


def init_ds_qsm_wf(
    *,
    output_dir: str,
    bids_dir: str,
    entities: dict[str, str],
    source_files: list[str],
    echo_numbers: list[int],
    echo_times: list[float],
    b0_tesla: float,
    has_phase: bool,
    options: WorkflowConfig,
    mask_dir: str | None = None,
    qsm: bool = True,
    name: str = "ds_qsm_wf",
) -> pe.Workflow:
    """Sinks for every product of :func:`qsmprep.workflows.qsm.init_qsm_wf` (``mask_dir``:
    where a provided mask came from, for its ``Sources``; ``qsm`` False: the field and
    water-fat maps only)."""
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=OUTPUT_FIELDS), name="inputnode")
    common = {"base_directory": output_dir, "bids_dir": bids_dir, "entities": entities,
              "source_files": source_files}
    if mask_dir:
        common["mask_dir"] = mask_dir
    acquisition = {"EchoTime": echo_times, "MagneticFieldStrength": round(b0_tesla, 6)}

    def sink(node_name: str, source: str, suffix: str, fields: list[str], **kwargs) -> None:
        """A sink writing the input ``source``, its metadata merged from ``fields``."""
        node = pe.Node(DerivativesDataSink(suffix=suffix, **common, **kwargs),
                       name=node_name, run_without_submitting=True, mem_gb=0.1)
        workflow.connect(inputnode, source, node, "in_file")
        merge = pe.Node(Merge(len(fields)), name=f"{node_name}_metadata",
                        run_without_submitting=True)
        for index, field in enumerate(fields, start=1):
            workflow.connect(inputnode, field, merge, f"in{index}")
        workflow.connect(merge, "out", node, "extra_metadata")

    sink("ds_mask", "mask", "mask", ["mask_metadata"], desc=options.mask_type)
    if len(echo_times) >= 2:  # a single echo has no R2* fit
        sink("ds_r2star", "r2star", "R2starmap", ["r2star_metadata"], metadata={
            "Units": "1/s", "SkullStripped": True,
            "Description": "Transverse relaxation rate R2* from the multi-echo magnitude.",
            **acquisition})
        sink("ds_t2star", "t2star", "T2starmap", ["r2star_metadata"], metadata={
            "Units": "s", "SkullStripped": True, "Description": "T2* = 1/R2*.", **acquisition})
        sink("ds_s0", "s0", "S0map", ["r2star_metadata"], metadata={
            "Units": "arbitrary", "SkullStripped": True,
            "Description": "Magnitude extrapolated to TE = 0 by the R2* fit.", **acquisition})
    if not has_phase:
        return workflow

    field_fields = ["load_metadata", "readout_metadata", "field_metadata"]
    sink("ds_fieldmap", "field_hz", "fieldmap", field_fields, datatype="fmap", desc="total",
         metadata={"Units": "Hz", "SkullStripped": True, **acquisition,
                   "Description": "Total field (B0 inhomogeneity) from a multi-echo fit of "
                   "the phase, spatially unwrapped, inside the brain mask."})
    sink("ds_fieldmap_magnitude", "field_magnitude", "magnitude", ["load_metadata"],
         datatype="fmap", desc="total",
         metadata={"SkullStripped": False, "EchoTime": echo_times[0],
                   "Description": "First-echo magnitude of the field map."})
    sink("ds_unwrapped_phase", "unwrapped_phase", "MEGRE", field_fields, desc="unwrapped",
         part="phase", echo=echo_numbers,
         file_metadata=[{"EchoTime": te} for te in echo_times],
         metadata={"Units": "rad", "SkullStripped": True,
                   "MagneticFieldStrength": round(b0_tesla, 6),
                   "Description": "Spatially unwrapped phase (exact 2 pi multiples of the "
                   "input where the unwrapper guarantees it)."})
    if options.fieldmap_method == "waterfat":
        water_fat = {"SkullStripped": True, "Units": "arbitrary", **acquisition}
        sink("ds_water", "water", "M0map", ["field_metadata"], desc="water", metadata={
            **water_fat, "Description": "Water signal amplitude |W| at TE = 0 from the "
            "water-fat separation."})
        sink("ds_fat", "fat", "M0map", ["field_metadata"], desc="fat", metadata={
            **water_fat, "Description": "Fat signal amplitude |F| at TE = 0 (all fat peaks) "
            "from the water-fat separation."})
        sink("ds_pdff", "pdff", "PDFFmap", ["field_metadata"], metadata={
            **water_fat, "Units": "percent", "Description": "Proton-density fat fraction "
            "from the water-fat separation by magnitude discrimination (Liu et al. 2007): "
            "100 (1 - |W| / |W + F|) where |W| >= |F|, else 100 |F| / |W + F| (free of the "
            "noise bias of |F| / (|W| + |F|)); 100 |F| / (|W| + |F|) where W and F are more "
            "than 90 degrees apart and the smaller amplitude exceeds 3 standard deviations "
            "of its noise."})
    if not qsm:
        return workflow
    # without background removal (total field inversion) there is no local field to write
    if options.bfr_method != "none":
        sink("ds_local_field", "local_field_hz", "localfield", field_fields + ["bfr_metadata"],
             metadata={"Units": "Hz", "SkullStripped": True, **acquisition,
                       "Description": "Local (tissue) field after background field removal."})
    sink("ds_qsm_mask", "eroded_mask", "mask", ["bfr_metadata"], desc="qsm",
         metadata={"Type": "Brain" if options.mask_type == "brain" else "ROI",
                   "Description": "Mask on which the local field and susceptibility are "
                   "valid (eroded by background field removal)."})
    steps = (options.fieldmap_method, options.unwrap_method, options.bfr_method,
             options.inversion_method)
    sink("ds_chimap", "chi", "Chimap",
         field_fields + ["bfr_metadata", "inversion_metadata", "reference_metadata"],
         metadata={"Units": "ppm", "SkullStripped": True, **acquisition,
                   "Description": "Magnetic susceptibility (ppm).",
                   "EstimationAlgorithm": " -> ".join(steps),
                   "EstimationReference": " ".join(reference(s) for s in steps)})
    if options.swi:
        sink("ds_swi", "swi", "swi", ["swi_metadata"], metadata={
            "Units": "arbitrary", "SkullStripped": False, **acquisition,
            "Description": "Susceptibility-weighted image: echo-combined magnitude times the "
            "fourth power of the negative high-pass phase mask."})
        sink("ds_minip", "minip", "minIP", ["swi_metadata"], metadata={
            "Units": "arbitrary", "SkullStripped": False,
            "Description": "Sliding-slab minimum intensity projection of the SWI."})
        sink("ds_chimap_mip", "chi_mip", "Chimap", ["swi_metadata"], desc="mip", metadata={
            "Units": "ppm", "SkullStripped": True,
            "Description": "QSM venography: sliding-slab maximum intensity projection of the "
            "susceptibility map."})
    return workflow
