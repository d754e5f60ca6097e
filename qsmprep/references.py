"""Literature references of the methods qsmprep runs (sidecars and methods boilerplate)."""

from __future__ import annotations

REFERENCES: dict[str, str] = {
    "nlfit": "Liu T, et al. Nonlinear formulation of the magnetic field to source relationship "
    "for robust quantitative susceptibility mapping. Magn Reson Med 2013;69:467-476.",
    "linear": "Eckstein K, et al. Computationally efficient combination of multi-channel phase "
    "data from multi-echo acquisitions (ASPIRE/MCPC-3D-S). Magn Reson Med 2018;79:2996-3006.",
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
    "loglinear": "Weighted log-linear mono-exponential fit of the multi-echo magnitude.",
    "nlls": "Nonlinear least-squares mono-exponential fit of the multi-echo magnitude.",
    "arlo": "Pei M, et al. Algorithm for fast monoexponential fitting based on Auto-Regression "
    "on Linear Operations (ARLO) of data. Magn Reson Med 2015;73:843-850.",
}


def reference(method: str) -> str:
    """The reference of ``method`` (empty string when none is recorded)."""
    return REFERENCES.get(method, "")
