"""Shared fixtures: locations of bundled examples and of the developers' real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QSMPREP_SHARED_DATA", REPO.parent / "shared" / "data"))
EXAMPLES = REPO / "bids_examples"

os.environ.setdefault("NIPYPE_NO_ET", "1")


def shared_data(*parts: str) -> Path:
    """A folder of ../shared/data, or skip the test where it is absent (users' machines)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data folder {path} is absent")
    return path


def romeo_small():
    """The ROMEO 3-echo real GRE crop: (phase rad [x,y,z,3], magnitude) or skip if absent."""
    import nibabel as nb
    import numpy as np

    from qsmprep.recon.phase import to_radians

    path = shared_data("megre_small_crops", "ROMEO_small")
    phase = to_radians(np.asarray(nb.load(str(path / "Phase.nii")).dataobj), "arbitrary")
    magnitude = np.asarray(nb.load(str(path / "Mag.nii")).dataobj, dtype=np.float32)
    return phase, magnitude


@pytest.fixture
def examples() -> Path:
    if not (EXAMPLES / "brain_megre").exists():
        pytest.skip("bundled examples not generated")
    return EXAMPLES
