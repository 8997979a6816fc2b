"""Channel pruning (mbdl_fast.prune): exactness against the dense model with removed channels zeroed,
parameter counts and rounding, automatic protection of image channels, pruning inside solvers,
reload without pickle, refused corrupt/mismatched checkpoints, importances, parameter/MAC counts."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import rel_err
from torch import nn

from mbdl_fast.checkpoint import CheckpointError, load_model, save_model
from mbdl_fast.data.simulate import birdcage_coil_maps
from mbdl_fast.physics import BlockCS, MultiCoilMRI
from mbdl_fast.physics.masks import random_mask
from mbdl_fast.priors import EDSR, DnCNN, NormUNet, UNet
from mbdl_fast.prune import (
    PruningError,
    PruningWarning,
    count_params_and_macs,
    find_priors,
    prune_channels,
)
from mbdl_fast.solvers import DEQ, COASTBlock, DeepUnfolding, ISTANetPlusBlock, RecursiveUnfolding, VarNet

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def seeded(module: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """``module`` with reproducible random weights (times ``scale``), float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale / max(p[0].numel(), 1) ** 0.5)
    return module.to(F64)


def zero_removed(dense: nn.Module, record) -> nn.Module:
    """A copy of the dense model with the output channels that pruning removed set to zero (weights, biases)."""
    zeroed = copy.deepcopy(dense)
    modules = dict(zeroed.named_modules())
    with torch.no_grad():
        for name, dirs in record.kept.items():
            layer = modules[name]
            if "out" not in dirs or not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            dim = 1 if getattr(layer, "transposed", False) else 0
            removed = sorted(set(range(layer.weight.shape[dim])) - set(dirs["out"]))
            layer.weight.index_fill_(dim, torch.tensor(removed, dtype=torch.long), 0.0)
            if layer.bias is not None:
                layer.bias[removed] = 0.0
    return zeroed


def mri_problem(size=16, batch=2, coils=3, dtype=torch.complex128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(size, 4, 0.125, seed=seed)
    maps = birdcage_coil_maps(coils, (size, size)).unsqueeze(0).to(dtype)
    physics = MultiCoilMRI(mask, maps)
    x = torch.randn(batch, size, size, generator=g, dtype=dtype)
    return physics, physics.A(x), x


def prior_input(channels=2, size=32, seed=1):
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=F64)


