"""deepinv users: our operators as deepinv physics, deepinv denoisers as our priors.

- :func:`to_deepinv` wraps an ``mbdl_fast.physics`` operator as a ``deepinv.physics.LinearPhysics`` in deepinv's
  real-packed layout (images (B, 2, H, W) for MRI, k-space (B, 2, H, W) single-coil or (B, 2, C, H, W)).
  ``A``, ``A_adjoint``, ``A_adjoint_A`` are ours; ``prox_l2`` and ``dc_step`` run through ``mbdl_fast.prox_l2`` and
  ``mbdl_fast.dc_step`` (the fused Triton / CUDA backends where they run, else plain PyTorch); all differentiable.
  deepinv's algorithms, losses and trainers take it where they take deepinv's own physics.
- :class:`FusedL2`: deepinv's ``L2`` data fidelity whose gradient A^H(A x - y) is one fused DC step
  (``x - dc_step(x, y, 1)``) for a wrapped operator, so deepinv's PGD / gradient descent use the fused kernel.
- :func:`from_deepinv_denoiser` wraps a deepinv denoiser ``D(x, sigma)`` as a prior for ``DEQ``,
  ``DeepUnfolding``, ``VarNet`` (needs no deepinv import itself).

deepinv is an optional extra (``pip install "mbdl_fast[deepinv]"``), imported on first use.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from mbdl_fast.dc import dc_step
from mbdl_fast.prox import prox_l2

# FusedL2 and DeepinvPhysics subclass deepinv classes, so the module-level __getattr__ builds them on first use.
__all__ = ["DeepinvDenoiserPrior", "DeepinvPhysics", "FusedL2", "from_deepinv_denoiser", "to_deepinv"]  # noqa: F822


def _import_deepinv() -> Any:
    try:
        import deepinv
    except ImportError as exc:
        raise ImportError(
            f"mbdl_fast.interop.deepinv needs deepinv (pip install 'mbdl_fast[deepinv]'); importing it failed: {exc}"
        ) from exc
    except RuntimeError as exc:  # torchvision's C extension built for another torch registers no ops
        raise ImportError(
            f"deepinv could not be imported ({exc}): deepinv imports torchvision, and this torchvision does not match "
            f"torch {torch.__version__} (a CUDA torchvision wheel with a CPU torch, say); install the torchvision "
            "built for this torch"
        ) from exc
    return deepinv


def _as_gamma(gamma: float | torch.Tensor, batch: int) -> float | torch.Tensor:
    """deepinv's step (a float, or a tensor of 1 or B elements in any shape) as ours: a scalar or (B,)."""
    if isinstance(gamma, torch.Tensor):
        if gamma.numel() == 1:
            return gamma.reshape(())
        if gamma.numel() == batch:
            return gamma.reshape(batch)
    return gamma


def _real_packed(physics: nn.Module) -> nn.Module:
    """``physics`` in deepinv's real-packed layout: a shallow copy with ``layout="real_packed"`` where it has layouts."""
    if getattr(physics, "layout", None) == "complex":
        physics = copy.copy(physics)  # shares mask and coil maps; the caller's operator keeps its layout
        physics.layout = "real_packed"
    return physics


