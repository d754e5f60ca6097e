"""Reports: the participant page of a real CLI run of the bundled brain example and a group
page, rendered in a real headless browser (Debian's chromium + chromedriver through
Selenium; skipped where no browser is installed); byte-identical figures across two runs;
methods boilerplate that lists exactly the methods used; report failures counted, maps kept.

Screenshots are saved in ``ci-artifacts/`` (ignored by git) for people to look at.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from qsmprep.cli.run import main
from qsmprep.reports import EXIT_REPORT_FAILED, boilerplate, figures

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "bids_examples" / "brain_megre"
ARTIFACTS = REPO / "ci-artifacts"

#: Citation keys of two method combinations (each key is cited by exactly that combination).
DEFAULT = {"bipolar", "nlfit", "romeo", "ismv", "tv", "fansi", "dipole"}
OTHER_ARGS = ["--fieldmap-method", "linear", "--unwrap-method", "laplacian", "--bfr-method",
              "pdf", "--inversion-method", "medi", "--r2star-method", "arlo", "--reference",
              "none", "--readout-polarity", "monopolar"]
OTHER = {"mcpc3ds", "laplacian", "pdf", "medi", "medi0", "arlo", "dipole"}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two CLI runs of brain_megre (fresh work dirs, different --nprocs)."""
    if not EXAMPLE.exists():
        pytest.skip("bundled example missing")
    base = tmp_path_factory.mktemp("reports")
    codes = {}
    for name, nprocs in (("one", "2"), ("two", "1")):
        codes[name] = main([str(EXAMPLE), str(base / name), "participant", "-w",
                            str(base / f"work-{name}"), "--nprocs", nprocs,
                            "--skip-bids-validation"])
    return base, codes


def test_participant_page_from_the_run(runs):
    base, codes = runs
    assert codes == {"one": 0, "two": 0}
    out = base / "one"
    page = (out / "sub-01.html").read_text()
    names = sorted(p.name for p in (out / "sub-01" / "figures").glob("*.svg"))
    assert names == [f"sub-01_desc-{n}_mosaic.svg" for n in
                     ("chimap", "localfield", "mask", "r2star", "totalfield")]
    for name in names:  # every figure is on the page, by a path relative to the page
        assert f'src="sub-01/figures/{name}"' in page
    # the summary comes from the sidecars: echo times, field, obliquity, methods
    assert "4: TE = 4, 12, 20, 28 ms" in page and "2.894 T" in page
    assert "obliquity 12.0°" in page and "2 × 2 × 2 mm" in page
    # TV's lam is the noise-scaled value that ran (from the sidecar), not a fixed default
    sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_Chimap.json").read_text())
    lam = sidecar["DipoleInversionParameters"]["lam"]
    assert lam != pytest.approx(2e-4, rel=0.01)
    for method in ("nlfit", "region_growing", "ismv", "tv (", f"lam = {lam:.3g}", "nlls",
                   f"regularisation weight λ = {lam:.3g}"):
        assert method in page, method
    assert "qsm_wf.invert_dipole" in page  # run time per step from nipype's runtime
    assert 'id="no-errors"' in page
    assert (out / "logs" / "CITATION.md").exists() and (out / "logs" / "CITATION.bib").exists()


def test_figures_byte_identical_across_runs(runs):
    base, _ = runs
    one = _digests(base / "one" / "sub-01" / "figures")
    two = _digests(base / "two" / "sub-01" / "figures")
    assert len(one) == 5 and one == two
    # rebuilding the reports from the outputs gives the same bytes again
    assert main([str(EXAMPLE), str(base / "two"), "participant", "--reports-only"]) == 0
    assert _digests(base / "two" / "sub-01" / "figures") == one
    svg = next((base / "one" / "sub-01" / "figures").glob("*chimap*.svg")).read_text()
    assert "<dc:date>" not in svg and "clip-path" in svg  # no date; ids from the fixed salt


