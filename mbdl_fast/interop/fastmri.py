"""fastMRI users: load fastMRI's VarNet (end-to-end) and U-Net weights, and feed fastMRI's tensors.

fastMRI's module names are ours (``mbdl_fast.priors.UNet``, ``mbdl_fast.solvers.VarNet``), so a fastMRI
state dict loads strictly, with no renaming; the architecture (cascades, per-layer widths, poolings,
the sensitivity network) is read from the tensors' shapes, so pruned or resized models load too.

    from mbdl_fast.interop.fastmri import load_varnet, varnet_inputs

    model = load_varnet("knee_leaderboard_state_dict.pt")   # or a state dict, or a Lightning .ckpt
    y, physics = varnet_inputs(masked_kspace, mask)          # fastMRI's (B, C, H, W, 2) and (B, 1, 1, W, 1)
    image = model(y, physics)                                # (B, H, W), fastMRI's VarNet output

fastmri itself is not needed here (only to compare, in the tests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from mbdl_fast._validate import check_tensor, describe
from mbdl_fast.complex import from_fastmri
from mbdl_fast.physics import MRI
from mbdl_fast.priors import NormUNet, UNet
from mbdl_fast.priors.unet import unet_width_layers
from mbdl_fast.solvers.varnet import SensitivityModel, VarNet

__all__ = ["load_unet", "load_varnet", "varnet_inputs"]

StateSource = Mapping[str, torch.Tensor] | str | os.PathLike[str]


def _state_dict(source: StateSource, marker: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of one model from a state dict or a ``.pt`` / Lightning ``.ckpt`` file, prefix removed.

    The prefix is what precedes ``marker`` in the shortest key ending with it (``varnet.`` in a
    Lightning checkpoint, ``module.`` after DataParallel); keys outside it (a Lightning module's
    loss buffers) are left out.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"source: no such file {path}")
        source = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise TypeError(f"source: expected a state dict or a path to one, got {type(source).__name__}")
    state = source.get("state_dict", source)
    if not isinstance(state, Mapping):
        raise TypeError(f"source: 'state_dict' is a {type(state).__name__}, not a state dict")
    keys = sorted((k for k in state if isinstance(k, str) and k.endswith(marker)), key=len)
    if not keys:
        shown = list(state)[:6]
        raise ValueError(f"source: not a fastMRI {what} state dict (no key ending in {marker!r}); keys start {shown}")
    prefix = keys[0][: -len(marker)]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _unet_args(state: Mapping[str, torch.Tensor], prefix: str) -> dict:
    """``UNet`` constructor arguments (every width explicit) from the fastMRI U-Net tensors under ``prefix``."""
    pools = 0
    while f"{prefix}down_sample_layers.{pools}.layers.0.weight" in state:
        pools += 1
    if pools == 0:
        raise ValueError(f"source: no fastMRI U-Net under {prefix!r} ({prefix}down_sample_layers.0.layers.0.weight)")
    widths = []
    for name in unet_width_layers(pools):
        weight = state[f"{prefix}{name}.weight"]
        widths.append(weight.shape[1] if "up_transpose_conv" in name else weight.shape[0])  # (in, out, 2, 2)
    return {
        "in_channels": state[f"{prefix}down_sample_layers.0.layers.0.weight"].shape[1],
        "out_channels": state[f"{prefix}up_conv.{pools - 1}.1.weight"].shape[0],
        "num_pool_layers": pools,
        "widths": widths,
    }


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> torch.nn.Module:
    model.load_state_dict(dict(state), strict=True)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    return model.eval()


def load_unet(source: StateSource, drop_prob: float = 0.0) -> torch.nn.Module:
    """fastMRI's ``Unet`` (``fastmri.models.Unet``, e.g. the single-coil U-Net baseline) as ``mbdl_fast.priors.UNet``.

    Args:
        source: its state dict, or a file holding one (``torch.save``'d, or a Lightning checkpoint of
            fastMRI's ``UnetModule``); read with ``weights_only=True`` (no pickle code runs).
        drop_prob: Dropout2d probability (not in the weights; fastMRI's default 0).

    Returns:
        ``UNet`` in eval mode, real (B, in_chans, H, W) -> (B, out_chans, H, W), equal to fastMRI's ``Unet``.
    """
    state = _state_dict(source, "down_sample_layers.0.layers.0.weight", "Unet")
    return _load_strict(UNet(drop_prob=drop_prob, **_unet_args(state, "")), state, "Unet")


def load_varnet(
    source: StateSource, mask_center: bool = True, output: str = "rss", drop_prob: float = 0.0
) -> torch.nn.Module:
    """fastMRI's ``VarNet`` (the end-to-end VarNet, ``fastmri.models.VarNet``) as ``mbdl_fast.solvers.VarNet``.

    Args:
        source: its state dict, or a file holding one (fastMRI's released ``*_state_dict.pt``, or a
            Lightning checkpoint of ``VarNetModule``); read with ``weights_only=True``. Without
            ``sens_net.*`` tensors the model uses the physics' coil maps instead.
        mask_center: the sensitivity network's ``mask_center`` (not in the weights; fastMRI's default True).
        output: ``"rss"`` (fastMRI's magnitude output) or ``"combined"`` (the complex image combined
            with the estimated maps).
        drop_prob: Dropout2d probability of every U-Net (not in the weights; fastMRI's default 0).

    Returns:
        ``VarNet`` in eval mode; ``model(y, physics)`` with ``(y, physics) = varnet_inputs(masked_kspace,
        mask)`` equals fastMRI's ``model(masked_kspace, mask)``.
    """
    state = _state_dict(source, "cascades.0.dc_weight", "VarNet")
    num_cascades = 0
    while f"cascades.{num_cascades}.dc_weight" in state:
        num_cascades += 1
    priors = [
        NormUNet(drop_prob=drop_prob, **_unet_args(state, f"cascades.{t}.model.unet.")) for t in range(num_cascades)
    ]
    sens_net: SensitivityModel | bool = False
    sens_chans, sens_pools = 8, 4
    if any(k.startswith("sens_net.") for k in state):
        args = _unet_args(state, "sens_net.norm_unet.unet.")
        sens_net = SensitivityModel(
            num_pool_layers=args["num_pool_layers"], drop_prob=drop_prob, mask_center=mask_center, widths=args["widths"]
        )
        sens_chans, sens_pools = args["widths"][0], args["num_pool_layers"]
    model = VarNet(
        num_cascades,
        priors=priors,
        chans=priors[0].widths[0],
        pools=priors[0].unet.num_pool_layers,
        sens_net=sens_net,
        sens_chans=sens_chans,
        sens_pools=sens_pools,
        mask_center=mask_center,
        output=output,
    )
    return _load_strict(model, state, "VarNet")


def varnet_inputs(masked_kspace: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
    """fastMRI's VarNet inputs as ours: ``(y, physics)`` for ``mbdl_fast.solvers.VarNet``.

    Args:
        masked_kspace: real (B, C, H, W, 2), fastMRI's layout.
        mask: fastMRI's column mask, bool or real (B, 1, 1, W, 1) (or (1, 1, W, 1)).

    Returns:
        y complex (B, C, H, W) and ``MRI(mask)``, mask real (B, 1, 1, W), float64 for float64 k-space
        (the operator carries the mask and layout; a VarNet with a sensitivity network takes any number of coils).
    """
    check_tensor("masked_kspace", masked_kspace)
    if masked_kspace.is_complex() or masked_kspace.dim() != 5 or masked_kspace.shape[-1] != 2:
        raise ValueError(f"masked_kspace: expected fastMRI's real (B, C, H, W, 2), got {describe(masked_kspace)}")
    check_tensor("mask", mask)
    if mask.dim() not in (4, 5) or mask.shape[-1] != 1 or mask.shape[-3] != 1:
        raise ValueError(f"mask: expected fastMRI's column mask (B, 1, 1, W, 1) or (1, 1, W, 1), got {describe(mask)}")
    y = from_fastmri(masked_kspace)
    real = masked_kspace.dtype if masked_kspace.is_floating_point() else torch.float32
    return y, MRI(mask[..., 0].to(real))
