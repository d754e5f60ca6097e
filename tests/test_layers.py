"""The house rules of DESIGN.md "Layers": the numerical core (recon, analysis, simulate)
takes and returns arrays -- no nipype, no NIfTI/BIDS libraries, no file reading or writing --
and imports only downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qsmprep"
CORE = ("recon", "analysis", "simulate")
FORBIDDEN_MODULES = ("nipype", "nibabel", "bids", "qsmprep.bids", "qsmprep.cli",
                     "qsmprep.config", "qsmprep.workflows", "qsmprep.interfaces",
                     "qsmprep.reports", "qsmprep.datasets")
FORBIDDEN_CALLS = {"open", "loadmat", "savemat", "to_filename", "write_text", "write_bytes",
                   "read_text", "read_bytes", "savetxt", "loadtxt", "save", "load"}


def _modules():
    return sorted(p for part in CORE for p in (PACKAGE / part).rglob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_module_is_array_in_array_out(path):
    tree = ast.parse(path.read_text())
    bad = sorted(name for name in _imports(tree)
                 if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_MODULES))
    assert not bad, f"{path.name} imports {bad}"
    calls = sorted({node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                    for node in ast.walk(tree) if isinstance(node, ast.Call)
                    and isinstance(node.func, (ast.Attribute, ast.Name))}
                   & FORBIDDEN_CALLS)
    # np.load/np.save style calls on files; ``load``/``save`` as method names elsewhere count too
    assert not calls, f"{path.name} calls {calls} (file I/O belongs in qsmprep.datasets)"
