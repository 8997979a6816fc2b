"""EDSR-style prior: SPADE's DEQ denoiser (residual blocks, no normalisation layers).

h0 = head(x)                                         conv3x3  in_channels -> w
h_{k+1} = h_k + res_scale * conv2_k(relu(conv1_k(h_k)))   conv3x3  w -> m_k -> w,  k = 0..K-1
y = tail(h0 + body_end(h_K))                         conv3x3  w -> w, then w -> out_channels
(y = x + y when residual_to_input)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mbdl_fast._registry import register
from mbdl_fast._validate import check_int, check_number
from mbdl_fast.priors._common import MAX_LAYERS, check_prior_input, kwargs_from_config, positive_int, resolve_widths


class _ResBlock(nn.Module):
    """h + res_scale * conv2(relu(conv1(h))): conv3x3 width -> inner -> width."""

    def __init__(self, width: int, inner: int, res_scale: float, bias: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, inner, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(inner, width, 3, padding=1, bias=bias)
        self.res_scale = res_scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.conv2(torch.relu(self.conv1(h)))
        return h + (r if self.res_scale == 1.0 else r * self.res_scale)


@register("EDSR")
class EDSR(nn.Module):
    r"""EDSR-style residual CNN prior (SPADE's DEQ prior: 2 -> 64, 13 residual blocks, 64 -> 2).

    Maps real ``(B, in_channels, H, W)`` to real ``(B, out_channels, H, W)``; any ``H, W``.
    With :math:`K` = ``num_blocks``, tied width :math:`w` and inner widths :math:`m_k`:

    .. math::
        h_0 = \mathrm{head}(x),\quad
        h_{k+1} = h_k + s\,C^{(2)}_k(\mathrm{ReLU}(C^{(1)}_k(h_k))),\quad
        y = \mathrm{tail}(h_0 + \mathrm{body\_end}(h_K))

    (``y + x`` when ``residual_to_input``), all convolutions 3x3 with padding 1, :math:`s` = ``res_scale``.

    **Widths.** ``widths`` lists the output channels of every internal convolution, length
    ``2 * num_blocks + 2``, in this order::

        index 0             head            (tied)
        index 1 + 2k        blocks[k].conv1 (inner width m_k, free)
        index 2 + 2k        blocks[k].conv2 (tied)
        index 2K + 1        body_end        (tied)

    The tied entries (head, every ``conv2``, ``body_end``) are joined by the residual additions
    and must all be equal; each block's inner width is free, and is what channel pruning shrinks.
    ``tail`` outputs ``out_channels`` and is not in the list. ``width`` (default 64) sets every
    entry at once; pass ``width`` or ``widths``, not both.

    Args:
        in_channels: input channels (2: real and imaginary parts of a complex image).
        out_channels: output channels.
        width: uniform width of every internal convolution (64 when neither it nor ``widths`` is given).
        num_blocks: number of residual blocks K.
        widths: per-layer widths, as above.
        res_scale: scale s of each residual branch (EDSR's residual scaling; 1 keeps it off).
        residual_to_input: return ``x + tail(...)`` (needs ``in_channels == out_channels``). Off by
            default, as SPADE's prior: the network outputs the denoised image itself.
        bias: biases in every convolution.

    ``forward(x, sigma=None)`` is deepinv's denoiser call; this prior is not noise-conditional and
    ignores ``sigma``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 2,
        width: int | None = None,
        num_blocks: int = 13,
        widths: Sequence[int] | None = None,
        res_scale: float = 1.0,
        residual_to_input: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.num_blocks = check_int("num_blocks", num_blocks, 0, MAX_LAYERS)
        layout = "head, then conv1 and conv2 of each block, then body_end"
        self.widths = resolve_widths("width", width, widths, 64, 2 * num_blocks + 2, layout)
        tied = [self.widths[i] for i in self.tied_widths()[0]]
        if len(set(tied)) != 1:
            raise ValueError(
                "widths: head (index 0), every block's conv2 (indices 2, 4, ...) and body_end (last index) "
                f"are joined by residual additions and must be equal, got {tied} in {list(self.widths)}"
            )
        if residual_to_input and in_channels != out_channels:
            raise ValueError(
                f"residual_to_input: needs in_channels == out_channels, got {in_channels} and {out_channels}"
            )
        self.res_scale = check_number("res_scale", res_scale)
        self.residual_to_input = bool(residual_to_input)
        self.bias = bool(bias)

        w = self.widths[0]
        self.head = nn.Conv2d(in_channels, w, 3, padding=1, bias=bias)
        self.blocks = nn.ModuleList(
            _ResBlock(w, self.widths[1 + 2 * k], self.res_scale, bias) for k in range(num_blocks)
        )
        self.body_end = nn.Conv2d(w, w, 3, padding=1, bias=bias)
        self.tail = nn.Conv2d(w, out_channels, 3, padding=1, bias=bias)

    def width_layers(self) -> list[str]:
        """Module name of the convolution whose output channels each ``widths`` entry gives."""
        names = ["head"]
        for k in range(self.num_blocks):
            names += [f"blocks.{k}.conv1", f"blocks.{k}.conv2"]
        return names + ["body_end"]

    def tied_widths(self) -> list[list[int]]:
        """Groups of ``widths`` indices that must stay equal: [head, every conv2, body_end]."""
        return [[0, *range(2, 2 * self.num_blocks + 1, 2), 2 * self.num_blocks + 1]]

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Real ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``; ``sigma`` is ignored."""
        check_prior_input(x, self.in_channels, self)
        h0 = self.head(x)
        h = h0
        for block in self.blocks:
            h = block(h)
        y = self.tail(h0 + self.body_end(h))
        return x + y if self.residual_to_input else y

    def to_config(self) -> dict[str, Any]:
        """Plain-JSON constructor arguments, every width explicit."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_blocks": self.num_blocks,
            "widths": list(self.widths),
            "res_scale": self.res_scale,
            "residual_to_input": self.residual_to_input,
            "bias": self.bias,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EDSR:
        return cls(**kwargs_from_config(cls, config))
