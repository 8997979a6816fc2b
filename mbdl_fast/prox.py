"""``prox_l2``: the data-consistency prox argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||², by any backend.

The front door: it asks the operator (``physics.prox_l2``), which solves (I + gamma A^H A) x = z + gamma A^H y.
Cartesian MRI has the fused backends (``triton``, ``cuda``): single coil, the closed form as the fused op
``mbdl_fast.ops.mri_prox``; multi-coil, CG on the fused DC step (``MultiCoilMRI.prox_l2``). Super-resolution and
block CS have closed forms (their ``prox_l2_reference``); any other operator, CG.
"""

from __future__ import annotations

import torch

from mbdl_fast._validate import check_operator


def prox_l2(
    physics: torch.nn.Module,
    z: torch.Tensor,
    y: torch.Tensor,
    gamma: float | torch.Tensor,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||² for ``physics``, by ``backend`` ("auto", "torch", "triton", "cuda").

    Args:
        physics: a ``mbdl_fast.physics`` operator. Cartesian MRI (``MRI``, ``MultiCoilMRI``) has the fused backends:
            single coil, the closed form in one fused k-space pass between two FFTs; multi-coil, CG (the operator's
            ``cg_tol``, ``cg_max_iter``; info in ``physics.last_prox_info``) on the fused DC step.
        z: the point to pull towards, e.g. complex64 (B, H, W) for MRI (complex64 for the fused backends).
        y: measurements, e.g. complex64 (B, C, H, W) k-space.
        gamma: step, a float or a real tensor of shape () or (B,), >= 0; differentiable.
        backend: "torch" is the operator's own ``prox_l2_reference``, exactly. "auto" picks the fastest available
            fused backend and uses "torch" where the fused ones cannot run the call (complex128, an operator whose
            coil maps or mask require grad); an explicit fused backend refuses such a call.
        check_inputs: refuse NaN/Inf in z, y and gamma and a negative gamma (a GPU synchronisation).
    """
    check_operator("physics", physics, ("prox_l2",))
    return physics.prox_l2(z, y, gamma, backend=backend, check_inputs=check_inputs)
