"""The fused convolution op (``mbdl_fast.ops.conv2d``): every backend against ``conv2d_fused_ref`` (Triton in the CPU
interpreter where no GPU is visible).

Every kernel check uses fresh random inputs and a poisoned (NaN) output buffer, compares with
``conv2d_fused_ref`` evaluated in float64 on the same (rounded) inputs, forward and backward.
"""

import pytest
import torch
from conftest import rel_err, require_backend

from mbdl_fast.backends import supported_backends
from mbdl_fast.layers import FastConv2d
from mbdl_fast.ops.conv2d import conv2d_fused, conv2d_fused_op, conv2d_fused_ref, conv2d_weight_grad_op

# Relative-error bounds (forward, backward) per precision row. In the interpreter TF32 is not
# emulated (it computes exact fp32) and bf16 products are exact in fp32, so the bounds are the GPU's.
PRECISIONS = {
    "fp32": (torch.float32, False, 1e-5, 1e-5),  # allow_tf32=False: exact fp32, fp32 accumulation
    "tf32": (torch.float32, True, 5e-3, 5e-3),  # 10-bit mantissa products, fp32 accumulation
    "bf16": (torch.bfloat16, True, 1.5e-2, 2e-2),  # bf16 inputs and output, fp32 accumulation
}
# (batch, c_in, c_out, h, w, k, activation, residual, scale): pruned-prior shapes, tiny spatially.
CASES = [
    (2, 8, 16, 5, 6, 3, "relu", False, 1.0),  # conv1 + ReLU of a residual block (act' read from the output)
    (1, 24, 24, 4, 7, 3, "none", True, 0.5),  # conv2 + res_scale + skip
    (2, 16, 8, 3, 5, 1, "leaky_relu", True, -1.0),  # 1x1, act and residual: z recomputed in backward
    (1, 8, 16, 4, 4, 3, "leaky_relu", False, -0.5),  # negative scale: act' from the output's sign
    (1, 2, 32, 6, 4, 3, "none", False, 1.0),  # EDSR head: 2 image channels, masked K tile
    (1, 32, 2, 5, 5, 3, "none", True, 1.0),  # EDSR tail + input residual: 2 output channels
    (1, 72, 40, 3, 3, 3, "relu", False, 1.0),  # 72 -> 40: two K chunks per tap (the second partial), partial N tile
]


def _case_inputs(case, dtype, device, seed):
    n, c_in, c_out, h, w, k, act, residual, scale = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=gen)
    weight = torch.randn(c_out, c_in, k, k, generator=gen) / (c_in * k * k) ** 0.5
    bias = torch.randn(c_out, generator=gen)
    res = torch.randn(n, c_out, h, w, generator=gen) if residual else None
    grad = torch.randn(n, c_out, h, w, generator=gen)
    cast = [t if t is None else t.to(device=device, dtype=dtype) for t in (x, weight, bias, res, grad)]
    return cast, (act, scale)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}-{c[2]}-k{c[5]}-{c[6]}-res{int(c[7])}")
