#!/usr/bin/env python3
"""Replay the Dockerfile's install commands in a fresh virtual environment (no Docker needed).

No Docker engine runs on our machines, so CI proves the image recipe this way:

1. the builder stage's ``COPY`` lines copy exactly those files from the repository into a
   temporary build context (a file the image forgets is missing here too);
2. its ``RUN`` lines run there with ``/bin/sh -c``, the stage's ``ENV`` and ``ARG`` values,
   and the image's absolute folders (``/opt``, the ``WORKDIR``) mapped into the temporary
   folder, so ``python -m venv /opt/venv && /opt/venv/bin/pip install .`` creates and fills
   a fresh virtual environment;
3. the final stage is checked as far as it can be without root: the folders it copies from
   the builder exist, its ``ENTRYPOINT`` (exec form) and the BIDS validator start with the
   final ``ENV``, the provenance file names the version and commit, ``USER`` is a non-root
   uid, and the thread/cache variables are set. Its system commands (``useradd``) are not
   replayed.

Usage: ``python scripts/check_dockerfile_install.py [--keep DIR]``; every dependency is
installed from the package index, as in the image (about 60 s with a local index). Exit
status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Variables the final image must set (thread pools, writable caches, offline Nipype).
REQUIRED_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS", "NUMBA_CACHE_DIR", "MPLCONFIGDIR", "NIPYPE_NO_ET")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages with their (INSTRUCTION, arguments) in order; continuation lines joined and
    comment lines dropped as Docker does."""
    stages: list[Stage] = []
    logical, pending = [], ""
    for raw in Path(path).read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = (pending + stripped).strip()
        pending = ""
        if line:
            logical.append(line)
    preamble_args: dict[str, str] = {}
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if keyword == "ARG":
                key, _, value = rest.partition("=")
                preamble_args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    if not stages:
        raise ValueError(f"{path}: no FROM instruction")
    return stages


def parse_env(arguments: str, env: dict[str, str]) -> dict[str, str]:
    """``ENV K=V K2="V 2"`` (or legacy ``ENV K V``) with ``$VAR``/``${VAR}`` expanded."""
    words = shlex.split(arguments)
    if words and "=" not in words[0]:
        return {words[0]: expand(" ".join(words[1:]), env)}
    values = {}
    for word in words:
        key, _, value = word.partition("=")
        values[key] = expand(value, {**env, **values})
    return values


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)",
                  lambda m: env.get(m.group(1) or m.group(2), ""), text)


