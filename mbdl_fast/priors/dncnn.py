"""DnCNN prior (Zhang et al., "Beyond a Gaussian Denoiser", TIP 2017): residual learning of the noise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mbdl_fast._registry import register
from mbdl_fast._validate import check_int
from mbdl_fast.priors._common import MAX_LAYERS, check_prior_input, kwargs_from_config, positive_int, resolve_widths


@register("DnCNN")
class DnCNN(nn.Module):
    r"""DnCNN: ``depth`` 3x3 convolutions, ReLU between them, optional batch norm on the middle ones.

    Maps real ``(B, in_channels, H, W)`` to real ``(B, out_channels, H, W)``; any ``H, W``.
    With :math:`D` = ``depth`` and :math:`C_i` the i-th convolution (padding 1):

    .. math::
        h_1 = \mathrm{ReLU}(C_0(x)),\quad
        h_{i+1} = \mathrm{ReLU}(\mathrm{BN}_i(C_i(h_i)))\ (i = 1..D-2),\quad
        n = C_{D-1}(h_{D-1})

    and the output is :math:`x - n` when ``residual`` (the network estimates the noise, as in
    Zhang et al.), :math:`n` otherwise. ``BN_i`` is the identity unless ``batch_norm``.

    **Widths.** ``widths`` lists the output channels of convolutions ``0 .. D-2`` (length
    ``depth - 1``; the last one outputs ``out_channels``). No entry is tied to another: there is
    no residual addition inside the network, so channel pruning may shrink each one freely.
    ``width`` (default 64) sets every entry at once; pass ``width`` or ``widths``, not both.
    Convolution ``i`` is ``convs[i]``, its batch norm (when on) ``norms[i - 1]``.

    Args:
        in_channels, out_channels: channels of input and output (2 each for a complex image).
        depth: number of convolutions D >= 2 (17 in Zhang et al.).
        width: uniform width (64 when neither it nor ``widths`` is given).
        widths: per-layer widths, as above.
        bias: biases in every convolution.
        batch_norm: BatchNorm2d after convolutions 1 .. D-2 (off by default: a prior inside a
            DEQ or unrolled network should not depend on batch statistics).
        residual: output ``x - n`` (needs ``in_channels == out_channels``).

    ``forward(x, sigma=None)`` is deepinv's denoiser call; this prior is not noise-conditional and
    ignores ``sigma``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 2,
        depth: int = 17,
        width: int | None = None,
        widths: Sequence[int] | None = None,
        bias: bool = True,
        batch_norm: bool = False,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.depth = check_int("depth", depth, 2, MAX_LAYERS)  # >= 2: a first and a last convolution
        self.widths = resolve_widths("width", width, widths, 64, depth - 1, "outputs of convs 0 .. depth-2")
        if residual and in_channels != out_channels:
            raise ValueError(f"residual: needs in_channels == out_channels, got {in_channels} and {out_channels}")
        self.bias = bool(bias)
        self.batch_norm = bool(batch_norm)
        self.residual = bool(residual)

        chans = [in_channels, *self.widths, out_channels]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=bias) for i in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm2d(w) for w in self.widths[1:]) if batch_norm else None

    def width_layers(self) -> list[str]:
        """Module name of the convolution whose output channels each ``widths`` entry gives."""
        return [f"convs.{i}" for i in range(self.depth - 1)]

    def tied_widths(self) -> list[list[int]]:
        """Groups of ``widths`` indices that must stay equal: none in DnCNN."""
        return []

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Real ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``; ``sigma`` is ignored."""
        check_prior_input(x, self.in_channels, self)
        h = torch.relu(self.convs[0](x))
        for i in range(1, self.depth - 1):
            h = self.convs[i](h)
            if self.norms is not None:
                h = self.norms[i - 1](h)
            h = torch.relu(h)
        n = self.convs[-1](h)
        return x - n if self.residual else n

    def to_config(self) -> dict[str, Any]:
        """Plain-JSON constructor arguments, every width explicit."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "depth": self.depth,
            "widths": list(self.widths),
            "bias": self.bias,
            "batch_norm": self.batch_norm,
            "residual": self.residual,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DnCNN:
        return cls(**kwargs_from_config(cls, config))
