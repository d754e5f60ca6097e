"""Reproducibility: the same inputs and configuration give bit-identical outputs across runs,
across ``--nprocs`` (FFT/numba thread counts), and when re-run from the configuration file
that every run writes to ``logs/`` (with the versions that produced it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qsmprep import __version__
from qsmprep.cli.run import main

import _tiny_bids as tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("repro")
    root = tiny.new_dataset(base / "bids")
    tiny.add_participant(root, "01", seed=3)
    before = tiny.checksums(root)
    codes = {}
    for name, nprocs in (("one", "1"), ("two", "2")):
        codes[name] = main([str(root), str(base / name), "participant", "--nprocs", nprocs,
                            "-w", str(base / f"work-{name}"), "--skip-bids-validation"])
    (config,) = sorted((base / "one" / "logs").glob("config-*.toml"))
    # a fresh work dir: the re-run recomputes everything from the written configuration
    codes["config"] = main([str(root), str(base / "config"), "participant", "--config-file",
                            str(config), "-w", str(base / "work-config")])
    assert tiny.checksums(root) == before  # inputs never modified
    return base, codes, config


def _outputs(out: Path) -> dict[str, str]:
    """sha256 of every output file except the per-run logs (config-<run id>.toml) and the
    HTML pages (they show run times); the report figures are compared."""
    return {k: v for k, v in tiny.checksums(out).items()
            if not k.startswith("logs") and not k.endswith(".html")}


def test_bit_identical_across_nprocs(runs):
    base, codes, _ = runs
    assert codes["one"] == 0 and codes["two"] == 0
    one, two = _outputs(base / "one"), _outputs(base / "two")
    assert any(k.endswith("_Chimap.nii.gz") for k in one)
    assert len(one) > 20 and one == two


def test_written_config_reproduces_the_run(runs):
    base, codes, config = runs
    assert codes["config"] == 0
    assert _outputs(base / "config") == _outputs(base / "one")
    text = config.read_text()
    assert f"# versions: qsmprep {__version__}" in text and "numpy " in text
    settings = tomllib.loads(text)
    assert settings["nipype"]["nprocs"] == 1
    assert settings["workflow"]["inversion_method"] == "tv"
    # the re-run wrote its own configuration, equal apart from the paths that were overridden
    (again,) = sorted((base / "config" / "logs").glob("config-*.toml"))
    rerun = tomllib.loads(again.read_text())
    assert rerun["workflow"] == settings["workflow"] and rerun["nipype"] == settings["nipype"]
    assert rerun["execution"]["skip_bids_validation"] is True
