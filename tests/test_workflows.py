"""Workflow construction for every method option, and the sink's naming/atomic writes."""

from __future__ import annotations

import json
from typing import get_args

import nibabel as nb
import numpy as np
import pytest

from qsmprep.bids import Acquisition, Echo
from qsmprep.config import (
    BackgroundMethod,
    Config,
    FieldmapMethod,
    InversionMethod,
    UnwrapMethod,
)
from qsmprep.interfaces.bids import DerivativesDataSink
from qsmprep.workflows.base import init_qsmprep_wf


def _acquisition(has_phase: bool = True, session: str | None = None) -> Acquisition:
    entities = {"subject": "01", **({"session": session} if session else {})}
    echoes = [Echo(n, 0.005 * n, magnitude=f"/data/m{n}.nii.gz",
                   phase=f"/data/p{n}.nii.gz" if has_phase else None) for n in (1, 2, 3)]
    return Acquisition(entities=entities, suffix="MEGRE", echoes=echoes, b0_tesla=2.89,
                       b0_source="ImagingFrequency", phase_units="arbitrary",
                       output_entities=dict(entities))


DEFAULTS = ("nlfit", "region_growing", "ismv", "tv")
STEPS = (FieldmapMethod, UnwrapMethod, BackgroundMethod, InversionMethod)
ONE_AT_A_TIME = sorted({
    DEFAULTS[:step] + (choice,) + DEFAULTS[step + 1:]
    for step, options in enumerate(STEPS) for choice in get_args(options)
})


def test_background_registry_matches_cli():
    from qsmprep.recon import background

    assert set(background.METHODS) == set(get_args(BackgroundMethod))


@pytest.mark.parametrize("combo", ONE_AT_A_TIME)
def test_workflow_builds_for_every_method(tmp_path, combo):
    config = Config()
    config.execution.work_dir = tmp_path / "work"
    config.execution.output_dir = tmp_path / "out"
    config.execution.bids_dir = tmp_path
    wf_options = config.workflow
    (wf_options.fieldmap_method, wf_options.unwrap_method, wf_options.bfr_method,
     wf_options.inversion_method) = combo
    acquisitions = [_acquisition(), _acquisition(session="2"), _acquisition(has_phase=False,
                                                                             session="3")]
    shapes = {a.name: (64, 64, 48) for a in acquisitions}
    workflow = init_qsmprep_wf(config, acquisitions, shapes=shapes)
    names = workflow.list_node_names()
    assert any(n.endswith("invert_dipole") for n in names)
    assert sum(n.endswith("ds_chimap") for n in names) == 2  # not for magnitude-only
    assert sum(n.endswith("ds_r2star") for n in names) == 3
    node = workflow.get_node("sub_01_ses_2_MEGRE_wf.qsm_wf.invert_dipole")
    assert node.inputs.method == combo[3] and node.inputs.b0_tesla == 2.89
    assert workflow.get_node("sub_01_ses_2_MEGRE_wf.qsm_wf.estimate_field").inputs.method \
        == combo[0]


def test_sink_names_sidecars_and_atomicity(tmp_path):
    source = tmp_path / "bids" / "sub-01" / "anat" / "sub-01_echo-1_part-mag_MEGRE.nii.gz"
    source.parent.mkdir(parents=True)
    image = nb.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4))
    image.to_filename(str(source))
    files = []
    for n in (1, 2):
        path = tmp_path / f"in{n}.nii.gz"
        image.to_filename(str(path))
        files.append(str(path))
    sink = DerivativesDataSink(
        base_directory=str(tmp_path / "out"), bids_dir=str(tmp_path / "bids"), in_file=files,
        source_files=[str(source)], entities={"subject": "01"}, suffix="MEGRE",
        desc="unwrapped", part="phase", echo=[1, 2], metadata={"Units": "rad", "Gone": None},
        extra_metadata=[{"Step": "a"}], file_metadata=[{"EchoTime": 0.01}, {"EchoTime": 0.02}],
    )
    result = sink.run(cwd=str(tmp_path))
    written = result.outputs.out_file
    assert [p.split("/")[-1] for p in written] == [
        "sub-01_echo-1_part-phase_desc-unwrapped_MEGRE.nii.gz",
        "sub-01_echo-2_part-phase_desc-unwrapped_MEGRE.nii.gz",
    ]
    sidecar = json.loads((tmp_path / "out/sub-01/anat/"
                          "sub-01_echo-2_part-phase_desc-unwrapped_MEGRE.json").read_text())
    assert sidecar == {"EchoTime": 0.02, "Sources": [
        "bids:raw:sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz"], "Step": "a", "Units": "rad"}
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_node_memory_follows_the_data_and_low_mem_sets_a_budget(tmp_path):
    from qsmprep.cli.run import LOW_MEM_BUDGET_GB, _plugin_settings
    from qsmprep.workflows.resources import NodeMemory

    config = Config()
    config.execution.work_dir, config.execution.output_dir = tmp_path / "w", tmp_path / "o"
    config.execution.bids_dir = tmp_path
    acquisition = _acquisition()
    small = init_qsmprep_wf(config, [acquisition], shapes={acquisition.name: (64, 64, 48)})
    full = init_qsmprep_wf(config, [acquisition], shapes={acquisition.name: (256, 256, 176)})
    prefix = f"{acquisition.name.replace('-', '_')}_wf.qsm_wf."
    for node in ("load_echoes", "estimate_field", "remove_background", "invert_dipole"):
        low, high = (wf.get_node(prefix + node).mem_gb for wf in (small, full))
        assert 0.3 <= low < 0.5 < high, node  # baseline + data: 64x64x48 is light
    # a full-size 6-echo subject: the measured peaks (benchmarks/speed.py) with margin,
    # every node within a few GB so that an 8 GB node can run it
    memory = NodeMemory(256 * 256 * 176, 6)
    estimates = {n: memory.gb(n) for n in ("load_echoes", "brain_mask", "fit_r2star",
                                           "estimate_field", "remove_background",
                                           "invert_dipole")}
    assert 2.5 < estimates["estimate_field"] < 4.0
    assert max(estimates.values()) == estimates["estimate_field"]
    # water-fat: measured 4.6 GB (8 echoes) and 3.7 GB (4 echoes) at 256 x 256 x 176
    # (benchmarks/waterfat_benchmark.py); the estimate covers both, with margin, not 5x
    for echoes, measured in ((8, 4.6), (4, 3.7)):
        assert measured < NodeMemory(256 * 256 * 176, echoes).gb("waterfat") < 1.5 * measured
    # body slabs pad the cut axes: the inversion's estimate grows (measured 255 B/voxel)
    body = NodeMemory(256 * 256 * 64, 6, body=True)
    assert body.gb("invert_dipole") > 0.3 + 1.3 * 255 * 256 * 256 * 64 / 1e9
    config.nipype.nprocs = 2
    _, args = _plugin_settings(config, None)
    assert args.get("memory_gb", 99.0) > LOW_MEM_BUDGET_GB  # 90% of the machine or cgroup
    config.execution.low_mem = True
    _, args = _plugin_settings(config, None)
    assert args["memory_gb"] == LOW_MEM_BUDGET_GB
    config.nipype.mem_gb = 2000  # --mem 2G stays the tighter limit
    assert _plugin_settings(config, None)[1]["memory_gb"] == 2.0