@functools.cache
def _classes() -> dict[str, type]:
    """The deepinv subclasses, built on first use so that importing this module does not import deepinv."""
    dinv = _import_deepinv()

    class DeepinvPhysics(dinv.physics.LinearPhysics):
        """An ``mbdl_fast.physics`` operator as a deepinv ``LinearPhysics`` (see :func:`to_deepinv`)."""

        def __init__(self, physics: nn.Module, backend: str = "auto", **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.physics = _real_packed(physics)
            self.backend = backend

        def update_parameters(self, **kwargs: Any) -> None:
            """deepinv's on-the-fly parameters (``physics(x, mask=m)``) go to our ``update``; ``None`` means keep."""
            ours = {k: v for k, v in kwargs.items() if v is not None}
            if ours:
                self.physics.update(**ours)

        def A(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # noqa: N802 (deepinv's name)
            self.update_parameters(**kwargs)
            return self.physics.A(x)

        def A_adjoint(self, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # noqa: N802
            self.update_parameters(**kwargs)
            return self.physics.A_adjoint(y)

        def A_adjoint_A(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # noqa: N802
            self.update_parameters(**kwargs)
            return self.physics.A_adjoint_A(x)

        def prox_l2(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor, **kwargs: Any) -> torch.Tensor:
            """argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||² through ``mbdl_fast.prox_l2`` (closed forms, fused MRI)."""
            self.update_parameters(**{k: v for k, v in kwargs.items() if k not in ("use_fft", "verbose")})
            return prox_l2(self.physics, z, y, _as_gamma(gamma, z.shape[0]), backend=self.backend)

        def dc_step(self, x: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
            """x - gamma A^H(A x - y) through ``mbdl_fast.dc_step`` (fused for MRI)."""
            return dc_step(self.physics, x, y, _as_gamma(gamma, x.shape[0]), backend=self.backend)

        def noise(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            """The noise model's output; for MRI masked, as deepinv's MRI (unsampled k-space stays zero)."""
            noisy = self.noise_model(x, **kwargs)
            mask_for = getattr(self.physics, "mask_for", None)
            if mask_for is None:
                return noisy
            mask = mask_for(x)
            # (B|1, 1, H|1, W|1) against real-packed (B, 2, H, W) or (B, 2, C, H, W): the coil axis goes after 2.
            return (mask.unsqueeze(1) if x.dim() == 5 else mask) * noisy

    class FusedL2(dinv.optim.L2):
        """deepinv's ``L2`` (½σ⁻² ||A x - y||²) whose gradient is one fused DC step on a :func:`to_deepinv` operator."""

        def grad(self, x: torch.Tensor, y: torch.Tensor, physics: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            if isinstance(physics, DeepinvPhysics):
                return self.norm * (x - physics.dc_step(x, y, 1.0))
            return super().grad(x, y, physics, *args, **kwargs)

    return {"DeepinvPhysics": DeepinvPhysics, "FusedL2": FusedL2}


def __getattr__(name: str) -> Any:
    # ``FusedL2`` and ``DeepinvPhysics`` subclass deepinv's classes: built when first asked for.
    if name in ("FusedL2", "DeepinvPhysics"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_deepinv(physics: nn.Module, backend: str = "auto", **kwargs: Any) -> Any:
    """``physics`` (an ``mbdl_fast.physics`` operator) as a ``deepinv.physics.LinearPhysics``.

    Args:
        physics: ``MRI``, ``MultiCoilMRI``, ``SuperResolution``, ``BlockCS``. A complex-layout MRI operator is
            used through a real-packed copy (sharing mask and coil maps), so inputs and outputs are deepinv's:
            images real (B, 2, H, W), k-space real (B, 2, H, W) (single coil) or (B, 2, C, H, W).
            Real-image operators (super-resolution, block CS) take their real tensors as they are.
        backend: of ``prox_l2`` and ``dc_step`` ("auto", "torch", "triton", "cuda").
        kwargs: deepinv ``LinearPhysics`` arguments (``noise_model``, ``max_iter``, ``tol``, ...).

    Returns:
        a ``DeepinvPhysics`` (subclass of ``deepinv.physics.LinearPhysics``) with ``A``, ``A_adjoint``,
        ``A_adjoint_A``, ``prox_l2``, ``dc_step`` and ``noise`` (masked for MRI); ``.physics`` is the wrapped operator.
    """
    if not all(callable(getattr(physics, name, None)) for name in ("A", "A_adjoint", "prox_l2")):
        raise TypeError(f"physics: expected an mbdl_fast.physics operator (A, A_adjoint, prox_l2), got {physics!r:.80}")
    return _classes()["DeepinvPhysics"](physics, backend=backend, **kwargs)


class DeepinvDenoiserPrior(nn.Module):
    """A deepinv denoiser ``D(x, sigma)`` as an mbdl_fast prior: real (B, C, H, W) -> (B, C, H, W).

    ``forward(x, sigma=None)`` calls ``denoiser(x, sigma)`` with the given noise level, or the fixed
    ``sigma`` of the wrapper (the solvers call priors without one). Complex images reach it through
    ``mbdl_fast.priors.denoise`` as (B, 2, H, W), which is deepinv's layout for complex images.
    Not registered: a model holding it runs, trains and prunes, but saves with ``torch.save``, not ``save_model``.
    """

    def __init__(self, denoiser: nn.Module, sigma: float | torch.Tensor) -> None:
        super().__init__()
        if not isinstance(denoiser, nn.Module):
            raise TypeError(f"denoiser: expected a deepinv denoiser (an nn.Module), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.sigma = sigma

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        return self.denoiser(x, self.sigma if sigma is None else sigma)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


def from_deepinv_denoiser(denoiser: nn.Module, sigma: float | torch.Tensor) -> DeepinvDenoiserPrior:
    """A deepinv denoiser (``deepinv.models.DnCNN``, ``DRUNet``, ...) as a prior for DEQ / DeepUnfolding / VarNet.

    Args:
        denoiser: called as ``denoiser(x, sigma)`` on real (B, C, H, W) (C = 2 for complex MRI images).
        sigma: the noise level it is called with (deepinv's ``sigma_denoiser``).
    """
    return DeepinvDenoiserPrior(denoiser, sigma)
