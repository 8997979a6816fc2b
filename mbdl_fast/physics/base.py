"""The operator interface every physics class shares (deepinv's names and call signatures).

A linear operator A maps images x to measurements y. Every subclass provides ``A`` and
``A_adjoint``; the rest follows:

- ``dc_step(x, y, gamma)``   = x - gamma * A^H (A x - y)              (one gradient step on ½||Ax - y||²)
- ``prox_l2(z, y, gamma)``   = argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||²
                             = (I + gamma A^H A)^{-1} (z + gamma A^H y)  (CG here; closed forms in subclasses)
- ``update(**params)``       swaps operator parameters (mask, coil maps, ...) in place.

Two levels per data-consistency operation: ``dc_step_reference`` / ``prox_l2_reference`` are the plain-PyTorch
definitions (a subclass with a closed form overrides them); ``dc_step`` / ``prox_l2`` check the arguments once,
pick the backend and run (a subclass with a fused op, ``mbdl_fast.ops``, overrides them and calls it with plain
tensors). ``mbdl_fast.dc_step`` and ``mbdl_fast.prox_l2`` call these methods.
"""

from __future__ import annotations

import torch

from mbdl_fast._validate import (
    MAX_ITERATIONS,
    check_finite,
    check_int,
    check_number,
    check_operator,
    check_same_device,
    check_step,
    check_tensor,
    describe,
    run_unchecked,
    value_checks_wanted,
)
from mbdl_fast.backends import resolve_backend, resolve_op
from mbdl_fast.linalg import solve_hpd


