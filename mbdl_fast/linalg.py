"""Batched conjugate gradient for Hermitian positive-definite systems, per-sample convergence.

``conjugate_gradient`` differentiates by unrolling its iterations: the derivative of the iterations run, not of the
solution. A warm start that is already (nearly) the solution stops it after 0 or few iterations, and then dx/db is
about the identity instead of M^{-1} (18 % off in a multi-coil prox warm-started at z with y = A z).
``solve_hpd`` differentiates implicitly: x = M^{-1} b, so dL/db = M^{-1} dL/dx, one more CG solve in backward, and
the gradients of whatever M depends on follow from r = b - M x at the solution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> = sum conj(a) * b per sample, real part (the system is Hermitian): shape (B,)."""
    return torch.sum((a.conj() * b).real.reshape(a.shape[0], -1), dim=1)


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 50,
) -> tuple[torch.Tensor, dict]:
    """Solve ``apply(x) = b`` for each sample of a batch (dim 0), ``apply`` Hermitian positive definite.

    Stops a sample once ||r|| <= tol * ||b|| (relative residual); stops the loop when all have,
    or at ``max_iter``. Returns ``(x, info)`` with ``info = {"iterations", "residual" (B,), "converged" (B,)}``.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = _batch_dot(r, r)
    b_norm = torch.sqrt(_batch_dot(b, b)).clamp_min(torch.finfo(rs.dtype).tiny)
    shape = (-1,) + (1,) * (b.dim() - 1)
    it = 0
    for it in range(1, max_iter + 1):
        if bool((torch.sqrt(rs) <= tol * b_norm).all()):
            it -= 1
            break
        ap = apply(p)
        active = torch.sqrt(rs) > tol * b_norm
        denom = _batch_dot(p, ap)
        alpha = torch.where(active & (denom > 0), rs / torch.where(denom > 0, denom, 1.0), 0.0)
        x = x + alpha.view(shape) * p
        r = r - alpha.view(shape) * ap
        rs_new = _batch_dot(r, r)
        beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), 0.0)
        p = r + beta.view(shape) * p
        rs = torch.where(active, rs_new, rs)
    residual = torch.sqrt(rs) / b_norm
    return x, {"iterations": it, "residual": residual, "converged": residual <= tol}


class _ImplicitSolve(torch.autograd.Function):
    """Forward: zeros like r. Backward: M^{-1} grad (CG). Added to the solution x*, it makes dx*/dθ = M^{-1} dr/dθ."""

    @staticmethod
    def forward(ctx, r, apply, tol, max_iter):  # noqa: ANN001, ANN205 (autograd's signature)
        ctx.apply_op, ctx.tol, ctx.max_iter = apply, tol, max_iter
        return torch.zeros_like(r)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        with torch.no_grad():
            g, _ = conjugate_gradient(ctx.apply_op, grad, tol=ctx.tol, max_iter=ctx.max_iter)
        return g, None, None, None


def solve_hpd(
    apply: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 50,
) -> tuple[torch.Tensor, dict]:
    """``conjugate_gradient`` without recording its iterations, differentiated implicitly (module docstring).

    The forward solve runs under ``no_grad``; with autograd on, one more ``apply`` builds r = b - M x* (zero up to
    the residual) whose graph carries the gradients to b and to M's parameters (a step size, coil maps), and the
    backward solves M g = dL/dx by CG with the same ``tol`` and ``max_iter``. M must be Hermitian (it is its own
    adjoint), as for ``conjugate_gradient``.
    """
    with torch.no_grad():
        x, info = conjugate_gradient(apply, b, x0=x0, tol=tol, max_iter=max_iter)
    if torch.is_grad_enabled():
        r = b - apply(x)
        if r.requires_grad:
            x = x + _ImplicitSolve.apply(r, apply, tol, max_iter)
    return x, info
