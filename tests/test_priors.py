import json
import math

import pytest
import torch
from torch.nn.functional import pad

from mbdl_fast.complex import from_real_packed, to_real_packed
from mbdl_fast.priors import EDSR, DnCNN, NormUNet, UNet, denoise
from mbdl_fast.registry import build, config_of


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return {
        "EDSR": lambda: EDSR(width=4, num_blocks=2),
        "DnCNN": lambda: DnCNN(depth=4, width=4),
        "UNet": lambda: UNet(chans=4, num_pool_layers=2),
        "NormUNet": lambda: NormUNet(chans=4, num_pool_layers=2),
    }[name]()


PRIORS = ["EDSR", "DnCNN", "UNet", "NormUNet"]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int = 3, bias: bool = True) -> int:
    return k * k * cin * cout + (cout if bias else 0)


@pytest.mark.parametrize("name", PRIORS)
@pytest.mark.parametrize("size", [(16, 16), (17, 19)])
def test_shapes_even_and_odd(name, size):
    model = tiny(name)
    x = torch.randn(2, 2, *size)
    y = model(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


def test_default_architectures():
    # SPADE's EDSR: 2 -> 64, 13 blocks of two 64 -> 64 convs, 64 -> 64 body end, 64 -> 2 tail.
    edsr = EDSR()
    assert edsr.widths == (64,) * 28
    assert n_params(edsr) == conv(2, 64) + 13 * 2 * conv(64, 64) + conv(64, 64) + conv(64, 2)
    assert n_params(DnCNN()) == conv(2, 64) + 15 * conv(64, 64) + conv(64, 2)
    # fastMRI's VarNet U-Net (18 channels, 4 poolings): its per-cascade parameter count.
    assert n_params(UNet()) == 2_454_338
    assert UNet().widths == tuple(UNet(widths=list(UNet().widths)).widths)
    assert UNet().widths[:10] == (18, 18, 36, 36, 72, 72, 144, 144, 288, 288)
    assert UNet().widths[10:] == (144,) * 3 + (72,) * 3 + (36,) * 3 + (18,) * 3


def test_unet_module_names_follow_fastmri():
    keys = set(UNet(chans=2).state_dict())
    for key in [
        "down_sample_layers.0.layers.0.weight",
        "down_sample_layers.3.layers.4.weight",
        "conv.layers.4.weight",
        "up_transpose_conv.0.layers.0.weight",
        "up_conv.2.layers.0.weight",
        "up_conv.3.0.layers.4.weight",
        "up_conv.3.1.weight",
        "up_conv.3.1.bias",
    ]:
        assert key in keys
    assert all(k.startswith("unet.") for k in NormUNet(chans=2).state_dict())


def test_edsr_per_layer_widths():
    # head 6; block 0: inner 3, out 6; block 1: inner 5, out 6; body end 6.
    widths = [6, 3, 6, 5, 6, 6]
    model = EDSR(in_channels=2, out_channels=3, num_blocks=2, widths=widths)
    expected = conv(2, 6) + conv(6, 3) + conv(3, 6) + conv(6, 5) + conv(5, 6) + conv(6, 6) + conv(6, 3)
    assert n_params(model) == expected
    assert model(torch.randn(1, 2, 16, 16)).shape == (1, 3, 16, 16)
    assert model.tied_widths() == [[0, 2, 4, 5]]


def test_dncnn_per_layer_widths():
    model = DnCNN(depth=4, widths=[3, 5, 7], bias=False, batch_norm=True)
    expected = conv(2, 3, bias=False) + conv(3, 5, bias=False) + conv(5, 7, bias=False) + conv(7, 2, bias=False)
    assert n_params(model) == expected + 2 * (5 + 7)  # batch norm weight and bias on the middle layers
    assert model(torch.randn(2, 2, 16, 16)).shape == (2, 2, 16, 16)
    assert model.tied_widths() == []


def test_unet_per_layer_widths():
    # P = 2: down0 (3, 4), down1 (5, 6), bottleneck (7, 8), up0 (t 2, a 9, b 10), up1 (t 11, a 3, b 4).
    widths = [3, 4, 5, 6, 7, 8, 2, 9, 10, 11, 3, 4]
    model = UNet(in_channels=2, out_channels=2, num_pool_layers=2, widths=widths)
    expected = (
        conv(2, 3, bias=False)
        + conv(3, 4, bias=False)
        + conv(4, 5, bias=False)
        + conv(5, 6, bias=False)
        + conv(6, 7, bias=False)
        + conv(7, 8, bias=False)
        + 4 * 8 * 2  # transpose 2x2: bottleneck 8 -> 2
        + conv(2 + 6, 9, bias=False)  # upsampled 2 + skip of down1 (6)
        + conv(9, 10, bias=False)
        + 4 * 10 * 11  # transpose 10 -> 11
        + conv(11 + 4, 3, bias=False)  # upsampled 11 + skip of down0 (4)
        + conv(3, 4, bias=False)
        + conv(4, 2, k=1)  # final 1x1 with bias
    )
    assert n_params(model) == expected
    assert model(torch.randn(1, 2, 17, 19)).shape == (1, 2, 17, 19)
    assert n_params(NormUNet(num_pool_layers=2, widths=widths)) == expected


@pytest.mark.parametrize("name", PRIORS)
def test_width_layers_name_the_convs(name):
    model = tiny(name)
    modules = dict(model.named_modules())
    assert len(model.width_layers()) == len(model.widths)
    for layer, width in zip(model.width_layers(), model.widths, strict=True):
        assert modules[layer].out_channels == width


@pytest.mark.parametrize(
    "make",
    [
        lambda: EDSR(num_blocks=2, widths=[6, 3, 5, 5, 6, 6]),  # a tied entry differs
        lambda: EDSR(num_blocks=2, widths=[6, 3, 6, 5, 6]),  # wrong length
        lambda: EDSR(num_blocks=1, widths=[6, 0, 6, 6]),  # not positive
        lambda: EDSR(num_blocks=1, width=6, widths=[6, 3, 6, 6]),  # both
        lambda: DnCNN(depth=4, widths=[3, 5]),
        lambda: DnCNN(depth=3, widths=[3, 2.5]),
        lambda: DnCNN(depth=3, widths="34"),
        lambda: UNet(num_pool_layers=2, widths=[4] * 11),
        lambda: UNet(num_pool_layers=1, widths=[4, 4, 4, -1, 4, 4, 4]),
        lambda: UNet(chans=4, num_pool_layers=1, widths=[4] * 7),
        lambda: NormUNet(num_pool_layers=1, widths=[True] * 7),
    ],
)
def test_invalid_widths_name_widths(make):
    with pytest.raises((ValueError, TypeError), match="widths"):
        make()


def test_edsr_tied_error_is_explicit():
    with pytest.raises(ValueError, match=r"widths: head .* must be equal"):
        EDSR(num_blocks=2, widths=[6, 3, 5, 5, 6, 6])


@pytest.mark.parametrize("name", PRIORS)
def test_config_json_round_trip(name):
    model = tiny(name)
    config = json.loads(json.dumps(config_of(model)))
    rebuilt = build(config)
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.to_config() == model.to_config()
    x = torch.randn(2, 2, 17, 16)
    assert torch.equal(rebuilt(x), model(x))
    direct = type(model).from_config(config["args"])
    assert [(k, v.shape) for k, v in direct.state_dict().items()] == [
        (k, v.shape) for k, v in model.state_dict().items()
    ]


def test_pruned_config_rebuilds_exactly():
    model = EDSR(num_blocks=3, widths=[8, 3, 8, 5, 8, 2, 8, 8], residual_to_input=True, res_scale=0.5)
    rebuilt = EDSR.from_config(json.loads(json.dumps(model.to_config())))
    assert rebuilt.widths == model.widths and rebuilt.residual_to_input and rebuilt.res_scale == 0.5
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]


