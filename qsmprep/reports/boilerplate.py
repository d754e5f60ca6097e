"""Methods boilerplate: a past-tense description, with citations, of the methods that ran.

Every workflow carries its paragraph in ``__desc__`` (written by :func:`describe_qsm` and
:func:`describe_run` from the options it was built with); :func:`collect_descriptions`
gathers them in workflow order, and :func:`write_citation_files` writes ``logs/CITATION.md``
(Markdown with pandoc-style ``[@key]`` citations and the reference list) and
``logs/CITATION.bib`` (only the cited entries).
"""

from __future__ import annotations

import html
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

#: BibTeX entries by key.
BIBTEX: dict[str, str] = {
    "bids": """@article{bids,
  author = {Gorgolewski, Krzysztof J. and Auer, Tibor and Calhoun, Vince D. and others},
  title = {The brain imaging data structure, a format for organizing and describing outputs of neuroimaging experiments},
  journal = {Scientific Data}, volume = {3}, pages = {160044}, year = {2016},
  doi = {10.1038/sdata.2016.44}}""",
    "pybids": """@article{pybids,
  author = {Yarkoni, Tal and Markiewicz, Christopher J. and de la Vega, Alejandro and others},
  title = {PyBIDS: Python tools for BIDS datasets},
  journal = {Journal of Open Source Software}, volume = {4}, number = {40}, pages = {1294},
  year = {2019}, doi = {10.21105/joss.01294}}""",
    "nipype": """@article{nipype,
  author = {Gorgolewski, Krzysztof and Burns, Christopher D. and Madison, Cindee and others},
  title = {Nipype: a flexible, lightweight and extensible neuroimaging data processing framework in Python},
  journal = {Frontiers in Neuroinformatics}, volume = {5}, pages = {13}, year = {2011},
  doi = {10.3389/fninf.2011.00013}}""",
    "numpy": """@article{numpy,
  author = {Harris, Charles R. and Millman, K. Jarrod and van der Walt, St{\\'e}fan J. and others},
  title = {Array programming with {NumPy}},
  journal = {Nature}, volume = {585}, pages = {357--362}, year = {2020},
  doi = {10.1038/s41586-020-2649-2}}""",
    "scipy": """@article{scipy,
  author = {Virtanen, Pauli and Gommers, Ralf and Oliphant, Travis E. and others},
  title = {{SciPy} 1.0: fundamental algorithms for scientific computing in Python},
  journal = {Nature Methods}, volume = {17}, pages = {261--272}, year = {2020},
  doi = {10.1038/s41592-019-0686-2}}""",
    "dipole": """@article{dipole,
  author = {Marques, J. P. and Bowtell, R.},
  title = {Application of a Fourier-based method for rapid calculation of field inhomogeneity due to spatial variation of magnetic susceptibility},
  journal = {Concepts in Magnetic Resonance Part B}, volume = {25B}, number = {1},
  pages = {65--78}, year = {2005}, doi = {10.1002/cmr.b.20034}}""",
    "nlfit": """@article{nlfit,
  author = {Liu, Tian and Wisnieff, Cynthia and Lou, Min and Chen, Weiwei and Spincemaille, Pascal and Wang, Yi},
  title = {Nonlinear formulation of the magnetic field to source relationship for robust quantitative susceptibility mapping},
  journal = {Magnetic Resonance in Medicine}, volume = {69}, number = {2}, pages = {467--476},
  year = {2013}, doi = {10.1002/mrm.24272}}""",
    "mcpc3ds": """@article{mcpc3ds,
  author = {Eckstein, Korbinian and Dymerska, Barbara and Bachrata, Beata and others},
  title = {Computationally efficient combination of multi-channel phase data from multi-echo acquisitions ({ASPIRE})},
  journal = {Magnetic Resonance in Medicine}, volume = {79}, number = {6}, pages = {2996--3006},
  year = {2018}, doi = {10.1002/mrm.26963}}""",
    "romeo": """@article{romeo,
  author = {Dymerska, Barbara and Eckstein, Korbinian and Bachrata, Beata and others},
  title = {Phase unwrapping with a rapid opensource minimum spanning tree algorithm ({ROMEO})},
  journal = {Magnetic Resonance in Medicine}, volume = {85}, number = {4}, pages = {2294--2308},
  year = {2021}, doi = {10.1002/mrm.28563}}""",
    "laplacian": """@article{laplacian,
  author = {Schofield, Marvin A. and Zhu, Yimei},
  title = {Fast phase unwrapping algorithm for interferometric applications},
  journal = {Optics Letters}, volume = {28}, number = {14}, pages = {1194--1196}, year = {2003},
  doi = {10.1364/OL.28.001194}}""",
    "reliability": """@article{reliability,
  author = {Abdul-Rahman, Hussein S. and Gdeisat, Munther A. and Burton, David R. and Lalor, Michael J. and Lilley, Francis and Moore, Christopher J.},
  title = {Fast and robust three-dimensional best path phase unwrapping algorithm},
  journal = {Applied Optics}, volume = {46}, number = {26}, pages = {6623--6635}, year = {2007},
  doi = {10.1364/AO.46.006623}}""",
    "vsharp": """@article{vsharp,
  author = {Wu, Bing and Li, Wei and Guidon, Arnaud and Liu, Chunlei},
  title = {Whole brain susceptibility mapping using compressed sensing},
  journal = {Magnetic Resonance in Medicine}, volume = {67}, number = {1}, pages = {137--147},
  year = {2012}, doi = {10.1002/mrm.23000}}""",
    "pdf": """@article{pdf,
  author = {Liu, Tian and Khalidov, Ildar and de Rochefort, Ludovic and others},
  title = {A novel background field removal method for {MRI} using projection onto dipole fields ({PDF})},
  journal = {NMR in Biomedicine}, volume = {24}, number = {9}, pages = {1129--1136}, year = {2011},
  doi = {10.1002/nbm.1670}}""",
    "lbv": """@article{lbv,
  author = {Zhou, Dong and Liu, Tian and Spincemaille, Pascal and Wang, Yi},
  title = {Background field removal by solving the Laplacian boundary value problem},
  journal = {NMR in Biomedicine}, volume = {27}, number = {3}, pages = {312--319}, year = {2014},
  doi = {10.1002/nbm.3064}}""",
    "sharp": """@article{sharp,
  author = {Schweser, Ferdinand and Deistung, Andreas and Lehr, Berengar Wendel and Reichenbach, J{\\"u}rgen Rainer},
  title = {Quantitative imaging of intrinsic magnetic tissue properties using {MRI} signal phase: an approach to in vivo brain iron metabolism?},
  journal = {NeuroImage}, volume = {54}, number = {4}, pages = {2789--2807}, year = {2011},
  doi = {10.1016/j.neuroimage.2010.10.070}}""",
    "resharp": """@article{resharp,
  author = {Sun, Hongfu and Wilman, Alan H.},
  title = {Background field removal using spherical mean value filtering and Tikhonov regularization},
  journal = {Magnetic Resonance in Medicine}, volume = {71}, number = {3}, pages = {1151--1157},
  year = {2014}, doi = {10.1002/mrm.24765}}""",
    "ismv": """@article{ismv,
  author = {Wen, Yan and Zhou, Dong and Liu, Tian and Spincemaille, Pascal and Wang, Yi},
  title = {An iterative spherical mean value method for background field removal in {MRI}},
  journal = {Magnetic Resonance in Medicine}, volume = {72}, number = {4}, pages = {1065--1071},
  year = {2014}, doi = {10.1002/mrm.24998}}""",
    "tkd": """@article{tkd,
  author = {Shmueli, Karin and de Zwart, Jacco A. and van Gelderen, Peter and Li, Tie-Qiang and Dodd, Stephen J. and Duyn, Jeff H.},
  title = {Magnetic susceptibility mapping of brain tissue in vivo using {MRI} phase data},
  journal = {Magnetic Resonance in Medicine}, volume = {62}, number = {6}, pages = {1510--1522},
  year = {2009}, doi = {10.1002/mrm.22135}}""",
    "tsvd": """@article{tsvd,
  author = {Wharton, Samuel and Sch{\\"a}fer, Andreas and Bowtell, Richard},
  title = {Susceptibility mapping in the human brain using threshold-based k-space division},
  journal = {Magnetic Resonance in Medicine}, volume = {63}, number = {5}, pages = {1292--1304},
  year = {2010}, doi = {10.1002/mrm.22334}}""",
    "l2": """@article{l2,
  author = {Bilgic, Berkin and Chatnuntawech, Itthi and Fan, Audrey P. and others},
  title = {Fast image reconstruction with L2-regularization},
  journal = {Journal of Magnetic Resonance Imaging}, volume = {40}, number = {1},
  pages = {181--191}, year = {2014}, doi = {10.1002/jmri.24365}}""",
    "tv": """@article{tv,
  author = {Bilgic, Berkin and Fan, Audrey P. and Polimeni, Jonathan R. and others},
  title = {Fast quantitative susceptibility mapping with L1-regularization and automatic parameter selection},
  journal = {Magnetic Resonance in Medicine}, volume = {72}, number = {5}, pages = {1444--1459},
  year = {2014}, doi = {10.1002/mrm.25029}}""",
    "fansi": """@article{fansi,
  author = {Milovic, Carlos and Bilgic, Berkin and Zhao, Bo and Acosta-Cabronero, Julio and Tejos, Cristian},
  title = {Fast nonlinear susceptibility inversion with variational regularization},
  journal = {Magnetic Resonance in Medicine}, volume = {80}, number = {2}, pages = {814--821},
  year = {2018}, doi = {10.1002/mrm.27073}}""",
    "ilsqr": """@article{ilsqr,
  author = {Li, Wei and Wang, Nian and Yu, Fang and others},
  title = {A method for estimating and removing streaking artifacts in quantitative susceptibility mapping},
  journal = {NeuroImage}, volume = {108}, pages = {111--122}, year = {2015},
  doi = {10.1016/j.neuroimage.2014.12.043}}""",
    "ndi": """@article{ndi,
  author = {Polak, Daniel and Chatnuntawech, Itthi and Yoon, Jaeyeon and others},
  title = {Nonlinear dipole inversion ({NDI}) enables robust quantitative susceptibility mapping ({QSM})},
  journal = {NMR in Biomedicine}, volume = {33}, number = {12}, pages = {e4271}, year = {2020},
  doi = {10.1002/nbm.4271}}""",
    "medi": """@article{medi,
  author = {Liu, Tian and Liu, Jing and de Rochefort, Ludovic and others},
  title = {Morphology enabled dipole inversion ({MEDI}) from a single-angle acquisition: comparison with {COSMOS} in human brain imaging},
  journal = {Magnetic Resonance in Medicine}, volume = {66}, number = {3}, pages = {777--783},
  year = {2011}, doi = {10.1002/mrm.22816}}""",
    "medi0": """@article{medi0,
  author = {Liu, Zhe and Spincemaille, Pascal and Yao, Yihao and Zhang, Yan and Wang, Yi},
  title = {{MEDI+0}: Morphology enabled dipole inversion with automatic uniform cerebrospinal fluid zero reference for quantitative susceptibility mapping},
  journal = {Magnetic Resonance in Medicine}, volume = {79}, number = {5}, pages = {2795--2803},
  year = {2018}, doi = {10.1002/mrm.26946}}""",
    "nesta": """@article{nesta,
  author = {Becker, Stephen and Bobin, J{\\'e}r{\\^o}me and Cand{\\`e}s, Emmanuel J.},
  title = {{NESTA}: a fast and accurate first-order method for sparse recovery},
  journal = {SIAM Journal on Imaging Sciences}, volume = {4}, number = {1}, pages = {1--39},
  year = {2011}, doi = {10.1137/090756855}}""",
    "tgv": """@article{tgv,
  author = {Langkammer, Christian and Bredies, Kristian and Poser, Benedikt A. and others},
  title = {Fast quantitative susceptibility mapping using {3D} {EPI} and total generalized variation},
  journal = {NeuroImage}, volume = {111}, pages = {622--630}, year = {2015},
  doi = {10.1016/j.neuroimage.2015.02.041}}""",
    "rts": """@article{rts,
  author = {Kames, Christian and Wiggermann, Vanessa and Rauscher, Alexander},
  title = {Rapid two-step dipole inversion for susceptibility mapping with sparsity priors},
  journal = {NeuroImage}, volume = {167}, pages = {276--283}, year = {2018},
  doi = {10.1016/j.neuroimage.2017.11.018}}""",
    "tfi": """@article{tfi,
  author = {Liu, Zhe and Kee, Youngwook and Zhou, Dong and Wang, Yi and Spincemaille, Pascal},
  title = {Preconditioned total field inversion ({TFI}) method for quantitative susceptibility mapping},
  journal = {Magnetic Resonance in Medicine}, volume = {78}, number = {1}, pages = {303--315},
  year = {2017}, doi = {10.1002/mrm.26331}}""",
    "arlo": """@article{arlo,
  author = {Pei, Mengchao and Nguyen, Thanh D. and Thimmappa, Nanda D. and others},
  title = {Algorithm for fast monoexponential fitting based on Auto-Regression on Linear Operations ({ARLO}) of data},
  journal = {Magnetic Resonance in Medicine}, volume = {73}, number = {2}, pages = {843--850},
  year = {2015}, doi = {10.1002/mrm.25137}}""",
    "varpro": """@article{varpro,
  author = {Hernando, Diego and Haldar, Justin P. and Sutton, Bradley P. and Ma, Jingfei and Kellman, Peter and Liang, Zhi-Pei},
  title = {Joint estimation of water/fat images and field inhomogeneity map},
  journal = {Magnetic Resonance in Medicine}, volume = {59}, number = {3}, pages = {571--580},
  year = {2008}, doi = {10.1002/mrm.21522}}""",
    "graphcut_hernando": """@article{graphcut_hernando,
  author = {Hernando, Diego and Kellman, Peter and Haldar, Justin P. and Liang, Zhi-Pei},
  title = {Robust water/fat separation in the presence of large field inhomogeneities using a graph cut algorithm},
  journal = {Magnetic Resonance in Medicine}, volume = {63}, number = {1}, pages = {79--90},
  year = {2010}, doi = {10.1002/mrm.22177}}""",
    "graphcut": """@article{graphcut,
  author = {Berglund, Johan and Skorpil, Mikael},
  title = {Multi-scale graph-cut algorithm for efficient water-fat separation},
  journal = {Magnetic Resonance in Medicine}, volume = {78}, number = {3}, pages = {941--949},
  year = {2017}, doi = {10.1002/mrm.26479}}""",
    "pdff_md": """@article{pdff_md,
  author = {Liu, Chia-Ying and McKenzie, Charles A. and Yu, Huanzhou and Brittain, Jean H. and Reeder, Scott B.},
  title = {Fat quantification with {IDEAL} gradient echo imaging: correction of bias from {T1} and noise},
  journal = {Magnetic Resonance in Medicine}, volume = {58}, number = {2}, pages = {354--364},
  year = {2007}, doi = {10.1002/mrm.21301}}""",
    "fat_ismrm": """@article{fat_ismrm,
  author = {Hamilton, Gavin and Yokoo, Takeshi and Bydder, Mark and others},
  title = {In vivo characterization of the liver fat {1H} {MR} spectrum},
  journal = {NMR in Biomedicine}, volume = {24}, number = {7}, pages = {784--790}, year = {2011},
  doi = {10.1002/nbm.1622}}""",
    "fat_marrow": """@article{fat_marrow,
  author = {Ren, Jimin and Dimitrov, Ivan and Sherry, A. Dean and Malloy, Craig R.},
  title = {Composition of adipose tissue and marrow fat in humans by {1H} {NMR} at 7 Tesla},
  journal = {Journal of Lipid Research}, volume = {49}, number = {9}, pages = {2055--2062},
  year = {2008}, doi = {10.1194/jlr.D800010-JLR200}}""",
    "bipolar": """@article{bipolar,
  author = {Peterson, P{\\"a}r and M{\\aa}nsson, Sven},
  title = {Fat quantification using multiecho sequences with bipolar gradients: investigation of accuracy and noise performance},
  journal = {Magnetic Resonance in Medicine}, volume = {71}, number = {1}, pages = {219--229},
  year = {2014}}""",
    "swi": """@article{swi,
  author = {Haacke, E. Mark and Xu, Yingbiao and Cheng, Yu-Chung N. and Reichenbach, J{\\"u}rgen R.},
  title = {Susceptibility weighted imaging ({SWI})},
  journal = {Magnetic Resonance in Medicine}, volume = {52}, number = {3}, pages = {612--618},
  year = {2004}, doi = {10.1002/mrm.20198}}""",
}

