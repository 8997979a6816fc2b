"""VarNet-style cascades (Sriram et al., fastMRI's ``VarNet``) with given coil maps.

Each cascade t = 0 .. T-1 updates the full multi-coil k-space k (B, C, H, W), as fastMRI's
``VarNetBlock``:

    k_{t+1} = k_t - eta_t M ⊙ (k_t - y) - E( D_t( R(k_t) ) ),

    R(k) = Σ_c conj(S_c) ⊙ F_c^H k_c          (sens_reduce: coil combination, (B, C, H, W) -> (B, H, W))
    E(x) = F_c (S_c ⊙ x)                       (sens_expand: un-masked forward model, (B, H, W) -> (B, C, H, W))

with eta_t a learned soft-DC weight (initialised to 1), M the physics' mask, S its coil maps and
D_t a learned prior on the complex image (it sees (B, 2, H, W) real through ``denoise``; fastMRI
uses a normalised U-Net, ``NormUNet``). fastMRI writes the soft DC as ``where(mask, k - y, 0)``;
here it is ``M ⊙ (k - y)``, the same for binary masks and a weighting for soft ones.

Differences from fastMRI: the coil maps are given (taken from the physics), not estimated by a
sensitivity network; the output is the complex coil-combined image R(k_T) = Σ_c conj(S_c) F_c^H k_T
(B, H, W), not the root-sum-of-squares magnitude. With coil maps normalised so that Σ_c |S_c|² = 1
on the support, R(E(x)) = x there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mbdl_fast._validate import check_number
from mbdl_fast.fft import fft2c, ifft2c
from mbdl_fast.priors.base import denoise
from mbdl_fast.registry import build, config_of, register
from mbdl_fast.solvers.unfolding import _check_count, _check_solver_inputs, _maybe_checkpoint, _replicate

__all__ = ["VarNet"]


def _default_prior(chans: int, pools: int) -> nn.Module:
    try:
        from mbdl_fast.priors import NormUNet
    except ImportError as exc:  # the priors package may be absent in a partial install
        raise ImportError(
            f"VarNet: the default cascade prior mbdl_fast.priors.NormUNet is not available ({exc}); "
            "pass priors=... (any registered module mapping (B, 2, H, W) to (B, 2, H, W))"
        ) from exc
    return NormUNet(in_channels=2, out_channels=2, chans=chans, num_pool_layers=pools)


@register("VarNet")
class VarNet(nn.Module):
    """T cascades of k-space soft DC plus a learned image-domain term (see the module docstring).

    Args:
        num_cascades: T (fastMRI: 12).
        priors: the cascade priors D_t: one registered module (deep-copied so that each cascade
            owns one) or a list of T. Default: ``mbdl_fast.priors.NormUNet(chans, pools)``.
        chans, pools: width and depth of the default NormUNet (fastMRI: 18 and 4); unused
            when ``priors`` is given.
        dc_weight_init: initial soft-DC weight eta_t of every cascade (fastMRI: 1).
        checkpointing: recompute each cascade in backward so training memory does not grow with T.

    Attributes:
        priors: ``nn.ModuleList`` of T priors; dc_weight: (T,) parameter.
    """

    def __init__(
        self,
        num_cascades: int = 12,
        priors: nn.Module | Sequence[nn.Module] | None = None,
        chans: int = 18,
        pools: int = 4,
        dc_weight_init: float = 1.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.num_cascades = _check_count("num_cascades", num_cascades)
        self.chans = _check_count("chans", chans)
        self.pools = _check_count("pools", pools, minimum=0)
        if priors is None:
            priors = [_default_prior(self.chans, self.pools) for _ in range(self.num_cascades)]
        self.priors = nn.ModuleList(_replicate("priors", priors, self.num_cascades))
        self.dc_weight_init = check_number("dc_weight_init", dc_weight_init)
        self.dc_weight = nn.Parameter(torch.full((self.num_cascades,), self.dc_weight_init, dtype=torch.float32))
        self.checkpointing = bool(checkpointing)

    @staticmethod
    def sens_expand(x: torch.Tensor, physics: nn.Module) -> torch.Tensor:
        """E(x) = F_c(S ⊙ x): complex (B, H, W) -> (B, C, H, W), un-masked."""
        return fft2c(physics._expand(x))

    @staticmethod
    def sens_reduce(k: torch.Tensor, physics: nn.Module) -> torch.Tensor:
        """R(k) = Σ_c conj(S_c) ⊙ F_c^H k_c: complex (B, C, H, W) -> (B, H, W)."""
        return physics._combine(ifft2c(k))

    def _cascade(self, t: int, k: torch.Tensor, y: torch.Tensor, physics: nn.Module) -> torch.Tensor:
        soft_dc = self.dc_weight[t] * (physics.mask * (k - y))
        model_term = self.sens_expand(denoise(self.priors[t], self.sens_reduce(k, physics)), physics)
        return k - soft_dc - model_term

    def forward(self, y: torch.Tensor, physics: nn.Module, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct the coil-combined image from k-space ``y``.

        Args:
            y: measured k-space (B, C, H, W) complex (masked: y = M ⊙ F_c(S x) + noise), or
                real-packed (B, 2, C, H, W) for a ``layout="real_packed"`` physics.
            physics: ``MultiCoilMRI`` / ``MRI``, whose mask and coil maps the cascades use.
            x0: optional initial image (B, H, W) complex; k_0 = E(x0). Default k_0 = y (fastMRI).

        Returns:
            R(k_T), complex (B, H, W) (real-packed (B, 2, H, W) for a real-packed physics).
        """
        from mbdl_fast.physics.mri import MultiCoilMRI

        if not isinstance(physics, MultiCoilMRI):
            raise TypeError(f"physics: VarNet expects MultiCoilMRI or MRI, got {type(physics).__name__}")
        _check_solver_inputs(y, x0, physics)
        y = physics._kspace_in("y", y)
        if x0 is None:
            k = y
        else:
            x0_img, _ = physics._image_in("x0", x0)
            k = self.sens_expand(x0_img, physics)
        for t in range(self.num_cascades):
            k = _maybe_checkpoint(self.checkpointing, self._cascade, t, k, y, physics)
        return physics._image_out(self.sens_reduce(k, physics), False)

    # -- configs ----------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Constructor arguments as plain JSON; the T cascade priors as nested configs."""
        return {
            "num_cascades": self.num_cascades,
            "priors": [config_of(p) for p in self.priors],
            "chans": self.chans,
            "pools": self.pools,
            "dc_weight_init": self.dc_weight_init,
            "checkpointing": self.checkpointing,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VarNet:
        args = dict(config)
        args["priors"] = [build(c) for c in args["priors"]]
        return cls(**args)

    def extra_repr(self) -> str:
        return f"num_cascades={self.num_cascades}, checkpointing={self.checkpointing}"