class Replay:
    """Run a Dockerfile's stages with container paths mapped under ``root``."""

    def __init__(self, root: Path, *, build_args: dict[str, str]):
        self.root = root
        self.build_args = build_args
        self.roots = {"/opt"}

    def host(self, path: str) -> str:
        """A container path mapped into the replay folder."""
        return str(self.root) + path if path.startswith("/") else path

    def rewrite(self, command: str) -> str:
        """Container absolute folders of the image -> the replay folder."""
        for folder in sorted(self.roots, key=len, reverse=True):
            command = re.sub(rf"(?<![\w./-]){re.escape(folder)}(?=/|\s|$|[;&|'\"])",
                             lambda _m, f=folder: self.host(f), command)
        return command

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # the image's `python` is the base image's interpreter: here, the running one
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        return env

    def builder(self, stage: Stage, log) -> dict[str, str]:
        env, args = self.base_env(), {}
        workdir = self.host("/")
        for keyword, rest in stage.instructions:
            if keyword == "ARG":
                key, _, default = rest.partition("=")
                args[key] = self.build_args.get(key, default.strip('"'))
            elif keyword == "ENV":
                env.update(parse_env(rest, {**env, **args}))
            elif keyword == "WORKDIR":
                self.roots.add("/" + rest.strip("/").split("/")[0])
                workdir = self.host(rest)
                Path(workdir).mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                self.copy(rest, workdir, log)
            elif keyword == "RUN":
                command = self.rewrite(rest)  # the shell expands ARG/ENV values itself
                log(f"RUN {command}")
                start = time.monotonic()
                result = subprocess.run(["/bin/sh", "-c", command], cwd=workdir,
                                        env={**env, **args}, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                log(result.stdout[-4000:].rstrip())
                if result.returncode:
                    raise CheckFailed(f"builder RUN failed (exit {result.returncode}): {rest}")
                log(f"  ... ok in {time.monotonic() - start:.1f} s")
        return env

    def copy(self, rest: str, workdir: str, log) -> None:
        words = rest.split()
        if any(w.startswith("--from") for w in words):
            return
        words = [w for w in words if not w.startswith("--")]
        *sources, target = words
        target_path = Path(target if target.startswith("/") else f"{workdir}/{target}")
        if target.startswith("/"):
            target_path = Path(self.host(target))
        for source in sources:
            source_path = REPO / source
            if not source_path.exists():
                raise CheckFailed(f"COPY {source}: not in the repository")
            if source_path.is_dir():
                destination = target_path if not target.endswith("/") else (
                    target_path / source_path.name)
                shutil.copytree(source_path, destination, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                destination = target_path / source_path.name if (
                    target.endswith("/") or len(sources) > 1) else target_path
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source_path, destination)
        log(f"COPY {rest}")

    def final(self, stage: Stage, builder_name: str | None, build_args: dict[str, str],
              log) -> dict[str, str]:
        """Check the final stage's copies and start its entry point with its ENV."""
        env, args = self.base_env(), {}
        for keyword, rest in stage.instructions:
            if keyword == "ARG":
                key, _, default = rest.partition("=")
                args[key] = build_args.get(key, default.strip('"'))
            elif keyword == "ENV":
                env.update(parse_env(self.rewrite(rest), {**env, **args}))
            elif keyword == "COPY" and "--from=" in rest:
                words = rest.split()
                source_stage = next(w.split("=", 1)[1] for w in words if w.startswith("--from="))
                if source_stage not in (builder_name, "0"):
                    raise CheckFailed(f"COPY {rest}: unknown stage {source_stage}")
                source = [w for w in words if not w.startswith("--")][0]
                if not Path(self.host(source)).exists():
                    raise CheckFailed(f"COPY {rest}: the builder made no {source}")
                log(f"COPY {rest} (present)")
            elif keyword == "RUN":
                log(f"RUN (system set-up, not replayed) {rest}")
        entrypoint = json.loads(dict(stage.instructions)["ENTRYPOINT"])
        for command in (entrypoint + ["--version"], entrypoint + ["--help"],
                        ["bids-validator-deno", "--version"]):
            result = subprocess.run(command, env=env, text=True, cwd=self.root,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            first = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
            log(f"$ {' '.join(command)} -> exit {result.returncode}: {first}")
            if result.returncode:
                raise CheckFailed(f"{' '.join(command)} failed: {result.stdout[-2000:]}")
        where = shutil.which(entrypoint[0], path=env["PATH"])
        if where is None or not where.startswith(str(self.root)):
            raise CheckFailed(f"{entrypoint[0]} resolves to {where}, not the fresh venv")
        return env


def policy_problems(stages: list[Stage]) -> list[str]:
    """Rules of CONVENTIONS §6 that the recipe breaks (empty: none)."""
    problems = []
    if len(stages) < 2:
        problems.append("expected a multi-stage build (builder + final image)")
    for stage in stages:
        if not re.search(r":\d+\.\d+\.\d+", stage.base):
            problems.append(f"FROM {stage.base}: pin the base image to a patch version")
    final = stages[-1]
    users = [rest.split(":")[0] for keyword, rest in final.instructions if keyword == "USER"]
    if not users or not users[-1].isdigit() or int(users[-1]) == 0:
        given = users[-1] if users else None
        problems.append(f"USER must be a numeric non-root uid, got {given!r}")
    entrypoints = [rest for keyword, rest in final.instructions if keyword == "ENTRYPOINT"]
    try:
        exec_form = bool(entrypoints) and isinstance(json.loads(entrypoints[-1]), list)
    except ValueError:
        exec_form = False
    if not exec_form:
        problems.append('ENTRYPOINT must use the exec form ["qsmprep"]')
    declared: set[str] = set()
    for keyword, rest in final.instructions:
        if keyword == "ENV":
            declared.update(parse_env(rest, {}))
    missing = [k for k in REQUIRED_ENV if k not in declared]
    if missing:
        problems.append(f"the final stage does not set {', '.join(missing)}")
    labels = " ".join(rest for keyword, rest in final.instructions if keyword == "LABEL")
    for label in ("title", "version", "revision", "created", "source", "licenses"):
        if f"org.opencontainers.image.{label}=" not in labels:
            problems.append(f"missing OCI label org.opencontainers.image.{label}")
    builds = " ".join(rest for stage in stages for keyword, rest in stage.instructions
                      if keyword == "RUN")
    if "/opt/qsmprep/VERSION" not in builds:
        problems.append("no RUN writes the provenance file /opt/qsmprep/VERSION")
    return problems


class CheckFailed(RuntimeError):
    """A Dockerfile instruction failed or the image recipe breaks a rule."""


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def check(dockerfile: Path, root: Path, *, log=print) -> dict[str, str]:
    """Replay and check; returns the provenance file's fields. Raises :class:`CheckFailed`."""
    stages = parse_dockerfile(dockerfile)
    problems = policy_problems(stages)
    if problems:
        raise CheckFailed("; ".join(problems))
    image_python = re.search(r"python:(\d+\.\d+)", stages[0].base)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if image_python and image_python.group(1) != here:
        log(f"note: the image uses Python {image_python.group(1)}, this replay {here}")
    build_args = {"VCS_REF": _git_commit(),
                  "BUILD_DATE": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    replay = Replay(root, build_args=build_args)
    replay.builder(stages[0], log)
    replay.final(stages[-1], stages[0].name, build_args, log)
    version_file = Path(replay.host("/opt/qsmprep/VERSION"))
    if not version_file.is_file():
        raise CheckFailed("the build writes no /opt/qsmprep/VERSION provenance file")
    lines = version_file.read_text().splitlines()
    fields = {"version": lines[0].split()[-1] if lines else ""}
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        fields[key.lower()] = value
    log(f"/opt/qsmprep/VERSION: {fields}")
    return fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dockerfile", type=Path, default=REPO / "Dockerfile")
    parser.add_argument("--keep", type=Path, help="replay into this folder and keep it")
    options = parser.parse_args(argv)
    root = options.keep or Path(tempfile.mkdtemp(prefix="qsmprep-docker-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        check(options.dockerfile, root.resolve())
    except (CheckFailed, ValueError) as error:
        print(f"check_dockerfile_install: FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        if options.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"check_dockerfile_install: the Dockerfile's install commands work "
          f"({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