def test_boilerplate_lists_exactly_the_methods_used(runs, tmp_path):
    base, _ = runs
    texts = {}
    for name, extra in (("default", []), ("other", OTHER_ARGS)):
        out = tmp_path / name
        code = main([str(EXAMPLE), str(out), "participant", "--boilerplate-only",
                     "--skip-bids-validation", "-w", str(tmp_path / f"work-{name}"), *extra])
        assert code == 0
        assert not (out / "sub-01").exists() and not list(out.glob("logs/config-*.toml"))
        md = (out / "logs" / "CITATION.md").read_text()
        bib = (out / "logs" / "CITATION.bib").read_text()
        keys = set(boilerplate.cited_keys(md))
        software = {"nipype", "numpy", "scipy", "bids", "pybids"}
        expected = DEFAULT if name == "default" else OTHER
        assert keys - software == expected, (name, keys)
        assert set(re.findall(r"@article\{(\w+),", bib)) == keys  # bib: exactly the cited
        texts[name] = md
    assert "TE = 4, 12, 20, 28 ms" in texts["default"]
    assert "projection onto dipole fields" in texts["other"]
    assert "iterative spherical mean value" not in texts["other"]
    assert "were not referenced" in texts["other"] and "ARLO" in texts["other"]
    # the real run wrote the same boilerplate as --boilerplate-only
    assert (base / "one" / "logs" / "CITATION.md").read_text() == texts["default"]


