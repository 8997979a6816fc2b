"""Convolutions of pruned priors: cuDNN against FastConv2d (fused Triton kernel), at the shapes pruning produces.

Each row is one layer of a (pruned) EDSR prior at the ladder's size (8 x 320 x 320 on a GPU):
3x3 convolutions of 16..64 channels (multiples of 8, as ``prune_channels`` rounds them) with the
epilogue the layer has in the prior (conv1 + ReLU, conv2 + residual), a 1x1, and the 2-channel head.

Variants:
- ``torch_nchw``: F.conv2d in NCHW plus the epilogue in PyTorch (what an unconverted prior runs);
- ``torch_channels_last``: the same in NHWC (cuDNN's tensor-core layout; oneDNN's on a CPU);
- ``triton``: the fused kernel (implicit GEMM, epilogue fused), GPU only;
- ``fast_auto``: ``FastConv2d`` with ``backend="auto"``: the faster of cuDNN and Triton, timed once per shape.
Dtypes: float32 (TF32 on: PyTorch's default for cuDNN convolutions) and bfloat16 on a GPU; float32
on a CPU, where only the two torch variants run (the Triton interpreter is for tests, not timing).
Each row checks its output against the float64 reference before timing.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import device_name, sync

from mbdl_fast.layers import FastConv2d, conv_choices
from mbdl_fast.ops.conv2d import conv2d_fused_op, conv2d_fused_ref

# name: (c_in, c_out, k, activation, residual)
LAYERS = {
    "3x3_16_relu": (16, 16, 3, "relu", False),
    "3x3_24_relu": (24, 24, 3, "relu", False),
    "3x3_24_residual": (24, 24, 3, "none", True),
    "3x3_32_relu": (32, 32, 3, "relu", False),
    "3x3_32_residual": (32, 32, 3, "none", True),
    "3x3_48_relu": (48, 48, 3, "relu", False),
    "3x3_64_relu": (64, 64, 3, "relu", False),
    "1x1_64": (64, 64, 1, "none", False),
    "3x3_head_2_24": (2, 24, 3, "none", False),
}
VARIANTS = ["torch_nchw", "torch_channels_last", "triton", "fast_auto"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {"fp32": 5e-3, "bf16": 2e-2}  # TF32 / bf16 rounding against the float64 reference


def _pixels(device: torch.device) -> tuple[int, int]:
    return (8, 320) if device.type == "cuda" else (1, 64)


@functools.lru_cache(maxsize=1)  # the layer is the slowest-varying parameter: one problem in memory at a time
def _problem(layer: str, device: torch.device):
    """Fresh random inputs (float32) and the float64 reference, on ``device``."""
    c_in, c_out, k, act, residual = LAYERS[layer]
    batch, size = _pixels(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=gen, device=device)
    weight = torch.randn(c_out, c_in, k, k, generator=gen, device=device) / (c_in * k * k) ** 0.5
    bias = torch.randn(c_out, generator=gen, device=device) * 0.1
    res = torch.randn(batch, c_out, size, size, generator=gen, device=device) if residual else None
    reference = conv2d_fused_ref(x.double(), weight.double(), bias.double(), act,
                                 None if res is None else res.double())  # fmt: skip
    return (x, weight, bias, res), reference


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_conv(benchmark, layer, variant, dtype_name, bench_device):
    on_gpu = bench_device.type == "cuda"
    if not on_gpu and variant in ("triton", "fast_auto"):
        pytest.skip(f"{variant}: needs a CUDA device (on a CPU FastConv2d runs F.conv2d: the torch rows)")
    if not on_gpu and dtype_name != "fp32":
        pytest.skip(f"{dtype_name}: GPU rows only (the CPU rows are float32)")
    c_in, c_out, k, act, residual = LAYERS[layer]
    dtype = DTYPES[dtype_name]
    batch, size = _pixels(bench_device)
    inputs, reference = _problem(layer, bench_device)
    cast = [None if t is None else t.to(dtype) for t in inputs]
    x, weight, bias, res = cast
    if variant != "torch_nchw":
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
        res = None if res is None else res.contiguous(memory_format=torch.channels_last)

    if variant in ("torch_nchw", "torch_channels_last"):

        def step():
            return conv2d_fused_ref(x, weight, bias, act, res)
    elif variant == "triton":

        def step():
            return conv2d_fused_op(x, weight, bias, res, act, 0.01, 1.0, True, "triton")
    else:
        layer_module = FastConv2d(c_in, c_out, k, padding=k // 2, activation=act, residual=residual).to(bench_device)
        with torch.no_grad():
            layer_module.weight.copy_(weight)
            layer_module.bias.copy_(bias)
        layer_module = layer_module.to(dtype=dtype, memory_format=torch.channels_last)

        def step():
            return layer_module(x, res) if residual else layer_module(x)

    with torch.no_grad():
        out = step()  # warm-up (compilation, the auto choice) and the correctness check
        err = float((out.double() - reference).norm() / reference.norm())
        assert err < TOL[dtype_name], f"{layer} {variant} {dtype_name}: relative error {err:.2e}"
        inner = 20 if on_gpu else 3

        def timed():
            for _ in range(inner):
                step()
            sync(bench_device)

        flops = 2 * batch * size * size * c_in * c_out * k * k
        choice = [r["choice"] for r in conv_choices()
                  if r["op"] == "conv2d" and r["key"][:2] == (tuple(x.shape), str(dtype).replace("torch.", ""))
                  and r["key"][3] == tuple(weight.shape)]  # fmt: skip
        benchmark.extra_info.update({
            "suite": "conv", "layer": layer, "variant": variant, "dtype": dtype_name,
            "size": f"{batch}x{c_in}x{size}x{size}->{c_out}", "device": device_name(bench_device), "rel_err": err,
            "flops": flops, "inner": inner, "auto_choice": choice[-1] if variant == "fast_auto" and choice else None,
        })  # fmt: skip
        benchmark.pedantic(timed, rounds=5 if not on_gpu else 20, warmup_rounds=1)
