"""``mri_forward``: the Cartesian MRI forward operator A x = M ⊙ F_c(S ⊙ x) as one fused op.

    x (B, H, W) complex64 -> (B, C, H, W) complex64;  coil maps S (B|1, C, H, W) complex64 or None (one coil);
    mask M float32 (B|1, 1, H|1, W|1);  F_c fastMRI's centred orthonormal 2-D FFT.

Backends: ``torch`` (:func:`mri_forward_ref`) and ``triton`` (kernels/mri_dc.py: coil expansion and centring shifts
fused around one FFT). The ``cuda`` extension has no forward operator: the table says so, and a request for it is an
error with that reason. The op is linear in x, so its backward is the adjoint, dL/dx = Σ_c conj(S_c) F_c^H(M g_c).
"""

from __future__ import annotations

import torch

from mbdl_fast.backends import implementation, register
from mbdl_fast.fft import fftc, ifftc

OP = "mri_forward"


@torch.library.custom_op("mbdl_fast::mri_forward", mutates_args=())
def mri_forward_op(x: torch.Tensor, coil_maps: torch.Tensor | None, mask: torch.Tensor, impl: str) -> torch.Tensor:
    """A x = M ⊙ F_c(S ⊙ x) by backend ``impl`` (module docstring: shapes); every implementation takes
    ``(x, coil_maps, mask)``."""
    return implementation(OP, impl)(x, coil_maps, mask)


@mri_forward_op.register_fake
def _(x, coil_maps, mask, impl):
    c = 1 if coil_maps is None else coil_maps.shape[1]
    return x.new_empty((x.shape[0], c, x.shape[1], x.shape[2]))


def coil_expand(x: torch.Tensor, coil_maps: torch.Tensor | None) -> torch.Tensor:
    """S ⊙ x: (B, H, W) -> (B, C, H, W)."""
    return x.unsqueeze(1) if coil_maps is None else coil_maps * x.unsqueeze(1)


def coil_combine(z: torch.Tensor, coil_maps: torch.Tensor | None) -> torch.Tensor:
    """Σ_c conj(S_c) ⊙ z_c: (B, C, H, W) -> (B, H, W)."""
    return z[:, 0] if coil_maps is None else torch.sum(coil_maps.conj() * z, dim=1)


def mri_forward_ref(x: torch.Tensor, coil_maps: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """M ⊙ F_c(S ⊙ x) in plain PyTorch: the definition the fused implementations are checked against."""
    return mask * fftc(coil_expand(x, coil_maps))


def mri_adjoint_ref(y: torch.Tensor, coil_maps: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """A^H y = Σ_c conj(S_c) F_c^H(M ⊙ y_c): (B, C, H, W) -> (B, H, W), plain PyTorch."""
    return coil_combine(ifftc(mask * y), coil_maps)


def _setup(ctx, inputs, output):
    _, coil_maps, mask, _ = inputs
    ctx.save_for_backward(coil_maps, mask)


def _backward(ctx, grad):
    coil_maps, mask = ctx.saved_tensors
    return mri_adjoint_ref(grad, coil_maps, mask), None, None, None


mri_forward_op.register_autograd(_backward, setup_context=_setup)

register(OP, "torch", mri_forward_ref)
register(OP, "triton", "mbdl_fast.kernels.mri_dc:mri_forward_triton")
