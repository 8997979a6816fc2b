"""Real scanner data shipped with the package: one in-vivo brain slice, 16 receive coils, fully sampled.

``files/brain_invivo_16ch_gre.npz``: an adult brain, one axial 2-D gradient-echo (FLASH) slice at 3 T
(Siemens), 16 channels of a head/neck coil, fully sampled Cartesian 128 x 128 (FOV 256 mm, 3 mm slice,
TE 12.4 ms, TR 48 ms, flip 8 deg); ``files/brain_invivo_bodycoil_2ch_gre.npz``: the same slice received
by the body coil (2 channels), a sensitivity reference. Raw k-space, noise included, no patient fields;
from the MIT-licensed repository pulseq/MR-Physics-with-Pulseq (``files/LICENSE_pulseq_MR-Physics-with-Pulseq.txt``
says which files and commit, and carries the notice that must travel with any copy).

The coil maps of a real scan are unknown: estimate them, e.g. with ``mbdl_fast.coils.espirit``.
"""

from __future__ import annotations

import numpy as np
import torch

from mbdl_fast.data._resources import load_npz
from mbdl_fast.fft import ifft2c
from mbdl_fast.transforms import rotate

REAL_BRAIN_FILE = "brain_invivo_16ch_gre.npz"
BODY_COIL_FILE = "brain_invivo_bodycoil_2ch_gre.npz"


def root_sum_of_squares(kspace: torch.Tensor) -> torch.Tensor:
    """sqrt(Σ_c |ifft2c(y_c)|²): real ``(B, H, W)`` from complex k-space ``(B, C, H, W)``."""
    return ifft2c(kspace).abs().square().sum(dim=1).sqrt()


def load_real_brain(body_coil: bool = False) -> torch.Tensor:
    """The real slice's fully sampled k-space, complex64 ``(1, C, 128, 128)``, in the project's conventions.

    - Layout: centred k-space as ``mbdl_fast.fft.ifft2c`` inverts (fastMRI's), phase encoding along the
      last axis W like fastMRI's k-space, so the column masks of ``mbdl_fast.physics.masks`` undersample
      phase-encode lines. The scanner acquired phase encoding along H (anterior up); the stored arrays
      are turned a quarter turn counter-clockwise (``mbdl_fast.finetune.rotate``: exact, about the Fourier
      origin, commutes with the FFT), so images show anterior to the left, not mirrored.
    - Scale: divided by the maximum of the root-sum-of-squares image of the full k-space, so the image
      is in [0, 1] like the simulated slices (each divided by its volume's maximum). The noise is the
      scanner's, scaled alike.

    Args:
        body_coil: ``False``: the 16-channel head-coil scan ``(1, 16, 128, 128)``; ``True``: the body-coil
            scan of the same slice ``(1, 2, 128, 128)``, scaled by its own root-sum-of-squares maximum.

    Returns:
        a fresh complex64 tensor on the CPU, fully sampled (undersample it with a mask).
    """
    if not isinstance(body_coil, bool):
        raise TypeError(f"body_coil: expected a bool, got {type(body_coil).__name__}")
    stored = load_npz(BODY_COIL_FILE if body_coil else REAL_BRAIN_FILE)["kspace"]
    kspace = rotate(torch.from_numpy(np.array(stored, dtype=np.complex64))[None], 1)
    return (kspace / root_sum_of_squares(kspace).max()).contiguous()
