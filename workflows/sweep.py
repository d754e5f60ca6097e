"""The regularisation sweep: one susceptibility map per λ (``--lambda-sweep``).

Each λ gets a copy of the acquisition's dipole inversion and referencing nodes (same method,
parameters, weights and inputs; only λ differs) and a sink writing
``<entities>_desc-lambda<value>_Chimap.nii.gz``.
"""

from __future__ import annotations

from nipype.interfaces.utility import Merge
from nipype.pipeline import engine as pe

from qsmprep.interfaces.bids import DerivativesDataSink
from qsmprep.study_io import lambda_label


def connect_lambda_sweep(
    parent: pe.Workflow,
    qsm_wf: pe.Workflow,
    *,
    lambdas: list[float],
    output_dir: str,
    bids_dir: str,
    entities: dict[str, str],
    source_files: list[str],
    echo_times: list[float],
    b0_tesla: float,
    name: str = "lambda_sweep_wf",
) -> pe.Workflow:
    """Add the sweep to ``parent`` (the acquisition's workflow), fed like ``qsm_wf``'s
    ``invert_dipole`` and ``reference_chi`` nodes; returns the sweep workflow."""
    invert = qsm_wf.get_node("invert_dipole")
    reference = qsm_wf.get_node("reference_chi")
    if invert is None or reference is None:
        raise ValueError("the QSM workflow has no dipole inversion to sweep")
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        f"The dipole inversion was repeated with {len(lambdas)} regularisation weights "
        f"(lambda = {', '.join(f'{v:g}' for v in lambdas)}) to relate the agreement with the "
        "reference measurements to the regularisation.")
    acquisition = {"EchoTime": echo_times, "MagneticFieldStrength": round(b0_tesla, 6)}
    graph = qsm_wf._graph  # nipype keeps the edges (with their field pairs) here
    for value in lambdas:
        label = lambda_label(value)
        sweep_invert = invert.clone(f"invert_{label}")
        sweep_invert.inputs.lam = float(value)
        sweep_invert.inputs.lambda_rule = ""
        sweep_reference = reference.clone(f"reference_{label}")
        merge = pe.Node(Merge(2), name=f"metadata_{label}", run_without_submitting=True)
        sink = pe.Node(DerivativesDataSink(
            base_directory=output_dir, bids_dir=bids_dir, entities=entities,
            source_files=source_files, suffix="Chimap", desc=label,
            metadata={"Units": "ppm", "SkullStripped": True, **acquisition,
                      "RegularizationParameter": float(value),
                      "Description": f"Magnetic susceptibility (ppm) with the regularisation "
                      f"weight lambda = {value:g} (--lambda-sweep)."}),
            name=f"ds_chimap_{label}", run_without_submitting=True, mem_gb=0.1)
        workflow.connect([
            (sweep_invert, sweep_reference, [("chi", "chi")]),
            (sweep_reference, sink, [("chi", "in_file")]),
            (sweep_invert, merge, [("metadata", "in1")]),
            (sweep_reference, merge, [("metadata", "in2")]),
            (merge, sink, [("out", "extra_metadata")]),
        ])
        for original, copy in ((invert, sweep_invert), (reference, sweep_reference)):
            for source, _, data in graph.in_edges(original, data=True):
                if source is invert:
                    continue  # the copy's own inversion feeds it
                for source_field, field in data["connect"]:
                    if isinstance(source_field, str):
                        parent.connect(qsm_wf, f"{source.name}.{source_field}",
                                       workflow, f"{copy.name}.{field}")
    return workflow