#: Citation keys of each method value of the configuration.
METHOD_CITATIONS: dict[str, tuple[str, ...]] = {
    "nlfit": ("nlfit",), "linear": ("mcpc3ds",),
    "waterfat": ("varpro", "graphcut_hernando", "graphcut", "pdff_md"),
    "inphase": ("nlfit",),
    "region_growing": ("romeo",), "romeo": ("romeo",), "laplacian": ("laplacian",),
    "reliability": ("reliability",),
    "vsharp": ("vsharp",), "pdf": ("pdf",), "lbv": ("lbv",), "sharp": ("sharp",),
    "resharp": ("resharp",), "ismv": ("ismv",),
    "tkd": ("tkd",), "tsvd": ("tsvd",), "l2": ("l2",), "tv": ("tv", "fansi"),
    "nltv": ("fansi",), "ilsqr": ("ilsqr",), "ndi": ("ndi",), "medi": ("medi", "medi0"),
    "l2medi": ("medi",), "tvmedi": ("medi", "nesta"), "tgv": ("tgv",), "rts": ("rts",),
    "tfi": ("tfi", "fansi"),
    "arlo": ("arlo",), "csf": ("medi0",), "swi": ("swi",),
    "ismrm": ("fat_ismrm",), "ren_marrow": ("fat_marrow",),
}

