"""Measurement operators with deepinv's interface: A, A_adjoint, dc_step, prox_l2, update."""

from mbdl_fast.physics.base import LinearPhysics

__all__ = ["LinearPhysics"]
