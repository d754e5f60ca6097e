"""Command line: parsing, configuration round trip and documented exit codes."""

from __future__ import annotations

import json

import pytest

from qsmprep.cli.parser import EXIT_CODES, build_parser, parse_args
from qsmprep.cli.run import main
from qsmprep.config import Config, ConfigError


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    return root


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for code in EXIT_CODES:
        assert f"  {code:>3}  " in text
    for flag in ("--participant-label", "--participant_label", "--bids-filter-file", "--nprocs",
                 "--omp-nthreads", "--mem", "--low-mem", "--use-plugin", "--work-dir",
                 "--config-file", "--inversion-method", "--bfr-method", "--unwrap-method",
                 "--fieldmap-method", "--lambda", "--reference", "--phase-sign"):
        assert flag in text


def test_usage_errors_exit_64(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args([str(dataset), str(tmp_path / "out"), "participant", "--inversion-method",
                    "magic"])
    assert stop.value.code == 64
    assert "magic" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        parse_args([str(tmp_path / "missing"), str(tmp_path / "out"), "participant"])
    assert stop.value.code == 64
    with pytest.raises(SystemExit) as stop:  # the scanner frequency given for the field
        parse_args([str(dataset), str(tmp_path / "out"), "participant", "--b0-tesla", "127.7"])
    assert stop.value.code == 64
    assert "127.7 MHz is the proton frequency at 3 T" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # soft-tissue reference needs the fat fraction
        parse_args([str(dataset), str(tmp_path / "out"), "participant", "--reference", "water"])
    assert stop.value.code == 64
    assert "--fieldmap-method waterfat" in capsys.readouterr().err
    config, _ = parse_args([str(dataset), str(tmp_path / "out"), "participant", "--preset",
                            "body"])
    assert config.workflow.reference == "water" and config.workflow.mask_type == "body"
    assert (config.workflow.bfr_method, config.workflow.inversion_method) == ("none", "tfi")


@pytest.mark.parametrize("option, field, default, values, bad, listed", [
    ("--phase-sign", "phase_sign", "auto",
     (("-1", -1), ("+1", 1), ("1", 1), ("auto", "auto")), "2", "+1, -1, auto"),
    ("--readout-polarity", "readout_polarity", "auto",
     (("monopolar", "monopolar"), ("bipolar", "bipolar"), ("auto", "auto")), "flyback",
     "monopolar"),
])
def test_choice_options(dataset, tmp_path, capsys, option, field, default, values, bad,
                        listed):
    args = [str(dataset), str(tmp_path / "out"), "participant"]
    assert getattr(parse_args(args)[0].workflow, field) == default
    for value, expected in values:
        assert getattr(parse_args(args + [option, value])[0].workflow, field) == expected
    with pytest.raises(SystemExit) as stop:
        parse_args(args + [option, bad])
    assert stop.value.code == 64
    assert listed in capsys.readouterr().err


def test_total_field_inversion_pairs_with_no_background_removal(dataset, tmp_path, capsys):
    args = [str(dataset), str(tmp_path / "out"), "participant"]
    # an explicit background removal (or local-field inversion) turns the body preset into
    # two-step QSM
    for extra, expected in ((["--bfr-method", "lbv"], ("lbv", "tv")),
                            (["--inversion-method", "medi"], ("pdf", "medi"))):
        config, _ = parse_args(args + ["--preset", "body", *extra])
        assert (config.workflow.bfr_method, config.workflow.inversion_method) == expected
    for extra, message in ((["--bfr-method", "none"], "only a total field inversion"),
                           (["--inversion-method", "tfi"], "needs --bfr-method none"),
                           (["--preset", "body", "--lambda", "auto"], "--lambda auto is not")):
        with pytest.raises(SystemExit) as stop:
            parse_args(args + extra)
        assert stop.value.code == 64
        assert message in capsys.readouterr().err


def test_options_map_to_config(dataset, tmp_path):
    config, _ = parse_args([
        str(dataset), str(tmp_path / "out"), "participant", "--participant_label", "sub-01",
        "--unwrap-method", "laplacian", "--bfr-method", "pdf", "--lambda", "2e-4",
        "--nprocs", "2", "--mem", "4G", "-vv",
    ])
    assert config.execution.participant_label == ["01"]
    assert config.workflow.unwrap_method == "laplacian"
    assert config.workflow.bfr_method == "pdf"
    assert config.workflow.inversion_lambda == 2e-4
    assert config.nipype.nprocs == 2 and config.nipype.mem_gb == 4000
    assert config.execution.verbosity == 2


def test_config_file_round_trip_and_override(dataset, tmp_path):
    config = Config()
    config.workflow.inversion_method = "l2"
    config.workflow.bfr_method = "pdf"
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    loaded, _ = parse_args([str(dataset), str(tmp_path / "out"), "participant",
                            "--config-file", str(path), "--bfr-method", "vsharp"])
    assert loaded.workflow.inversion_method == "l2"  # from the file
    assert loaded.workflow.bfr_method == "vsharp"  # the command line wins
    assert Config.from_toml(path).workflow == config.workflow


def test_config_file_unknown_key_is_named(dataset, tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[workflow]\ninversion_methd = "tv"\n')
    with pytest.raises(SystemExit) as stop:
        parse_args([str(dataset), str(tmp_path / "out"), "participant", "--config-file",
                    str(path)])
    assert stop.value.code == 64
    assert "inversion_methd" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not one of"):
        Config.from_dict({"workflow": {"bfr_method": "magic"}})


def test_group_level_needs_participant_outputs(dataset, tmp_path, caplog):
    assert main([str(dataset), str(tmp_path / "out"), "group"]) == 64
    assert "run the participant level" in caplog.text


def test_output_dir_checks(dataset, tmp_path, caplog):
    assert main([str(dataset), str(dataset), "participant"]) == 64
    assert main([str(dataset), str(dataset / "sub-01" / "out"), "participant"]) == 64
    assert "inside the BIDS dataset" in caplog.text


def test_unknown_participant_and_empty_dataset(dataset, tmp_path, caplog):
    out = tmp_path / "out"
    assert main([str(dataset), str(out), "participant", "--skip-bids-validation",
                 "--participant-label", "99"]) == 64
    assert "sub-99" in caplog.text
    # a dataset without QSM inputs is 66; 18 is for filters that match nothing
    assert main([str(dataset), str(out), "participant", "--skip-bids-validation"]) == 66


def test_method_parameters_and_lambda_auto(dataset, tmp_path, capsys):
    config, _ = parse_args([str(dataset), str(tmp_path / "out"), "participant",
                            "--inversion-method", "tkd", "--inversion-param", "threshold=0.15",
                            "--bfr-method", "pdf", "--bfr-param", "tol=1e-4",
                            "--bfr-param", "max_iter=50"])
    assert config.workflow.inversion_params == {"threshold": 0.15}
    assert config.workflow.bfr_params == {"tol": 1e-4, "max_iter": 50}
    config, _ = parse_args([str(dataset), str(tmp_path / "out"), "participant",
                            "--lambda", "auto"])
    assert config.workflow.lambda_rule == "discrepancy"
    assert config.workflow.inversion_lambda is None
    config, _ = parse_args([str(dataset), str(tmp_path / "out"), "participant",
                            "--lambda", "auto", "--lambda-rule", "lcurve"])
    assert config.workflow.lambda_rule == "lcurve"
    with pytest.raises(SystemExit) as stop:
        parse_args([str(dataset), str(tmp_path / "out"), "participant", "--inversion-method",
                    "tkd", "--inversion-param", "treshold=0.15"])
    assert stop.value.code == 64
    assert "treshold" in capsys.readouterr().err


def test_lambda_with_a_method_without_lambda_is_refused(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args([str(dataset), str(tmp_path / "out"), "participant", "--inversion-method",
                    "tgv", "--lambda", "0.001"])
    assert stop.value.code == 64
    assert "no regularisation weight" in capsys.readouterr().err