_FIELDMAP = {
    "nlfit": "by a nonlinear fit of the complex multi-echo signal [@nlfit], which also gave a "
    "map of the field's noise",
    "linear": "by a noise-weighted linear fit of the temporally unwrapped phase over echo "
    "time, after removal of the phase offset at TE = 0 (MCPC-3D-S) [@mcpc3ds]",
}
_UNWRAP = {
    "region_growing": "quality-guided region growing with ROMEO-style edge weights [@romeo]",
    "romeo": "ROMEO with multi-echo edge weights (the template echo spatially, the other "
    "echoes temporally) [@romeo]",
    "laplacian": "the Laplacian (FFT-based) unwrapping of Schofield and Zhu [@laplacian]",
    "reliability": "reliability-sorting best-path unwrapping [@reliability] (scikit-image)",
}
_BFR = {
    "ismv": "iterative spherical mean value filtering (iSMV) [@ismv]",
    "vsharp": "variable-radius sophisticated harmonic artifact reduction for phase data "
    "(V-SHARP) [@vsharp]",
    "sharp": "sophisticated harmonic artifact reduction for phase data (SHARP) [@sharp]",
    "resharp": "regularisation-enabled SHARP (RESHARP) [@resharp]",
    "pdf": "projection onto dipole fields (PDF) [@pdf]",
    "lbv": "the Laplacian boundary value method (LBV) [@lbv]",
}
_INVERSION = {
    "tv": "total-variation regularised inversion solved with the alternating direction "
    "method of multipliers, with magnitude-derived edge weights and noise-derived data "
    "weights [@tv; @fansi]",
    "nltv": "nonlinear total-variation regularised inversion (FANSI) [@fansi]",
    "medi": "morphology enabled dipole inversion (MEDI) [@medi; @medi0]",
    "l2medi": "an L2-regularised MEDI variant solved by conjugate gradients [@medi]",
    "tvmedi": "a total-variation MEDI variant solved by Nesterov's method [@medi; @nesta]",
    "tgv": "total generalised variation regularised inversion [@tgv]",
    "rts": "rapid two-step dipole inversion (RTS) [@rts]",
    "ndi": "nonlinear dipole inversion (NDI) [@ndi]",
    "ilsqr": "iterative LSQR with streaking-artifact estimation (iLSQR) [@ilsqr]",
    "l2": "closed-form Tikhonov (L2) regularised inversion [@l2]",
    "tkd": "truncated k-space division (TKD) [@tkd]",
    "tsvd": "truncated singular value decomposition of the dipole kernel (TSVD) [@tsvd]",
    "tfi": "total field inversion [@tfi], with total-variation "
    "regularisation on the voxels with signal only (the background sources outside the mask "
    "and in signal voids such as cortical bone are left to the data), solved with the "
    "alternating direction method of multipliers with noise-derived data weights [@fansi]",
}
_R2STAR = {
    "nlls": "a nonlinear least-squares mono-exponential fit of the multi-echo magnitude",
    "loglinear": "a weighted log-linear mono-exponential fit of the multi-echo magnitude",
    "arlo": "auto-regression on linear operations (ARLO) [@arlo]",
}
_REFERENCE = {
    "mean": "Susceptibility values were referenced to the mean over the mask.",
    "csf": "Susceptibility values were referenced to the cerebrospinal fluid of the lateral "
    "ventricles, found as voxels of low R2* [@medi0].",
    "roi": "Susceptibility values were referenced to the mean over a provided reference "
    "region.",
    "water": "Susceptibility values were referenced to the mean over water-dominant soft "
    "tissue (proton-density fat fraction below 10%, eroded by one voxel).",
    "none": "Susceptibility values were not referenced (no offset was removed).",
}


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _echo_text(echo_times: Sequence[float]) -> str:
    times = [round(1000 * t, 3) for t in echo_times]
    if len(times) == 1:
        return f"a single echo (TE = {times[0]:g} ms)"
    spacing = np.diff(times) if len(times) > 2 else None
    uniform = spacing is not None and np.allclose(spacing, spacing[0], atol=1e-3)
    listed = ", ".join(f"{t:g}" for t in times)
    extra = f", spacing {spacing[0]:g} ms" if uniform else ""
    return f"{len(times)} echoes (TE = {listed} ms{extra})"


