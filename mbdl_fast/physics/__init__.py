"""Measurement operators with deepinv's interface: A, A_adjoint, dc_step, prox_l2, update."""

from mbdl_fast.physics import masks
from mbdl_fast.physics.base import LinearPhysics
from mbdl_fast.physics.blockcs import BlockCS
from mbdl_fast.physics.mri import MRI, MultiCoilMRI
from mbdl_fast.physics.superres import SuperResolution

__all__ = ["BlockCS", "LinearPhysics", "MRI", "MultiCoilMRI", "SuperResolution", "masks"]
