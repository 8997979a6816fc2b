"""Deep equilibrium model (DEQ) with SPADE's operator, generic over every physics with a DC step.

The reconstruction is the fixed point z* = T(z*) of

    v    = z - gamma A^H (A z - y)                 (the DC gradient step, ``mbdl_fast.dc_step``)
    T(z) = alpha D(v) + (1 - alpha) v,             0 < alpha < 1, gamma > 0,

with D the CNN prior (through ``denoise``: complex images reach it as 2 real channels). The forward
solve runs without autograd (Anderson acceleration or plain iteration, per-sample convergence); the
output is one more differentiable application, x = T(z*), whose backward is either

- ``"jfb"``: Jacobian-free (Fung et al. 2022): gradients of T at the detached z* only, i.e. the
  Jacobian (I - dT/dz)^{-1} replaced by I. One backward pass of T;
- ``"implicit"``: the implicit-function theorem (Bai et al. 2019): the incoming gradient g_out is
  replaced by the solution of the adjoint fixed point

      g = (dT/dz)^H g + g_out      (at z*, by vector-Jacobian products through T),

  solved by the same kind of solver with its own tolerance and cap, then backpropagated through
  T into the prior, alpha, gamma (and y).

Parametrisation: alpha = sigmoid(alpha_logit) and gamma = exp(log_gamma), so that any gradient step
keeps 0 < alpha < 1 and gamma > 0. A non-learned alpha or gamma is a buffer (saved, not trained).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mbdl_fast._registry import build, config_of, register
from mbdl_fast._validate import (
    MAX_ITERATIONS,
    check_finite,
    check_int,
    check_nonempty,
    check_operator,
    check_tensor,
    describe,
    run_unchecked,
    value_checks_wanted,
)
from mbdl_fast.backends import BACKENDS
from mbdl_fast.dc import dc_step
from mbdl_fast.priors.base import denoise
from mbdl_fast.solvers.execution import ExecutionCache, check_execution, solve_in_static_buffers
from mbdl_fast.solvers.fixed_point import MAX_ANDERSON_M, SOLVERS, anderson_solve, fixed_point_solve

__all__ = ["DEQ", "jacobian_frobenius_estimate"]

_BACKWARDS = ("jfb", "implicit")
_STOP_MODES = ("rel", "abs")

#: Solver options and their defaults; the f_/b_ names are torchdeq's.
DEFAULT_SOLVER_OPTIONS: dict[str, Any] = {
    "f_solver": "anderson",
    "f_max_iter": 100,
    "f_tol": 1e-4,
    "f_stop_mode": "rel",
    "b_solver": "anderson",
    "b_max_iter": 100,
    "b_tol": 1e-4,
    "b_stop_mode": "rel",
    "backward": "jfb",
    "anderson_m": 5,
    "anderson_lam": 1e-4,
    "anderson_beta": 1.0,
    "anderson_coefficients": "real",
    "dc_backend": "auto",
    "execution": "eager",
    "graph_chunk": None,
}


def _check_option(key: str, value: Any) -> Any:
    def number(positive: bool) -> float:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or (value <= 0 if positive else value < 0):
            raise ValueError(f"{key}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        return float(value)

    def choice(options: tuple[str, ...]) -> str:
        if value not in options:
            raise ValueError(f"{key}: expected one of {options}, got {value!r}")
        return value

    if key in ("f_solver", "b_solver"):
        return choice(SOLVERS)
    if key in ("f_stop_mode", "b_stop_mode"):
        return choice(_STOP_MODES)
    if key == "backward":
        return choice(_BACKWARDS)
    if key == "dc_backend":
        return choice(("auto",) + BACKENDS)
    if key == "execution":
        return check_execution(value)
    if key == "graph_chunk":
        return None if value is None else check_int(key, value, 1, MAX_ITERATIONS)
    if key == "anderson_coefficients":
        return choice(("real", "complex"))
    if key in ("f_max_iter", "b_max_iter"):
        return check_int(key, value, 1, MAX_ITERATIONS)
    if key == "anderson_m":
        return check_int(key, value, 1, MAX_ANDERSON_M)
    if key in ("f_tol", "b_tol", "anderson_beta"):
        return number(positive=True)
    if key == "anderson_lam":
        return number(positive=False)
    raise TypeError(f"{key}: unknown option {key!r} of DEQ; known options: {sorted(DEFAULT_SOLVER_OPTIONS)}")


def jacobian_frobenius_estimate(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Hutchinson estimate of ||dfz/dz||_F^2 / n (n = z.numel()), differentiable (create_graph).

    With one Gaussian probe v (complex Gaussian for complex z), E ||v^H J||^2 = ||J||_F^2, so
    ||vjp(v)||^2 / n is an unbiased estimate of the mean squared Jacobian entry per output (Bai et al.
    2021, "Stabilizing Equilibrium Models by Jacobian Regularization"). fz: f(z) with z a leaf that
    requires grad; both of any shape. Returns a 0-dim real tensor.
    """
    probe = torch.randn_like(fz)
    (vjp,) = torch.autograd.grad(fz, z, probe, create_graph=True)
    return vjp.abs().pow(2).sum() / z.numel()