def describe_run(*, version: str, n_acquisitions: int | None = None) -> str:
    """Opening paragraph: software and versions (cites BIDS, Nipype, NumPy, SciPy)."""
    versions = []
    for package, name in (("nipype", "Nipype"), ("numpy", "NumPy"), ("scipy", "SciPy"),
                          ("pybids", "PyBIDS")):
        try:
            versions.append((name, metadata.version(package)))
        except metadata.PackageNotFoundError:
            versions.append((name, "unknown"))
    v = dict(versions)
    acquisitions = ("" if n_acquisitions is None else
                    f" {n_acquisitions} multi-echo gradient-echo acquisition"
                    f"{'s were' if n_acquisitions != 1 else ' was'} found in the BIDS "
                    "dataset [@bids; @pybids] and processed independently.")
    return (f"Results included in this manuscript come from processing performed using "
            f"*qsmprep* {version}, which is based on Nipype {v['Nipype']} [@nipype], with "
            f"numerical methods implemented in NumPy {v['NumPy']} [@numpy] and SciPy "
            f"{v['SciPy']} [@scipy].{acquisitions}")


def describe_qsm(
    options: Any,
    *,
    echo_times: Sequence[float],
    b0_tesla: float,
    has_phase: bool,
    provided_mask: bool = False,
    qsm: bool = True,
) -> str:
    """Methods paragraph of one acquisition's QSM workflow, from its options (a
    :class:`~qsmprep.config.WorkflowConfig`), echo times (s), field (T) and inputs (``qsm``
    False: a single slice, water-fat maps only)."""
    sentences = [f"The acquisition had {_echo_text(echo_times)} at {b0_tesla:.3g} T."]
    waterfat = has_phase and options.fieldmap_method == "waterfat"
    body = options.mask_type == "body"
    if provided_mask:
        sentences.append("A provided mask was used" + (" as the body mask." if body else
                                                        " as the brain mask."))
    elif body:
        sentences.append("A body mask was computed by Otsu's threshold of the logarithm of "
                         "the echo-combined magnitude, filling holes and keeping every "
                         "sizeable connected part.")
    else:
        sentences.append("A brain mask was computed by a robust threshold of the "
                         "echo-combined magnitude followed by morphological cleaning"
                         + (f" and a {options.mask_erode_mm:g} mm erosion"
                            if options.mask_erode_mm else "") + ".")
    if has_phase:
        polarity = getattr(options, "readout_polarity", "monopolar")
        if polarity == "bipolar" or (polarity == "auto" and len(echo_times) >= 4):
            sentences.append(
                "The phase of the echoes read with the second readout polarity (a constant "
                "plus a linear ramp) was estimated by minimising the fit residual of the "
                "signal model and "
                + ("removed where it explained at least 25% of the residual of a monopolar "
                   "fit" if polarity == "auto" else "removed")
                + " [@bipolar]; the sidecar field ReadoutPolarityCorrection records it.")
        if waterfat:
            model = str(options.fat_model)
            fat_cites = "; ".join(f"@{k}" for k in METHOD_CITATIONS.get(model, ()))
            sentences.append(
                "The field map was estimated by water-fat separation with a multi-peak fat "
                f"spectrum ({model.replace('_', '-')}"
                + (f" [{fat_cites}]" if fat_cites else "") + ") and a common R2*: a "
                "variable-projection grid search [@varpro], coarse-to-fine graph-cut "
                "regularisation of the water/fat ambiguity by max-flow jump moves "
                "[@graphcut_hernando; @graphcut], which also unwrapped the field, and continuous "
                "refinement; water, fat and R2* maps came from the same fit, the "
                "proton-density fat fraction by magnitude discrimination [@pdff_md] (the "
                "plain ratio where water and fat were out of phase above the noise), and a "
                "swap detector checked the field for water/fat "
                "swaps.")
        elif options.fieldmap_method == "inphase":
            sentences.append(
                "The field map was estimated by a single-frequency nonlinear fit [@nlfit] of "
                "the echoes in phase with the main fat peak"
                + (f" (echoes {options.inphase_echoes})" if options.inphase_echoes else "")
                + "; the chemical shift of fat was not modelled.")
        else:
            if len(echo_times) > 1:
                sentences.append(f"The total field was estimated {_FIELDMAP[options.fieldmap_method]}.")
            else:
                sentences.append("The total field was computed from the phase divided by "
                                 "2π TE.")
        if not waterfat:
            sentences.append(f"Phase wraps were removed by {_UNWRAP[options.unwrap_method]}.")
        if qsm:
            sentences.extend(_susceptibility_sentences(options))
        else:
            sentences.append("The acquisition was a single slice: no susceptibility map was "
                             "computed (the dipole field of a source reaches across slices).")
    if len(echo_times) >= 2:
        if waterfat:
            pass  # R2* from the water-fat fit, said above
        else:
            sentences.append(f"R2*, T2* and S0 maps were computed by "
                             f"{_R2STAR[options.r2star_method]}.")
    if has_phase and options.swi and qsm:
        sentences.append(
            "Susceptibility-weighted images [@swi], their minimum intensity projections and "
            f"maximum intensity projections of the susceptibility map ({options.mip_slab_mm:g}"
            " mm slabs) were also computed.")
    if not has_phase:
        sentences.append("No phase images were available, so no susceptibility map was "
                         "computed.")
    return " ".join(sentences)


