"""``dc_step``: the data-consistency gradient step x' = x - gamma A^H(A x - y), by any backend, for any operator.

The front door: it asks the operator (``physics.dc_step``). Cartesian MRI runs the fused op
``mbdl_fast.ops.dc_step`` on the ``triton`` and ``cuda`` backends; the other operators run their plain-PyTorch
``dc_step_reference``. An operator with deepinv's names only (no ``dc_step``) gets the generic step.
"""

from __future__ import annotations

import torch

from mbdl_fast._validate import check_operator
from mbdl_fast.physics.base import generic_dc_step


def dc_step(
    physics: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    gamma: float | torch.Tensor,
    backend: str = "auto",
    AHy: torch.Tensor | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """x - gamma A^H(A x - y) for ``physics``, by ``backend`` ("auto", "torch", "triton", "cuda").

    Args:
        physics: a ``mbdl_fast.physics`` operator.
        x: image, e.g. complex64 (B, H, W) for MRI.
        y: measurements, e.g. complex64 (B, C, H, W) k-space; may be None when ``AHy`` is given.
        gamma: step size >= 0, a float or a real tensor of shape () or (B,); differentiable.
        backend: "auto" picks the fastest backend the operator has here; an explicit one that cannot run is an
            error with the reason (``mbdl_fast.backends``).
        AHy: A^H y precomputed once per solve, shaped and typed exactly like x (then ``y`` is not used); with a
            Cartesian-line mask the step then transforms along the sampled axis only.
        check_inputs: refuse NaN/Inf in x, y, AHy and gamma (a GPU synchronisation; solvers check once per solve).
    """
    check_operator("physics", physics, ("A", "A_adjoint", "A_adjoint_A"))
    own = getattr(physics, "dc_step", None)
    if own is None:
        return generic_dc_step(physics, x, y, gamma, backend, AHy, check_inputs)
    return own(x, y, gamma, backend=backend, AHy=AHy, check_inputs=check_inputs)
