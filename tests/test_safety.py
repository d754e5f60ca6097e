"""Safety: labels, filter and config files cannot make qsmprep write outside its output or
work folder; no shell command is built from user input; nothing touches the network."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from qsmprep import bids
from qsmprep.cli.parser import parse_args

import _tiny_bids as tiny

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("qsmprep", "interfaces", "workflows")
                 for p in (REPO / folder).rglob("*.py"))
TRAVERSALS = ["../x", "..", "a/b", "x\\y", "/etc", "01/../../x", ""]


@pytest.fixture
def small(tmp_path):
    root = tiny.new_dataset(tmp_path / "bids")
    tiny.add_participant(root, "01")
    return root


@pytest.mark.parametrize("value", TRAVERSALS)
@pytest.mark.parametrize("flag", ["--participant-label", "--session-label"])
def test_command_line_labels_cannot_traverse(small, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        parse_args([str(small), str(tmp_path / "out"), "participant", flag, value])
    assert stop.value.code == 64
    assert "not a valid BIDS label" in capsys.readouterr().err


@pytest.mark.parametrize("value", TRAVERSALS)
def test_config_file_labels_cannot_traverse(small, tmp_path, capsys, value):
    config = tmp_path / "run.toml"
    config.write_text(f"[execution]\nparticipant_label = [{value!r}]\n".replace("'", '"')
                      .replace("\\", "\\\\"))
    with pytest.raises(SystemExit) as stop:
        parse_args([str(small), str(tmp_path / "out"), "participant", "--config-file",
                    str(config)])
    assert stop.value.code == 64
    assert "participant_label" in capsys.readouterr().err


def test_config_file_cannot_redirect_the_output(small, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[execution]\noutput_dir = "{tmp_path / "elsewhere"}"\n'
                      f'bids_dir = "{tmp_path / "other"}"\n')
    settings, _ = parse_args([str(small), str(tmp_path / "out"), "participant",
                              "--config-file", str(config)])
    assert settings.execution.output_dir == tmp_path / "out"  # the command line decides
    assert settings.execution.bids_dir == small


@pytest.mark.parametrize("value", TRAVERSALS[:-1] + ["*x", "a b"])
@pytest.mark.parametrize("entity", ["subject", "session", "acquisition", "run"])
def test_filter_values_cannot_traverse(small, entity, value):
    layout = bids.load_layout(small)
    for filters in ({entity: value}, {entity: ["01", value]}):
        with pytest.raises(bids.BIDSInputError) as error:
            bids.discover(layout, filters=filters, filter_source="filters.json")
        assert error.value.exit_code == 64
        assert f"'{entity}' has the value" in str(error.value)


@pytest.mark.parametrize("value", TRAVERSALS)
@pytest.mark.parametrize("key", ["subject", "session", "acquisition", "run", "desc"])
def test_derivative_paths_stay_inside(key, value):
    entities = {"subject": "01"}
    kwargs = {}
    if key == "desc":
        kwargs["desc"] = value
    else:
        entities[key] = value
    with pytest.raises(ValueError, match="alphanumeric"):
        bids.derivative_path(entities, "Chimap", **kwargs)
    relative = bids.derivative_path({"subject": "01", "run": "2"}, "Chimap", desc="x")
    assert not Path(relative).is_absolute() and ".." not in Path(relative).parts


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_shell_and_no_network_in_the_package(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            for name in names:
                assert name.split(".")[0] not in {"socket", "requests", "urllib3", "httpx",
                                                  "ftplib", "smtplib"}, (path, name)
                assert not name.startswith(("urllib.request", "http.client")), (path, name)
            assert "CommandLine" not in names, f"{path}: nipype CommandLine builds shell text"
    for call, name in _calls(tree):
        assert name not in {"os.system", "os.popen", "subprocess.getoutput",
                            "subprocess.getstatusoutput"}, f"{path}: {name}"
        if name.startswith("subprocess."):
            assert not any(k.arg == "shell" for k in call.keywords), f"{path}: shell=True"
            first = call.args[0] if call.args else None
            assert not isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)), (
                f"{path}: {name} with a command string; pass an argument list")


def test_nipype_telemetry_is_off():
    import qsmprep.cli.run  # noqa: F401

    assert os.environ["NIPYPE_NO_ET"] == "1"