def test_report_failure_is_counted_and_maps_are_kept(runs, tmp_path, monkeypatch, caplog):
    base, _ = runs
    out = tmp_path / "out"
    shutil.copytree(base / "one", out)
    original = figures.mosaic

    def broken(layer, **kwargs):
        if kwargs.get("title", "").startswith("susceptibility"):
            raise RuntimeError("simulated drawing failure")
        return original(layer, **kwargs)

    monkeypatch.setattr(figures, "mosaic", broken)
    code = main([str(EXAMPLE), str(out), "participant", "--reports-only"])
    assert code == EXIT_REPORT_FAILED
    page = (out / "sub-01.html").read_text()
    assert "simulated drawing failure" in page and "Figure chimap could not be drawn" in page
    assert "sub-01_desc-r2star_mosaic.svg" in page  # the other figures are still there
    assert (out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").exists()
    assert "simulated drawing failure" in caplog.text


def test_crash_appears_in_the_errors_section(runs, tmp_path):
    base, _ = runs
    out = tmp_path / "out"
    shutil.copytree(base / "one", out)
    crash = out / "logs" / "crash" / "crash-20260101-000000-qsm-invert_dipole-x.txt"
    crash.parent.mkdir(parents=True, exist_ok=True)
    crash.write_text("Node: qsmprep_wf.sub_01_MEGRE_wf.qsm_wf.invert_dipole\n"
                     "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                     "ValueError: local field is empty\n")
    other = crash.with_name("crash-20260101-000000-other.txt")
    other.write_text("Node: qsmprep_wf.sub_011_MEGRE_wf.qsm_wf.invert_dipole\nValueError: no\n")
    assert main([str(EXAMPLE), str(out), "participant", "--reports-only"]) == 0
    page = (out / "sub-01.html").read_text()
    assert "qsm_wf.invert_dipole</b>: ValueError: local field is empty" in page
    assert "sub_011" not in page and 'id="no-errors"' not in page


def test_warnings_of_the_participant_are_shown(runs, tmp_path):
    base, _ = runs
    out = tmp_path / "out"
    shutil.copytree(base / "one", out)
    (log,) = (out / "logs").glob("qsmprep-*.log")
    assert "processing 1 acquisition(s)" in log.read_text()  # the run's own log file
    with log.open("a") as stream:
        stream.write("261121-04:03:26 | WARNING | qsmprep | sub-01_MEGRE: phase units "
                     "missing, inferred rad\n  (second line)\n"
                     "261121-04:03:26 | WARNING | qsmprep | sub-011_MEGRE: not this one\n"
                     "261121-04:03:26 | WARNING | qsmprep | validator not installed\n"
                     "261121-04:03:26 | INFO    | qsmprep | sub-01: only info\n")
    assert main([str(EXAMPLE), str(out), "participant", "--reports-only"]) == 0
    page = (out / "sub-01.html").read_text()
    assert "WARNING: sub-01_MEGRE: phase units missing, inferred rad\n  (second line)" in page
    assert "validator not installed" in page
    assert "not this one" not in page and "only info" not in page


def _synthetic_body_outputs(out: Path) -> None:
    """Outputs of a water-fat run with --lambda auto (L-curve) and a λ sweep, 24^3 voxels."""
    import json

    import nibabel as nb

    anat, fmap = out / "sub-07" / "anat", out / "sub-07" / "fmap"
    anat.mkdir(parents=True)
    fmap.mkdir(parents=True)
    grid = np.indices((24, 24, 24)) - 11.5
    inside = (np.sqrt((grid ** 2).sum(0)) < 10).astype(np.float32)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    meta = {"EchoTime": [0.0012, 0.0023, 0.0034], "MagneticFieldStrength": 3.0,
            "FieldMapping": "waterfat", "FatModel": "ren_marrow",
            "SwapCheckMessage": "water/fat swap check: suspect (1.20% of voxels off ...)"}
    lcurve = {"RegularizationSelection": "lcurve", "RegularizationCandidates": [1e-5, 1e-4, 1e-3],
              "RegularizationResidualNorms": [1.0, 2.0, 4.0],
              "RegularizationNorms": [30.0, 10.0, 5.0], "RegularizationCurvature": [0, 1, 0],
              "DipoleInversion": "tv", "DipoleInversionParameters": {"lam": 1e-4}}

    def write(folder, name, data, sidecar):
        nb.save(nb.Nifti1Image(np.asarray(data, np.float32), affine),
                str(folder / f"{name}.nii.gz"))
        (folder / f"{name}.json").write_text(json.dumps(sidecar))

    write(anat, "sub-07_desc-body_mask", inside, {"Description": "body mask"})
    write(anat, "sub-07_desc-qsm_mask", inside, {})
    write(anat, "sub-07_Chimap", 0.5 * inside * grid[0] / 10, {**meta, **lcurve})
    for value in (1e-5, 1e-3):
        label = f"lambda{value:.0e}".replace("-", "m").replace("+", "p").replace(".", "p")
        write(anat, f"sub-07_desc-{label}_Chimap", inside, {"RegularizationParameter": value})
    write(anat, "sub-07_localfield", inside, meta)
    write(anat, "sub-07_R2starmap", 80 * inside, meta)
    write(anat, "sub-07_desc-water_M0map", 100 * inside, meta)
    write(anat, "sub-07_desc-fat_M0map", 50 * inside, meta)
    write(anat, "sub-07_PDFFmap", 33 * inside, meta)
    write(fmap, "sub-07_desc-total_fieldmap", 10 * inside, meta)
    write(fmap, "sub-07_desc-total_magnitude", 100 * inside, {})
    (out / "logs").mkdir()
    (out / "logs" / "config-20260101-000000_abcdef12.toml").write_text(
        "# command: qsmprep in out participant --preset body\n"
        '[execution]\nanalysis_level = "participant"\nparticipant_label = []\n'
        '[workflow]\nmask_type = "body"\nfieldmap_method = "waterfat"\n')


def test_body_page_water_fat_swap_verdict_lcurve_and_sweep(tmp_path):
    from qsmprep.reports import build_participant_report

    out = tmp_path / "out"
    _synthetic_body_outputs(out)
    result = build_participant_report(out, "07")
    assert result.failures == []
    names = sorted(p.name.split("_desc-")[1] for p in result.figures)
    assert names == ["chimap_mosaic.svg", "fat_mosaic.svg", "lambdasweep_mosaic.svg",
                     "lcurve_plot.svg", "localfield_mosaic.svg", "mask_mosaic.svg",
                     "pdff_mosaic.svg", "r2star_mosaic.svg", "totalfield_mosaic.svg",
                     "water_mosaic.svg"]
    page = result.html.read_text()
    assert 'class="verdict-suspect">suspect</span>' in page
    assert "fixed window ±1 ppm (body data)" in page and "0–300 1/s" in page
    assert "±0.5 ppm (±63.9 Hz)" in page  # local field window: 0.5 ppm at 3 T
    assert "λ chosen by lcurve" in page
    svg = (out / "sub-07" / "figures" / "sub-07_desc-lcurve_plot.svg").read_text()
    assert "chosen λ = 0.0001" in svg


def test_mosaic_geometry_and_outline():
    """Slices spread over the mask; outlines are exactly the mask's boundary pixels."""
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 4:16, 6:14] = True
    assert figures.slice_positions(mask, 2, 5) == [7, 8, 10, 11, 12]
    labels = np.zeros((6, 6), np.int32)
    labels[1:5, 1:5] = 2
    edge = figures._outline_2d(labels)
    assert edge[2:4, 2:4].sum() == 0 and (edge[1, 1:5] == 2).all() and edge[0].sum() == 0


# ---------------------------------------------------------------------------------------
# the browser
# ---------------------------------------------------------------------------------------
def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                   if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("no headless browser (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--allow-file-access-from-files"):
        options.add_argument(argument)
    try:
        return webdriver.Chrome(service=Service(driver), options=options)
    except Exception as error:  # a browser that cannot start here is an environment issue
        pytest.skip(f"the headless browser did not start: {error}")


IMAGE_CHECK = """
const images = Array.from(document.images);
return images.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]);
"""


def _check_page(browser, path: Path, screenshot: str) -> list:
    browser.get(path.as_uri())
    browser.execute_script("return document.readyState")
    images = browser.execute_script(IMAGE_CHECK)
    assert images, f"{path} shows no image"
    broken = [src for src, complete, width, height in images
              if not complete or width == 0 or height == 0]
    assert not broken, f"images that do not load: {broken}"
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 40, 12000))
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / screenshot))
    return images


