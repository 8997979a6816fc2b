"""Deep unfolding (PGD/HQS), VarNet cascades and recursive ISTA-Net+/COAST on tiny problems."""

import copy
import json

import pytest
import torch
from conftest import rel_err
from torch import nn
from torch.nn.functional import interpolate, mse_loss

from mbdl_fast.fft import fft2c, ifft2c
from mbdl_fast.physics.blockcs import BlockCS
from mbdl_fast.physics.masks import random_mask
from mbdl_fast.physics.mri import MRI, MultiCoilMRI
from mbdl_fast.registry import build, config_of, register
from mbdl_fast.solvers.recursion import COASTBlock, ISTANetPlusBlock, RecursiveUnfolding
from mbdl_fast.solvers.unfolding import DeepUnfolding
from mbdl_fast.solvers.varnet import VarNet


# ------------------------------------------------------------------------------------------------
# Tiny registered priors
# ------------------------------------------------------------------------------------------------
@register("tests.unfolding.Identity")
class Identity(nn.Module):
    def forward(self, x):
        return x

    def to_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@register("tests.unfolding.Zero")
class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)

    def to_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@register("tests.unfolding.TinyCNN")
class TinyCNN(nn.Module):
    """x + conv(tanh(conv(x))): channels -> width -> channels."""

    def __init__(self, channels: int = 2, width: int = 4):
        super().__init__()
        self.channels, self.width = channels, width
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.tanh(self.conv1(x)))

    def to_config(self):
        return {"channels": self.channels, "width": self.width}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def multicoil(batch=2, coils=3, h=8, w=10, seed=0, dtype=torch.complex64):
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(batch, coils, h, w, dtype=dtype, generator=gen)
    maps = maps / maps.abs().pow(2).sum(dim=1, keepdim=True).sqrt()  # Σ_c |S_c|² = 1
    phys = MultiCoilMRI(random_mask(w, 2, 0.3, seed=seed), maps)
    x = torch.randn(batch, h, w, dtype=dtype, generator=gen)
    return phys, x, phys.A(x)


