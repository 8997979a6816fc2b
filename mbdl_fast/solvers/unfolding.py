"""Deep unfolding: K unrolled iterations of proximal gradient descent (PGD) or half-quadratic splitting (HQS).

With a learned prior D_k standing in for a proximal operator, measurements y = A x + noise and
x_0 = A^H y (or a given ``x0``), one forward pass runs, for k = 0 .. K-1,

    PGD:  x_{k+1} = D_k( x_k - gamma_k A^H (A x_k - y) )                  (``dc_step``, then the prior)
    HQS:  z_k     = D_k( x_k )                                             (the prior first,
          x_{k+1} = prox_l2(z_k, y, gamma_k)                                then the exact DC prox)
                  = argmin_x gamma_k/2 ||A x - y||² + 1/2 ||x - z_k||²,

and returns x_K: after PGD the last operation is the prior, after HQS the data-consistency prox.

Tied weights share one prior and one step size across the K iterations (one set of parameters);
untied weights hold K priors and K step sizes. A^H y is computed once per forward and handed to
every ``dc_step``; inputs are checked for NaN/Inf once per forward, not per iteration.

Images follow the physics: complex (B, H, W) for MRI (the prior sees (B, 2, H, W) real through
``mbdl_fast.priors.base.denoise``), real (B, 1, H, W) for block CS and super-resolution.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mbdl_fast._registry import build, config_of, register
from mbdl_fast._validate import (
    MAX_ITERATIONS,
    check_choice,
    check_finite,
    check_int,
    check_nonempty,
    check_number,
    check_operator,
    check_tensor,
    run_unchecked,
    value_checks_wanted,
)
from mbdl_fast.backends import BACKENDS
from mbdl_fast.dc import dc_step
from mbdl_fast.priors.base import denoise
from mbdl_fast.prox import prox_l2
from mbdl_fast.solvers.execution import ExecutionCache, check_execution, unrolled_in_graph

__all__ = ["DeepUnfolding"]

_ALGORITHMS = ("pgd", "hqs")


# ------------------------------------------------------------------------------------------------
# Helpers shared by the unrolled solvers (also used by varnet.py and recursion.py)
# ------------------------------------------------------------------------------------------------
def _check_count(name: str, value: object, minimum: int = 1) -> int:
    return check_int(name, value, minimum, MAX_ITERATIONS)


def _as_module_list(name: str, modules: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """A module, or a list/tuple/ModuleList of modules, as a plain list (never empty)."""
    items = list(modules) if isinstance(modules, (list, tuple, nn.ModuleList)) else [modules]
    if not items:
        raise ValueError(f"{name}: expected a module or a non-empty list of modules, got an empty list")
    for i, m in enumerate(items):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name}[{i}]: expected a torch.nn.Module, got {type(m).__name__}")
    return items


def _replicate(name: str, modules: nn.Module | Sequence[nn.Module], count: int) -> list[nn.Module]:
    """``count`` distinct modules: a list of exactly ``count``, or one module and ``count - 1`` deep copies."""
    items = _as_module_list(name, modules)
    if len(items) == 1:
        return items + [copy.deepcopy(items[0]) for _ in range(count - 1)]
    if len(items) != count:
        raise ValueError(f"{name}: expected one module or a list of {count}, got a list of {len(items)}")
    if len({id(m) for m in items}) != len(items):
        raise ValueError(f"{name}: the same module appears twice in the list; pass distinct modules or tie them")
    return items


def _adjoint_measurements(physics: nn.Module, y: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
    """A^H y, shaped like ``x0`` when one is given.

    Block CS cannot tell the image size from y, so ``x0`` supplies it where the adjoint takes
    ``img_size``; an ``x0`` with a channel axis (B, 1, H, W) gets A^H y in that layout.
    """
    if x0 is not None and "img_size" in inspect.signature(physics.A_adjoint).parameters:
        ahy = physics.A_adjoint(y, img_size=tuple(x0.shape[-2:]))
    else:
        ahy = physics.A_adjoint(y)
    if x0 is not None and ahy.shape != x0.shape:
        if ahy.numel() != x0.numel() or ahy.dtype != x0.dtype:
            raise ValueError(
                f"x0: expected the shape and dtype of A^H y, {ahy.dtype} {tuple(ahy.shape)}, "
                f"got {x0.dtype} {tuple(x0.shape)}"
            )
        ahy = ahy.reshape(x0.shape)
    return ahy


def _check_solver_inputs(y: torch.Tensor, x0: torch.Tensor | None, physics: object) -> None:
    """One NaN/Inf scan per forward (a device sync), so the iterations skip theirs (``run_unchecked``); none inside
    a traced graph (torch.compile, torch.export, a CUDA-graph capture), where it would be a data-dependent branch."""
    check_operator("physics", physics, ("A", "A_adjoint"))
    check_nonempty("y", check_tensor("y", y), "measurements")
    if x0 is not None:
        check_nonempty("x0", check_tensor("x0", x0), "image")
    if value_checks_wanted():
        check_finite("y", y)
        if x0 is not None:
            check_finite("x0", x0)


def _maybe_checkpoint(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, recomputed in backward instead of stored when ``enabled`` and autograd records.

    Non-reentrant checkpointing stores only each iteration's inputs (one iterate) and recomputes the
    prior's activations during backward, one iteration at a time: activation memory is that of a
    single iteration instead of K of them, at the cost of a second forward pass.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(run_unchecked, fn, *args, use_reentrant=False)
    return run_unchecked(fn, *args)


# ------------------------------------------------------------------------------------------------
# DeepUnfolding
# ------------------------------------------------------------------------------------------------
@register("DeepUnfolding")
class DeepUnfolding(nn.Module):
    """K unrolled PGD or HQS iterations with learned priors and step sizes (see the module docstring).

    Args:
        priors: a registered prior module, or a list of them. Tied: one module (or a list of one).
            Untied: K modules, or one module that is deep-copied so that each iteration owns one.
        num_iters: K, the number of unrolled iterations.
        algorithm: "pgd" (x <- D(x - gamma A^H(Ax - y))) or "hqs" (x <- prox_l2(D(x), y, gamma)).
        tied: share one prior and one step size across iterations.
        gamma_init: initial step size gamma (PGD) or prox weight gamma (HQS), a finite number > 0; stored
            as is, not reparametrised.
        learn_gamma: make gamma a parameter; else a buffer (saved, not trained).
        checkpointing: recompute each iteration in backward (``torch.utils.checkpoint``,
            non-reentrant) so training memory does not grow with K. A prior with batch norm in
            training mode updates its running statistics twice per iteration under it.
        dc_backend: backend of ``dc_step`` ("auto", "torch", "triton", "cuda"); PGD only.
        execution: "eager", "static_buffers" or "cuda_graph": how an inference forward runs
            (``mbdl_fast.solvers.execution``); also settable as ``model.execution``.

    Attributes:
        priors: ``nn.ModuleList`` of 1 (tied) or K (untied) priors.
        gamma: (1,) or (K,) step sizes, a parameter or a buffer.
        execution_cache: the static-buffer set-up of the non-eager execution modes, and how the last call ran.
    """

    def __init__(
        self,
        priors: nn.Module | Sequence[nn.Module],
        num_iters: int = 5,
        algorithm: str = "pgd",
        tied: bool = True,
        gamma_init: float = 1.0,
        learn_gamma: bool = True,
        checkpointing: bool = False,
        dc_backend: str = "auto",
        execution: str = "eager",
    ) -> None:
        super().__init__()
        self.num_iters = _check_count("num_iters", num_iters)
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm: expected one of {_ALGORITHMS}, got {algorithm!r}")
        self.algorithm = algorithm
        self.tied = bool(tied)
        if self.tied:
            items = _as_module_list("priors", priors)
            if len(items) != 1:
                raise ValueError(f"priors: tied weights take one prior, got a list of {len(items)}")
        else:
            items = _replicate("priors", priors, self.num_iters)
        self.priors = nn.ModuleList(items)
        self.gamma_init = check_number("gamma_init", gamma_init, 0.0, open_min=True, meaning="a step size")
        self.learn_gamma = bool(learn_gamma)
        gamma = torch.full((1 if self.tied else self.num_iters,), self.gamma_init, dtype=torch.float32)
        if self.learn_gamma:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)
        self.checkpointing = bool(checkpointing)
        self.dc_backend = check_choice("dc_backend", dc_backend, ("auto", *BACKENDS))
        self.execution = check_execution(execution)
        self.execution_cache = ExecutionCache()

    def prior(self, k: int) -> nn.Module:
        """D_k: the prior of iteration k (the shared one when tied)."""
        return self.priors[0 if self.tied else k]

    def step_size(self, k: int) -> torch.Tensor:
        """gamma_k, a 0-dim tensor (the shared one when tied)."""
        return self.gamma[0 if self.tied else k]

    def _iteration(
        self, k: int, x: torch.Tensor, y: torch.Tensor, ahy: torch.Tensor, physics: nn.Module
    ) -> torch.Tensor:
        gamma = self.step_size(k)
        if self.algorithm == "pgd":
            v = dc_step(physics, x, y, gamma, backend=self.dc_backend, AHy=ahy, check_inputs=False)
            return denoise(self.prior(k), v)
        z = denoise(self.prior(k), x)
        return prox_l2(physics, z, y, gamma, backend=self.dc_backend, check_inputs=False)

    def forward(self, y: torch.Tensor, physics: nn.Module, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct from measurements ``y`` of ``physics``.

        Args:
            y: measurements, e.g. complex64 k-space (B, C, H, W) or block-CS (B, n_blocks, m).
            physics: a ``mbdl_fast.physics`` operator (``A``, ``A_adjoint``, ``prox_l2``).
            x0: initial image (default A^H y), shaped like the physics' images.

        Returns:
            x_K, shaped like A^H y (or like ``x0``).
        """
        _check_solver_inputs(y, x0, physics)
        if check_execution(self.execution) != "eager":
            out = unrolled_in_graph(
                self.execution_cache, self.execution, self, self._unrolled, y, physics, self._eager_reason(x0, physics)
            )
            if out is not None:
                return out
        else:
            self.execution_cache.last_mode = "eager"
        return self._unrolled(y, physics, x0)

    def _unrolled(self, y: torch.Tensor, physics: nn.Module, x0: torch.Tensor | None = None) -> torch.Tensor:
        """The K iterations from x0 (default A^H y), inputs already checked."""
        ahy = run_unchecked(_adjoint_measurements, physics, y, x0)
        x = ahy if x0 is None else x0
        for k in range(self.num_iters):
            x = _maybe_checkpoint(self.checkpointing, self._iteration, k, x, y, ahy, physics)
        return x

    def _eager_reason(self, x0: torch.Tensor | None, physics: nn.Module) -> str | None:
        """Why this model's forward cannot replay from static buffers, or None (the physics' own reasons aside)."""
        if x0 is not None:
            return "x0 given (graphs start from A^H y)"
        if self.algorithm == "hqs" and getattr(physics, "coil_maps", None) is not None:
            return "HQS with coil maps: its prox runs CG, which checks convergence on the host"
        return None

    # -- configs ----------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Constructor arguments as plain JSON; the priors as nested configs (1 tied, K untied)."""
        return {
            "priors": [config_of(p) for p in self.priors],
            "num_iters": self.num_iters,
            "algorithm": self.algorithm,
            "tied": self.tied,
            "gamma_init": self.gamma_init,
            "learn_gamma": self.learn_gamma,
            "checkpointing": self.checkpointing,
            "dc_backend": self.dc_backend,
            "execution": self.execution,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DeepUnfolding:
        args = dict(config)
        args["priors"] = [build(c) for c in args["priors"]]
        return cls(**args)

    def extra_repr(self) -> str:
        return (
            f"algorithm={self.algorithm!r}, num_iters={self.num_iters}, tied={self.tied}, "
            f"learn_gamma={self.learn_gamma}, checkpointing={self.checkpointing}"
        )
