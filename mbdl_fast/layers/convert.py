"""``to_fast(model)``: replace a prior's conv / activation / residual patterns by fused ``FastConv2d`` layers, in place.

Patterns, each computing exactly what the original forward computes:

- EDSR (``mbdl_fast.priors.EDSR``): each residual block's conv1 + ReLU -> one layer, its conv2 +
  res_scale + skip add -> one layer; ``body_end`` + the long skip (h0) -> one layer; ``tail`` (+ x
  when ``residual_to_input``) -> one layer. 2 launches per block instead of 5.
- DnCNN (``mbdl_fast.priors.DnCNN``, no batch norm): conv + ReLU -> one layer, the last conv +
  ``x - n`` -> one layer (res_scale -1). With batch norm: plain FastConv2d (BN sits between conv and ReLU).
- ``nn.Sequential``: Conv2d followed by ReLU / LeakyReLU -> one layer and an ``nn.Identity``.
- Any other ``nn.Conv2d`` (exactly that class) whose geometry the fused kernel takes: ``FastConv2d``.

Parameters are shared, not copied, and state-dict keys do not change, so checkpoints load either
way. Converted modules get an instance ``forward`` (their class, config and ``to_config`` are
untouched). Prune first, then convert: the pruner traces plain ``nn.Conv2d`` graphs.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from mbdl_fast.layers.conv import FastConv2d
from mbdl_fast.ops.conv2d import unsupported_reason
from mbdl_fast.priors._common import check_prior_input
from mbdl_fast.priors.dncnn import DnCNN
from mbdl_fast.priors.edsr import EDSR, _ResBlock

_MARK = "_mbdl_fast_converted"


def _bind(module: nn.Module, forward: Callable) -> None:
    module.forward = types.MethodType(forward, module)
    setattr(module, _MARK, True)


def _edsr_block_forward(self, h: torch.Tensor) -> torch.Tensor:
    return self.conv2(self.conv1(h), h)


def _edsr_forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
    check_prior_input(x, self.in_channels)
    h0 = self.head(x)
    h = h0
    for block in self.blocks:
        h = block(h)
    h = self.body_end(h, h0)
    return self.tail(h, x) if self.residual_to_input else self.tail(h)


def _dncnn_forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
    check_prior_input(x, self.in_channels)
    h = x
    for conv in self.convs[:-1]:
        h = conv(h)
    return self.convs[-1](h, x) if self.residual else self.convs[-1](h)


class _Converter:
    def __init__(self, backend: str, allow_tf32: bool) -> None:
        self.options = {"backend": backend, "allow_tf32": allow_tf32}

    def fast(self, conv: nn.Conv2d, **fusion) -> FastConv2d:
        if isinstance(conv, FastConv2d):
            raise ValueError(f"to_fast: {conv} is already a FastConv2d; convert a model once")
        return FastConv2d.from_conv(conv, **fusion, **self.options)

    def edsr_block(self, block: nn.Module) -> None:
        block.conv1 = self.fast(block.conv1, activation="relu")
        block.conv2 = self.fast(block.conv2, residual=True, res_scale=block.res_scale)
        _bind(block, _edsr_block_forward)

    def edsr(self, prior: nn.Module) -> None:
        prior.head = self.fast(prior.head)
        for block in prior.blocks:
            self.edsr_block(block)
        prior.body_end = self.fast(prior.body_end, residual=True)
        prior.tail = self.fast(prior.tail, residual=prior.residual_to_input)
        _bind(prior, _edsr_forward)

    def dncnn(self, prior: nn.Module) -> None:
        last = len(prior.convs) - 1
        if prior.norms is not None:
            for i in range(len(prior.convs)):
                prior.convs[i] = self.fast(prior.convs[i])
            setattr(prior, _MARK, True)
            return
        for i in range(last):
            prior.convs[i] = self.fast(prior.convs[i], activation="relu")
        prior.convs[last] = self.fast(
            prior.convs[last], residual=prior.residual, res_scale=-1.0 if prior.residual else 1.0
        )
        _bind(prior, _dncnn_forward)

    def sequential(self, seq: nn.Sequential) -> None:
        names = list(seq._modules)
        for here, after in zip(names, names[1:], strict=False):
            conv, act = seq._modules[here], seq._modules[after]
            if type(conv) is nn.Conv2d and isinstance(act, (nn.ReLU, nn.LeakyReLU)) and _convertible(conv):
                seq._modules[here] = self.fast(conv, activation=act)
                seq._modules[after] = nn.Identity()

    def walk(self, module: nn.Module) -> None:
        if getattr(module, _MARK, False):
            return
        if type(module) is EDSR:
            self.edsr(module)
        elif type(module) is _ResBlock:
            self.edsr_block(module)
        elif type(module) is DnCNN:
            self.dncnn(module)
        elif isinstance(module, nn.Sequential):
            self.sequential(module)
        for name, child in list(module.named_children()):
            if type(child) is nn.Conv2d and _convertible(child):
                setattr(module, name, self.fast(child))
            else:
                self.walk(child)


def _convertible(conv: nn.Conv2d) -> bool:
    return (
        unsupported_reason(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.padding_mode,
        )  # fmt: skip
        is None
    )


def to_fast(model: nn.Module, backend: str = "auto", allow_tf32: bool = True) -> nn.Module:
    """Convert ``model``'s conv / activation / residual patterns to fused ``FastConv2d`` layers, in place.

    Works on a prior, or on a solver holding priors (DEQ, DeepUnfolding, VarNet, ...): every
    submodule is visited. Outputs are unchanged up to the fused kernel's rounding (bit-identical on
    a CPU, where every layer runs F.conv2d). Returns ``model``.

    Args:
        backend: of every FastConv2d: "auto" (timed per shape on a GPU, F.conv2d on a CPU), "torch", "triton".
        allow_tf32: TF32 tensor cores for float32 convolutions (False: exact fp32).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Conv2d):
        raise TypeError("model: a bare nn.Conv2d cannot be converted in place; use FastConv2d.from_conv(conv)")
    _Converter(backend, allow_tf32).walk(model)
    return model


def fast_layers(model: nn.Module) -> list[str]:
    """One line per FastConv2d in ``model``: its name, shape and what is fused (or why it falls back)."""
    lines = []
    for name, m in model.named_modules():
        if isinstance(m, FastConv2d):
            fused = [m.activation] if m.activation != "none" else []
            if m.residual:
                fused.append(f"residual x{m.res_scale:g}")
            k = "x".join(map(str, m.kernel_size))
            where = f"falls back: {m.unsupported}" if m.unsupported else f"backend {m.backend}"
            lines.append(f"{name}: {k} {m.in_channels}->{m.out_channels}, fused [{', '.join(fused)}], {where}")
    return lines