def blockcs(batch=2, size=66, ratio=0.25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    phys = BlockCS(ratio, img_size=(size, size), seed=seed)
    x = interpolate(torch.rand(batch, 1, 6, 6, generator=gen), size=(size, size), mode="bilinear")
    return phys, x, phys.A(x)


# ------------------------------------------------------------------------------------------------
# DeepUnfolding
# ------------------------------------------------------------------------------------------------
def test_tied_weights_are_one_set_of_parameters():
    prior = TinyCNN()
    k = 4
    tied = DeepUnfolding(prior, num_iters=k, tied=True)
    assert n_params(tied) == n_params(prior) + 1
    assert all(tied.prior(i) is prior for i in range(k))
    assert tied.gamma.shape == (1,)

    untied = DeepUnfolding(TinyCNN(), num_iters=k, tied=False)
    assert n_params(untied) == k * n_params(prior) + k
    assert len({id(untied.prior(i)) for i in range(k)}) == k
    assert len({p.data_ptr() for p in untied.parameters()}) == len(list(untied.parameters()))

    frozen = DeepUnfolding(TinyCNN(), num_iters=k, tied=True, learn_gamma=False)
    assert n_params(frozen) == n_params(prior)
    assert "gamma" in frozen.state_dict()


def test_prior_list_checks():
    with pytest.raises(ValueError, match="tied weights take one prior"):
        DeepUnfolding([TinyCNN(), TinyCNN()], num_iters=2, tied=True)
    with pytest.raises(ValueError, match="a list of 3"):
        DeepUnfolding([TinyCNN(), TinyCNN()], num_iters=3, tied=False)
    p = TinyCNN()
    with pytest.raises(ValueError, match="appears twice"):
        DeepUnfolding([p, p], num_iters=2, tied=False)
    with pytest.raises(ValueError, match="algorithm"):
        DeepUnfolding(p, algorithm="admm")


def test_tied_gradient_accumulates_over_iterations():
    phys, x, y = multicoil()
    model = DeepUnfolding(TinyCNN(), num_iters=3, tied=True, gamma_init=0.5)
    model(y, phys).abs().pow(2).sum().backward()
    assert model.gamma.grad is not None and model.gamma.grad.shape == (1,)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("problem", ["mri", "blockcs"])
def test_pgd_with_identity_prior_is_plain_dc_steps(problem):
    phys, _, y = multicoil() if problem == "mri" else blockcs()
    k, gamma = 4, 0.7
    model = DeepUnfolding(Identity(), num_iters=k, algorithm="pgd", tied=False, gamma_init=gamma)
    with torch.no_grad():
        out = model(y, phys)
    ref = phys.A_adjoint(y)
    for _ in range(k):
        ref = phys.dc_step_reference(ref, y, gamma)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("problem", ["mri", "blockcs"])
def test_hqs_with_identity_prior_is_alternating_prox(problem):
    if problem == "mri":
        gen = torch.Generator().manual_seed(1)
        phys = MRI(random_mask(10, 2, 0.3, seed=1))
        y = phys.A(torch.randn(2, 8, 10, dtype=torch.complex64, generator=gen))
    else:
        phys, _, y = blockcs()
    k, gamma = 3, 0.4
    model = DeepUnfolding(Identity(), num_iters=k, algorithm="hqs", tied=True, gamma_init=gamma)
    with torch.no_grad():
        out = model(y, phys)
    ref = phys.A_adjoint(y)
    for _ in range(k):
        ref = phys.prox_l2(ref, y, gamma)
    assert rel_err(out, ref) < 1e-5


def test_hqs_order_is_prior_then_prox():
    """z_k = D(x_k), x_{k+1} = prox(z_k): with D = 0 every iterate is prox(0) = gamma/(1+gamma) A^H y."""
    phys, _, y = blockcs()
    model = DeepUnfolding(Zero(), num_iters=2, algorithm="hqs", gamma_init=3.0)
    with torch.no_grad():
        out = model(y, phys)
    assert rel_err(out, 0.75 * phys.A_adjoint(y)) < 1e-5


def test_x0_is_the_starting_point():
    phys, x, y = multicoil()
    model = DeepUnfolding(Identity(), num_iters=1, gamma_init=0.3)
    with torch.no_grad():
        out = model(y, phys, x0=x)
    assert rel_err(out, x) < 1e-5  # y = A x: x is a fixed point of the DC step
    with pytest.raises(ValueError, match="NaN"):
        model(y, phys, x0=torch.full_like(x, float("nan")))


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("algorithm", ["pgd", "hqs"])
def test_checkpointing_gives_same_output_and_gradients(algorithm):
    phys = MRI(random_mask(10, 2, 0.3, seed=2))
    x = torch.randn(2, 8, 10, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    y = phys.A(x)
    plain = DeepUnfolding(TinyCNN(), num_iters=3, algorithm=algorithm, tied=False, gamma_init=0.6)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = True
    outs = []
    for model in (plain, ckpt):
        out = model(y, phys)
        (out - x).abs().pow(2).sum().backward()
        outs.append(out.detach())
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for a, b in zip(_grads(plain), _grads(ckpt), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _saved_bytes(model, y, physics) -> int:
    """Bytes autograd keeps for backward during one forward (outside checkpointed regions)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(y, physics)
    return total


def test_checkpointing_keeps_only_the_iteration_inputs():
    phys = MRI(random_mask(32, 2, 0.3, seed=2))
    y = phys.A(torch.randn(2, 32, 32, dtype=torch.complex64))
    image_bytes = 2 * 32 * 32 * 8
    saved = {}
    for k in (2, 6):
        for ckpt in (False, True):
            model = DeepUnfolding(TinyCNN(width=16), num_iters=k, tied=False, checkpointing=ckpt)
            saved[k, ckpt] = _saved_bytes(model, y, phys)
    per_iter_plain = (saved[6, False] - saved[2, False]) / 4
    per_iter_ckpt = (saved[6, True] - saved[2, True]) / 4
    # checkpointed: only (x_k, y, A^H y) per iteration, and y, A^H y are the same tensors every time
    assert per_iter_ckpt <= 3 * image_bytes
    assert per_iter_plain > 10 * image_bytes


# ------------------------------------------------------------------------------------------------
# VarNet
# ------------------------------------------------------------------------------------------------
def test_varnet_with_zero_prior_is_a_kspace_projection():
    phys, x, y = multicoil()
    model = VarNet(num_cascades=2, priors=Zero(), dc_weight_init=1.0)
    x0 = torch.randn_like(x)
    with torch.no_grad():
        out = model(y, phys, x0=x0)
        from_y = model(y, phys)
    k0 = fft2c(phys.coil_maps * x0[:, None])
    m = phys.mask
    projected = (1 - m) * k0 + m * y  # keep the unsampled k-space of x0, replace the sampled by y
    expected = torch.sum(phys.coil_maps.conj() * ifft2c(projected), dim=1)
    assert rel_err(out, expected) < 1e-5
    assert rel_err(from_y, phys.A_adjoint(y)) < 1e-5  # k_0 = y is already consistent


def test_varnet_shape_dtype_and_gradients():
    phys, x, y = multicoil()
    model = VarNet(num_cascades=3, priors=TinyCNN())
    assert len({id(p) for p in model.priors}) == 3 and all(c.dc_weight.shape == (1,) for c in model.cascades)
    out = model(y, phys)
    assert out.shape == x.shape and out.dtype == torch.complex64
    (out - x).abs().pow(2).sum().backward()
    # k_0 = y is consistent, so the first soft DC vanishes and its weight gets no gradient
    dc_grads = [c.dc_weight.grad for c in model.cascades]
    assert dc_grads[0] == 0 and all(g != 0 for g in dc_grads[1:])
    assert all(p.grad is not None for p in model.parameters())
    cs_physics, _, cs_y = blockcs()
    with pytest.raises(TypeError, match="MultiCoilMRI"):
        model(cs_y, cs_physics)


def test_varnet_checkpointing_matches():
    phys, x, y = multicoil()
    plain = VarNet(num_cascades=2, priors=TinyCNN())
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = True
    for model in (plain, ckpt):
        (model(y, phys) - x).abs().pow(2).sum().backward()
    for a, b in zip(_grads(plain), _grads(ckpt), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_varnet_default_normunet_prior():
    phys, x, y = multicoil(h=16, w=16)
    model = VarNet(num_cascades=2, chans=4, pools=2)
    assert all(type(p).__name__ == "NormUNet" for p in model.priors)
    with torch.no_grad():
        out = model(y, phys)
    assert out.shape == x.shape and out.dtype == torch.complex64


# ------------------------------------------------------------------------------------------------
# Recursion
# ------------------------------------------------------------------------------------------------
def recursive(kind="ista", blocks=2, R=3, feats=8, **kw):
    block = ISTANetPlusBlock if kind == "ista" else COASTBlock
    return RecursiveUnfolding(
        [block(channels=feats) for _ in range(blocks)], max_recursions=R, modulation_features=feats, **kw
    )


def test_random_recursion_counts_vary_and_stay_in_bounds():
    model = recursive(blocks=3, R=4, seed=0).train()
    draws = [model.recursion_counts() for _ in range(50)]
    assert all(len(d) == 3 and all(1 <= c <= 4 for c in d) for d in draws)
    assert len({tuple(d) for d in draws}) > 10
    assert {c for d in draws for c in d} == {1, 2, 3, 4}
    again = recursive(blocks=3, R=4, seed=0).train()
    assert [again.recursion_counts() for _ in range(50)] == draws  # seeded generator: reproducible

    assert model.eval().recursion_counts() == [4, 4, 4]
    assert model.train().recursion_counts([1, 2, 3]) == [1, 2, 3]
    assert recursive(blocks=3, R=4, train_random=False).train().recursion_counts() == [4, 4, 4]
    with pytest.raises(ValueError, match=r"in \[1, 4\]"):
        model.recursion_counts([1, 5, 1])
    with pytest.raises(ValueError, match="3 ints"):
        model.recursion_counts([1, 1])


def test_forward_uses_drawn_counts_per_batch():
    phys, _, y = blockcs(batch=1)
    model = recursive(R=3, seed=1).train()
    seen = set()
    for _ in range(6):
        _, aux = model(y, phys, return_aux=True)
        assert aux["recursions"] == model.last_recursions and aux["iterations"] == sum(aux["recursions"])
        seen.add(tuple(aux["recursions"]))
    assert len(seen) > 1
    with torch.no_grad():
        _, aux = model.eval()(y, phys, return_aux=True)
    assert aux["recursions"] == [3, 3] and "symmetry_loss" not in aux


def test_modulation_mlp_shapes_and_features():
    model = recursive(feats=8, R=2)
    first, act, last = model.modulation
    assert (first.in_features, first.out_features) == (3, 8) and isinstance(act, nn.ReLU)
    assert (last.in_features, last.out_features) == (8, 8)
    assert n_params(model.modulation) == 3 * 8 + 8 + 8 * 8 + 8
    assert model.modulation_scales(0.25, 3, 1).shape == (1, 8)
    assert model.modulation_scales(torch.tensor([0.25, 0.5]), 3, 1).shape == (2, 8)
    # the features are (ratio, total / (L R), index / (L R)) with L R = 4
    expected = model.modulation(torch.tensor([[0.25, 0.75, 0.5]]))
    assert torch.allclose(model.modulation_scales(0.25, 3, 2), expected)
    with pytest.raises(ValueError, match="modulation_features"):
        RecursiveUnfolding([COASTBlock(channels=4)], modulation_features=8)


@pytest.mark.parametrize("kind", ["ista", "coast"])
def test_scales_change_the_block_output(kind):
    phys, _, y = blockcs(batch=2)
    block = (ISTANetPlusBlock if kind == "ista" else COASTBlock)(channels=8).eval()
    x0 = phys.A_adjoint(y)
    with torch.no_grad():
        plain, _ = block(x0, y, phys)
        ones, _ = block(x0, y, phys, scales=torch.ones(8))
        doubled, _ = block(x0, y, phys, scales=torch.full((2, 8), 2.0))
        per_sample, _ = block(x0, y, phys, scales=torch.tensor([[1.0] * 8, [2.0] * 8]))
    assert torch.equal(plain, ones)
    assert rel_err(doubled, plain) > 1e-4
    assert torch.allclose(per_sample[0], plain[0]) and torch.allclose(per_sample[1], doubled[1])
    with pytest.raises(ValueError, match="one scale per channel"):
        block(x0, y, phys, scales=torch.ones(4))
    with pytest.raises(ValueError, match="one scale per channel"):
        block(x0, y, phys, scales=torch.ones(3, 8))


def test_istanet_block_reports_symmetry_in_training():
    phys, _, y = blockcs(batch=1)
    block = ISTANetPlusBlock(channels=8).train()
    x0 = phys.A_adjoint(y)
    _, aux = block(x0, y, phys)
    assert aux["symmetry"].shape == (1, 8, 66, 66)
    u = block.conv_d(x0 - block.rho * (phys.A_adjoint_A(x0) - x0))
    assert torch.allclose(aux["symmetry"], block.inverse_transform(block.transform(u)) - u, atol=1e-6)
    model = recursive(R=2, seed=0).train()
    _, aux = model(y, phys, return_aux=True)
    assert aux["symmetry_loss"].dim() == 0 and aux["symmetry_loss"] > 0


@pytest.mark.parametrize("kind", ["ista", "coast"])
def test_training_steps_lower_the_loss_on_block_cs(kind):
    torch.manual_seed(0)
    phys, x, y = blockcs(batch=2, ratio=0.25)
    model = recursive(kind, blocks=2, R=2, feats=8, seed=0)

    def eval_loss():
        with torch.no_grad():
            return float(mse_loss(model.eval()(y, phys), x))

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(12):
        out, aux = model.train()(y, phys, return_aux=True)
        loss = mse_loss(out, x) + 0.01 * aux.get("symmetry_loss", 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_recursion_checkpointing_matches():
    phys, x, y = blockcs(batch=1)
    plain = recursive("ista", R=2, seed=0).train()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = True
    outs = []
    for model in (plain, ckpt):
        out, aux = model(y, phys, recursions=[2, 1], return_aux=True)
        (mse_loss(out, x) + 0.01 * aux["symmetry_loss"]).backward()
        outs.append(out.detach())
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    for a, b in zip(_grads(plain), _grads(ckpt), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_recursion_on_complex_mri_with_two_channel_blocks():
    phys, x, y = multicoil()
    blocks = [COASTBlock(channels=4, num_res_blocks=1, image_channels=2) for _ in range(2)]
    model = RecursiveUnfolding(blocks, max_recursions=2, modulation_features=4).eval()
    with torch.no_grad():
        out = model(y, phys)
    assert out.shape == x.shape and out.dtype == torch.complex64
    with pytest.raises(ValueError, match="image_channels=2"):
        recursive("coast", feats=4)(y, phys)


# ------------------------------------------------------------------------------------------------
# Config round trips
# ------------------------------------------------------------------------------------------------
def _round_trip(model: nn.Module) -> nn.Module:
    config = json.loads(json.dumps(config_of(model)))
    rebuilt = build(config)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


@pytest.mark.parametrize(
    "make",
    [
        lambda: DeepUnfolding(TinyCNN(), num_iters=3, algorithm="pgd", tied=True, gamma_init=0.4),
        lambda: DeepUnfolding(TinyCNN(width=3), num_iters=2, algorithm="hqs", tied=False, learn_gamma=False),
        lambda: VarNet(num_cascades=2, priors=[TinyCNN(width=3), TinyCNN(width=5)], checkpointing=True),
    ],
    ids=["du-tied-pgd", "du-untied-hqs", "varnet"],
)
def test_config_round_trip_mri(make):
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # differ from any fresh initialisation
    rebuilt = _round_trip(model)
    assert rebuilt.to_config() == model.to_config()
    phys = MRI(random_mask(10, 2, 0.3, seed=3))
    y = phys.A(torch.randn(2, 8, 10, dtype=torch.complex64))
    with torch.no_grad():
        assert torch.equal(model.eval()(y, phys), rebuilt.eval()(y, phys))


@pytest.mark.parametrize("kind", ["ista", "coast"])
def test_config_round_trip_recursion(kind):
    torch.manual_seed(0)
    model = recursive(kind, blocks=2, R=2, feats=8, seed=5)
    rebuilt = _round_trip(model)
    assert rebuilt.to_config() == model.to_config()
    assert [type(b) for b in rebuilt.blocks] == [type(b) for b in model.blocks]
    phys, _, y = blockcs(batch=1)
    with torch.no_grad():
        assert torch.equal(model.eval()(y, phys), rebuilt.eval()(y, phys))