def generic_dc_step(
    physics: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    gamma: float | torch.Tensor,
    backend: str = "auto",
    AHy: torch.Tensor | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """x - gamma A^H(A x - y) by ``backend`` ("torch" only; see ``mbdl_fast.dc_step`` for the arguments):
    ``physics.dc_step_reference``, or with ``AHy`` (A^H y precomputed, shaped like x; then ``y`` may be None)
    x - gamma (A^H A x - AHy). ``LinearPhysics.dc_step``, and the step of any operator with deepinv's names only."""
    dc_step_arguments(x, y, gamma, AHy, backend, None, check_inputs)
    return run_unchecked(dc_step_torch, physics, x, y, gamma, AHy)


def dc_step_torch(
    physics: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    gamma: float | torch.Tensor,
    ahy: torch.Tensor | None,
) -> torch.Tensor:
    """The plain-PyTorch step, arguments checked: ``physics.dc_step_reference``, or x - gamma (A^H A x - AHy)."""
    if ahy is None:
        check_operator("physics", physics, ("dc_step_reference",))
        return physics.dc_step_reference(x, y, gamma)
    normal = physics.A_adjoint_A(x)  # checks x against the operator
    if ahy.dtype != x.dtype or ahy.shape != x.shape:
        dtype = str(x.dtype).replace("torch.", "")
        raise ValueError(f"AHy: expected {dtype} {tuple(x.shape)} like x (A^H y), got {describe(ahy)}")
    check_same_device([("x", x), ("AHy", ahy)])
    return x - _gamma_view(gamma, x) * (normal - ahy)


class LinearPhysics(torch.nn.Module):
    """Base class of the linear measurement operators. Subclasses implement ``A`` and ``A_adjoint``.

    Attributes ``cg_tol`` (>= 0; 0 runs exactly ``cg_max_iter`` iterations) and ``cg_max_iter`` (>= 1) govern the generic CG prox; the info of its
    last call is kept in ``last_prox_info``, and a call that leaves samples above ``cg_tol`` warns
    (``mbdl_fast.solvers.ConvergenceWarning``).
    """

    def __init__(self, cg_tol: float = 1e-6, cg_max_iter: int = 100) -> None:
        super().__init__()
        self.cg_tol = check_number("cg_tol", cg_tol, 0.0)
        self.cg_max_iter = check_int("cg_max_iter", cg_max_iter, 1, MAX_ITERATIONS)
        self.last_prox_info: dict = {}

    # -- the operator ---------------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        raise NotImplementedError(f"{type(self).__name__} must implement A")

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        raise NotImplementedError(f"{type(self).__name__} must implement A_adjoint")

    def A_adjoint_A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """Normal operator A^H A x."""
        return self.A_adjoint(self.A(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Noise-free measurements, as ``deepinv.physics.Physics.__call__``."""
        return self.A(x)

    # -- data consistency -----------------------------------------------------------------------
    def dc_step_reference(self, x: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """x - gamma * A^H(A x - y), in plain PyTorch: the definition every fast path is checked against."""
        return x - _gamma_view(gamma, x) * self.A_adjoint(self.A(x) - y)

    # x - gamma A^H(A x - y) by "torch": dc_step_reference, or with AHy x - gamma (A^H A x - AHy) (generic_dc_step);
    # an operator with a fused op overrides it.
    dc_step = generic_dc_step

    def prox_l2(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        gamma: float | torch.Tensor,
        backend: str = "auto",
        check_inputs: bool = True,
    ) -> torch.Tensor:
        """argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||² by ``backend`` (here "torch" only: :meth:`prox_l2_reference`;
        see ``mbdl_fast.prox_l2`` for the arguments)."""
        prox_l2_arguments(z, y, gamma, backend, None, check_inputs)
        return run_unchecked(self.prox_l2_reference, z, y, gamma)

    def prox_l2_reference(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||², by CG on (I + gamma A^H A) x = z + gamma A^H y.

        Differentiable implicitly (``mbdl_fast.linalg.solve_hpd``): the backward is one more CG solve. Subclasses
        with a closed form override this.
        """
        g = _gamma_view(gamma, z)
        rhs = z + g * self.A_adjoint(y)
        x, info = solve_hpd(
            lambda v: v + g * self.A_adjoint_A(v),
            rhs,
            x0=z,
            tol=self.cg_tol,
            max_iter=self.cg_max_iter,
            warn_as=f"{type(self).__name__}.prox_l2",
        )
        self.last_prox_info = info
        return x

    def update(self, **params: object) -> None:
        """Replace operator parameters by name (e.g. ``mask=...``, ``coil_maps=...``); unknown names are errors."""
        for name, value in params.items():
            setter = getattr(self, f"_set_{name}", None)
            if setter is None:
                known = sorted(a[len("_set_") :] for a in dir(self) if a.startswith("_set_"))
                raise TypeError(f"update: unknown parameter {name!r} for {type(self).__name__}; known: {known}")
            setter(value)


def _gamma_view(gamma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
    """A step size >= 0 (checked: ``check_step``), a scalar or one per sample (B,) viewed to broadcast over x."""
    check_step("gamma", gamma, x.shape[0], value_checks_wanted())
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(x.real.dtype)  # a float64 step must not promote a float32 / complex64 problem
    if isinstance(gamma, torch.Tensor) and gamma.dim() == 1:
        return gamma.view((-1,) + (1,) * (x.dim() - 1))
    return gamma


def _resolve(backend: str, device: torch.device, op: str | None) -> str:
    """``backend`` for ``op`` (a fused op's name in the backend table), or "torch" only when ``op`` is None."""
    return resolve_backend(backend, device, ("torch",)) if op is None else resolve_op(op, backend, device)


def dc_step_arguments(
    x: object,
    y: object,
    gamma: float | torch.Tensor,
    ahy: object,
    backend: str,
    op: str | None,
    check_inputs: bool,
) -> str:
    """The checks every ``dc_step`` runs once per call, and the backend it resolves to (``op``: the fused op the
    operator has, None for "torch" only). NaN scans synchronise the GPU: only with ``check_inputs`` and never inside
    a compiled graph, a CUDA-graph capture or a solver's iterations (``value_checks_wanted``)."""
    x = check_tensor("x", x)
    for arg, t in (("y", y), ("AHy", ahy)):
        if t is not None:
            check_tensor(arg, t)
    name = _resolve(backend, x.device, op)
    if y is None and ahy is None:
        raise ValueError("y: expected measurements (or AHy = A^H y precomputed), got None for both")
    checks = check_inputs and value_checks_wanted()
    check_step("gamma", gamma, x.shape[0] if x.dim() else 1, checks)
    if checks:
        for arg, t in (("x", x), ("y", y), ("AHy", ahy)):
            if t is not None:
                check_finite(arg, t)
    return name


def prox_l2_arguments(
    z: object, y: object, gamma: float | torch.Tensor, backend: str, op: str | None, check_inputs: bool
) -> str:
    """The checks every ``prox_l2`` runs once per call, and the backend it resolves to (as :func:`dc_step_arguments`)."""
    z = check_tensor("z", z)
    if y is None:
        raise ValueError("y: expected measurements, got None")
    y = check_tensor("y", y)
    name = _resolve(backend, z.device, op)
    checks = check_inputs and value_checks_wanted()
    check_step("gamma", gamma, z.shape[0] if z.dim() else 1, checks)
    if checks:
        for arg, t in (("z", z), ("y", y)):
            check_finite(arg, t)
    return name
