"""Literature references of the methods qsmprep runs (sidecars and methods boilerplate)."""

from __future__ import annotations

REFERENCES: dict[str, str] = {
    "nlfit": "Liu T, et al. Nonlinear formulation of the magnetic field to source relationship "
    "for robust quantitative susceptibility mapping. Magn Reson Med 2013;69:467-476.",
    "linear": "Eckstein K, et al. Computationally efficient combination of multi-channel phase "
    "data from multi-echo acquisitions (ASPIRE/MCPC-3D-S). Magn Reson Med 2018;79:2996-3006.",
    "bipolar": "Peterson P, Mansson S. Fat quantification using multiecho sequences with "
    "bipolar gradients: investigation of accuracy and noise performance. Magn Reson Med "
    "2014;71:219-229 (bipolar readout phase errors); Yu H, et al. Phase and amplitude "
    "correction for multi-echo water-fat separation with bipolar acquisitions. J Magn Reson "
    "Imaging 2010;32:1264-1271.",
    "region_growing": "Dymerska B, Eckstein K, et al. Phase unwrapping with a rapid opensource "
    "minimum spanning tree algorithm (ROMEO). Magn Reson Med 2021;85:2294-2308.",
    "romeo": "Dymerska B, Eckstein K, et al. Phase unwrapping with a rapid opensource minimum "
    "spanning tree algorithm (ROMEO). Magn Reson Med 2021;85:2294-2308 (multi-echo weights).",
    "laplacian": "Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric "
    "applications. Opt Lett 2003;28:1194-1196.",
    "reliability": "Abdul-Rahman HS, et al. Fast and robust three-dimensional best path phase "
    "unwrapping algorithm. Appl Opt 2007;46:6623-6635.",
    "vsharp": "Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed "
    "sensing. Magn Reson Med 2012;67:137-147.",
    "pdf": "Liu T, et al. A novel background field removal method for MRI using projection onto "
    "dipole fields (PDF). NMR Biomed 2011;24:1129-1136.",
    "lbv": "Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the "
    "Laplacian boundary value problem. NMR Biomed 2014;27:312-319.",
    "sharp": "Schweser F, et al. Quantitative imaging of intrinsic magnetic tissue properties "
    "using MRI signal phase. NeuroImage 2011;54:2789-2807.",
    "resharp": "Sun H, Wilman AH. Background field removal using spherical mean value filtering "
    "and Tikhonov regularization. Magn Reson Med 2014;71:1151-1157.",
    "ismv": "Wen Y, Zhou D, Liu T, Spincemaille P, Wang Y. An iterative spherical mean value "
    "method for background field removal in MRI. Magn Reson Med 2014;72:1065-1071.",
    "tkd": "Shmueli K, et al. Magnetic susceptibility mapping of brain tissue in vivo using MRI "
    "phase data. Magn Reson Med 2009;62:1510-1522.",
    "l2": "Bilgic B, et al. Fast image reconstruction with L2-regularization. J Magn Reson "
    "Imaging 2014;40:181-191.",
    "tv": "Bilgic B, et al. Fast quantitative susceptibility mapping with L1-regularization and "
    "automatic parameter selection. Magn Reson Med 2014;72:1444-1459; Milovic C, et al. Fast "
    "nonlinear susceptibility inversion with variational regularization (FANSI). Magn Reson "
    "Med 2018;80:814-821.",
    "tsvd": "Wharton S, Schafer A, Bowtell R. Susceptibility mapping in the human brain using "
    "threshold-based k-space division. Magn Reson Med 2010;63:1292-1304.",
    "ilsqr": "Li W, Wang N, Yu F, et al. A method for estimating and removing streaking "
    "artifacts in quantitative susceptibility mapping. NeuroImage 2015;108:111-122.",
    "nltv": "Milovic C, Bilgic B, Zhao B, Acosta-Cabronero J, Tejos C. Fast nonlinear "
    "susceptibility inversion with variational regularization. Magn Reson Med 2018;80:814-821.",
    "ndi": "Polak D, Chatnuntawech I, Yoon J, et al. Nonlinear dipole inversion (NDI) enables "
    "robust quantitative susceptibility mapping (QSM). NMR Biomed 2020;33:e4271.",
    "medi": "Liu T, Liu J, de Rochefort L, et al. Morphology enabled dipole inversion (MEDI) "
    "from a single-angle acquisition. Magn Reson Med 2011;66:777-783; Liu Z, et al. MEDI+0. "
    "Magn Reson Med 2018;79:2795-2803.",
    "l2medi": "L2-regularised MEDI solved by conjugate gradients with an opposed-phase edge "
    "mask and a maximum-intensity-projection data weight (calcaneus trabecular bone study).",
    "tvmedi": "TV-MEDI solved by Nesterov's method (NESTA; Becker S, Bobin J, Candes EJ. SIAM "
    "J Imaging Sci 2011;4:1-39), as in the calcaneus trabecular bone study.",
    "tgv": "Langkammer C, Bredies K, Poser BA, et al. Fast quantitative susceptibility mapping "
    "using 3D EPI and total generalized variation. NeuroImage 2015;111:622-630.",
    "rts": "Kames C, Wiggermann V, Rauscher A. Rapid two-step dipole inversion for "
    "susceptibility mapping with sparsity priors. NeuroImage 2018;167:276-283.",
    "tfi": "Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. Preconditioned total field inversion "
    "(TFI) method for quantitative susceptibility mapping. Magn Reson Med 2017;78:303-315.",
    "none": "",
    "loglinear": "Weighted log-linear mono-exponential fit of the multi-echo magnitude.",
    "nlls": "Nonlinear least-squares mono-exponential fit of the multi-echo magnitude.",
    "arlo": "Pei M, et al. Algorithm for fast monoexponential fitting based on Auto-Regression "
    "on Linear Operations (ARLO) of data. Magn Reson Med 2015;73:843-850.",
}


def reference(method: str) -> str:
    """The reference of ``method`` (empty string when none is recorded)."""
    return REFERENCES.get(method, "")