def _susceptibility_sentences(options: Any) -> list[str]:
    """Background removal, inversion and referencing of the methods paragraph."""
    sentences: list[str] = []
    bfr_params = ", ".join(f"{k} = {_number(v)}" for k, v in
                           sorted(dict(options.bfr_params).items()))
    erosion = (f"after eroding the mask by {options.bfr_erode_mm:g} mm, "
               if options.bfr_erode_mm else "")
    radius = (f" (largest kernel radius {options.vsharp_max_radius_mm:g} mm)"
              if options.bfr_method == "vsharp" else "")
    if options.bfr_method == "none":
        eroded = (f" (eroded by {options.bfr_erode_mm:g} mm)" if options.bfr_erode_mm
                  else "")
        sentences.append(
            "The background field was not removed beforehand: the inversion modelled the "
            f"background sources outside the mask{eroded} together with the tissue.")
    else:
        sentences.append(
            f"Background fields were removed {erosion}by {_BFR[options.bfr_method]}{radius}"
            + (f" with {bfr_params}" if bfr_params else "") + ".")
    method = options.inversion_method
    if options.lambda_rule:
        rule = ("the discrepancy principle (weighted residual equal to the noise level)"
                if options.lambda_rule == "discrepancy" else
                "the point of maximum curvature of the L-curve")
        lam = f", with the regularisation weight chosen per acquisition by {rule}"
    elif options.inversion_lambda is not None:
        lam = f", with regularisation weight λ = {options.inversion_lambda:.3g}"
    else:
        lam = _default_lambda_text(method)
    params = ", ".join(f"{k} = {_number(v)}" for k, v in
                       sorted(dict(options.inversion_params).items()))
    study = (" The data weight was the maximum magnitude over echo times and the edge "
             "mask came from the opposed-phase image |W - F|."
             if options.study_weights and method in ("l2medi", "tvmedi") else "")
    sentences.append(
        f"Susceptibility maps were reconstructed from the "
        f"{'total' if options.bfr_method == 'none' else 'local'} field with the dipole "
        f"model [@dipole] by {_INVERSION[method]}{lam}"
        + (f" ({params})" if params else "") + "." + study)
    sentences.append(_REFERENCE[options.reference])
    return sentences