def test_from_config_refuses_unknown_keys():
    with pytest.raises(ValueError, match="config: unknown EDSR arguments"):
        EDSR.from_config({"widht": 4})


@pytest.mark.parametrize("name", PRIORS)
def test_denoise_complex_equals_manual_packing(name):
    model = tiny(name)
    z = torch.randn(2, 16, 17, dtype=torch.complex64)
    manual = from_real_packed(model(to_real_packed(z)))
    assert torch.equal(denoise(model, z), manual)
    assert torch.equal(denoise(model, z.unsqueeze(1)), manual.unsqueeze(1))
    assert torch.equal(denoise(model, z, sigma=0.1), manual)


@pytest.mark.parametrize("name", PRIORS)
def test_deepinv_style_call(name):
    model = tiny(name)
    x = torch.randn(1, 2, 16, 16)
    assert torch.equal(model(x, sigma=0.1), model(x))
    assert torch.equal(model(x, 0.1), model(x))


@pytest.mark.parametrize("name", PRIORS)
def test_input_validation_names_x(name):
    model = tiny(name)
    with pytest.raises(TypeError, match=r"x: .*mbdl_fast\.priors\.denoise"):
        model(torch.randn(1, 16, 16, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"x: expected real floating \(B, 2, H, W\)"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="x: "):
        model(torch.randn(2, 16, 16))
    with pytest.raises(TypeError, match="x: "):
        model(torch.ones(1, 2, 16, 16, dtype=torch.int64))


def test_unet_too_small_names_x():
    with pytest.raises(ValueError, match="x: expected H, W >= 2 \\*\\* num_pool_layers = 4"):
        UNet(chans=2, num_pool_layers=2)(torch.randn(1, 2, 3, 16))
    with pytest.raises(ValueError, match="bottleneck"):
        UNet(chans=2, num_pool_layers=2)(torch.randn(1, 2, 4, 4))


def test_dncnn_residual_learning():
    torch.manual_seed(0)
    residual = DnCNN(depth=3, width=4)
    plain = DnCNN(depth=3, width=4, residual=False)
    plain.load_state_dict(residual.state_dict())
    x = torch.randn(1, 2, 16, 16)
    assert torch.equal(residual(x), x - plain(x))


def test_edsr_residual_to_input():
    torch.manual_seed(0)
    a = EDSR(width=4, num_blocks=1, residual_to_input=True)
    b = EDSR(width=4, num_blocks=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(a(x), x + b(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="residual_to_input"):
        EDSR(out_channels=1, residual_to_input=True)


def fastmri_norm_unet(unet: UNet, x: torch.Tensor) -> torch.Tensor:
    """fastMRI's NormUnet.forward after complex_to_chan_dim, written as fastMRI writes it."""
    b, c, h, w = x.shape
    g = x.contiguous().view(b, 2, c // 2 * h * w)
    mean = g.mean(dim=2).view(b, 2, 1, 1, 1).expand(b, 2, c // 2, 1, 1).contiguous().view(b, c, 1, 1)
    std = g.std(dim=2).view(b, 2, 1, 1, 1).expand(b, 2, c // 2, 1, 1).contiguous().view(b, c, 1, 1)
    x = (x - mean) / std
    w_mult, h_mult = ((w - 1) | 15) + 1, ((h - 1) | 15) + 1
    w_pad = (math.floor((w_mult - w) / 2), math.ceil((w_mult - w) / 2))
    h_pad = (math.floor((h_mult - h) / 2), math.ceil((h_mult - h) / 2))
    x = unet(pad(x, w_pad + h_pad))
    x = x[..., h_pad[0] : h_mult - h_pad[1], w_pad[0] : w_mult - w_pad[1]]
    return x * std + mean


@pytest.mark.parametrize("channels", [2, 4])
def test_norm_unet_matches_fastmri(channels):
    torch.manual_seed(0)
    model = NormUNet(in_channels=channels, out_channels=channels, chans=4, num_pool_layers=2)
    x = 3.0 * torch.randn(2, channels, 13, 18) + 1.5
    torch.testing.assert_close(model(x), fastmri_norm_unet(model.unet, x), rtol=1e-5, atol=1e-5)
    # Normalisation makes it equivariant to scaling; a constant image stays finite.
    torch.testing.assert_close(model(4.0 * x), 4.0 * model(x), rtol=1e-4, atol=1e-4)
    assert torch.isfinite(model(torch.zeros(1, channels, 16, 16))).all()


def test_norm_unet_needs_even_channels():
    with pytest.raises(ValueError, match="in_channels: expected an even number"):
        NormUNet(in_channels=3, out_channels=2)
