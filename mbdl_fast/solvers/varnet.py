"""VarNet (Sriram et al. 2020, fastMRI's end-to-end ``VarNet``): k-space cascades, coil maps given or learned.

Each cascade t = 0 .. T-1 updates the full multi-coil k-space k (B, C, H, W), as fastMRI's
``VarNetBlock``:

    k_{t+1} = k_t - eta_t M ⊙ (k_t - y) - E( D_t( R(k_t) ) ),

    R(k) = Σ_c conj(S_c) ⊙ F_c^H k_c          (sens_reduce: coil combination, (B, C, H, W) -> (B, H, W))
    E(x) = F_c (S_c ⊙ x)                       (sens_expand: un-masked forward model, (B, H, W) -> (B, C, H, W))

with eta_t a learned soft-DC weight (initialised to 1), M the physics' mask, S the coil maps and
D_t a learned prior on the complex image (it sees (B, 2, H, W) real through ``denoise``; fastMRI
uses a normalised U-Net, ``NormUNet``). fastMRI writes the soft DC as ``where(mask, k - y, 0)``;
here it is ``M ⊙ (k - y)``, the same for binary masks and a weighting for soft ones.

Coil maps S: the physics' (``MultiCoilMRI(mask, coil_maps)``), or, with ``sens_net``, estimated from y
and the mask by fastMRI's sensitivity network (:class:`SensitivityModel`): the end-to-end VarNet.

Output: ``"combined"`` (default), the complex coil-combined image R(k_T) (B, H, W); with maps
normalised so that Σ_c |S_c|² = 1 on the support (the sensitivity network's are), R(E(x)) = x there.
``"rss"``: fastMRI's output, the root-sum-of-squares magnitude sqrt(Σ_c |F_c^H k_T,c|²), real (B, H, W).

Module names follow fastMRI's ``VarNet`` (``cascades.t.model``, ``cascades.t.dc_weight``, ``sens_net.norm_unet``),
so its state dicts load as they are (``mbdl_fast.interop.fastmri``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mbdl_fast._registry import build, config_of, register
from mbdl_fast._validate import check_complex, check_number, describe
from mbdl_fast.complex import from_real_packed, to_real_packed
from mbdl_fast.fft import fft2c, ifft2c
from mbdl_fast.physics.mri import MultiCoilMRI
from mbdl_fast.priors import NormUNet
from mbdl_fast.priors._common import kwargs_from_config
from mbdl_fast.priors.base import denoise
from mbdl_fast.solvers.execution import ExecutionCache, check_execution, unrolled_in_graph
from mbdl_fast.solvers.unfolding import _check_count, _check_solver_inputs, _maybe_checkpoint, _replicate

__all__ = ["SensitivityModel", "VarNet", "VarNetBlock"]

_OUTPUTS = ("combined", "rss")


def _norm_unet(**kwargs: Any) -> nn.Module:
    return NormUNet(in_channels=2, out_channels=2, **kwargs)


def sens_expand(x: torch.Tensor, coil_maps: torch.Tensor | None) -> torch.Tensor:
    """E(x) = F_c(S ⊙ x): complex (B, H, W) -> (B, C, H, W), un-masked (one coil, S = 1, for ``None``)."""
    return fft2c(x.unsqueeze(1) if coil_maps is None else coil_maps * x.unsqueeze(1))


def sens_reduce(k: torch.Tensor, coil_maps: torch.Tensor | None) -> torch.Tensor:
    """R(k) = Σ_c conj(S_c) ⊙ F_c^H k_c: complex (B, C, H, W) -> (B, H, W)."""
    z = ifft2c(k)
    return z[:, 0] if coil_maps is None else torch.sum(coil_maps.conj() * z, dim=1)


def _column_mask(mask: torch.Tensor) -> torch.Tensor:
    """The sampled columns (B|1, W) as bool, from a mask (B|1, 1, 1|H, W) that varies along W only."""
    if mask.shape[-2] != 1 and bool((mask != mask[..., :1, :]).any()):
        raise ValueError(
            f"mask: the sensitivity network finds the ACS band among the sampled columns, so it needs a Cartesian "
            f"column mask (varying along W only), got one varying along H too ({describe(mask)}); "
            "pass num_low_frequencies= to give the band's width"
        )
    return mask[:, 0, 0, :] != 0


@register("SensitivityModel")
class SensitivityModel(nn.Module):
    r"""fastMRI's coil-sensitivity network: a NormUNet on each coil image of the ACS band, RSS-normalised.

    From measured k-space y (B, C, H, W) complex and the column mask M:

    .. math::
        S_c = \frac{u_c}{\sqrt{\sum_{c'} |u_{c'}|^2}}, \qquad
        u_c = \mathrm{NormUNet}\big(F_c^{-1}(L \odot y_c)\big),

    with L the centred band of fully sampled low-frequency columns (``mask_center=True``; all columns
    otherwise). The band is fastMRI's: from the centre column W // 2, the runs of sampled columns to
    its left and right, of lengths l and r; ``n = max(2 min(l, r), 1)`` columns starting at
    ``(W - n + 1) // 2``, per sample. ``num_low_frequencies`` forces n. Each coil image is its own
    NormUNet sample ((B C, 2, H, W) real-packed). The RSS is floored at the smallest normal float,
    so a coil-free pixel gives 0 instead of fastMRI's NaN.

    Args:
        chans: width of the NormUNet's first convolution (fastMRI's ``sens_chans``, 8 when neither it
            nor ``widths`` is given).
        num_pool_layers: its poolings (fastMRI's ``sens_pools``, 4).
        drop_prob: its Dropout2d probability.
        mask_center: keep only the ACS band of y (fastMRI's default) or all of it.
        widths: per-layer widths of the NormUNet (see :class:`mbdl_fast.priors.UNet`).

    Attributes:
        norm_unet: the NormUNet, named as fastMRI's (``norm_unet.unet...``).
    """

    def __init__(
        self,
        chans: int | None = None,
        num_pool_layers: int = 4,
        drop_prob: float = 0.0,
        mask_center: bool = True,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if chans is None and widths is None:
            chans = 8
        self.mask_center = bool(mask_center)
        self.norm_unet = _norm_unet(chans=chans, num_pool_layers=num_pool_layers, drop_prob=drop_prob, widths=widths)

    def width_layers(self) -> list[str]:
        """Module name of the convolution whose output channels each ``widths`` entry gives."""
        return [f"norm_unet.{name}" for name in self.norm_unet.width_layers()]

    def tied_widths(self) -> list[list[int]]:
        return []

    @property
    def widths(self) -> tuple[int, ...]:
        return self.norm_unet.widths

    @property
    def in_channels(self) -> int:
        return self.norm_unet.in_channels

    def low_frequency_band(
        self, mask: torch.Tensor, width: int, num_low_frequencies: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """First column and width of the ACS band per sample, ``(start, count)`` each int64 (B|1,).

        ``mask``: real (B|1, 1, 1|H, W) (the physics' mask) varying along W only.
        """
        if num_low_frequencies:
            count = torch.full((mask.shape[0],), int(num_low_frequencies), dtype=torch.long, device=mask.device)
        else:
            sampled = _column_mask(mask.expand(*mask.shape[:-1], width)).to(torch.int8)
            centre = width // 2
            # argmin finds the first unsampled column: the run of sampled ones on each side of the centre.
            left = torch.argmin(sampled[:, :centre].flip(1), dim=1)
            right = torch.argmin(sampled[:, centre:], dim=1)
            count = torch.clamp_min(2 * torch.minimum(left, right), 1)
        return (width - count + 1) // 2, count

    def forward(self, y: torch.Tensor, mask: torch.Tensor, num_low_frequencies: int | None = None) -> torch.Tensor:
        """Coil maps S (B, C, H, W) complex, Σ_c |S_c|² = 1, from k-space ``y`` (B, C, H, W) complex and ``mask``.

        ``mask``: real, broadcastable to (B, 1, H, W) (leading dims as the physics stores it, (B|1, 1, 1|H, W)).
        """
        check_complex("y", y, "k-space (B, C, H, W)", 4)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        b, c, h, w = y.shape
        if self.mask_center:
            start, count = self.low_frequency_band(mask, w, num_low_frequencies)
            cols = torch.arange(w, device=y.device)
            band = (cols >= start[:, None]) & (cols < (start + count)[:, None])
            y = y * band[:, None, None, :]
        coil_images = ifft2c(y).reshape(b * c, h, w)
        u = from_real_packed(self.norm_unet(to_real_packed(coil_images))).view(b, c, h, w)
        rss = u.abs().square().sum(dim=1, keepdim=True).sqrt()
        return u / rss.clamp_min(torch.finfo(rss.dtype).tiny)

    def to_config(self) -> dict[str, Any]:
        """Plain-JSON constructor arguments, every width explicit."""
        unet = self.norm_unet.to_config()
        return {
            "num_pool_layers": unet["num_pool_layers"],
            "drop_prob": unet["drop_prob"],
            "mask_center": self.mask_center,
            "widths": unet["widths"],
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SensitivityModel:
        return cls(**kwargs_from_config(cls, config))

    def extra_repr(self) -> str:
        return f"mask_center={self.mask_center}"


class VarNetBlock(nn.Module):
    """One cascade: its prior ``model`` (D_t) and its soft-DC weight ``dc_weight`` (eta_t, shape (1,)), as fastMRI's."""

    def __init__(self, model: nn.Module, dc_weight_init: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.dc_weight = nn.Parameter(torch.full((1,), float(dc_weight_init), dtype=torch.float32))

    def forward(
        self, k: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, coil_maps: torch.Tensor | None
    ) -> torch.Tensor:
        """k - eta M ⊙ (k - y) - E(D(R(k))): k, y (B, C, H, W) complex; coil_maps (B|1, C, H, W) or None (one coil)."""
        soft_dc = self.dc_weight * (mask * (k - y))
        return k - soft_dc - sens_expand(denoise(self.model, sens_reduce(k, coil_maps)), coil_maps)


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
        sens_net: ``False`` (coil maps from the physics), ``True`` (a :class:`SensitivityModel` with
            ``sens_chans``, ``sens_pools``, ``mask_center``: fastMRI's end-to-end VarNet), or a module
            mapping (y, mask, num_low_frequencies) to maps.
        sens_chans, sens_pools, mask_center: of the default sensitivity network (fastMRI: 8, 4, True).
        output: ``"combined"`` (complex R(k_T)) or ``"rss"`` (fastMRI's magnitude); module docstring.
        execution: "eager", "static_buffers" or "cuda_graph": how an inference forward runs
            (``mbdl_fast.solvers.execution``); also settable as ``model.execution``.

    Attributes:
        cascades: ``nn.ModuleList`` of T :class:`VarNetBlock` (``.model``, ``.dc_weight``);
        priors: the T cascade priors (a list view of ``cascades[t].model``);
        sens_net: the sensitivity network, or None.
        execution_cache: the static-buffer set-up of the non-eager execution modes, and how the last call ran.
    """

    def __init__(
        self,
        num_cascades: int = 12,
        priors: nn.Module | Sequence[nn.Module] | None = None,
        chans: int = 18,
        pools: int = 4,
        dc_weight_init: float = 1.0,
        checkpointing: bool = False,
        sens_net: nn.Module | bool = False,
        sens_chans: int = 8,
        sens_pools: int = 4,
        mask_center: bool = True,
        output: str = "combined",
        execution: str = "eager",
    ) -> None:
        super().__init__()
        self.num_cascades = _check_count("num_cascades", num_cascades)
        self.chans = _check_count("chans", chans)
        self.pools = _check_count("pools", pools, minimum=0)
        if priors is None:
            priors = [_norm_unet(chans=self.chans, num_pool_layers=self.pools) for _ in range(self.num_cascades)]
        self.dc_weight_init = check_number("dc_weight_init", dc_weight_init)
        self.cascades = nn.ModuleList(
            VarNetBlock(p, self.dc_weight_init) for p in _replicate("priors", priors, self.num_cascades)
        )
        self.checkpointing = bool(checkpointing)
        self.sens_chans = _check_count("sens_chans", sens_chans)
        self.sens_pools = _check_count("sens_pools", sens_pools)
        self.mask_center = bool(mask_center)
        if sens_net is True:
            sens_net = SensitivityModel(self.sens_chans, self.sens_pools, mask_center=self.mask_center)
        elif sens_net is False or sens_net is None:
            sens_net = None
        elif not isinstance(sens_net, nn.Module):
            raise TypeError(f"sens_net: expected a bool or an nn.Module, got {type(sens_net).__name__}")
        self.sens_net = sens_net
        if output not in _OUTPUTS:
            raise ValueError(f"output: expected one of {_OUTPUTS}, got {output!r}")
        self.output = output
        self.execution = check_execution(execution)
        self.execution_cache = ExecutionCache()

    @property
    def priors(self) -> list[nn.Module]:
        """The T cascade priors D_t (``cascades[t].model``)."""
        return [c.model for c in self.cascades]

    @property
    def estimates_coil_maps(self) -> bool:
        """Whether the coil maps come from the sensitivity network. Then the phase of the output image is the
        convention of those maps, which no reference image shares: compare magnitudes (``train.compared_images``)."""
        return self.sens_net is not None

    def image_physics(self, y: torch.Tensor, physics: nn.Module, num_low_frequencies: int | None = None) -> nn.Module:
        """The operator that measures this model's output image: ``physics`` with the model's own coil maps.

        Without ``sens_net`` that is ``physics`` itself. With it, a ``MultiCoilMRI`` with the mask and layout of
        ``physics`` and the sensitivity network's estimate S(y) (B, C, H, W) as coil maps (differentiable), so
        that ``A x`` = M F_c(S x) of the output x can be compared with ``y`` when the true maps are unknown
        (self-supervised fine-tuning; ``physics`` may then be a single-coil ``MRI(mask)``).
        """
        if self.sens_net is None:
            return physics
        maps = self.coil_maps(self.measured_kspace(y, physics), physics, num_low_frequencies)
        return MultiCoilMRI(physics.mask, maps, layout=physics.layout)

    sens_expand = staticmethod(sens_expand)
    sens_reduce = staticmethod(sens_reduce)

    def measured_kspace(self, y: torch.Tensor, physics: nn.Module) -> torch.Tensor:
        """``y`` checked against ``physics`` and as complex (B, C, H, W). With a sensitivity network any
        number of coils is accepted (the physics' maps, if any, are not used)."""
        if not isinstance(physics, MultiCoilMRI):
            raise TypeError(f"physics: VarNet expects MultiCoilMRI or MRI, got {type(physics).__name__}")
        if self.sens_net is None or physics.coil_maps is not None:
            return physics.kspace_in("y", y)
        return physics.kspace_in("y", y, any_coils=True)

    def coil_maps(
        self, y: torch.Tensor, physics: nn.Module, num_low_frequencies: int | None = None
    ) -> torch.Tensor | None:
        """S: the sensitivity network's estimate from ``y`` (complex (B, C, H, W)) and the mask, else the physics'."""
        if self.sens_net is None:
            return physics.coil_maps
        return self.sens_net(y, physics.mask_for(y), num_low_frequencies)

    def reconstruct(
        self,
        y: torch.Tensor,
        physics: nn.Module,
        x0: torch.Tensor | None = None,
        num_low_frequencies: int | None = None,
    ) -> torch.Tensor:
        """The forward pass on checked complex k-space ``y`` (B, C, H, W) (see :meth:`measured_kspace`)."""
        maps = self.coil_maps(y, physics, num_low_frequencies)
        if x0 is None:
            k = y
        else:
            x0_img, _ = physics.image_in("x0", x0)
            k = self.sens_expand(x0_img, maps)
        for cascade in self.cascades:
            k = _maybe_checkpoint(self.checkpointing, cascade, k, y, physics.mask_for(y), maps)
        if self.output == "rss":
            return ifft2c(k).abs().square().sum(dim=1).sqrt()
        return physics.image_out(self.sens_reduce(k, maps), False)

    def forward(
        self,
        y: torch.Tensor,
        physics: nn.Module,
        x0: torch.Tensor | None = None,
        num_low_frequencies: int | None = None,
    ) -> torch.Tensor:
        """Reconstruct from k-space ``y``.

        Args:
            y: measured k-space (B, C, H, W) complex (masked: y = M ⊙ F_c(S x) + noise), or
                real-packed (B, 2, C, H, W) for a ``layout="real_packed"`` physics.
            physics: ``MultiCoilMRI`` / ``MRI``, whose mask (and coil maps, without ``sens_net``) the
                cascades use. With ``sens_net``, an ``MRI(mask)`` will do, whatever the number of coils.
            x0: optional initial image (B, H, W) complex; k_0 = E(x0). Default k_0 = y (fastMRI).
            num_low_frequencies: width of the ACS band for the sensitivity network (fastMRI's
                argument); default: found from the mask.

        Returns:
            ``output="combined"``: R(k_T), complex (B, H, W) (real-packed (B, 2, H, W) for a real-packed
            physics). ``output="rss"``: real (B, H, W), sqrt(Σ_c |F_c^H k_T,c|²).
        """
        _check_solver_inputs(y, x0, physics)
        if check_execution(self.execution) != "eager":
            reason = None
            if x0 is not None or num_low_frequencies is not None:
                reason = "x0 or num_low_frequencies given (graphs start from y, the ACS band found from the mask)"
            out = unrolled_in_graph(self.execution_cache, self.execution, self, self._from_kspace, y, physics, reason)
            if out is not None:
                return out
        else:
            self.execution_cache.last_mode = "eager"
        return self.reconstruct(self.measured_kspace(y, physics), physics, x0, num_low_frequencies)

    def _from_kspace(self, y: torch.Tensor, physics: nn.Module) -> torch.Tensor:
        return self.reconstruct(self.measured_kspace(y, physics), physics)

    # -- configs ----------------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Constructor arguments as plain JSON; the T cascade priors and the sensitivity network as nested configs."""
        return {
            "num_cascades": self.num_cascades,
            "priors": [config_of(p) for p in self.priors],
            "chans": self.chans,
            "pools": self.pools,
            "dc_weight_init": self.dc_weight_init,
            "checkpointing": self.checkpointing,
            "sens_net": None if self.sens_net is None else config_of(self.sens_net),
            "sens_chans": self.sens_chans,
            "sens_pools": self.sens_pools,
            "mask_center": self.mask_center,
            "output": self.output,
            "execution": self.execution,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VarNet:
        args = dict(config)
        args["priors"] = [build(c) for c in args["priors"]]
        if args.get("sens_net") is not None:
            args["sens_net"] = build(args["sens_net"])
        return cls(**args)

    def extra_repr(self) -> str:
        return f"num_cascades={self.num_cascades}, output={self.output!r}, checkpointing={self.checkpointing}"
