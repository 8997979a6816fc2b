"""Fine-tuning: the three strategies on tiny MRI problems, exact rotations, ground-truth-free data, the DEQ tolerance guard."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, default_collate

from mbdl_fast.data import MultiCoilBrainDataset
from mbdl_fast.data.simulate import birdcage_coil_maps
from mbdl_fast.fft import fftc
from mbdl_fast.finetune import (
    IMAGE_LOSSES,
    STRATEGIES,
    SelfSupervised,
    finetune,
    image_loss,
    make_strategy,
    mri_problem,
    problem_from_config,
    rotate,
    rotate_physics,
)
from mbdl_fast.physics import MRI, MultiCoilMRI, SuperResolution
from mbdl_fast.physics.masks import equispaced_mask
from mbdl_fast.priors import EDSR
from mbdl_fast.solvers import DEQ, DeepUnfolding, VarNet
from mbdl_fast.tasks import TrainConfig, make_dataset

SIZE, COILS = 16, 4
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny DEQs stop at their iteration cap by design here
        yield


@pytest.fixture(scope="module")
def data() -> Dataset:
    return Subset(MultiCoilBrainDataset("train", num_coils=COILS, size=SIZE), [0, 1])


class WithoutTarget(Dataset):
    """Acquisitions only: items with ``kspace``, ``coil_maps`` and ``mask``, no ground truth at all."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        return {key: item[key] for key in ("kspace", "coil_maps", "mask")}


class Adjoint(nn.Module):
    """f(y) = A^H y: exact for fully sampled multi-coil MRI (A^H A = I when Σ_c |S_c|² = 1)."""

    def forward(self, y: torch.Tensor, physics: nn.Module) -> torch.Tensor:
        return physics.A_adjoint(y)


def tiny(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "e2e":  # E2E-VarNet: coil maps from its own sensitivity network
        return VarNet(num_cascades=1, chans=4, pools=1, sens_net=True, sens_chans=4, sens_pools=1)
    prior = EDSR(width=8, num_blocks=1)
    if kind == "du":
        return DeepUnfolding(prior, num_iters=2)
    return DEQ(prior, f_max_iter=10, f_tol=1e-3)


def fixed_loss(strategy, model, batch, teacher=None) -> float:
    physics, y, target = mri_problem(batch, CPU)
    with torch.no_grad():
        out = strategy(model, physics, y, target, teacher, generator=torch.Generator().manual_seed(0))
    return float(out["loss"])


# ------------------------------------------------------------------------------------------------
# Rotations
# ------------------------------------------------------------------------------------------------
def test_rotate_is_an_exact_quarter_turn_group():
    odd = torch.randn(2, 3, 15, 15)
    for k in range(4):
        assert torch.equal(rotate(odd, k), torch.rot90(odd, k, dims=(-2, -1)))
    even = torch.randn(2, 16, 16, dtype=torch.complex64)
    assert torch.equal(rotate(rotate(rotate(rotate(even, 1), 1), 1), 1), even)
    assert torch.equal(rotate(rotate(even, 1), 3), even)
    # a permutation of pixels: nothing interpolated
    assert torch.equal(rotate(even, 1).abs().flatten().sort().values, even.abs().flatten().sort().values)
    assert rotate(torch.randn(1, 16, 24), 2).shape == (1, 16, 24)
    with pytest.raises(ValueError, match="16 x 24"):
        rotate(torch.randn(1, 16, 24), 1)


@pytest.mark.parametrize("n", [15, 16])
def test_rotation_commutes_with_the_centred_fft(n):
    x = torch.randn(2, n, n, dtype=torch.complex64)
    for k in range(1, 4):
        assert torch.allclose(fftc(rotate(x, k)), rotate(fftc(x), k), atol=1e-5)


def test_rotating_coil_maps_with_the_image_rotates_fully_sampled_kspace():
    maps = birdcage_coil_maps(COILS, (SIZE, SIZE), seed=3)[None]
    physics = MultiCoilMRI(torch.ones(1, 1, 1, SIZE), maps)
    x = torch.randn(1, SIZE, SIZE, dtype=torch.complex64)
    for k in range(1, 4):
        rotated = rotate_physics(physics, k)
        assert torch.allclose(rotated.A(rotate(x, k)), rotate(physics.A(x), k), atol=1e-5)
        # the maps must turn with the object: the same operator on the rotated image is another acquisition
        assert (physics.A(rotate(x, k)) - rotate(physics.A(x), k)).abs().max() > 0.1
        assert rotated.mask is physics.mask and physics.coil_maps is maps  # mask kept, original untouched
    assert rotate_physics(MRI(torch.ones(1, SIZE)), 1).coil_maps is None


# ------------------------------------------------------------------------------------------------
# Self-supervised loss
# ------------------------------------------------------------------------------------------------
def test_self_supervised_terms_vanish_where_they_should():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, SIZE, SIZE, dtype=torch.complex64)
    # Undersampled single coil: A A^H = M, so f = A^H fits the data exactly (L_MC = 0), but the rotated
    # image, sampled by the same mask, loses other frequencies: L_EQ sees the null space.
    single = MRI(equispaced_mask(SIZE, 4, 0.125, seed=0))
    parts = SelfSupervised()(Adjoint(), single, single.A(x), None, None, generator=gen)
    assert parts["mc"] < 1e-10 and parts["eq"] > 0.1
    # Fully sampled multi-coil: f = A^H is exact and equivariant (coil maps rotated), both terms vanish.
    maps = birdcage_coil_maps(COILS, (SIZE, SIZE), seed=1)[None].expand(2, -1, -1, -1)
    full = MultiCoilMRI(torch.ones(1, 1, 1, SIZE), maps)
    for k in (1, 2, 3):
        parts = SelfSupervised(rotations=(k,), noise_std=0.0)(Adjoint(), full, full.A(x), None, None, generator=gen)
        assert parts["loss"] < 1e-10


