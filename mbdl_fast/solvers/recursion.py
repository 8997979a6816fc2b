"""Recursive deep unfolding (Alhejaili et al., "Recursions Are All You Need: Towards Efficient Deep
Unfolding Networks"), with ISTA-Net+ and COAST recovery blocks.

L distinct recovery blocks; block i is applied R_i times in a row, so the network runs
T = Σ_i R_i iterations with the parameters of L blocks:

    x_0 = A^H y;    for i = 1 .. L, repeat R_i times:  t <- t + 1,  x <- B_i(x, y, s_t)

In training mode each R_i is drawn uniformly from {1, .., R} once per forward (per batch), which
shortens training; in eval mode R_i = R (or a list given to ``forward``). A modulation MLP
shared by all blocks, Linear(3, F) -> ReLU -> Linear(F, F), maps the features

    f_t = (measurement ratio,  T / (L R),  t / (L R))          t = 1 .. T

to per-channel scales s_t (F,) that multiply the residual branch of the block, so one set of
block weights can act differently at every recursion. The measurement ratio is the physics'
``ratio`` (block CS: m / block² nominal, e.g. 0.25) or, for MRI, the sampled fraction of k-space
(1 / acceleration). The official R-COAST code feeds 2 × ratio; here the ratio is fed as is.

A recovery block is any module called ``block(x, y, physics, scales=None, AHy=None)`` returning
``(x_next, aux)`` (``aux`` a dict) whose ``channels`` equals F. Both blocks here start with the
physics' gradient step r = x - rho A^H(A x - y) (``dc_step``, learned rho) on the whole image
(the original codes apply their convolutions to single 33×33 blocks during training and to
whole images at test time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.functional import relu

from mbdl_fast._registry import build, config_of, register
from mbdl_fast._validate import describe, run_unchecked
from mbdl_fast.complex import from_real_packed, to_real_packed
from mbdl_fast.dc import dc_step
from mbdl_fast.physics.mri import MultiCoilMRI
from mbdl_fast.solvers.unfolding import (
    _adjoint_measurements,
    _as_module_list,
    _check_count,
    _check_solver_inputs,
    _maybe_checkpoint,
)

__all__ = ["COASTBlock", "ISTANetPlusBlock", "RecursiveUnfolding", "measurement_ratio"]


# ------------------------------------------------------------------------------------------------
# Helpers of the blocks
# ------------------------------------------------------------------------------------------------
def _channel_scales(scales: torch.Tensor | None, channels: int, batch: int) -> torch.Tensor | None:
    """Scales (F,), (1, F) or (B, F) as (B|1, F, 1, 1) to multiply features (B, F, H, W); F == channels."""
    if scales is None:
        return None
    if not isinstance(scales, torch.Tensor) or scales.is_complex() or not scales.is_floating_point():
        got = describe(scales) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise TypeError(f"scales: expected a real tensor (F,) or (B, F) with F = {channels}, got {got}")
    if scales.dim() == 1:
        scales = scales.unsqueeze(0)
    if scales.dim() != 2 or scales.shape[1] != channels or scales.shape[0] not in (1, batch):
        raise ValueError(
            f"scales: expected ({channels},) or ({batch}, {channels}) (one scale per channel of the block), "
            f"got {describe(scales)}"
        )
    return scales[:, :, None, None]


def _to_real(x: torch.Tensor, image_channels: int) -> tuple[torch.Tensor, bool]:
    """Real (B, image_channels, H, W); complex (B, H, W) as (B, 2, H, W), for 2-channel blocks only."""
    if x.is_complex():
        if image_channels != 2 or x.dim() != 3:
            raise ValueError(
                f"x: a complex image needs a block with image_channels=2 and (B, H, W) images, "
                f"got image_channels={image_channels} and {describe(x)}"
            )
        return to_real_packed(x), True
    if x.dim() != 4 or x.shape[1] != image_channels:
        raise ValueError(f"x: expected real (B, {image_channels}, H, W), got {describe(x)}")
    return x, False


def _init_xavier(modules: Sequence[nn.Module]) -> None:
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _conv(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


# ------------------------------------------------------------------------------------------------
# ISTA-Net+
# ------------------------------------------------------------------------------------------------
@register("ISTANetPlusBlock")
class ISTANetPlusBlock(nn.Module):
    """One ISTA-Net+ phase (Zhang & Ghanem, CVPR 2018) with per-channel modulation.

        r        = x - rho A^H(A x - y)                     (gradient step, learned rho, init 0.5)
        u        = D(r)                                     conv3×3, image_channels -> C
        v        = F(u) = conv(ReLU(conv(u)))               forward transform, C -> C
        w        = F~(soft(v, theta)) = conv(ReLU(conv(.)))  backward transform (learned theta, init 0.01)
        x_next   = r + G(s ⊙ w)                             G: conv3×3, C -> image_channels

    ``s`` are the modulation scales (per channel of w; 1 when None). In training mode, ``aux``
    holds ``"symmetry"`` = F~(F(u)) - u (B, C, H, W), the ISTA-Net+ constraint whose mean square
    (summed over phases, weighted 0.01) joins the loss; in eval mode ``aux`` is empty.
    Convolutions have no bias and Xavier-normal weights, as ISTA-Net+.

    Args:
        channels: C (ISTA-Net+: 32); must equal the modulation features F.
        image_channels: 1 for real images (block CS); 2 for complex images (packed as 2 channels).
        rho_init, theta_init: initial step size and soft threshold.
        dc_backend: backend of ``dc_step``.
    """

    def __init__(
        self,
        channels: int = 32,
        image_channels: int = 1,
        rho_init: float = 0.5,
        theta_init: float = 0.01,
        dc_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.channels = _check_count("channels", channels)
        self.image_channels = _check_count("image_channels", image_channels)
        self.rho_init, self.theta_init = float(rho_init), float(theta_init)
        self.dc_backend = dc_backend
        c = self.channels
        self.rho = nn.Parameter(torch.tensor(self.rho_init))
        self.theta = nn.Parameter(torch.tensor(self.theta_init))
        self.conv_d = _conv(self.image_channels, c, bias=False)
        self.forward1, self.forward2 = _conv(c, c, bias=False), _conv(c, c, bias=False)
        self.backward1, self.backward2 = _conv(c, c, bias=False), _conv(c, c, bias=False)
        self.conv_g = _conv(c, self.image_channels, bias=False)
        _init_xavier(list(self.modules()))

    def transform(self, u: torch.Tensor) -> torch.Tensor:
        """F(u) = conv(ReLU(conv(u)))."""
        return self.forward2(relu(self.forward1(u)))

    def inverse_transform(self, v: torch.Tensor) -> torch.Tensor:
        """F~(v) = conv(ReLU(conv(v)))."""
        return self.backward2(relu(self.backward1(v)))

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        physics: nn.Module,
        scales: torch.Tensor | None = None,
        AHy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One phase: x (B, image_channels, H, W) real (or complex (B, H, W)) -> (x_next, aux)."""
        r = dc_step(physics, x, y, self.rho, backend=self.dc_backend, AHy=AHy, check_inputs=False)
        r_real, packed = _to_real(r, self.image_channels)
        s = _channel_scales(scales, self.channels, r_real.shape[0])
        u = self.conv_d(r_real)
        v = self.transform(u)
        w = self.inverse_transform(torch.sign(v) * relu(v.abs() - self.theta))
        out = r_real + self.conv_g(w if s is None else w * s)
        aux = {"symmetry": self.inverse_transform(v) - u} if self.training else {}
        return (from_real_packed(out) if packed else out), aux

    def to_config(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "image_channels": self.image_channels,
            "rho_init": self.rho_init,
            "theta_init": self.theta_init,
            "dc_backend": self.dc_backend,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ISTANetPlusBlock:
        return cls(**config)


# ------------------------------------------------------------------------------------------------
# COAST
# ------------------------------------------------------------------------------------------------
@register("COASTBlock")
class COASTBlock(nn.Module):
    """One COAST recovery block (You et al., IEEE TIP 2021): gradient step and controllable residual blocks.

        r      = x - rho A^H(A x - y)                       (learned rho, init 0.5)
        h_0    = head(r)                                    conv3×3, image_channels -> C
        h_j    = h_{j-1} + s ⊙ conv(ReLU(conv(h_{j-1})))    j = 1 .. num_res_blocks (COAST's CPMB)
        x_next = r + tail(h_J)                              conv3×3, C -> image_channels

    ``s`` are the modulation scales (per channel; 1 when None), shared by the CPMBs of the block as
    in COAST, where a linear map of the CS ratio produced them. Convolutions have biases and
    PyTorch's default initialisation, as COAST. ``aux`` is empty.

    Args:
        channels: C (COAST: 32); must equal the modulation features F.
        num_res_blocks: CPMBs per block (COAST and R-COAST: 3).
        image_channels: 1 for real images (block CS); 2 for complex images (packed as 2 channels).
        rho_init: initial step size.
        dc_backend: backend of ``dc_step``.
    """

    def __init__(
        self,
        channels: int = 32,
        num_res_blocks: int = 3,
        image_channels: int = 1,
        rho_init: float = 0.5,
        dc_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.channels = _check_count("channels", channels)
        self.num_res_blocks = _check_count("num_res_blocks", num_res_blocks)
        self.image_channels = _check_count("image_channels", image_channels)
        self.rho_init = float(rho_init)
        self.dc_backend = dc_backend
        c = self.channels
        self.rho = nn.Parameter(torch.tensor(self.rho_init))
        self.head = _conv(self.image_channels, c, bias=True)
        self.res_blocks = nn.ModuleList(
            nn.Sequential(_conv(c, c, bias=True), nn.ReLU(), _conv(c, c, bias=True)) for _ in range(num_res_blocks)
        )
        self.tail = _conv(c, self.image_channels, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        physics: nn.Module,
        scales: torch.Tensor | None = None,
        AHy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One block: x (B, image_channels, H, W) real (or complex (B, H, W)) -> (x_next, {})."""
        r = dc_step(physics, x, y, self.rho, backend=self.dc_backend, AHy=AHy, check_inputs=False)
        r_real, packed = _to_real(r, self.image_channels)
        s = _channel_scales(scales, self.channels, r_real.shape[0])
        h = self.head(r_real)
        for res in self.res_blocks:
            h = h + (res(h) if s is None else res(h) * s)
        out = r_real + self.tail(h)
        return (from_real_packed(out) if packed else out), {}

    def to_config(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "num_res_blocks": self.num_res_blocks,
            "image_channels": self.image_channels,
            "rho_init": self.rho_init,
            "dc_backend": self.dc_backend,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> COASTBlock:
        return cls(**config)


# ------------------------------------------------------------------------------------------------
# The recursive network
# ------------------------------------------------------------------------------------------------
def measurement_ratio(physics: nn.Module) -> float | torch.Tensor:
    """The first modulation feature: the physics' ``ratio`` (block CS), or the sampled fraction of
    k-space per sample, (B|1,), for MRI (1 / acceleration)."""
    ratio = getattr(physics, "ratio", None)
    if ratio is not None:
        return float(ratio)
    if isinstance(physics, MultiCoilMRI):
        mask = physics.mask  # (B|1, 1, H|1, W|1): the mean over broadcast axes is the sampled fraction
        return mask.reshape(mask.shape[0], -1).mean(dim=1)
    raise ValueError(
        f"ratio: {type(physics).__name__} has no measurement ratio; pass ratio=... to RecursiveUnfolding.forward"
    )


@register("RecursiveUnfolding")
class RecursiveUnfolding(nn.Module):
    """L recovery blocks, block i applied R_i times, modulated by a shared MLP (see the module docstring).

    Args:
        blocks: L distinct registered recovery blocks (``ISTANetPlusBlock``, ``COASTBlock``, or any
            module with their call signature and a ``channels`` attribute equal to F).
        max_recursions: R; R_i is drawn from {1, .., R} in training, R_i = R in eval.
        modulation_features: F, the width of the modulation MLP and the channels of every block.
        train_random: draw the R_i in training mode (else R_i = R in training too).
        seed: seed of the ``torch.Generator`` (on the CPU) that draws the R_i; None uses torch's
            global RNG. The generator's state is not part of the state dict.
        checkpointing: recompute each iteration in backward so training memory does not grow with T.

    Attributes:
        blocks: ``nn.ModuleList`` of L blocks; modulation: the MLP; last_recursions: the R_i of the
        last forward.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        max_recursions: int = 4,
        modulation_features: int = 32,
        train_random: bool = True,
        seed: int | None = None,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        items = _as_module_list("blocks", blocks)
        if len({id(b) for b in items}) != len(items):
            raise ValueError("blocks: the same module appears twice; recursion reuses a block, pass distinct blocks")
        self.max_recursions = _check_count("max_recursions", max_recursions)
        self.modulation_features = _check_count("modulation_features", modulation_features)
        for i, b in enumerate(items):
            channels = getattr(b, "channels", None)
            if channels != self.modulation_features:
                raise ValueError(
                    f"blocks[{i}]: expected channels = modulation_features = {self.modulation_features}, "
                    f"got {type(b).__name__} with channels={channels}"
                )
        self.blocks = nn.ModuleList(items)
        feats = self.modulation_features
        self.modulation = nn.Sequential(nn.Linear(3, feats), nn.ReLU(), nn.Linear(feats, feats))
        self.train_random = bool(train_random)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed: expected an int or None, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.checkpointing = bool(checkpointing)
        self.last_recursions: list[int] = []

    @property
    def num_blocks(self) -> int:
        """L."""
        return len(self.blocks)

    @property
    def max_iterations(self) -> int:
        """L · R, the normaliser of the iteration features."""
        return self.num_blocks * self.max_recursions

    def recursion_counts(self, recursions: Sequence[int] | None = None) -> list[int]:
        """The R_i of one forward: ``recursions`` if given (each in [1, R]); else drawn uniformly
        from {1, .., R} in training mode (with ``train_random``); else R for every block."""
        L, R = self.num_blocks, self.max_recursions
        if recursions is not None:
            counts = list(recursions)
            if len(counts) != L or any(
                isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= R for c in counts
            ):
                raise ValueError(f"recursions: expected {L} ints in [1, {R}] (one per block), got {recursions!r}")
            return counts
        if self.training and self.train_random:
            return [int(c) for c in torch.randint(1, R + 1, (L,), generator=self.generator)]
        return [R] * L

    def modulation_scales(self, ratio: float | torch.Tensor, total: int, index: int) -> torch.Tensor:
        """s_t = MLP(ratio, total / (L R), index / (L R)): (1, F), or (B, F) for a per-sample ratio (B,)."""
        w = self.modulation[0].weight
        ratio_t = torch.as_tensor(ratio, dtype=w.dtype, device=w.device).reshape(-1)
        frac = torch.tensor([total, index], dtype=w.dtype, device=w.device) / self.max_iterations
        features = torch.cat((ratio_t[:, None], frac.expand(ratio_t.shape[0], 2)), dim=1)
        return self.modulation(features)

    def _iteration(
        self,
        i: int,
        total: int,
        t: int,
        x: torch.Tensor,
        y: torch.Tensor,
        ahy: torch.Tensor,
        physics: nn.Module,
        ratio: float | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Iteration t (block i): the next iterate and mean(symmetry²) when the block reports one.

        The reduction happens here so that, under checkpointing, no (B, C, H, W) aux tensor outlives
        the iteration.
        """
        x, aux = self.blocks[i](x, y, physics, scales=self.modulation_scales(ratio, total, t), AHy=ahy)
        symmetry = aux.get("symmetry")
        return x, (None if symmetry is None else symmetry.pow(2).mean())

    def forward(
        self,
        y: torch.Tensor,
        physics: nn.Module,
        x0: torch.Tensor | None = None,
        recursions: Sequence[int] | None = None,
        ratio: float | torch.Tensor | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Reconstruct from measurements ``y``.

        Args:
            y: measurements, e.g. block CS (B, n_blocks, m).
            physics: the operator (block CS ``BlockCS``, or MRI with 2-channel blocks).
            x0: initial image (default A^H y, ISTA-Net's initialisation); gives block CS its size.
            recursions: R_i per block, overriding the draw (training) or R (eval).
            ratio: the measurement-ratio feature, a float or (B,); default ``measurement_ratio(physics)``.
            return_aux: also return ``aux``.

        Returns:
            x_T; with ``return_aux``, ``(x_T, aux)``: ``"recursions"`` (the R_i), ``"iterations"``
            (T), and, when blocks report ``"symmetry"`` (ISTA-Net+ in training), ``"symmetry_loss"``
            = Σ over iterations of mean(symmetry²) (ISTA-Net+ weighs it 0.01 in the loss).
        """
        counts = self.recursion_counts(recursions)
        self.last_recursions = counts
        _check_solver_inputs(y, x0, physics)
        ahy = run_unchecked(_adjoint_measurements, physics, y, x0)
        x = ahy if x0 is None else x0
        ratio = measurement_ratio(physics) if ratio is None else ratio
        total = sum(counts)
        symmetry_loss: torch.Tensor | None = None
        t = 0
        for i, count in enumerate(counts):
            for _ in range(count):
                t += 1
                x, term = _maybe_checkpoint(self.checkpointing, self._iteration, i, total, t, x, y, ahy, physics, ratio)
                if term is not None:
                    symmetry_loss = term if symmetry_loss is None else symmetry_loss + term
        if not return_aux:
            return x
        info: dict[str, Any] = {"recursions": counts, "iterations": total}
        if symmetry_loss is not None:
            info["symmetry_loss"] = symmetry_loss
        return x, info

    # -- configs ----------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Constructor arguments as plain JSON; the L blocks as nested configs."""
        return {
            "blocks": [config_of(b) for b in self.blocks],
            "max_recursions": self.max_recursions,
            "modulation_features": self.modulation_features,
            "train_random": self.train_random,
            "seed": self.seed,
            "checkpointing": self.checkpointing,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RecursiveUnfolding:
        args = dict(config)
        args["blocks"] = [build(c) for c in args["blocks"]]
        return cls(**args)

    def extra_repr(self) -> str:
        return (
            f"max_recursions={self.max_recursions}, modulation_features={self.modulation_features}, "
            f"train_random={self.train_random}, checkpointing={self.checkpointing}"
        )