def _default_lambda_text(method: str) -> str:
    """", with regularisation weight ..." for ``method``'s default lam ("" if it has none)."""
    try:
        from qsmprep.recon import inversion

        if method in inversion.NOISE_SCALED_LAMBDA:
            return (f", with regularisation weight λ = {inversion.TV_LAMBDA_PER_NOISE:g} "
                    "times the median field noise (ppm) of each acquisition")
        value = inversion.default_lambda(method)
    except Exception:  # unknown method or registry problem: say nothing
        return ""
    return "" if value is None else f", with regularisation weight λ = {value:.3g}"


def collect_descriptions(workflow: Any) -> list[str]:
    """``__desc__`` paragraphs of ``workflow`` and its sub-workflows (depth first, in the
    order they were added), identical paragraphs once."""
    out: list[str] = []

    def visit(item: Any) -> None:
        desc = getattr(item, "__desc__", None)
        if isinstance(desc, str) and desc.strip() and desc.strip() not in out:
            out.append(desc.strip())
        graph = getattr(item, "_graph", None)
        if graph is None:
            return
        for node in graph.nodes():  # insertion order
            if hasattr(node, "_graph"):
                visit(node)

    visit(workflow)
    return out


def cited_keys(text: str) -> list[str]:
    """Citation keys in ``[@a; @b]`` groups, in first-citation order."""
    keys: list[str] = []
    for group in re.findall(r"\[(@[^\]]+)\]", text):
        for key in re.findall(r"@([\w:-]+)", group):
            if key not in keys:
                keys.append(key)
    return keys