def _group_outputs(out: Path) -> None:
    """A group folder as the group level writes it: tables with data dictionaries and
    figures (SVG + PNG) from qsmprep's group plotting functions."""
    from qsmprep.reports import group as plots

    group = out / "group"
    group.mkdir(parents=True)
    (group / "association.tsv").write_text(
        "map\troi\tmeasure\tn\tr\tr_ci_low\tr_ci_high\tslope\n"
        "Chimap\tL1\tBMD\t8\t-0.83\t-0.97\t-0.31\t-0.0042\n"
        "Chimap\tL2\tBMD\t8\t-0.79\t-0.96\t-0.19\t-0.0039\n")
    (group / "association.json").write_text('{"r": {"Description": "Pearson r"}}')
    rng = np.random.default_rng(0)
    x = rng.uniform(50, 200, 12)
    y = -0.004 * x + rng.normal(0, 0.05, 12)
    plots.scatter(x, y, ["L1", "L2", "L3"] * 4, xlabel="BMD (mg/cm3)", ylabel="χ (ppm)",
                  title="Chimap vs BMD", path_stem=group / "figures" / "scatter_Chimap_vs_BMD")
    plots.bland_altman(y, y + rng.normal(0, 0.02, 12), unit="ppm", title="raters",
                       path_stem=group / "figures" / "blandaltman_Chimap_interrater")


def test_group_page_renders_what_exists(tmp_path):
    """Every table and figure of group/ is on the page; a broken table is an error (exit 3),
    the rest still renders."""
    out = tmp_path / "out"
    _group_outputs(out)
    (out / "group" / "broken.tsv").write_bytes(b"a\tb\n\xff\xfe\x00\n")
    code = main([str(EXAMPLE), str(out), "group", "--reports-only"])
    assert code == EXIT_REPORT_FAILED
    page = (out / "group" / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == ["figures/blandaltman_Chimap_interrater.svg",
                               "figures/scatter_Chimap_vs_BMD.svg"]
    assert all((out / "group" / s).stat().st_size > 0 for s in sources)
    assert 'id="table-association"' in page and "-0.83" in page
    assert "broken.tsv could not be read" in page
    assert page.index("association") < page.index("broken")  # known tables first


def test_pages_in_a_headless_browser(runs, tmp_path):
    base, _ = runs
    out = base / "one"
    browser = _browser()
    try:
        images = _check_page(browser, out / "sub-01.html", "report_sub-01.png")
        assert len(images) == 5
        summary = browser.find_element("id", "summary-sub-01").text
        assert "4: TE = 4, 12, 20, 28 ms" in summary
        for method in ("nlfit", "region_growing", "ismv", "tv", "nlls"):
            assert method in summary, method
        methods = browser.find_element("id", "methods").text
        assert "iterative spherical mean value" in methods and "Wen et al." in methods

        group_out = tmp_path / "study"
        shutil.copytree(out, group_out)
        _group_outputs(group_out)
        code = main([str(EXAMPLE), str(group_out), "group", "--reports-only"])
        assert code == 0
        images = _check_page(browser, group_out / "group" / "index.html", "report_group.png")
        assert len(images) == 2
        table = browser.find_element("id", "table-association").text
        assert "-0.83" in table and "L2" in table
        links = [a.get_attribute("href") for a in browser.find_elements("tag name", "a")]
        assert any(h.endswith("scatter_Chimap_vs_BMD.png") for h in links)
        assert any(h.endswith("sub-01.html") for h in links)
    finally:
        browser.quit()
