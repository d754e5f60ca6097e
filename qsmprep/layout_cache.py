"""A pybids index (``--bids-database-dir``) built once and shared by many runs.

Cluster array tasks (one participant each) would otherwise index the whole dataset once per
task. With ``--bids-database-dir DIR`` the first task builds the index and the others reuse it:

- ``DIR/<fingerprint>/layout_index.sqlite``, where the fingerprint hashes the dataset's
  absolute root and the path, size and modification time of every indexed file (plus the
  pybids version and qsmprep's ignore rules). A changed dataset (a participant added, a
  sidecar edited) or the same dataset at another path (a container bind mount) gets a new
  index; an unchanged one is reused and never written again.
- Building is safe when several tasks start at once: each indexes in memory, saves the index
  to a private temporary folder inside ``DIR`` and renames it into place (an atomic
  ``rename`` on one file system); a task that loses the race discards its copy and reads
  the winner's. Readers only open finished indexes.
- A ``layout_index.sqlite`` placed directly in ``DIR`` (e.g. built by another BIDS App) is
  used as given, without the fingerprint check.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

LOGGER = logging.getLogger("qsmprep")

DATABASE_FILE = "layout_index.sqlite"
#: Top-level folders that qsmprep's index ignores (kept in step with bids.load_layout).
IGNORED_TOP = frozenset({"code", "stimuli", "sourcedata", "models", "derivatives"})
#: Bump when the indexing rules change, so that old indexes are not reused.
INDEX_RULES = "1"


def dataset_fingerprint(bids_dir: Path) -> str:
    """Hex digest of what the index depends on: root path, indexed files' names, sizes and
    modification times, pybids version and qsmprep's ignore rules."""
    from importlib import metadata

    root = Path(bids_dir).absolute()
    digest = hashlib.sha256()
    try:
        pybids = metadata.version("pybids")
    except metadata.PackageNotFoundError:
        pybids = "unknown"
    digest.update(f"{root}\0{pybids}\0{INDEX_RULES}\0".encode())
    for folder, dirs, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not (relative == Path(".") and d in IGNORED_TOP))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(folder, name)
            try:
                stat = path.stat()
            except OSError:  # a dangling link (git-annex): its name still counts
                digest.update(f"{relative / name}\0missing\n".encode())
                continue
            digest.update(f"{relative / name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_cached_layout(bids_dir: Path, database_dir: Path):
    """The dataset's pybids layout from ``database_dir`` (built and saved there when absent).

    Returns ``(layout, reused)``. Raises :class:`qsmprep.bids.BIDSInputError` for datasets
    pybids cannot index, and ``OSError`` when ``database_dir`` cannot be created.
    """
    from qsmprep import bids

    database_dir = Path(database_dir).absolute()
    if (database_dir / DATABASE_FILE).is_file():
        LOGGER.info("using the pybids index %s as given (not checked against the dataset)",
                    database_dir / DATABASE_FILE)
        return bids.load_layout(bids_dir, database_dir=database_dir, reset=False), True
    database_dir.mkdir(parents=True, exist_ok=True)
    final = database_dir / dataset_fingerprint(bids_dir)[:20]
    if (final / DATABASE_FILE).is_file():
        try:
            layout = bids.load_layout(bids_dir, database_dir=final, reset=False)
        except bids.BIDSInputError as error:  # unreadable index: rebuild in memory below
            LOGGER.warning("the pybids index %s cannot be read (%s); indexing again.",
                           final, error.__cause__ or error)
        else:
            LOGGER.info("reusing the pybids index %s", final)
            return layout, True
    layout = bids.load_layout(bids_dir)  # in memory
    temporary = database_dir / f".tmp-{final.name}-{uuid.uuid4().hex[:12]}"
    try:
        layout.save(str(temporary), replace_connection=False)
        os.rename(temporary, final)  # atomic; fails when another task won the race
        LOGGER.info("saved the pybids index to %s", final)
    except OSError as error:
        if not (final / DATABASE_FILE).is_file():
            LOGGER.warning("could not save the pybids index to %s (%s); this run indexed "
                           "the dataset in memory.", final, error)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return layout, False