class MidResidual(nn.Module):
    """A user module whose first branch is added to its input mid-network: h = x + b(relu(a(x)))."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 16, 3, padding=1), nn.Conv2d(16, 2, 3, padding=1)
        self.c, self.d = nn.Conv2d(2, 16, 3, padding=1), nn.Conv2d(16, 2, 3, padding=1)

    def forward(self, x):
        h = x + self.b(torch.relu(self.a(x)))
        return self.d(torch.relu(self.c(h)))


# ------------------------------------------------------------------------------------------------
# Exactness: pruned == dense with the removed channels zeroed
# ------------------------------------------------------------------------------------------------
PRIORS = {
    "edsr": lambda: EDSR(width=16, num_blocks=2),
    "edsr_residual": lambda: EDSR(width=16, num_blocks=2, residual_to_input=True),
    "dncnn": lambda: DnCNN(depth=4, width=16),
    "unet": lambda: UNet(chans=8, num_pool_layers=2),
    "normunet": lambda: NormUNet(chans=8, num_pool_layers=2),
}


@pytest.mark.parametrize("kind", sorted(PRIORS))
def test_pruned_prior_equals_dense_with_removed_channels_zeroed(kind):
    dense = seeded(PRIORS[kind]())
    pruned = prune_channels(dense, 0.5)
    x = prior_input()
    with torch.no_grad():
        out, zeroed, full = pruned(x), zero_removed(dense, pruned.pruning_record)(x), dense(x)
    assert rel_err(out, zeroed) < 1e-10
    assert rel_err(out, full) > 1e-3  # channels really went, and mattered
    assert n_params(pruned) < n_params(dense)


def test_deq_pruned_operator_and_fixed_point_equal_zeroed_dense():
    physics, y, _ = mri_problem()
    dense = DEQ(seeded(EDSR(width=16, num_blocks=1), scale=0.3), f_tol=1e-11, f_max_iter=200).to(F64)
    pruned = prune_channels(dense, 0.5, check_inputs=(y, physics))
    zeroed = zero_removed(dense, pruned.pruning_record)
    z = physics.A_adjoint(y)
    with torch.no_grad():
        assert rel_err(pruned.step(z, y, physics), zeroed.step(z, y, physics)) < 1e-10
        out, info = pruned(y, physics, return_info=True)
        ref, ref_info = zeroed(y, physics, return_info=True)
        assert rel_err(pruned.step(z, y, physics), dense.step(z, y, physics)) > 1e-6
    assert bool(info["converged"].all()) and bool(ref_info["converged"].all())
    assert rel_err(out, ref) < 1e-8


def test_untied_unfolding_equals_zeroed_dense():
    physics, y, _ = mri_problem()
    priors = [seeded(EDSR(width=16, num_blocks=1), seed=k) for k in range(2)]
    dense = DeepUnfolding(priors, num_iters=2, tied=False).to(F64)
    pruned = prune_channels(dense, 0.5)
    with torch.no_grad():
        assert rel_err(pruned(y, physics), zero_removed(dense, pruned.pruning_record)(y, physics)) < 1e-10
    # Each prior ranked on its own weights: different priors keep different channels.
    kept = pruned.pruning_record.kept
    assert kept["priors.0.blocks.0.conv1"]["out"] != kept["priors.1.blocks.0.conv1"]["out"]


# ------------------------------------------------------------------------------------------------
# Counts and rounding
# ------------------------------------------------------------------------------------------------
def test_half_of_width_16_edsr_is_width_8_and_input_untouched():
    dense = EDSR(width=16, num_blocks=2)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    pruned = prune_channels(dense, 0.5)
    assert pruned.widths == (8,) * 6
    assert n_params(pruned) == n_params(EDSR(width=8, num_blocks=2))
    assert dense.widths == (16,) * 6  # the input model is not mutated
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    record = pruned.pruning_record
    assert record.params_before == n_params(dense) and record.params_after == n_params(pruned)
    assert json.loads(json.dumps(record.to_dict()))["units"][0]["widths_after"] == [8] * 6


@pytest.mark.parametrize(
    ("widths", "ratio", "round_to", "expected"),
    [
        ([8, 16, 32], 0.5, 8, [8, 8, 16]),  # <= round_to channels: untouched
        ([24, 32, 20], 0.3, 8, [16, 16, 8]),  # floor((1 - r) c) rounded down: 16.8 -> 16, 22.4 -> 16, 14 -> 8
        ([12, 20, 40], 0.1, 8, [8, 16, 32]),  # never below round_to
        ([20, 20, 12], 0.4, 4, [12, 12, 4]),  # 12 -> 12, 7 -> 4
        ([10, 6, 3], 0.5, 1, [5, 3, 1]),  # round_to=1: floor((1 - r) c), at least one channel
    ],
)
def test_round_to_is_honoured(widths, ratio, round_to, expected):
    pruned = prune_channels(DnCNN(depth=4, widths=widths), ratio, round_to=round_to)
    assert list(pruned.widths) == expected
    assert all(w % round_to == 0 for w, w0 in zip(pruned.widths, widths, strict=True) if w != w0)


def test_nothing_to_prune_is_an_error_also_through_a_deq():
    with pytest.raises(PruningError, match=r"nothing was pruned in EDSR at 'prior'"):
        prune_channels(DEQ(EDSR(width=8, num_blocks=2)), 0.5)


# ------------------------------------------------------------------------------------------------
# Protection of image channels
# ------------------------------------------------------------------------------------------------
def test_image_layers_are_found_and_untouched():
    edsr = prune_channels(EDSR(width=16, num_blocks=2, residual_to_input=True), 0.5)
    assert edsr.pruning_record.units[0].protected_auto == ["tail"]
    assert edsr.head.in_channels == 2 and edsr.tail.out_channels == 2
    assert "out" not in edsr.pruning_record.kept["tail"]

    dncnn = prune_channels(DnCNN(depth=4, width=16, residual=True), 0.5)
    assert dncnn.pruning_record.units[0].protected_auto == ["convs.3"]
    assert dncnn.convs[0].in_channels == 2 and dncnn.convs[3].out_channels == 2

    unet = prune_channels(NormUNet(chans=8, num_pool_layers=2), 0.5)
    assert unet.pruning_record.units[0].protected_auto == ["unet.up_conv.1.1"]

    # A user module: the branch added to the input mid-network and the output layer are protected.
    user = prune_channels(MidResidual(), 0.5)
    assert user.pruning_record.units[0].protected_auto == ["b", "d"]
    assert (user.a.out_channels, user.b.out_channels, user.c.out_channels, user.d.out_channels) == (8, 2, 8, 2)


def test_user_protected_layer_keeps_its_output_channels():
    pruned = prune_channels(EDSR(width=16, num_blocks=2), 0.5, protect=["blocks.1.conv1"])
    assert pruned.widths == (8, 8, 8, 16, 8, 8)
    assert pruned.pruning_record.units[0].protected_user == ["blocks.1.conv1"]
    with pytest.raises(ValueError, match="not a module of the model"):
        prune_channels(EDSR(width=16, num_blocks=2), 0.5, protect=["blocks.9.conv1"])


class _ChannelConstant(nn.Module):
    """Multiplies features by a per-channel constant buffer: no dependency graph can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 16, 3, padding=1), nn.Conv2d(16, 2, 3, padding=1)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 16).view(1, 16, 1, 1))

    def forward(self, x):
        return self.b(self.a(x) * self.scale)


