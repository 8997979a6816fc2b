"""The operator interface every physics class shares (deepinv's names and call signatures).

A linear operator A maps images x to measurements y. Every subclass provides ``A`` and
``A_adjoint``; the rest follows:

- ``dc_step(x, y, gamma)``   = x - gamma * A^H (A x - y)              (one gradient step on ½||Ax - y||²)
- ``prox_l2(z, y, gamma)``   = argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||²
                             = (I + gamma A^H A)^{-1} (z + gamma A^H y)  (CG here; closed forms in subclasses)
- ``update(**params)``       swaps operator parameters (mask, coil maps, ...) in place.
"""

from __future__ import annotations

import torch

from mbdl_fast._validate import MAX_ITERATIONS, check_int, check_number, check_step, value_checks_wanted
from mbdl_fast.linalg import solve_hpd


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

    def dc_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        gamma: float | torch.Tensor,
        backend: str = "auto",
        AHy: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x - gamma * A^H(A x - y) through the fastest backend available (see ``mbdl_fast.dc_step``); with ``AHy``
        (A^H y precomputed, shaped like x) ``y`` may be None."""
        from mbdl_fast.dc import dc_step

        return dc_step(self, x, y, gamma, backend=backend, AHy=AHy)

    def prox_l2(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||², by CG on (I + gamma A^H A) x = z + gamma A^H y.

        Differentiable implicitly (``mbdl_fast.linalg.solve_hpd``): the backward is one more CG solve.
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
