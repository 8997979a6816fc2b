"""Batched conjugate gradient for Hermitian positive-definite systems, per-sample convergence."""

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
