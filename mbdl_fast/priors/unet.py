"""fastMRI's U-Net and VarNet's normalised U-Net, with per-layer widths.

Module names follow fastMRI's ``Unet`` (``down_sample_layers``, ``conv``, ``up_transpose_conv``,
``up_conv``, each block's ``layers``), so a state dict of fastMRI's ``Unet`` with the default
widths loads into ``UNet``, and one of its ``NormUnet`` into ``NormUNet``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.functional import avg_pool2d, pad

from mbdl_fast._registry import register
from mbdl_fast._validate import describe
from mbdl_fast.priors._common import check_prior_input, kwargs_from_config, positive_int, resolve_widths


class _ConvBlock(nn.Module):
    """(conv3x3 no bias -> InstanceNorm2d -> LeakyReLU(0.2) -> Dropout2d) twice: in -> mid -> out."""

    def __init__(self, in_chans: int, mid_chans: int, out_chans: int, drop_prob: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_chans, mid_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(mid_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
            nn.Conv2d(mid_chans, out_chans, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Dropout2d(drop_prob),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _TransposeConvBlock(nn.Module):
    """ConvTranspose2d(k=2, s=2, no bias) -> InstanceNorm2d -> LeakyReLU(0.2): doubles H and W."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.ConvTranspose2d(in_chans, out_chans, kernel_size=2, stride=2, bias=False),
            nn.InstanceNorm2d(out_chans),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _default_unet_widths(chans: int, num_pool_layers: int) -> list[int]:
    """fastMRI's widths: chans doubling at each pooling, both convolutions of a block alike."""
    P = num_pool_layers
    down = [chans * 2**i for i in range(P) for _ in range(2)]
    up = [chans * 2 ** (P - 1 - j) for j in range(P) for _ in range(3)]
    return down + [chans * 2**P] * 2 + up


def unet_width_layers(num_pool_layers: int) -> list[str]:
    """Module names (fastMRI's) of the convolutions whose output channels the ``widths`` entries give, in order."""
    P = num_pool_layers
    names = []
    for i in range(P):
        names += [f"down_sample_layers.{i}.layers.0", f"down_sample_layers.{i}.layers.4"]
    names += ["conv.layers.0", "conv.layers.4"]
    for j in range(P):
        block = f"up_conv.{j}.0" if j == P - 1 else f"up_conv.{j}"
        names += [f"up_transpose_conv.{j}.layers.0", f"{block}.layers.0", f"{block}.layers.4"]
    return names


_UNET_LAYOUT = (
    "for each down level: conv a, conv b; bottleneck conv a, conv b; "
    "for each up level, deepest first: transpose conv, conv a, conv b"
)


