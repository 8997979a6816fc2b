"""``FastConv2d``: an ``nn.Conv2d`` whose bias, activation and residual add run in the convolution's epilogue."""

from __future__ import annotations

import torch
from torch import nn

from mbdl_fast.ops.conv2d import (
    ACTIVATIONS,
    apply_epilogue,
    conv2d_fused_op,
    resolve_conv_backend,
    unsupported_reason,
)


def _activation_spec(activation: object, negative_slope: float | None) -> tuple[str, float]:
    """(name, slope) from None, a name, or an ``nn.ReLU`` / ``nn.LeakyReLU`` module."""
    if activation is None:
        return "none", 0.01 if negative_slope is None else float(negative_slope)
    if isinstance(activation, nn.ReLU):
        return "relu", 0.0
    if isinstance(activation, nn.LeakyReLU):
        return "leaky_relu", float(activation.negative_slope)
    if activation in ACTIVATIONS:
        return str(activation), 0.01 if negative_slope is None else float(negative_slope)
    raise ValueError(f"activation: expected None, one of {ACTIVATIONS}, nn.ReLU or nn.LeakyReLU, got {activation!r}")


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` computing ``res_scale * act(conv(x) + bias) + residual`` in one fused kernel where it can.

    A drop-in: the same constructor arguments, parameters and state-dict keys as ``nn.Conv2d``
    (``isinstance(layer, nn.Conv2d)`` holds), plus keyword-only

    Args:
        activation: None, "relu", "leaky_relu" (``negative_slope``), or an ``nn.ReLU`` / ``nn.LeakyReLU``.
        residual: the layer adds a residual: call ``layer(x, residual)`` with residual (N, C_out, H, W).
        res_scale: multiplies act(conv(x) + bias) before the residual add (EDSR's res_scale; -1: residual - conv).
        backend: "auto" (on a GPU: cuDNN or the Triton kernel, whichever is faster for the shape,
            timed once and cached; on a CPU: F.conv2d), "torch" or "triton" (an error where it cannot run).
        allow_tf32: TF32 tensor cores for float32 inputs (default, as cuDNN's); False: exact fp32.

    Where the fused kernel does not apply (CPU, stride, groups, dilation, padding other than k//2,
    more than 128 channels) the layer runs ``F.conv2d`` and the same epilogue in PyTorch: the same result.
    """

    def __init__(
        self,
        *args,
        activation: object = None,
        negative_slope: float | None = None,
        residual: bool = False,
        res_scale: float = 1.0,
        backend: str = "auto",
        allow_tf32: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.activation, self.negative_slope = _activation_spec(activation, negative_slope)
        self.residual = bool(residual)
        self.res_scale = float(res_scale)
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
        self.backend = backend
        self.allow_tf32 = bool(allow_tf32)
        self.unsupported = unsupported_reason(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.padding_mode,
        )  # fmt: skip

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        activation: object = None,
        residual: bool = False,
        res_scale: float = 1.0,
        negative_slope: float | None = None,
        backend: str = "auto",
        allow_tf32: bool = True,
    ) -> FastConv2d:
        """A FastConv2d sharing ``conv``'s parameters (the same ``nn.Parameter`` objects) and geometry."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        fast = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta", activation=activation, negative_slope=negative_slope, residual=residual,
            res_scale=res_scale, backend=backend, allow_tf32=allow_tf32,
        )  # fmt: skip
        fast.weight = conv.weight
        fast.bias = conv.bias
        fast.train(conv.training)
        return fast

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """res_scale * act(conv(x) + bias) + residual; ``residual`` exactly when built with ``residual=True``."""
        if self.residual != (residual is not None):
            want = "layer(x, residual)" if self.residual else "layer(x) (built with residual=False)"
            raise ValueError(f"residual: this FastConv2d is called as {want}")
        reason = self.unsupported
        if reason is None and x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            reason = f"dtype {x.dtype}"
        impl = resolve_conv_backend(self.backend, x, reason)
        if impl == "torch" and (reason is not None or x.device.type != "cuda"):
            z = self._conv_forward(x, self.weight, self.bias)
            return apply_epilogue(z, self.activation, self.negative_slope, self.res_scale, residual)
        return conv2d_fused_op(x, self.weight, self.bias, residual, self.activation, self.negative_slope,
                               self.res_scale, self.allow_tf32, impl)  # fmt: skip

    def extra_repr(self) -> str:
        fused = [f"activation={self.activation!r}"]
        if self.activation == "leaky_relu":
            fused.append(f"negative_slope={self.negative_slope}")
        if self.residual:
            fused.append(f"residual=True, res_scale={self.res_scale}")
        fused.append(f"backend={self.backend!r}")
        if not self.allow_tf32:
            fused.append("allow_tf32=False")
        return ", ".join([super().extra_repr(), *fused])
