r"""Parameter and multiply-accumulate (MAC) counts of priors and of the solvers that apply them.

MACs are those of the convolutions and linear layers only, per image, counted by forward hooks on
one forward pass at the given input shape:

.. math::
    \mathrm{Conv}:\ C_\mathrm{out} \prod_d S^\mathrm{out}_d \cdot \frac{C_\mathrm{in}}{g} \prod_d k_d,\qquad
    \mathrm{ConvTranspose}:\ C_\mathrm{in} \prod_d S^\mathrm{in}_d \cdot \frac{C_\mathrm{out}}{g} \prod_d k_d,\qquad
    \mathrm{Linear}:\ (\text{output elements}) \cdot F_\mathrm{in}

(S the spatial sizes, k the kernel sizes, g the groups). Bias additions, activations, norms,
poolings and the data-consistency steps (FFTs, coil maps) are not counted: for the priors here
they are a few per cent of the convolutions, and they do not shrink with pruning.

A solver applies its prior(s) many times. For a solver, ``macs`` is the cost of one prior
application (the mean over its priors when they differ); ``macs_per_forward`` is the cost of one
forward pass where the number of applications is fixed (DeepUnfolding: K; VarNet: T cascades, plus
the sensitivity network once where it has one, although it runs once per coil;
RecursiveUnfolding in eval mode: L·R), and ``None`` for a DEQ, whose forward costs
(solver iterations + 1) x ``macs`` (one application of T per iteration, plus the differentiable
output application).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mbdl_fast.prune.channels import _example_for, _UnitHarness
from mbdl_fast.solvers import DEQ, DeepUnfolding, RecursiveUnfolding, VarNet, find_priors, is_solver

__all__ = ["count_params_and_macs", "conv_macs"]


def _module_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    """MACs of one call of a conv / transposed conv / linear layer on a whole batch."""
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        if module.transposed:
            x = inputs[0]
            spatial_in = math.prod(x.shape[2:])
            return x.shape[0] * module.in_channels * spatial_in * (module.out_channels // module.groups) * kernel
        spatial_out = math.prod(output.shape[2:])
        return output.shape[0] * module.out_channels * spatial_out * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def conv_macs(module: nn.Module, *args: Any, images: int = 1, **kwargs: Any) -> int:
    """MACs of the convolutions and linear layers in one call ``module(*args, **kwargs)``, per image.

    ``images`` is the number of images the call processes (the batch size), by which the total is divided.
    """
    total = 0

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += _module_macs(m, inputs, output)

    layers = [m for m in module.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return total // max(images, 1)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) < 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape: expected (C, H, W) or (B, C, H, W) positive ints, got {input_shape!r}")
    return shape


def count_params_and_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """Parameters and conv/linear MACs per image of a prior, or of one prior application in a solver.

    Args:
        model: a prior (EDSR, DnCNN, UNet, NormUNet, any ``nn.Module`` on real images), or a solver
            (DEQ, DeepUnfolding, VarNet, RecursiveUnfolding) whose priors are found as in
            :func:`mbdl_fast.prune.prune_channels`.
        input_shape: the real input of the prior, ``(C, H, W)`` or ``(B, C, H, W)``; e.g.
            ``(2, 320, 320)`` for a complex MRI image seen as 2 real channels.

    Returns:
        For a prior: ``{"params": P, "macs": M}`` (``M`` per image, see the module docstring).
        For a solver, also ``"priors"`` (``{name: {"params", "macs"}}`` for each distinct prior),
        ``"applications_per_forward"`` and ``"macs_per_forward"`` (``None`` for a DEQ), and
        ``"params"`` counts the whole solver (step sizes, modulation MLPs included).
    """
    shape = _shape(input_shape)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    units = find_priors(model)
    per_prior: dict[str, dict[str, int]] = {}
    modes = {m: m.training for m in model.modules()}
    model.eval()  # inference cost: no training-only branches (ISTA-Net+'s symmetry term)
    try:
        for name, unit in units:
            x = _example_for(unit, shape)
            harness = _UnitHarness(unit, x, markers=False)
            per_prior[name] = {"params": _params(unit), "macs": conv_macs(harness, x, images=shape[0])}
    finally:
        for m, mode in modes.items():
            m.train(mode)
    if not is_solver(model):
        (only,) = per_prior.values()
        return {"params": _params(model), "macs": only["macs"]}

    applications = _applications(model, [name for name, _ in units])
    mean = round(sum(p["macs"] for p in per_prior.values()) / len(per_prior))
    if applications is None:
        per_forward = None
        count = None
    else:
        per_forward = sum(per_prior[name]["macs"] for name in applications)
        count = len(applications)
    return {
        "params": _params(model),
        "macs": mean,
        "priors": per_prior,
        "applications_per_forward": count,
        "macs_per_forward": per_forward,
    }


def _applications(model: nn.Module, names: list[str]) -> list[str] | None:
    """The prior applied at each application of one forward pass (by name), or None when not fixed (DEQ)."""
    if isinstance(model, DEQ):
        return None
    if isinstance(model, DeepUnfolding):
        return [f"priors.{0 if model.tied else k}" for k in range(model.num_iters)]
    if isinstance(model, VarNet):
        # The sensitivity network runs once per coil; counted once here (per image and coil).
        sens = [name for name in names if name.startswith("sens_net.")]
        return [f"cascades.{t}.model" for t in range(model.num_cascades)] + sens
    if isinstance(model, RecursiveUnfolding):
        return [f"blocks.{i}" for i in range(model.num_blocks) for _ in range(model.max_recursions)]
    return list(names)  # a user solver with .prior / .priors: each prior once