@register("DEQ")
class DEQ(nn.Module):
    """Deep equilibrium reconstruction z* = T(z*) with SPADE's operator (see the module docstring).

    Args:
        prior: denoiser ``nn.Module`` on real ``(B, C, H, W)`` (2 channels for complex images); for
            ``to_config`` it must be a registered mbdl_fast model.
        alpha: initial prior weight, 0 < alpha < 1.
        gamma: initial DC step size, > 0; gamma <= 2 / ||A||^2 keeps the DC step non-expansive
            (||A|| <= 1 for MRI with a binary mask and coil maps normalised to sum_c |S_c|^2 = 1).
        learn_alpha, learn_gamma: train alpha / gamma (else they are fixed buffers).
        **solver_options: ``f_solver`` ("anderson" | "fixed_point_iter"), ``f_max_iter`` (100),
            ``f_tol`` (1e-4), ``f_stop_mode`` ("rel" | "abs"); the same with ``b_`` for the implicit
            backward (defaults equal to the forward's); ``backward`` ("jfb" | "implicit");
            ``anderson_m`` (5), ``anderson_lam`` (1e-4), ``anderson_beta`` (1.0),
            ``anderson_coefficients`` ("real" | "complex", see ``anderson_solve``); ``dc_backend``
            ("auto" | "torch" | "triton" | "cuda"); ``execution`` ("eager" | "static_buffers" | "cuda_graph", see
            ``mbdl_fast.solvers.execution``) and ``graph_chunk`` (iterations per captured graph, default
            ``anderson_m``). Unknown keys raise ``TypeError``; bad values ``ValueError``.

    Attributes:
        last_info: the forward solver's info of the last call (``anderson_solve``'s keys).
        last_backward_info: the adjoint solver's info of the last implicit backward.
        execution_cache: the static-buffer set-ups of the non-eager execution modes, and how the last solve ran.
    """

    def __init__(
        self,
        prior: nn.Module,
        alpha: float = 0.5,
        gamma: float = 1.0,
        learn_alpha: bool = True,
        learn_gamma: bool = True,
        **solver_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(prior, nn.Module):
            raise TypeError(f"prior: expected an nn.Module, got {type(prior).__name__}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise ValueError(f"alpha: expected a number in (0, 1), got {alpha!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma: expected a finite number > 0, got {gamma!r}")
        self.prior = prior
        self.learn_alpha = bool(learn_alpha)
        self.learn_gamma = bool(learn_gamma)
        logit = torch.tensor(math.log(alpha) - math.log1p(-alpha), dtype=torch.float32)
        log_gamma = torch.tensor(math.log(gamma), dtype=torch.float32)
        self._register("alpha_logit", logit, self.learn_alpha)
        self._register("log_gamma", log_gamma, self.learn_gamma)
        self.solver_options: dict[str, Any] = dict(DEFAULT_SOLVER_OPTIONS)
        self.configure(**solver_options)
        self.last_info: dict = {}
        self.last_backward_info: dict = {}
        self._last_solve: tuple | None = None  # (z*, physics, A^H y) of the last forward with autograd on
        self.execution_cache = ExecutionCache()

    def _register(self, name: str, value: torch.Tensor, learn: bool) -> None:
        if learn:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def configure(self, **solver_options: Any) -> DEQ:
        """Change solver options (validated as in the constructor), e.g. ``model.configure(f_tol=4e-3)``."""
        checked = {key: _check_option(key, value) for key, value in solver_options.items()}
        self.solver_options.update(checked)
        return self

    # -- the operator -----------------------------------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        """Prior weight sigmoid(alpha_logit), a differentiable 0-dim tensor in (0, 1)."""
        return torch.sigmoid(self.alpha_logit)

    @property
    def gamma(self) -> torch.Tensor:
        """DC step size exp(log_gamma), a differentiable 0-dim tensor > 0."""
        return torch.exp(self.log_gamma)

    def _operator(
        self,
        z: torch.Tensor,
        physics: nn.Module,
        AHy: torch.Tensor,
        alpha: torch.Tensor,
        gamma: torch.Tensor,
    ) -> torch.Tensor:
        v = dc_step(physics, z, None, gamma, backend=self.solver_options["dc_backend"], AHy=AHy, check_inputs=False)
        return alpha * denoise(self.prior, v) + (1 - alpha) * v

    def step(
        self, z: torch.Tensor, y: torch.Tensor, physics: nn.Module, AHy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One differentiable application T(z) = alpha D(z - gamma A^H(A z - y)) + (1 - alpha)(...).

        z: image shaped like ``physics.A_adjoint(y)`` (complex (B, H, W) for MRI, real (B, C, H, W) for SR);
        ``AHy`` = A^H y may be passed to save one adjoint.
        """
        if AHy is None:
            AHy = physics.A_adjoint(y)
        return self._operator(z, physics, AHy, self.alpha, self.gamma)

    # -- solves -----------------------------------------------------------------------------------
    def _state_options(self, which: str) -> dict[str, Any]:
        """The forward ("f") or backward ("b") solver's name and options, as ``solver_state`` takes them."""
        opts = self.solver_options
        state = {
            "solver": opts[f"{which}_solver"],
            "tol": opts[f"{which}_tol"],
            "max_iter": opts[f"{which}_max_iter"],
            "stop_mode": opts[f"{which}_stop_mode"],
        }
        if state["solver"] == "anderson":
            state.update(m=opts["anderson_m"], lam=opts["anderson_lam"], beta=opts["anderson_beta"],
                         coefficients=opts["anderson_coefficients"])  # fmt: skip
        return state

    def _solve(self, f, z0: torch.Tensor, which: str) -> tuple[torch.Tensor, dict]:
        options = self._state_options(which)
        solve = anderson_solve if options.pop("solver") == "anderson" else fixed_point_solve
        return solve(f, z0, **options)

    def _static_operator(self, z: torch.Tensor, physics: nn.Module, AHy: torch.Tensor) -> torch.Tensor:
        return self._operator(z, physics, AHy, self.alpha, self.gamma)

    def fixed_point(
        self, y: torch.Tensor, physics: nn.Module, x0: torch.Tensor | None = None, AHy: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """The fixed point z* = T(z*) (no autograd) and the solver's info; ``x0`` defaults to A^H y. Solved as the
        ``execution`` option says (``mbdl_fast.solvers.execution``)."""
        with torch.no_grad():
            if AHy is None:
                AHy = physics.A_adjoint(y)
            z0 = AHy if x0 is None else x0
            mode = self.solver_options["execution"]
            if mode != "eager":
                opts = self.solver_options
                chunk = opts["graph_chunk"] or opts["anderson_m"]
                key = tuple(sorted(opts.items()))
                solved = solve_in_static_buffers(
                    self.execution_cache, mode, self._static_operator, physics, AHy, z0, self._state_options("f"),
                    chunk, key,
                )  # fmt: skip
                if solved is not None:
                    return solved
            else:
                self.execution_cache.last_mode = "eager"
            alpha, gamma = self.alpha, self.gamma
            return self._solve(lambda z: self._operator(z, physics, AHy, alpha, gamma), z0.detach(), "f")

    def forward(
        self,
        y: torch.Tensor,
        physics: nn.Module,
        x0: torch.Tensor | None = None,
        return_info: bool = False,
        jac_loss: bool = False,
        z0: torch.Tensor | None = None,
        slow_gain: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """Reconstruct from measurements ``y`` of ``physics``: x = T(z*), differentiable as ``backward`` says.

        Args:
            y: measurements (e.g. complex64 k-space (B, C, H, W) for MRI).
            physics: any mbdl_fast operator (``MultiCoilMRI``, ``SuperResolution``, ``BlockCS``, ...).
            x0: initial iterate shaped like A^H y (default A^H y); ``z0`` is its torchdeq-style alias for a
                warm start (e.g. the previous slice's or a cheaper model's reconstruction). Give one, not both.
            return_info: also return the forward solver's info (also kept in ``last_info``).
            jac_loss: also put in ``info["jac_loss"]`` a differentiable Hutchinson estimate of
                ||dT/dz (z*)||_F^2 / n (Bai et al. 2021, torchdeq's ``jac_reg``): E_v ||v^H dT/dz||^2 / n with
                v ~ N(0, I), one probe; adding ``weight * jac_loss`` to a training loss keeps T contractive
                around its fixed points, so the solver converges in fewer iterations.
            slow_gain: also put in ``info["slow_gain"]`` the (B,) gains of T along the solver's last residual
                direction (``_slow_gain``), for a hinge such as ``relu(slow_gain - 0.9)`` on the slowest mode.

        Returns:
            x shaped like A^H y, or ``(x, info)``.
        """
        if z0 is not None:
            if x0 is not None:
                raise ValueError("z0: x0 and z0 name the same initial iterate; give one of them")
            x0 = z0
        check_operator("physics", physics, ("A", "A_adjoint", "A_adjoint_A"))
        check_nonempty("y", check_tensor("y", y), "measurements")
        checks = value_checks_wanted()
        if checks:
            check_finite("y", y)
        AHy = run_unchecked(physics.A_adjoint, y)
        if x0 is not None:
            check_tensor("x0", x0)
            if x0.shape != AHy.shape or x0.dtype != AHy.dtype:
                raise ValueError(f"x0: expected {describe(AHy)} like A^H y, got {describe(x0)}")
            if checks:
                check_finite("x0", x0)
        # Inputs are checked once: the iterations skip the operator's and the prior's NaN scans.
        z_star, info = run_unchecked(self.fixed_point, y, physics, x0=x0, AHy=AHy.detach())
        self.last_info = info
        self._last_solve = (z_star, physics, AHy.detach()) if torch.is_grad_enabled() else None
        wanted = {"jac_loss": jac_loss, "slow_gain": slow_gain}
        if any(wanted.values()) and not torch.is_grad_enabled():
            name = next(k for k, v in wanted.items() if v)
            raise RuntimeError(f"{name}: the Jacobian estimate needs autograd; call with gradients enabled")
        if self.solver_options["backward"] == "implicit" and torch.is_grad_enabled():
            out = run_unchecked(self._implicit_output, z_star, physics, AHy, info, wanted)
        elif any(wanted.values()):
            z = z_star.detach().requires_grad_()
            out = run_unchecked(self._operator, z, physics, AHy, self.alpha, self.gamma)
            run_unchecked(self._regularisers, z, out, physics, AHy, info, wanted)
        else:
            out = run_unchecked(self._operator, z_star, physics, AHy, self.alpha, self.gamma)
        return (out, info) if return_info else out

    def _regularisers(
        self, z: torch.Tensor, fz: torch.Tensor, physics: nn.Module, AHy: torch.Tensor, info: dict, wanted: dict
    ) -> None:
        """Put the asked-for training regularisers at the fixed point z (a leaf) with fz = T(z) into ``info``."""
        if wanted["jac_loss"]:
            info["jac_loss"] = jacobian_frobenius_estimate(fz, z)
        if wanted["slow_gain"]:
            info["slow_gain"] = self._slow_gain(z.detach(), fz, physics, AHy)

    def _implicit_output(
        self, z_star: torch.Tensor, physics: nn.Module, AHy: torch.Tensor, info: dict, wanted: dict
    ) -> torch.Tensor:
        z = z_star.detach().requires_grad_()
        fz = self._operator(z, physics, AHy, self.alpha, self.gamma)
        self._regularisers(z, fz, physics, AHy, info, wanted)
        # The hook goes on an alias of fz, not on fz itself: a hook on fz whose closure holds fz
        # would be a reference cycle through C++ that the garbage collector cannot break.
        out = fz.view_as(fz)
        if not out.requires_grad:
            return out

        def adjoint(grad: torch.Tensor) -> torch.Tensor:
            def vjp_plus_grad(g: torch.Tensor) -> torch.Tensor:
                return torch.autograd.grad(fz, z, g, retain_graph=True)[0] + grad

            g, info = self._solve(vjp_plus_grad, grad, "b")
            self.last_backward_info = info
            return g

        out.register_hook(adjoint)
        return out

    def _slow_gain(self, z_star: torch.Tensor, fz: torch.Tensor, physics: nn.Module, AHy: torch.Tensor) -> torch.Tensor:
        """Per-sample gain ||T(z* + d) - T(z*)|| / ||d|| along d = the solver's last residual T(z*) - z*, scaled to
        1e-3 ||z*||: (B,), differentiable in the parameters.

        After many iterations the residual is dominated by the slowest mode of the iteration, so this is a
        finite-difference estimate of the Jacobian's gain where convergence is slowest (a gain near 1 is what
        leaves a solve at its cap), which a Frobenius-norm estimate averages away.
        """
        dims = tuple(range(1, z_star.dim()))
        r = (fz.detach() - z_star).to(z_star.dtype)
        r_norm = torch.linalg.vector_norm(r, dim=dims, keepdim=True).clamp_min(torch.finfo(r.real.dtype).tiny)
        z_norm = torch.linalg.vector_norm(z_star, dim=dims, keepdim=True)
        d = r / r_norm * (1e-3 * z_norm)
        shifted = self._operator(z_star + d, physics, AHy, self.alpha, self.gamma)
        diff = torch.linalg.vector_norm(shifted - fz, dim=dims)
        return diff / torch.linalg.vector_norm(d, dim=dims).clamp_min(torch.finfo(diff.dtype).tiny)

    def jacobian_penalty(self) -> torch.Tensor:
        """``jacobian_frobenius_estimate`` of T at the fixed point of the last forward call run with autograd:
        a differentiable ||dT/dz (z*)||_F^2 / n for a training loss whose forward calls are not this module's own
        (e.g. a fine-tuning strategy)."""
        if self._last_solve is None:
            raise RuntimeError("jacobian_penalty: no forward call with autograd enabled since the last inference")
        z_star, physics, AHy = self._last_solve
        z = z_star.detach().requires_grad_()
        return jacobian_frobenius_estimate(self._operator(z, physics, AHy, self.alpha, self.gamma), z)

    # -- configs ----------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: the prior's config, current alpha and gamma, solver options."""
        logit = float(self.alpha_logit.detach().double())
        return {
            "prior": config_of(self.prior),
            # From the stored parameters in float64, so that rebuilding gives the same float32 values.
            "alpha": 1.0 / (1.0 + math.exp(-logit)),
            "gamma": math.exp(float(self.log_gamma.detach().double())),
            "learn_alpha": self.learn_alpha,
            "learn_gamma": self.learn_gamma,
            **self.solver_options,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DEQ:
        """Rebuild from ``to_config()`` (the prior through ``mbdl_fast.registry.build``)."""
        config = dict(config)
        if "prior" not in config:
            raise ValueError("config: expected a 'prior' entry (the prior's {'class', 'args'} config)")
        prior = build(config.pop("prior"))
        return cls(prior, **config)