def test_a_broken_pruned_model_is_an_error_not_a_silent_result():
    with pytest.raises(PruningError, match="fails on its example input"):
        prune_channels(_ChannelConstant(), 0.5)


# ------------------------------------------------------------------------------------------------
# Through solvers
# ------------------------------------------------------------------------------------------------
def test_every_solver_is_really_pruned():
    physics, y, _ = mri_problem(dtype=torch.complex64)
    models = {
        "deq": DEQ(EDSR(width=16, num_blocks=1), f_max_iter=3, f_tol=0.2),
        "du_tied": DeepUnfolding(EDSR(width=16, num_blocks=1), num_iters=2, tied=True),
        "du_untied": DeepUnfolding(EDSR(width=16, num_blocks=1), num_iters=2, tied=False),
        "varnet": VarNet(num_cascades=2, chans=8, pools=2),
        "user": MidResidual(),
    }
    for kind, model in models.items():
        check = None if kind == "user" else (y, physics)
        pruned = prune_channels(model, 0.5, check_inputs=check)
        units = pruned.pruning_record.units
        assert len(units) == {"du_untied": 2, "varnet": 2}.get(kind, 1), kind
        for unit, (_, prior) in zip(units, find_priors(pruned), strict=True):
            assert unit.params_after < unit.params_before, kind
            assert unit.params_after == n_params(prior), kind
        assert n_params(pruned) < n_params(model), kind
    # VarNet's cascades: 16 -> 8 and 32 -> 16; 8 stays.
    assert pruned_widths(prune_channels(models["varnet"], 0.5))[0] == (8, 8, 8, 8, 16, 16, 8, 8, 8, 8, 8, 8)


def pruned_widths(varnet: VarNet) -> list[tuple[int, ...]]:
    return [p.widths for p in varnet.priors]


def test_recursion_blocks_pruned_inside_keeping_modulated_channels():
    model = RecursiveUnfolding(
        [COASTBlock(channels=16, num_res_blocks=1), ISTANetPlusBlock(channels=16)],
        max_recursions=2,
        modulation_features=16,
    ).eval()
    with pytest.warns(PruningWarning, match="no per-layer widths"):
        pruned = prune_channels(model, 0.5)
    coast, ista = pruned.blocks
    assert coast.res_blocks[0][0].out_channels == 8 and coast.head.out_channels == 16
    assert ista.forward1.out_channels == 8 and ista.conv_d.out_channels == 16 and ista.backward2.out_channels == 16
    physics = BlockCS(0.25, block=33)
    x = torch.rand(1, 1, 66, 66, generator=torch.Generator().manual_seed(0))
    y = physics.A(x)
    with torch.no_grad():
        assert pruned(y, physics, x0=physics.A_adjoint(y, img_size=(66, 66))).shape == (1, 1, 66, 66)
    pruned.train()
    _, aux = pruned(y, physics, x0=physics.A_adjoint(y, img_size=(66, 66)), return_aux=True)
    assert torch.isfinite(aux["symmetry_loss"])


