"""ROI statistics of one acquisition's written maps (participant level)."""

from __future__ import annotations

from nipype.interfaces.utility import Merge
from nipype.pipeline import engine as pe

from qsmprep.interfaces.bids import DerivativesDataSink
from qsmprep.interfaces.roi import DerivativesTableSink, ROIStats

#: desc labels of maps left out of ROI statistics (projections are not voxelwise quantities);
#: field maps (fmap/) are left out too
EXCLUDED_DESC = {"mip"}


def map_sinks(workflow: pe.Workflow) -> list[str]:
    """Names of the sink nodes of ``workflow`` that write a quantitative ``*map`` image."""
    names = []
    for name in workflow.list_node_names():
        node = workflow.get_node(name)
        if node is None or not isinstance(node.interface, DerivativesDataSink):
            continue
        inputs = node.interface.inputs
        suffix = inputs.suffix
        desc = inputs.desc if isinstance(inputs.desc, str) else ""
        if (suffix.endswith("map") and suffix != "fieldmap" and desc not in EXCLUDED_DESC
                and inputs.datatype == "anat"):
            names.append(name)
    return names


def init_roi_wf(
    *,
    output_dir: str,
    entities: dict[str, str],
    scan: str,
    rois: list[dict],
    n_maps: int,
    name: str = "roi_wf",
) -> pe.Workflow:
    """ROI statistics of ``n_maps`` written maps (``inputnode.in1`` ... ``in<n_maps>``).

    Inputs also: ``qsm_mask``, ``brain_mask`` (written masks). Writes
    ``<entities>_desc-rois_stats.tsv`` and its JSON data dictionary.
    """
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        "Region-of-interest statistics (voxel count, volume, mean, standard deviation, "
        "median, minimum, maximum, 5th and 95th percentiles, coefficient of variation) of "
        "every quantitative map were computed in every observer's ROIs, inside the mask "
        "where each map is valid.")
    inputnode = pe.Node(Merge(n_maps), name="inputnode", run_without_submitting=True)
    stats = pe.Node(ROIStats(rois=rois, entities=entities, scan=scan), name="roi_stats",
                    mem_gb=0.3)
    sink = pe.Node(DerivativesTableSink(base_directory=output_dir, entities=entities),
                   name="ds_roi_stats", run_without_submitting=True, mem_gb=0.1)
    workflow.connect([
        (inputnode, stats, [("out", "in_maps")]),
        (stats, sink, [("out_tsv", "in_tsv"), ("out_json", "in_json")]),
    ])
    return workflow


def connect_roi_wf(
    parent: pe.Workflow,
    sources: list[pe.Workflow],
    *,
    output_dir: str,
    entities: dict[str, str],
    scan: str,
    rois: list[dict],
) -> pe.Workflow | None:
    """Add ROI statistics of every map written by the ``sources`` sink workflows to
    ``parent`` (the acquisition's workflow); returns the ROI workflow (None: no maps)."""
    outputs = [(wf, node) for wf in sources if wf is not None for node in map_sinks(wf)]
    if not outputs:
        return None
    roi_wf = init_roi_wf(output_dir=output_dir, entities=entities, scan=scan, rois=rois,
                         n_maps=len(outputs))
    for index, (wf, node) in enumerate(outputs, start=1):
        parent.connect(wf, f"{node}.out_file", roi_wf, f"inputnode.in{index}")
    ds_wf = sources[0]
    names = set(ds_wf.list_node_names())
    if "ds_qsm_mask" in names:
        parent.connect(ds_wf, "ds_qsm_mask.out_file", roi_wf, "roi_stats.qsm_mask")
    if "ds_mask" in names:
        parent.connect(ds_wf, "ds_mask.out_file", roi_wf, "roi_stats.brain_mask")
    return roi_wf
