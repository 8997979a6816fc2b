"""Batched fixed-point solvers for z = f(z): plain iteration and Anderson acceleration.

Both are one implementation, :class:`FixedPointState` (fixed buffers, no host synchronisation inside an
iteration, so that a CUDA graph can capture its steps), and run without autograd, on a batch (dim 0) of real or complex tensors of any shape, with
per-sample convergence: the residual of iterate z_k of sample b is

    r_b(z_k) = ||f(z_k) - z_k|| / ||f(z_k)||      (stop_mode="rel"; "abs": ||f(z_k) - z_k||)

and once r_b <= tol, sample b is frozen: its returned iterate stops changing while the others go on.
The loop stops when every sample has converged or after ``max_iter`` evaluations of f. A sample
that did not converge returns its lowest-residual iterate (as torchdeq does) and the call warns
with a ``ConvergenceWarning``; ``info`` always says which samples converged.

``info`` (every solver):
    iterations            int, evaluations of f run (the cost of the solve; z0's check counts as one)
    iterations_per_sample (B,) int64, evaluations until the sample converged (``iterations`` if never)
    residual              (B,) residual of the returned iterate
    trace                 list with one (B,) residual per evaluation (frozen samples repeat theirs)
    converged             (B,) bool, residual <= tol
    nonfinite             (B,) bool, f returned NaN/Inf for the sample: it stopped there (see below)
    evaluations_run       int, evaluations of f made (more than ``iterations`` when a CUDA-graph runner replays
                          whole chunks past the last convergence: ``mbdl_fast.solvers.execution``)

A frozen sample is still evaluated (at its frozen iterate) because f may mix the batch with
per-sample operator data (coil maps, masks); only its iterate is held.

A sample whose f(z) holds a NaN or Inf stops at once: it is frozen at its lowest-residual finite
iterate, never mixed into Anderson's history again, and reported (a ``ConvergenceWarning`` naming
the samples, ``info["nonfinite"]``); the other samples go on, and the loop ends when every sample
has converged or stopped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from mbdl_fast._validate import (
    MAX_ITERATIONS,
    check_choice,
    check_finite,
    check_int,
    check_nonempty,
    check_number,
    check_tensor,
    describe,
)
from mbdl_fast.linalg import ConvergenceWarning

__all__ = ["SOLVERS", "ConvergenceWarning", "FixedPointState", "anderson_solve", "fixed_point_solve", "solver_state"]

#: The solver names DEQ options take (``f_solver``, ``b_solver``).
SOLVERS = ("anderson", "fixed_point_iter")
_STOP_MODES = ("rel", "abs")
_COEFFICIENTS = ("real", "complex")
#: Anderson keeps 2m iterates per sample: a history beyond this is a configuration error, not a choice.
MAX_ANDERSON_M = 64


def _check_args(z0: object, tol: float, max_iter: int, stop_mode: str) -> torch.Tensor:
    z0 = check_tensor("z0", z0)
    if z0.dim() < 1 or z0.dtype not in (torch.float32, torch.float64, torch.complex64, torch.complex128):
        # Half precision cannot carry a 1e-4 tolerance, and the Anderson system is solved in z0's precision.
        raise TypeError(f"z0: expected a float32/float64 or complex64/complex128 tensor (B, ...), got {describe(z0)}")
    check_nonempty("z0", z0, "tensor (B, ...)")
    check_finite("z0", z0)
    check_number("tol", tol, 0.0, open_min=True)
    check_int("max_iter", max_iter, 1, MAX_ITERATIONS)
    check_choice("stop_mode", stop_mode, _STOP_MODES)
    return z0


def _evaluate(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """f on the flat iterate (B, N), returned flat; f must keep the shape."""
    fx = f(x.view(shape))
    if not isinstance(fx, torch.Tensor) or fx.shape != shape or fx.dtype != x.dtype:
        got = describe(fx) if isinstance(fx, torch.Tensor) else type(fx).__name__
        raise ValueError(f"f: expected f(z) of the shape and dtype of z0 ({describe(x.view(shape))}), got {got}")
    return fx.reshape(x.shape)


def _residual(fx: torch.Tensor, x: torch.Tensor, stop_mode: str) -> torch.Tensor:
    """Per-sample ||f(x) - x|| (divided by ||f(x)|| for "rel"): (B,) real."""
    diff = torch.linalg.vector_norm(fx - x, dim=1)
    if stop_mode == "rel":
        norm = torch.linalg.vector_norm(fx, dim=1)
        # 0 / tiny = 0 when f(x) = x = 0; and a diverging sample whose ||f(x)|| overflows must not
        # read as converged (finite / inf = 0): non-finite norms give an infinite residual.
        diff = torch.where(torch.isfinite(norm), diff / norm.clamp_min(torch.finfo(diff.dtype).tiny), math.inf)
    return torch.nan_to_num(diff, nan=math.inf)


def _spd_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """a^{-1} rhs for a batch (B, m, m) of Hermitian positive definite a and rhs (B, m), by elimination without
    pivoting (stable for such a), with no host synchronisation: capturable in a CUDA graph, unlike
    ``torch.linalg.solve``, which checks its pivots on the host."""
    a = a.clone()
    r = rhs.clone()
    m = a.shape[-1]
    for i in range(m - 1):
        factor = a[:, i + 1 :, i] / a[:, i : i + 1, i]
        a[:, i + 1 :, :] -= factor[:, :, None] * a[:, i : i + 1, :]
        r[:, i + 1 :] -= factor * r[:, i : i + 1]
    x = torch.zeros_like(r)
    for i in reversed(range(m)):
        x[:, i] = (r[:, i] - (a[:, i, i + 1 :] * x[:, i + 1 :]).sum(dim=1)) / a[:, i, i]
    return x


class FixedPointState:
    """The one implementation of both solvers: their iterate, history and per-sample bookkeeping in fixed buffers.

    ``step(f)`` is one iteration (one evaluation of f, then the plain or the Anderson update) written with device
    tensors only (iteration index, history slot, counts), so that it never synchronises with the host and any
    number of steps can be captured in one CUDA graph (``mbdl_fast.solvers.execution``). ``all_stopped()`` is the
    one host synchronisation, which ``fixed_point_solve`` / ``anderson_solve`` make after every step and a graph
    runner after every replayed chunk; ``finish`` returns ``(z, info)`` as the solvers document.

    Anderson's history is kept in m slots written round-robin; slots not yet filled are zero, so their rows and
    columns of the Gram matrix vanish and a = H^{-1} 1 / (1^T H^{-1} 1) over the filled slots, with
    H = M + mu I, is the solution of the bordered system of ``anderson_solve``'s docstring. By default that system
    is solved as it stands (``torch.linalg.solve``, which also copes with lam = 0 on a degenerate history); with
    ``sync_free`` a = H^{-1} 1 / (1^T H^{-1} 1) by elimination without pivoting (``_spd_solve``: no host
    synchronisation, so capturable; H must be positive definite, i.e. lam > 0 once the history degenerates):
    the same coefficients up to rounding.
    """

    def __init__(
        self,
        z0: torch.Tensor,
        *,
        anderson: bool,
        tol: float,
        max_iter: int,
        stop_mode: str,
        m: int = 5,
        lam: float = 1e-4,
        beta: float = 1.0,
        coefficients: str = "real",
        sync_free: bool = False,
    ) -> None:
        self.shape = z0.shape
        self.sync_free = sync_free
        self.anderson = anderson
        self.tol, self.max_iter, self.stop_mode = tol, max_iter, stop_mode
        self.m, self.lam, self.beta = m, lam, beta
        b = z0.shape[0]
        x = z0.detach().reshape(b, -1)
        real = x.real.dtype if x.is_complex() else x.dtype
        dev = x.device
        self.x = x.clone()
        self.best = x.clone()
        self.best_res = torch.empty(b, dtype=real, device=dev)
        self.converged = torch.empty(b, dtype=torch.bool, device=dev)
        self.nonfinite = torch.empty(b, dtype=torch.bool, device=dev)
        self.first_nonfinite = torch.empty((), dtype=torch.int64, device=dev)  # evaluation number, 0: none
        self.iters = torch.empty(b, dtype=torch.int64, device=dev)
        self.k = torch.empty((), dtype=torch.int64, device=dev)
        self.trace = torch.empty(max_iter, b, dtype=real, device=dev)
        if anderson:
            self.X = torch.empty(b, m, x.shape[1], dtype=x.dtype, device=dev)
            self.F = torch.empty_like(self.X)
            self.count = torch.empty((), dtype=torch.int64, device=dev)
            real_coefficients = not x.is_complex() or coefficients == "real"
            self.coef_dtype = real if real_coefficients else x.dtype
            self.eye = torch.eye(m, dtype=self.coef_dtype, device=dev)
            self.slots = torch.arange(m, device=dev)
            self.bordered = torch.zeros(b, m + 1, m + 1, dtype=self.coef_dtype, device=dev)
            self.rhs = torch.zeros(b, m + 1, 1, dtype=self.coef_dtype, device=dev)
            self.rhs[:, 0] = 1
        self.reset(z0)

    def reset(self, z0: torch.Tensor) -> None:
        """Start again from ``z0`` (same shape), in the same buffers."""
        flat = z0.detach().reshape(self.x.shape)
        self.x.copy_(flat)
        self.best.copy_(flat)
        self.best_res.fill_(math.inf)
        self.converged.zero_()
        self.nonfinite.zero_()
        self.first_nonfinite.zero_()
        self.iters.zero_()
        self.k.zero_()
        self.trace.zero_()
        if self.anderson:
            self.X.zero_()
            self.F.zero_()
            self.count.zero_()

    @property
    def stopped(self) -> torch.Tensor:
        """(B,) bool: samples whose iterate is held (converged, or f gave NaN/Inf)."""
        return self.converged | self.nonfinite

    def all_stopped(self) -> bool:
        """Whether every sample has converged or stopped (one host synchronisation)."""
        return bool(self.stopped.all())

    def step(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One evaluation of f and one update; past ``max_iter`` evaluations no sample is active (the iterate is held)."""
        x = self.x
        fx = _evaluate(f, x, self.shape)
        res = _residual(fx, x, self.stop_mode)
        evaluation = self.k + 1
        within = self.k < self.max_iter
        active = ~self.stopped & within
        broken = active & ~torch.isfinite(fx).all(dim=1)
        first = (self.first_nonfinite == 0) & broken.any()
        self.first_nonfinite.copy_(torch.where(first, evaluation, self.first_nonfinite))
        self.nonfinite.copy_(self.nonfinite | broken)
        active = active & ~broken
        # A diverging sample (residual inf, see _residual) keeps its last finite best.
        better = active & (res < self.best_res)
        self.best.copy_(torch.where(better[:, None], x, self.best))
        self.best_res.copy_(torch.where(better, res, self.best_res))
        self.iters.copy_(torch.where(active | broken, evaluation, self.iters))
        row = torch.where(active, res, self.best_res).unsqueeze(0)
        self.trace.index_copy_(0, self.k.clamp(max=self.max_iter - 1).view(1), row)
        self.converged.copy_(self.converged | (active & (res <= self.tol)))
        new = self._anderson(x, fx) if self.anderson else fx
        self.x.copy_(torch.where(self.stopped[:, None], self.best, new))
        self.k.add_(1)

    def _anderson(self, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        stopped = self.stopped
        slot = (self.k % self.m).view(1)
        # A stopped sample's history is never mixed again; zeros keep NaN out of its (ignored) system.
        self.X.index_copy_(1, slot, torch.where(stopped[:, None], 0, x)[:, None])
        self.F.index_copy_(1, slot, torch.where(stopped[:, None], 0, fx)[:, None])
        self.count.copy_(torch.clamp(self.count + 1, max=self.m))
        G = self.F - self.X
        gram = torch.bmm(G.conj(), G.transpose(1, 2))
        if self.coef_dtype != gram.dtype:
            gram = gram.real
        scale = torch.diagonal(gram, dim1=1, dim2=2).real.sum(dim=1) / self.count
        # Frozen samples (and exact fixed points, scale 0) get a harmless well-posed system.
        solvable = ~stopped & (scale > 0)
        mu = torch.where(solvable, self.lam * scale, 1.0).to(self.coef_dtype)
        gram = torch.where(solvable[:, None, None], gram, self.eye) + mu[:, None, None] * self.eye
        filled = self.slots < self.count
        # Slots not filled yet: identity rows and columns and no share of the constraint, so their coefficient is 0.
        gram = torch.where(filled[:, None] & filled[None, :], gram, self.eye)
        ones = filled.to(self.coef_dtype).expand(gram.shape[0], -1)
        if self.sync_free:
            a = _spd_solve(gram, ones)
            a = a / a.sum(dim=1, keepdim=True)
        else:
            self.bordered[:, 0, 1:] = ones
            self.bordered[:, 1:, 0] = ones
            self.bordered[:, 1:, 1:] = gram
            a = torch.linalg.solve(self.bordered, self.rhs)[:, 1:, 0]
        a = a.to(x.dtype)
        mixed = torch.bmm(a[:, None, :], self.F)[:, 0]
        if self.beta != 1.0:
            mixed = self.beta * mixed + (1 - self.beta) * torch.bmm(a[:, None, :], self.X)[:, 0]
        return mixed

    def finish(self, solver: str, stacklevel: int = 3) -> tuple[torch.Tensor, dict]:
        """``(z, info)`` (module docstring; ``evaluations_run``: evaluations of f made, needed or not), warning of
        the samples that did not converge or stopped on NaN/Inf."""
        iterations = int(self.iters.max())
        info = {
            "iterations": iterations,
            "iterations_per_sample": self.iters.clone(),
            "residual": self.best_res.clone(),
            "trace": list(self.trace[:iterations].clone().unbind(0)),
            "converged": self.converged.clone(),
            "nonfinite": self.nonfinite.clone(),
            "evaluations_run": int(self.k),
        }
        if bool(self.nonfinite.any()):
            broken = torch.nonzero(self.nonfinite).flatten().tolist()
            warnings.warn(
                f"{solver}: f(z) returned NaN/Inf for sample(s) {broken} of {self.shape[0]} (first at evaluation "
                f"{int(self.first_nonfinite)}); they stopped at their last finite iterate, the others went on; "
                "see info['nonfinite']",
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
        unfinished = ~self.converged & ~self.nonfinite
        failed = int(unfinished.sum())
        if failed:
            worst = float(self.best_res[unfinished].max())
            warnings.warn(
                f"{solver}: {failed} of {self.shape[0]} samples did not converge to tol={self.tol:g} in "
                f"max_iter={self.max_iter} iterations (largest final residual {worst:.3e}); see info['converged']",
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
        return self.best.view(self.shape).clone(), info


def solver_state(z0: torch.Tensor, solver: str = "anderson", **options: Any) -> FixedPointState:
    """A checked ``FixedPointState`` for ``solver`` ("anderson" | "fixed_point_iter") from ``z0`` with the options
    of ``anderson_solve`` / ``fixed_point_solve`` (``tol``, ``max_iter``, ``stop_mode``; Anderson: ``m``, ``lam``,
    ``beta``, ``coefficients``; ``sync_free``, see ``FixedPointState``): what a driver other than those two (a
    CUDA-graph runner) steps through."""
    check_choice("solver", solver, SOLVERS)
    sync_free = bool(options.pop("sync_free", False))
    tol, max_iter, stop_mode = options.pop("tol", 1e-4), options.pop("max_iter", 100), options.pop("stop_mode", "rel")
    z0 = _check_args(z0, tol, max_iter, stop_mode)
    anderson = solver == "anderson"
    if anderson:
        check_int("m", options.get("m", 5), 1, MAX_ANDERSON_M)
        check_number("lam", options.get("lam", 1e-4), 0.0)
        check_number("beta", options.get("beta", 1.0), 0.0, open_min=True)
        check_choice("coefficients", options.get("coefficients", "real"), _COEFFICIENTS)
    elif options:
        raise TypeError(f"fixed_point_iter: unknown options {sorted(options)} (Anderson's only)")
    return FixedPointState(
        z0, anderson=anderson, tol=tol, max_iter=max_iter, stop_mode=stop_mode, sync_free=sync_free, **options
    )


def _run(f: Callable[[torch.Tensor], torch.Tensor], state: FixedPointState, solver: str) -> tuple[torch.Tensor, dict]:
    with torch.no_grad():
        for _ in range(state.max_iter):
            state.step(f)
            if state.all_stopped():
                break
        return state.finish(solver, stacklevel=4)


def fixed_point_solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    tol: float = 1e-4,
    max_iter: int = 100,
    stop_mode: str = "rel",
) -> tuple[torch.Tensor, dict]:
    """Plain fixed-point iteration z_{k+1} = f(z_k), batched, per-sample convergence (module docstring).

    Args:
        f: maps a tensor shaped like ``z0`` to one of the same shape and dtype (B independent samples).
        z0: initial iterate (B, ...), real or complex.
        tol: tolerance on the residual (relative for ``stop_mode="rel"``).
        max_iter: cap on evaluations of f.
        stop_mode: "rel" (||f(z) - z|| / ||f(z)||) or "abs" (||f(z) - z||).

    Returns:
        ``(z, info)``: z (B, ...) the frozen iterate of converged samples, the lowest-residual one of the others.
    """
    state = solver_state(z0, "fixed_point_iter", tol=tol, max_iter=max_iter, stop_mode=stop_mode)
    return _run(f, state, "fixed_point_solve")


def anderson_solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
    tol: float = 1e-4,
    max_iter: int = 100,
    stop_mode: str = "rel",
    coefficients: str = "real",
) -> tuple[torch.Tensor, dict]:
    """Anderson acceleration of z = f(z), batched, per-sample convergence, complex-aware.

    With the last n = min(k + 1, m) iterates X_i (rows of X, (n, N) per sample), F_i = f(X_i)
    and residuals G = F - X, the coefficients minimise the combined residual under an affine
    constraint (Walker & Ni 2011; the DEQ tutorial of Kolter, Duvenaud & Johnson; torchdeq):

        a = argmin_{sum_i a_i = 1} || sum_i a_i G_i ||^2
          = solution of the bordered system   [ 0   1^T         ] [ nu ]   [ 1 ]
                                               [ 1   M + mu I    ] [ a  ] = [ 0 ],
        M_ij = <G_i, G_j> = sum conj(G_i) G_j  (the Gram matrix; conjugates for complex z),
        mu   = lam * trace(M) / n,

    solved per sample, then

        z_{k+1} = beta * sum_i a_i F_i + (1 - beta) * sum_i a_i X_i.

    For complex z, ``coefficients`` chooses the field of a:

    - ``"real"`` (default): a real, M replaced by Re M, i.e. Anderson on the real view R^{2N} of
      C^N. Right for maps that are only R-linear near the fixed point, as every CNN prior applied
      to (real, imaginary) channels is: the secant model behind Anderson needs
      f(sum a_i X_i) ~ sum a_i f(X_i), which complex a break for such maps. On DEQs for 32x32,
      4-coil, 4x MRI with small CNN priors (18 priors, tol 1e-4, cap 200), the 13 solves that
      converged with real coefficients took 25-93 iterations; with complex ones 30-200 (4 capped);
    - ``"complex"``: a complex, M Hermitian, solved in complex arithmetic. Slightly faster for
      C-linear maps (a complex contraction: 125-147 vs 132-186 iterations), for which it is exact.

    The Tikhonov term is relative to the Gram matrix's mean diagonal, so the solver behaves the
    same at every image scale; torchdeq adds ``lam * I`` absolutely, which near convergence
    (||G_i||^2 ~ (tol ||z||)^2, e.g. 1e-5 for a 32x32 image of unit pixels at tol 1e-4) swamps M
    and turns the extrapolation into an average of old iterates: on the MRI DEQs above none of the
    18 solves converged in 200 iterations that way.

    Args:
        f: maps a tensor shaped like ``z0`` to one of the same shape and dtype (B independent samples).
        z0: initial iterate (B, ...), real or complex.
        m: history size (m >= 1; m = 1 is a damped fixed-point iteration).
        lam: relative regularisation of the Gram matrix (>= 0; 0 only for well-conditioned problems).
        beta: mixing (damping) parameter, > 0; 1 uses f's values only.
        tol, max_iter, stop_mode: as ``fixed_point_solve``.
        coefficients: "real" or "complex", the field of the mixing coefficients for complex z (above).

    Returns:
        ``(z, info)``: z (B, ...) the frozen iterate of converged samples, the lowest-residual one of the others.
    """
    state = solver_state(
        z0,
        "anderson",
        tol=tol,
        max_iter=max_iter,
        stop_mode=stop_mode,
        m=m,
        lam=lam,
        beta=beta,
        coefficients=coefficients,
    )
    return _run(f, state, "anderson_solve")