# ------------------------------------------------------------------------------------------------
# Checkpoints: reload without pickle; corrupt or mismatched files refused
# ------------------------------------------------------------------------------------------------
def test_pruned_models_reload_without_pickle(tmp_path):
    physics, y, _ = mri_problem(dtype=torch.complex64)
    for kind, model in {
        "deq": DEQ(EDSR(width=16, num_blocks=2), f_max_iter=3, f_tol=0.2),
        "du_untied": DeepUnfolding(DnCNN(depth=3, width=16), num_iters=2, tied=False),
        "varnet": VarNet(num_cascades=1, chans=8, pools=2),
    }.items():
        pruned = prune_channels(model, 0.5).eval()
        weights, config = save_model(pruned, tmp_path / kind)
        assert weights.suffix == ".safetensors" and config.suffix == ".json"
        loaded = load_model(tmp_path / kind)
        with torch.no_grad():
            assert torch.equal(loaded(y, physics), pruned(y, physics)), kind
        assert n_params(loaded) == n_params(pruned) < n_params(model)


def test_corrupt_and_mismatched_pruned_checkpoints_are_refused(tmp_path):
    pruned = prune_channels(DEQ(EDSR(width=16, num_blocks=2)), 0.5)
    weights, config = save_model(pruned, tmp_path / "deq")

    header = json.loads(config.read_text())
    assert header["config"]["args"]["prior"]["args"]["widths"] == [8] * 6
    # Widths that disagree with the weights: the rebuilt model has other shapes.
    header["config"]["args"]["prior"]["args"]["widths"] = [16, 8, 16, 16, 16, 16]
    config.write_text(json.dumps(header))
    with pytest.raises(
        CheckpointError, match=r"has shape \(8, 2, 3, 3\), but the config's DEQ expects \(16, 2, 3, 3\)"
    ):
        load_model(tmp_path / "deq")
    # Widths that break the residual ties cannot even be built.
    header["config"]["args"]["prior"]["args"]["widths"] = [8, 8, 16, 8, 8, 8]
    config.write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="cannot rebuild the model from its config"):
        load_model(tmp_path / "deq")

    save_model(pruned, tmp_path / "deq")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="do not match the sha256"):
        load_model(tmp_path / "deq")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "deq", verify=False)


# ------------------------------------------------------------------------------------------------
# Importances and options
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("importance", ["l1", "l2", "random", "taylor"])
def test_each_importance_prunes(importance):
    x = prior_input(size=16)
    batches = [(x + 0.1 * torch.randn_like(x), x)] if importance == "taylor" else None
    dense = seeded(EDSR(width=32, num_blocks=2))
    # Two steps (32 -> 24 -> 16): the record composes the kept indices of both.
    pruned = prune_channels(dense, 0.5, importance=importance, taylor_batches=batches, iterative_steps=2)
    assert pruned.widths == (16,) * 6
    with torch.no_grad():
        assert rel_err(pruned(x), zero_removed(dense, pruned.pruning_record)(x)) < 1e-10


def test_taylor_through_a_solver_and_its_errors():
    physics, y, x = mri_problem(dtype=torch.complex64)
    deq = DEQ(EDSR(width=16, num_blocks=1), f_max_iter=3, f_tol=0.2)
    pruned = prune_channels(deq, 0.5, importance="taylor", taylor_batches=[((y, physics), x)])
    assert pruned.prior.widths == (8,) * 4
    assert all(p.grad is None for p in pruned.parameters())
    pruned = prune_channels(deq, 0.5, importance="taylor", taylor_batches=lambda m: m(y, physics).abs().mean())
    assert pruned.prior.widths == (8,) * 4
    with pytest.raises(ValueError, match="needs gradients"):
        prune_channels(deq, 0.5, importance="taylor")
    du = DeepUnfolding(EDSR(width=16, num_blocks=1), num_iters=2, tied=False)
    with pytest.raises(PruningError, match="does not reach"):
        prune_channels(
            du, 0.5, importance="taylor", taylor_batches=lambda m: m.priors[0](x.real[:, None].repeat(1, 2, 1, 1)).sum()
        )


def test_global_pruning_removes_the_ratio_over_the_prior():
    dense = seeded(DnCNN(depth=5, widths=[64, 64, 64, 64]))
    pruned = prune_channels(dense, 0.5, global_pruning=True)
    assert all(w % 8 == 0 for w in pruned.widths)
    assert sum(pruned.widths) <= 128
    x = prior_input(size=16)
    with torch.no_grad():
        assert rel_err(pruned(x), zero_removed(dense, pruned.pruning_record)(x)) < 1e-10


