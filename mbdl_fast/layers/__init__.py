"""Fast layers for (pruned) priors: fused convolutions and the conversion of whole priors.

- :class:`FastConv2d`: ``nn.Conv2d`` with bias, activation and residual add in the conv's epilogue
  (Triton implicit GEMM, channels_last, TF32/bf16 tensor cores); ``FastConv2d.from_conv(conv)``.
- :func:`to_fast`: convert a prior's (or a solver's priors') conv / ReLU / residual patterns in place.
- :func:`conv2d_fused` and its reference :func:`conv2d_fused_ref`.
- :func:`conv_choices`: per shape, which of cuDNN and the Triton kernel was timed faster on this GPU.

On a CPU every layer runs ``F.conv2d`` with the same semantics (the Triton interpreter is for tests).
"""

from mbdl_fast.layers.conv import FastConv2d
from mbdl_fast.layers.convert import fast_layers, to_fast
from mbdl_fast.ops.choice import clear_conv_choices, conv_choices
from mbdl_fast.ops.conv2d import conv2d_fused, conv2d_fused_ref

__all__ = [
    "FastConv2d",
    "clear_conv_choices",
    "conv2d_fused",
    "conv2d_fused_ref",
    "conv_choices",
    "fast_layers",
    "to_fast",
]
