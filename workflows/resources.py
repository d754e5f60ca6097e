"""Memory estimates of the QSM nodes from the data size, for Nipype's schedulers.

MultiProc starts a node only when its ``mem_gb`` fits the budget (``--mem``, default 90% of
the machine), and the SLURM/SGE plugins request it per job, so the estimates must be close to
what the nodes use: too low oversubscribes, too high refuses to run ("insufficient
resources") on small machines. The per-voxel costs below are the peak resident-set
increases of each step measured by ``benchmarks/speed.py`` on a 256 x 256 x 176, 6-echo
subject (plus the node's own input arrays), rounded up; ``MARGIN`` covers other data.
"""

from __future__ import annotations

from dataclasses import dataclass

#: resident memory of a node's Python process before it loads data (numpy, scipy, nipype)
PROCESS_BASELINE_GB = 0.3
#: safety factor on the measured costs
MARGIN = 1.3

#: peak bytes per voxel x echo (4D steps) and per voxel (3D steps; a node may have both)
BYTES_PER_VOXEL_ECHO = {
    "load_echoes": 16.0,  # magnitude + phase stacks (float32) and the finite mask
    "brain_mask": 10.0,   # echo combination and morphology on the magnitude stack
    "fit_r2star": 15.0,
    "estimate_field": 34.0,  # nonlinear fit, unwrapping, consistency check, 4D outputs
    "waterfat": 20.0,     # magnitude, phase, complex signal and its demodulated copy
    "readout_polarity": 32.0,  # magnitude, phase, complex signal, corrected phase
    "compute_swi": 24.0,
}
BYTES_PER_VOXEL = {
    "remove_background": 40.0,  # padded real FFTs of the field and masks
    "invert_dipole": 75.0,      # ADMM variables on the padded grid
    "reference_chi": 12.0,
    "venography": 12.0,
    # water-fat graph cut: neighbour pairs, candidates and pyramid (with the echo term above:
    # 4.6 / 3.7 GB measured for 8 / 4 echoes at 256 x 256 x 176, 63% of it masked)
    "waterfat": 215.0,
}
#: body masks fill the field of view and are cut by it: the inversions pad the cut axes by
#: the box length (TV and TFI measured 255 / 237 B per voxel on the 64 x 64 x 48 leg)
BODY_BYTES_PER_VOXEL = {"invert_dipole": 260.0}


@dataclass(frozen=True)
class NodeMemory:
    """``mem_gb`` of each QSM node for an acquisition of ``voxels`` x ``echoes``."""

    voxels: int
    echoes: int
    body: bool = False  # a body mask (--mask-type body)

    def gb(self, node: str) -> float:
        """Estimated peak memory (GB) of the node called ``node``."""
        if node not in BYTES_PER_VOXEL_ECHO and node not in BYTES_PER_VOXEL:
            raise KeyError(f"no memory estimate for the node {node!r}")
        per_voxel = BYTES_PER_VOXEL.get(node, 0.0)
        if self.body:
            per_voxel = BODY_BYTES_PER_VOXEL.get(node, per_voxel)
        per_voxel += max(self.echoes, 1) * BYTES_PER_VOXEL_ECHO.get(node, 0.0)
        return round(PROCESS_BASELINE_GB + MARGIN * self.voxels * per_voxel / 1e9, 2)
