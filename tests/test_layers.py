"""Fused convolution (Triton; the CPU interpreter where no GPU is visible) against F.conv2d, FastConv2d, to_fast.

Every kernel check uses fresh random inputs and a poisoned (NaN) output buffer, compares with
``conv2d_fused_ref`` evaluated in float64 on the same (rounded) inputs, forward and backward.
"""

import copy

import pytest
import torch
from conftest import rel_err
from torch import nn

from mbdl_fast.layers import FastConv2d, conv2d_fused, conv2d_fused_ref, conv_choices, fast_layers, to_fast
from mbdl_fast.layers.choice import clear_conv_choices, set_conv_choice
from mbdl_fast.layers.functional import conv2d_fused_op, unsupported_reason
from mbdl_fast.priors import EDSR, DnCNN

CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

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
# FastConv2d
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [None, "relu", nn.LeakyReLU(0.2)])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_from_conv_is_a_drop_in(activation, backend, device):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).to(device)
    fast = FastConv2d.from_conv(conv, activation=activation, residual=True, res_scale=0.5, backend=backend,
                                allow_tf32=False)  # fmt: skip
    assert fast.weight is conv.weight and fast.bias is conv.bias and isinstance(fast, nn.Conv2d)
    assert fast.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(2, 8, 5, 5, device=device)
    r = torch.randn(2, 16, 5, 5, device=device)
    z = conv(x)
    if activation == "relu":
        z = torch.relu(z)
    elif activation is not None:
        z = activation(z)
    ref = r + z * 0.5
    out = fast(x, r)
    if backend == "auto" and device.type == "cpu":
        assert torch.equal(out, ref)  # the CPU fallback is the same PyTorch ops
    else:
        assert rel_err(out.detach(), ref.detach()) < 1e-5


def test_unsupported_geometry_falls_back_with_the_same_semantics():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
    fast = FastConv2d.from_conv(conv, activation="relu")
    assert "stride" in fast.unsupported
    x = torch.randn(1, 8, 6, 6)
    assert torch.equal(fast(x), torch.relu(conv(x)))
    with pytest.raises(ValueError, match="'triton' cannot run this convolution: stride"):
        FastConv2d.from_conv(conv, backend="triton")(x)
    assert unsupported_reason(200, 8, (3, 3)) is not None
    assert unsupported_reason(8, 8, (5, 5)) is not None
    assert unsupported_reason(8, 8, (1, 1), padding=(0, 0)) is None


def test_residual_is_required_exactly_when_declared():
    fast = FastConv2d(4, 4, 3, padding=1, residual=True)
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match=r"layer\(x, residual\)"):
        fast(x)
    with pytest.raises(ValueError, match="residual=False"):
        FastConv2d(4, 4, 3, padding=1)(x, x)
    with pytest.raises(ValueError, match="activation"):
        FastConv2d(4, 4, 3, activation="gelu")


def test_auto_backend_on_cpu_times_nothing():
    clear_conv_choices()
    FastConv2d(8, 8, 3, padding=1)(torch.randn(1, 8, 4, 4))
    assert conv_choices() == []
    set_conv_choice("conv2d", ("shape",), "triton")
    assert conv_choices()[0]["choice"] == "triton"
    clear_conv_choices()


@NEEDS_CUDA
def test_auto_backend_times_once_per_shape_and_shows_the_choice():
    clear_conv_choices()
    layer = FastConv2d(32, 32, 3, padding=1, activation="relu").cuda()
    x = torch.randn(2, 32, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    ref = torch.relu(layer._conv_forward(x, layer.weight, layer.bias))
    assert rel_err(layer(x).detach(), ref.detach()) < 5e-3
    layer(x)
    rows = [r for r in conv_choices() if r["op"] == "conv2d"]
    assert len(rows) == 1 and rows[0]["choice"] in ("torch", "triton")
    assert set(rows[0]["ms"]) == {"torch", "triton"}


# ------------------------------------------------------------------------------------------------
# to_fast
# ------------------------------------------------------------------------------------------------
PRIORS = {
    "edsr": lambda: EDSR(2, 2, width=8, num_blocks=2),
    "edsr_scaled_input_residual": lambda: EDSR(2, 2, width=8, num_blocks=2, res_scale=0.3, residual_to_input=True),
    "dncnn": lambda: DnCNN(2, 2, depth=4, width=8),
    "dncnn_no_residual": lambda: DnCNN(2, 2, depth=3, width=8, residual=False),
    "dncnn_batch_norm": lambda: DnCNN(2, 2, depth=3, width=8, batch_norm=True),
    "sequential": lambda: nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 2, 1)),
}


@pytest.mark.parametrize("name", list(PRIORS))
def test_to_fast_preserves_outputs(name, device):
    torch.manual_seed(0)
    prior = PRIORS[name]().to(device).eval()
    x = torch.randn(2, 2, 6, 5, device=device)
    ref = prior(x)
    fallback = to_fast(copy.deepcopy(prior))
    if device.type == "cpu":
        assert torch.equal(fallback(x), ref)
    fused = to_fast(copy.deepcopy(prior), backend="triton", allow_tf32=False)
    assert rel_err(fused(x).detach(), ref.detach()) < 1e-5
    assert fused.state_dict().keys() == prior.state_dict().keys()
    assert len(fast_layers(fused)) == sum(isinstance(m, nn.Conv2d) for m in prior.modules())


def test_to_fast_fuses_the_edsr_and_dncnn_patterns():
    edsr = to_fast(EDSR(2, 2, width=8, num_blocks=1, res_scale=0.5, residual_to_input=True))
    lines = dict(line.split(": ", 1) for line in fast_layers(edsr))
    assert "fused [relu]" in lines["blocks.0.conv1"]
    assert "fused [residual x0.5]" in lines["blocks.0.conv2"]
    assert "fused [residual x1]" in lines["body_end"] and "fused [residual x1]" in lines["tail"]
    dncnn = to_fast(DnCNN(2, 2, depth=3, width=8))
    lines = dict(line.split(": ", 1) for line in fast_layers(dncnn))
    assert "fused [relu]" in lines["convs.0"] and "fused [residual x-1]" in lines["convs.2"]
    assert edsr.to_config()["widths"] == [8, 8, 8, 8]  # class and config untouched
    assert to_fast(edsr) is edsr  # a second conversion is a no-op


def test_converted_prior_compiles_in_one_graph(device):
    torch.manual_seed(2)
    prior = EDSR(2, 2, width=8, num_blocks=1, res_scale=0.5).to(device)
    fast = to_fast(copy.deepcopy(prior), backend="triton", allow_tf32=False)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 2, 5, 4, device=device)
    assert rel_err(compiled(x).detach(), prior(x).detach()) < 1e-5


def test_to_fast_keeps_training_gradients(device):
    torch.manual_seed(1)
    prior = EDSR(2, 2, width=8, num_blocks=1).to(device)
    fast = to_fast(copy.deepcopy(prior), backend="triton", allow_tf32=False)
    x = torch.randn(1, 2, 5, 5, device=device)
    prior(x).square().sum().backward()
    fast(x).square().sum().backward()
    for (name, p), q in zip(prior.named_parameters(), fast.parameters(), strict=True):
        assert rel_err(q.grad, p.grad) < 1e-5, name
