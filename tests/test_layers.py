"""FastConv2d and to_fast against the layers they replace (the fused op itself: test_op_conv2d.py)."""

import copy

import pytest
import torch
from conftest import rel_err
from torch import nn

from mbdl_fast.layers import FastConv2d, conv_choices, fast_layers, to_fast
from mbdl_fast.ops.choice import clear_conv_choices, set_conv_choice
from mbdl_fast.ops.conv2d import unsupported_reason
from mbdl_fast.priors import EDSR, DnCNN

CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


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