def test_self_supervised_measures_e2e_varnet_through_its_own_coil_maps():
    from mbdl_fast.fft import fft2c
    from mbdl_fast.finetune.strategies import relative_squared_error

    gen = torch.Generator().manual_seed(0)
    model = tiny("e2e").eval()
    x = torch.randn(2, SIZE, SIZE, dtype=torch.complex64, generator=gen)
    maps = birdcage_coil_maps(COILS, (SIZE, SIZE), seed=1)[None].expand(2, -1, -1, -1)
    mask = equispaced_mask(SIZE, 2, 0.25, seed=0)
    physics = MultiCoilMRI(mask, maps)
    y = physics.A(x)
    own = model.image_physics(y, physics)
    with torch.no_grad():
        estimated = model.sens_net(y, physics.mask)
        x1 = model(y, physics)
        parts = SelfSupervised(rotations=(2,))(model, physics, y, None, None, generator=gen)
    assert torch.allclose(own.coil_maps, estimated) and not torch.allclose(estimated, maps, atol=0.1)
    # L_MC = ||M F_c(S(y) x1) - y||² / ||y||² with the network's maps S(y), not the simulation's
    expected = relative_squared_error(physics.mask * fft2c(estimated * x1[:, None]), y)
    assert torch.allclose(parts["mc"], expected, rtol=1e-4)
    # a real scan has no known maps: the physics is the mask alone, and the loss still trains the sensitivity network
    parts = SelfSupervised()(model, MRI(mask), y, None, None, generator=gen)
    parts["loss"].backward()
    assert torch.isfinite(parts["loss"]) and all(p.grad.abs().sum() > 0 for p in model.sens_net.parameters())


def test_self_supervised_refuses_quarter_turns_of_non_square_images():
    x = torch.randn(1, 1, 16, 24)
    sr = SuperResolution("box", 2)
    with pytest.raises(ValueError, match="16 x 24"):
        SelfSupervised()(Adjoint(), sr, sr.A(x), None, None)
    assert torch.isfinite(SelfSupervised(rotations=(2,))(Adjoint(), sr, sr.A(x), None, None)["loss"])