def bibliography(keys: Iterable[str]) -> str:
    """BibTeX of ``keys`` (unknown keys are skipped)."""
    return "\n\n".join(BIBTEX[k] for k in keys if k in BIBTEX) + "\n"


def reference_line(key: str) -> str:
    """One human-readable reference from a BibTeX entry (authors, title, journal, year, doi)."""
    entry = BIBTEX.get(key, "")
    fields = dict(re.findall(r"(\w+)\s*=\s*\{((?:[^{}]|\{[^{}]*\})*)\}", entry))
    clean = {k: re.sub(r"[{}]|\\['\"`^]", "", v) for k, v in fields.items()}
    authors = clean.get("author", "").split(" and ")
    names = [a.split(",")[0].strip() for a in authors if a.strip()]
    if "others" in names or len(names) > 3:
        who = f"{names[0]} et al."
    else:
        who = ", ".join(names)
    who += "" if who.endswith(".") else "."
    parts = [f"{who} {clean.get('title', '')}.", clean.get("journal", "")]
    volume = clean.get("volume", "")
    if volume:
        parts[-1] += f" {clean.get('year', '')};{volume}"
        if clean.get("pages"):
            parts[-1] += f":{clean['pages'].replace('--', '-')}"
    parts[-1] += "."
    if clean.get("doi"):
        parts.append(f"doi:{clean['doi']}")
    return " ".join(p for p in parts if p)