def test_triton_conv_matches_reference(case, precision, device):
    dtype, tf32, tol_fwd, tol_bwd = PRECISIONS[precision]
    (x, weight, bias, res, grad), (act, scale) = _case_inputs(case, dtype, device, seed=CASES.index(case))
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias) + ((res,) if res is not None else ())]
    out = conv2d_fused(*leaves[:3], leaves[3] if res is not None else None, act, 0.1, scale, tf32, backend="triton")
    grads = torch.autograd.grad(out, leaves, grad)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_res = ref_leaves[3] if res is not None else None
    ref = conv2d_fused_ref(*ref_leaves[:3], act, ref_res, 0.1, scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    assert out.dtype == dtype
    assert rel_err(out.detach().double(), ref.detach()) < tol_fwd
    for name, g, r in zip(("x", "weight", "bias", "residual"), grads, ref_grads, strict=False):
        assert rel_err(g.double(), r) < tol_bwd, name


def test_kernel_writes_every_output_element(device):
    from mbdl_fast.kernels.conv2d import conv2d_fused_triton

    (x, weight, bias, res, _), (act, scale) = _case_inputs(CASES[1], torch.float32, device, seed=3)
    out = torch.full((1, 24, 4, 7), float("nan"), device=device).contiguous(memory_format=torch.channels_last)
    conv2d_fused_triton(x, weight, bias, res, act, 0.1, scale, False, out=out)
    assert rel_err(out, conv2d_fused_ref(x, weight, bias, act, res, 0.1, scale)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_tiles_cover_several_programs(dtype, device):
    """The GPU's tiling in miniature: several pixel programs (a partial last one), chunked weight-gradient sums."""
    from mbdl_fast.kernels.conv2d import conv2d_fused_triton, conv2d_weight_grad_triton

    (x, weight, bias, res, grad), (act, scale) = _case_inputs(CASES[0], dtype, device, seed=11)
    out = conv2d_fused_triton(x, weight, bias, res, act, 0.1, scale, False, block_m=16)  # 60 pixels: 4 programs
    ref = conv2d_fused_ref(x.double(), weight.double(), bias.double(), act, None, 0.1, scale)
    assert rel_err(out.double(), ref) < PRECISIONS["fp32" if dtype == torch.float32 else "bf16"][2]
    gw = conv2d_weight_grad_triton(x, grad, 3, False, block_p=16, chunks=2)  # 4 pixel blocks: 2 chunks x 2 steps
    ref_gw = torch.nn.grad.conv2d_weight(x.double(), tuple(weight.shape), grad.double(), padding=1)
    assert rel_err(gw.double(), ref_gw) < PRECISIONS["fp32" if dtype == torch.float32 else "bf16"][3]


def test_output_keeps_the_input_memory_format(device):
    x = torch.randn(1, 8, 4, 4, device=device)
    w = torch.randn(8, 8, 3, 3, device=device)
    assert conv2d_fused(x, w, backend="triton").is_contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert conv2d_fused(x_cl, w, backend="triton").is_contiguous(memory_format=torch.channels_last)


def test_custom_op_registration_and_compile(device):
    """Fake implementation, autograd registration and a full-graph trace (aot_eager: no C++ compiler needed)."""
    (x, weight, bias, res, _), (act, scale) = _case_inputs(CASES[2], torch.float32, device, seed=5)
    args = (x, weight.requires_grad_(), bias, res, act, 0.1, scale, False, "triton")
    torch.library.opcheck(
        conv2d_fused_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )

    layer = FastConv2d(16, 8, 1, activation="leaky_relu", negative_slope=0.1, residual=True, res_scale=-1.0,
                       backend="triton", allow_tf32=False).to(device)  # fmt: skip
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    xs = x.clone().requires_grad_()
    out = compiled(xs, res)
    out.square().sum().backward()
    xr = x.clone().requires_grad_()
    ref = conv2d_fused_ref(xr, layer.weight, layer.bias, "leaky_relu", res, 0.1, -1.0)
    ref.square().sum().backward()
    assert rel_err(out.detach(), ref.detach()) < 1e-5
    assert rel_err(xs.grad, xr.grad) < 1e-5


# ------------------------------------------------------------------------------------------------
# The ops, every backend of the table against the reference (exact fp32 and bf16)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", supported_backends("conv2d_fused"))
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"{c[1]}-{c[2]}-k{c[5]}-{c[6]}-res{int(c[7])}")
def test_every_backend_matches_the_ref(case, backend, precision, device):
    require_backend("conv2d_fused", backend, device)
    dtype, tf32, tol_fwd, tol_bwd = PRECISIONS[precision]
    (x, weight, bias, res, grad), (act, scale) = _case_inputs(case, dtype, device, seed=20 + CASES.index(case))
    out = conv2d_fused_op(x, weight, bias, res, act, 0.1, scale, tf32, backend)
    res64 = None if res is None else res.double()
    ref = conv2d_fused_ref(x.double(), weight.double(), bias.double(), act, res64, 0.1, scale)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out.double(), ref) < tol_fwd
    gw = conv2d_weight_grad_op(x, grad, weight.shape[-1], tf32, backend)
    ref_gw = torch.nn.grad.conv2d_weight(x.double(), tuple(weight.shape), grad.double(), padding=weight.shape[-1] // 2)
    assert gw.dtype == dtype and rel_err(gw.double(), ref_gw) < tol_bwd