# ------------------------------------------------------------------------------------------------
# The strategies train
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["du", "deq", "e2e"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_lowers_its_loss(data, name, kind):
    model = tiny(kind)
    teacher = tiny(kind, seed=1) if name == "school" else None
    batch = default_collate([data[0], data[1]])
    strategy = make_strategy(name)
    before = fixed_loss(strategy, model, batch, teacher)
    result = finetune(model, data, name, teacher=teacher, epochs=10, lr=3e-3, batch_size=2, progress=False)
    after = fixed_loss(strategy, model, batch, teacher)
    assert after < 0.9 * before, (before, after)
    assert len(result["history"]) == 10 and result["strategy"] == name
    if name == "self_supervised":
        assert {"train_mc", "train_eq"} <= set(result["history"][0])


def test_school_with_an_identical_teacher_has_zero_loss(data):
    model = tiny("deq")
    teacher = copy.deepcopy(model)
    assert fixed_loss(make_strategy("school"), model, default_collate([data[0], data[1]]), teacher) < 1e-10
    result = finetune(model, data, "school", teacher=teacher, epochs=1, batch_size=2, progress=False)
    assert result["history"][0]["train_loss"] < 1e-10
    with pytest.raises(ValueError, match="teacher"):
        finetune(model, data, "school", teacher=model, progress=False)
    with pytest.raises(ValueError, match="teacher"):
        finetune(model, data, "school", progress=False)


# ------------------------------------------------------------------------------------------------
# No ground truth
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["school", "self_supervised"])
def test_ground_truth_free_strategies_run_on_data_without_targets(data, name):
    no_target = WithoutTarget(data)
    assert "target" not in no_target[0]
    teacher = tiny("du", seed=1) if name == "school" else None
    result = finetune(
        tiny("du"), no_target, name, teacher=teacher, epochs=1, batch_size=2, val_dataset=no_target, progress=False
    )
    record = result["history"][0]
    assert record["val_psnr"] is None and record["val_ssim"] is None  # no metric without ground truth
    assert record["val_loss"] is not None and torch.isfinite(torch.tensor(record["val_loss"]))
    # with ground truth in the validation set, PSNR / SSIM are reported
    result = finetune(tiny("du"), no_target, name, teacher=teacher, batch_size=2, val_dataset=data, progress=False)
    assert result["history"][0]["val_psnr"] > 0 and 0 < result["history"][0]["val_ssim"] <= 1


def test_the_loop_hides_targets_from_ground_truth_free_strategies(data):
    class Spy:
        name, needs_target, needs_teacher = "spy", False, False
        seen = []

        def __call__(self, model, physics, y, target, teacher, generator=None):
            self.seen.append(target)
            return {"loss": model(y, physics).abs().mean()}

    finetune(tiny("du"), data, Spy(), batch_size=2, val_dataset=data, progress=False)
    assert Spy.seen and all(t is None for t in Spy.seen)


def test_supervised_needs_targets(data):
    with pytest.raises(ValueError, match="target"):
        finetune(tiny("du"), WithoutTarget(data), "supervised", batch_size=2, progress=False)


# ------------------------------------------------------------------------------------------------
# DEQ solver tolerance
# ------------------------------------------------------------------------------------------------
def test_deq_is_tuned_at_the_dense_tolerance_unless_told_otherwise(data, tmp_path):
    dense = DEQ(EDSR(width=8, num_blocks=1), f_max_iter=10, f_tol=1e-4)
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match="f_tol=0.004"):
        finetune(model, data, "supervised", solver_options={"f_tol": 4e-3}, progress=False)
    assert model.solver_options["f_tol"] == 1e-4  # a refused override leaves the model as it was
    # a student already loosened is refused against its teacher, too
    loose = copy.deepcopy(dense).configure(f_tol=4e-3)
    with pytest.raises(ValueError, match="teacher"):
        finetune(loose, data, "school", teacher=dense, progress=False)
    # the same tolerance is fine, and recorded
    result = finetune(model, data, "supervised", solver_options={"f_tol": 1e-4}, batch_size=2, progress=False)
    assert result["solver"]["same_tolerance"] and result["history"][0]["f_tol"] == 1e-4
    assert result["history"][0]["f_max_iter"] == 10
    # explicitly allowed: both settings recorded
    result = finetune(
        model,
        data,
        "supervised",
        solver_options={"f_tol": 4e-3},
        allow_different_tolerance=True,
        batch_size=2,
        val_dataset=data,
        out=tmp_path,
        progress=False,
    )
    assert result["history"][0]["f_tol"] == 4e-3 and result["solver"]["reference"]["f_tol"] == 1e-4
    assert not result["solver"]["same_tolerance"]
    saved = json.loads((tmp_path / "model_best.json").read_text())
    assert saved["metadata"]["finetune"]["solver"]["reference"]["f_tol"] == 1e-4
    with pytest.raises(ValueError, match="no DEQ"):
        finetune(tiny("du"), data, "supervised", solver_options={"f_tol": 1e-4}, progress=False)