def markdown(paragraphs: Sequence[str]) -> str:
    """``CITATION.md`` text: the paragraphs, then the numbered reference list."""
    text = "\n\n".join(paragraphs)
    keys = cited_keys(text)
    lines = ["# Methods (qsmprep boilerplate)", "",
             "*This text was generated from the methods that ran; it may be copied into a "
             "manuscript unchanged (CC0). Citation keys refer to `CITATION.bib`.*", "", text,
             "", "## References", ""]
    lines += [f"{n}. [@{k}] {reference_line(k)}" for n, k in enumerate(keys, start=1)]
    return "\n".join(lines) + "\n"


def to_html(paragraphs: Sequence[str]) -> str:
    """The boilerplate as HTML: numbered citations and a reference list."""
    text = "\n\n".join(paragraphs)
    keys = cited_keys(text)
    number = {k: n for n, k in enumerate(keys, start=1)}

    def cite(match: re.Match) -> str:
        found = [number[k] for k in re.findall(r"@([\w:-]+)", match.group(1)) if k in number]
        return "[" + ", ".join(str(n) for n in found) + "]"

    out = []
    for paragraph in paragraphs:
        escaped = html.escape(paragraph)
        escaped = re.sub(r"\*(\w[^*\s]*)\*", r"<em>\1</em>", escaped)
        linked = re.sub(r"\[(@[^\]]+)\]", cite, escaped)
        out.append(f"<p>{linked}</p>")
    if keys:
        out.append('<ol class="references">' + "".join(
            f"<li>{html.escape(reference_line(k))}</li>" for k in keys) + "</ol>")
    return "\n".join(out)


def write_citation_files(output_dir: Path, paragraphs: Sequence[str]) -> tuple[Path, Path]:
    """Write ``logs/CITATION.md`` and ``logs/CITATION.bib`` atomically; returns both paths."""
    from qsmprep.bids import atomic_write_text

    logs = Path(output_dir) / "logs"
    md, bib = logs / "CITATION.md", logs / "CITATION.bib"
    atomic_write_text(md, markdown(paragraphs))
    atomic_write_text(bib, bibliography(cited_keys("\n".join(paragraphs))))
    return md, bib