@register("UNet")
class UNet(nn.Module):
    r"""fastMRI's U-Net (VarNet's regulariser): 18 channels and 4 poolings by default.

    Maps real ``(B, in_channels, H, W)`` to real ``(B, out_channels, H, W)`` for
    ``H, W >= 2 ** num_pool_layers`` whose bottleneck, ``H // 2^P`` by ``W // 2^P``, has at least 2
    pixels (instance norm over one pixel is undefined). With :math:`P` = ``num_pool_layers``:

    - down level :math:`i = 0..P-1`: ConvBlock, its output kept as skip :math:`s_i`, then 2x2
      average pooling;
    - bottleneck ConvBlock;
    - up level :math:`j = 0..P-1` (deepest first): TransposeConvBlock (doubles H, W; a missing
      last row/column for odd sizes is filled by reflect padding, as fastMRI), concatenation
      ``[upsampled, s_{P-1-j}]`` along channels, ConvBlock;
    - a final 1x1 convolution with bias to ``out_channels``.

    A ConvBlock is (conv3x3 without bias -> InstanceNorm2d -> LeakyReLU(0.2) -> Dropout2d) twice
    (conv a, conv b); a TransposeConvBlock is ConvTranspose2d(2, stride 2, no bias) ->
    InstanceNorm2d -> LeakyReLU(0.2). Instance norms have no affine parameters.

    **Widths.** ``widths`` lists the output channels of every internal convolution, length
    ``5 P + 2``, in this order::

        2i, 2i + 1              down level i: conv a, conv b          (i = 0..P-1)
        2P, 2P + 1              bottleneck: conv a, conv b
        2P+2+3j, +3j+3, +3j+4   up level j: transpose, conv a, conv b (j = 0..P-1, deepest first)

    No entry is tied to another: skips are concatenated, never added, so pruning may shrink
    every entry freely. Up level j's conv a reads ``widths[2P+2+3j] + widths[2(P-1-j)+1]``
    channels (upsampled first, then the skip); its transpose conv reads the previous level's
    conv b (the bottleneck's conv b for j = 0); the final 1x1 conv reads up level P-1's conv b.
    The default (``chans`` c) is fastMRI's: down level i ``c 2^i`` (both convs), bottleneck
    ``c 2^P``, up level j ``c 2^(P-1-j)`` (all three). Pass ``chans`` or ``widths``, not both.
    ``ConvTranspose2d`` weights are ``(in, out, 2, 2)``: their output channels are dimension 1.

    Args:
        in_channels, out_channels: channels of input and output.
        chans: width of the first convolution, doubled at each pooling (18 when neither it nor
            ``widths`` is given).
        num_pool_layers: number of poolings P >= 1.
        drop_prob: Dropout2d probability.
        widths: per-layer widths, as above.

    ``forward(x, sigma=None)`` is deepinv's denoiser call; this prior is not noise-conditional and
    ignores ``sigma``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 2,
        chans: int | None = None,
        num_pool_layers: int = 4,
        drop_prob: float = 0.0,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        P = positive_int("num_pool_layers", num_pool_layers, maximum=16)  # 2^16 pixels per side at least
        self.num_pool_layers = P
        if not 0.0 <= float(drop_prob) <= 1.0:
            raise ValueError(f"drop_prob: expected a probability in [0, 1], got {drop_prob!r}")
        self.drop_prob = float(drop_prob)
        if widths is None:
            widths = _default_unet_widths(positive_int("chans", 18 if chans is None else chans), P)
            chans = None
        self.widths = resolve_widths("chans", chans, widths, 18, 5 * P + 2, _UNET_LAYOUT)
        w = self.widths

        self.down_sample_layers = nn.ModuleList()
        ch = in_channels
        for i in range(P):
            self.down_sample_layers.append(_ConvBlock(ch, w[2 * i], w[2 * i + 1], self.drop_prob))
            ch = w[2 * i + 1]
        self.conv = _ConvBlock(ch, w[2 * P], w[2 * P + 1], self.drop_prob)
        ch = w[2 * P + 1]

        self.up_transpose_conv = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for j in range(P):
            t, a, b = w[2 * P + 2 + 3 * j : 2 * P + 5 + 3 * j]
            skip = w[2 * (P - 1 - j) + 1]
            self.up_transpose_conv.append(_TransposeConvBlock(ch, t))
            block = _ConvBlock(t + skip, a, b, self.drop_prob)
            if j == P - 1:
                block = nn.Sequential(block, nn.Conv2d(b, out_channels, kernel_size=1, stride=1))
            self.up_conv.append(block)
            ch = b

    def width_layers(self) -> list[str]:
        """Module name of the convolution whose output channels each ``widths`` entry gives."""
        return unet_width_layers(self.num_pool_layers)

    def tied_widths(self) -> list[list[int]]:
        """Groups of ``widths`` indices that must stay equal: none in the U-Net."""
        return []

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Real ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``; ``sigma`` is ignored."""
        check_prior_input(x, self.in_channels, self)
        least = 2**self.num_pool_layers
        h, w = x.shape[-2:]
        if h < least or w < least or (h // least) * (w // least) < 2:
            # Instance norm over a single pixel is undefined (PyTorch refuses it): the bottleneck needs two.
            raise ValueError(
                f"x: expected H, W >= 2 ** num_pool_layers = {least} and at least 2 bottleneck pixels "
                f"((H // {least}) * (W // {least}) >= 2), got {describe(x)}"
            )
        stack = []
        out = x
        for layer in self.down_sample_layers:
            out = layer(out)
            stack.append(out)
            out = avg_pool2d(out, kernel_size=2, stride=2, padding=0)
        out = self.conv(out)
        for transpose_conv, conv in zip(self.up_transpose_conv, self.up_conv, strict=True):
            skip = stack.pop()
            out = transpose_conv(out)
            # Odd sizes lose a row/column to pooling; fastMRI refills it on the right/bottom by reflection.
            pad_w = skip.shape[-1] - out.shape[-1]
            pad_h = skip.shape[-2] - out.shape[-2]
            if pad_w or pad_h:
                out = pad(out, [0, pad_w, 0, pad_h], "reflect")
            out = conv(torch.cat([out, skip], dim=1))
        return out

    def to_config(self) -> dict[str, Any]:
        """Plain-JSON constructor arguments, every width explicit."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_pool_layers": self.num_pool_layers,
            "drop_prob": self.drop_prob,
            "widths": list(self.widths),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UNet:
        return cls(**kwargs_from_config(cls, config))


@register("NormUNet")
class NormUNet(nn.Module):
    r"""VarNet's normalised U-Net on real-packed images: normalise, pad to a multiple of 16, U-Net, undo.

    Input and output are real ``(B, C, H, W)`` with C even: the first half of the channels holds
    real parts, the second half imaginary parts (``mbdl_fast.complex.to_real_packed`` of a complex
    ``(B, H, W)`` or ``(B, C/2, H, W)`` image; fastMRI's channel order after ``complex_to_chan_dim``).
    For each sample and each half :math:`g` (real, imaginary), with mean :math:`\mu_g` and unbiased
    standard deviation :math:`\sigma_g` over its channels and pixels:

    .. math::
        y_g = \sigma_g\, \mathrm{unpad}(\mathrm{UNet}(\mathrm{pad}((x - \mu)/\sigma)))_g + \mu_g

    Padding is with zeros, split as evenly as possible (extra pixel on the right/bottom), up to
    the next multiple of 16 in H and W, as fastMRI's ``NormUnet`` (16 whatever ``num_pool_layers``;
    the U-Net's reflect padding handles what is left). Differences from fastMRI: the input is
    real-packed ``(B, C, H, W)`` instead of ``(B, C/2, H, W, 2)``; :math:`\sigma_g` is floored at
    the smallest normal float, so a constant (e.g. all-zero) image gives a finite output instead
    of NaN — identical whenever fastMRI's result is finite.

    Because of the padding, every image smaller than 16x16 becomes 16x16: with 4 poolings that leaves
    a one-pixel bottleneck, which :class:`UNet` refuses; use ``num_pool_layers <= 3`` for such images.

    Widths, arguments and module names (prefixed ``unet.``) are those of :class:`UNet`.
    ``forward(x, sigma=None)`` ignores ``sigma``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 2,
        chans: int | None = None,
        num_pool_layers: int = 4,
        drop_prob: float = 0.0,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if positive_int(name, value) % 2:
                raise ValueError(f"{name}: expected an even number (real and imaginary halves), got {value}")
        self.unet = UNet(in_channels, out_channels, chans, num_pool_layers, drop_prob, widths)

    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.out_channels

    @property
    def widths(self) -> tuple[int, ...]:
        return self.unet.widths

    def width_layers(self) -> list[str]:
        """Module name of the convolution whose output channels each ``widths`` entry gives."""
        return [f"unet.{name}" for name in self.unet.width_layers()]

    def tied_widths(self) -> list[list[int]]:
        """Groups of ``widths`` indices that must stay equal: none in the U-Net."""
        return []

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Real ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``; ``sigma`` is ignored."""
        check_prior_input(x, self.in_channels, self)
        b, c, h, w = x.shape
        groups = x.reshape(b, 2, (c // 2) * h * w)
        mean = groups.mean(dim=2).view(b, 2, 1, 1, 1)
        std = groups.std(dim=2).clamp_min(torch.finfo(x.dtype).tiny).view(b, 2, 1, 1, 1)
        x = ((x.view(b, 2, c // 2, h, w) - mean) / std).view(b, c, h, w)

        h_mult, w_mult = ((h - 1) | 15) + 1, ((w - 1) | 15) + 1
        top, left = (h_mult - h) // 2, (w_mult - w) // 2
        x = pad(x, [left, w_mult - w - left, top, h_mult - h - top])
        y = self.unet(x)[..., top : top + h, left : left + w]

        oc = self.out_channels
        return (y.reshape(b, 2, oc // 2, h, w) * std + mean).view(b, oc, h, w)

    def to_config(self) -> dict[str, Any]:
        """Plain-JSON constructor arguments, every width explicit."""
        return self.unet.to_config()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NormUNet:
        return cls(**kwargs_from_config(cls, config))