# ------------------------------------------------------------------------------------------------
# Losses and problems
# ------------------------------------------------------------------------------------------------
def test_image_losses_vanish_on_identical_images_and_differentiate():
    x = torch.rand(2, SIZE, SIZE, dtype=torch.complex64, requires_grad=True)
    ref = torch.rand(2, SIZE, SIZE, dtype=torch.complex64)
    for kind in IMAGE_LOSSES:
        assert float(image_loss(ref, ref, kind)) < 1e-6
        (grad,) = torch.autograd.grad(image_loss(x, ref, kind), x)
        assert torch.isfinite(torch.view_as_real(grad)).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="loss"):
        make_strategy("supervised", loss="psnr")


def test_train_config_gives_the_problems():
    cfg = TrainConfig(task="mri", size=SIZE, coils=COILS, max_train_items=2)
    model = tiny("du")
    result = finetune(
        model, make_dataset(cfg, "train"), "self_supervised", batch_to_problem=cfg, batch_size=2, progress=False
    )
    assert result["history"][0]["train_loss"] > 0
    to_problem = problem_from_config(TrainConfig(task="sr", size=SIZE))
    physics, y, target = to_problem({"target": torch.rand(2, 1, SIZE, SIZE)}, CPU)
    assert y.shape == (2, 1, SIZE // 2, SIZE // 2) and target is not None
    physics, y, target = to_problem({"y": y}, CPU)  # measurements only
    assert target is None
    with pytest.raises(KeyError, match="'y'"):
        to_problem({}, CPU)


def test_jacobian_regulariser_joins_the_fine_tuning_loss():
    """jac_reg adds ||dT/dz||_F^2 / n at the last fixed point to any strategy's loss (DEQs only)."""
    import warnings

    from mbdl_fast.finetune import finetune
    from mbdl_fast.priors import EDSR
    from mbdl_fast.solvers import DEQ, DeepUnfolding
    from mbdl_fast.tasks import TrainConfig, make_dataset

    cfg = TrainConfig(task="mri", size=16, coils=2, max_train_items=2, max_val_items=2)
    torch.manual_seed(0)
    deq = DEQ(EDSR(2, 2, width=4, num_blocks=1), alpha=0.5, f_tol=1e-3, f_max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = finetune(deq, make_dataset(cfg, "train"), "supervised", batch_to_problem=cfg, epochs=1, batch_size=2,
                       jac_reg=0.5, progress=False)  # fmt: skip
    record = out["history"][0]
    assert record["train_jac"] > 0 and torch.isfinite(torch.tensor(record["train_jac"]))
    with pytest.raises(RuntimeError, match="jacobian_penalty"):
        DEQ(EDSR(2, 2, width=4, num_blocks=1)).jacobian_penalty()
    with pytest.raises(ValueError, match="jac_reg: the Jacobian regulariser needs a DEQ"):
        finetune(DeepUnfolding(EDSR(2, 2, width=4, num_blocks=1), num_iters=2), make_dataset(cfg, "train"),
                 "supervised", batch_to_problem=cfg, jac_reg=0.5, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="jac_reg: expected"):
        finetune(deq, make_dataset(cfg, "train"), "supervised", batch_to_problem=cfg, jac_reg=-1.0, progress=False)