def test_modes_flags_and_the_dense_model_are_kept():
    dense = DnCNN(depth=4, width=16, batch_norm=True).train()
    dense.convs[0].requires_grad_(False)
    stats = [n.running_mean.clone() for n in dense.norms]
    x = prior_input(size=16).float()
    pruned = prune_channels(
        dense, 0.5, example_inputs=x[:1], protect=[dense.convs[1]], importance="taylor", taylor_batches=[(x, x)]
    )
    assert pruned.training and all(m.training for m in pruned.modules())
    assert not pruned.convs[0].weight.requires_grad and pruned.convs[1].weight.requires_grad
    assert all(torch.equal(n.running_mean, s) for n, s in zip(dense.norms, stats, strict=True))
    assert pruned.widths == (8, 16, 8)  # convs.1 protected (given as a module of the dense model)
    assert pruned.norms[1].num_features == 8 and pruned.norms[0].num_features == 16


def test_argument_checks():
    edsr = EDSR(width=16, num_blocks=1)
    for ratio in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="ratio"):
            prune_channels(edsr, ratio)
    with pytest.raises(ValueError, match="importance"):
        prune_channels(edsr, 0.5, importance="l3")
    with pytest.raises(ValueError, match="round_to"):
        prune_channels(edsr, 0.5, round_to=0)


# ------------------------------------------------------------------------------------------------
# Parameters and MACs
# ------------------------------------------------------------------------------------------------
def edsr_macs(width: int, blocks: int, hw: int, channels: int = 2) -> int:
    """head (C -> w), 2K + 1 inner w -> w convs, tail (w -> C); 3x3 each."""
    return 9 * hw * (2 * channels * width + (2 * blocks + 1) * width * width)


def test_params_and_macs_before_and_after():
    dense = EDSR(width=16, num_blocks=2)
    pruned = prune_channels(dense, 0.5)
    before, after = count_params_and_macs(dense, (2, 24, 24)), count_params_and_macs(pruned, (1, 2, 24, 24))
    assert before == {"params": n_params(dense), "macs": edsr_macs(16, 2, 24 * 24)}
    assert after == {"params": n_params(pruned), "macs": edsr_macs(8, 2, 24 * 24)}
    inner = 5 * 9 * 24 * 24
    assert (before["macs"] - 2 * 9 * 24 * 24 * 2 * 16) / inner == 4 * (after["macs"] - 2 * 9 * 24 * 24 * 2 * 8) / inner

    deq = count_params_and_macs(DEQ(EDSR(width=16, num_blocks=2)), (2, 24, 24))
    assert deq["macs"] == before["macs"] and deq["macs_per_forward"] is None
    assert deq["params"] == n_params(dense) + 2  # alpha and gamma
    du = count_params_and_macs(DeepUnfolding(pruned, num_iters=3, tied=True), (2, 24, 24))
    assert du["applications_per_forward"] == 3 and du["macs_per_forward"] == 3 * after["macs"]
    unet = UNet(chans=8, num_pool_layers=2)
    counted = count_params_and_macs(unet, (2, 16, 16))["macs"]
    assert counted == sum(_unet_layer_macs(unet, 16))


def _unet_layer_macs(unet: UNet, size: int) -> list[int]:
    """Independent count: each conv's MACs from its weight shape and the resolution it runs at."""
    out = []
    for i, block in enumerate(unet.down_sample_layers):
        hw = (size >> i) ** 2
        out += [hw * m.weight[0].numel() * m.out_channels for m in (block.layers[0], block.layers[4])]
    hw = (size >> unet.num_pool_layers) ** 2
    out += [hw * m.weight[0].numel() * m.out_channels for m in (unet.conv.layers[0], unet.conv.layers[4])]
    for j, (t, c) in enumerate(zip(unet.up_transpose_conv, unet.up_conv, strict=True)):
        hw_in = (size >> (unet.num_pool_layers - j)) ** 2
        tconv = t.layers[0]
        out.append(hw_in * tconv.in_channels * tconv.out_channels * 4)
        block = c[0] if isinstance(c, nn.Sequential) and not hasattr(c, "layers") else c
        hw_out = 4 * hw_in
        out += [hw_out * m.weight[0].numel() * m.out_channels for m in (block.layers[0], block.layers[4])]
    final = unet.up_conv[-1][1]
    out.append(size * size * final.in_channels * final.out_channels)
    return out


def test_warnings_are_not_emitted_for_our_priors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned = prune_channels(NormUNet(chans=8, num_pool_layers=2), 0.5)
        pruned(prior_input(size=16).float())
