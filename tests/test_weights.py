"""The shipped models load without pickle and beat the zero-filled / bicubic baselines on shipped data."""

import warnings

import pytest
import torch

from mbdl_fast.checkpoint import read_metadata
from mbdl_fast.metrics import psnr
from mbdl_fast.tasks import TrainConfig, make_dataset, prepare_batch
from mbdl_fast.weights import SHIPPED, load_pretrained, weights_path


def first_test_batch(name: str, count: int = 2):
    cfg = TrainConfig.from_dict(read_metadata(weights_path(name))["config"])
    data = make_dataset(cfg, "test")
    batch = torch.utils.data.default_collate([data[i] for i in range(count)])
    return prepare_batch(cfg, batch, torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_loads(name):
    model = load_pretrained(name)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize(
    "name",
    [
        "deq_mri_4x",
        "deq_mri_6x_uniform",
        "varnet_mri_4x",
        "deq_mri_4x_pruned50",
        "e2e_varnet_mri_4x",
        "e2e_varnet_mri_4x_pruned50",
    ],
)
def test_shipped_mri_models_beat_zero_filled_by_several_db(name):
    physics, y, target = first_test_batch(name)
    model = load_pretrained(name)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short DEQ cap here; the demo runs tol 1e-4
        out = model(y, physics)
    gain = float(psnr(out.abs(), target.abs()) - psnr(physics.A_adjoint(y).abs(), target.abs()))
    assert gain > 4.0


def test_shipped_sr_model_beats_bicubic_interpolation():
    physics, y, target = first_test_batch("deq_sr_2x", count=8)
    model = load_pretrained("deq_sr_2x").configure(f_tol=1e-4, f_max_iter=100)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(y, physics)
    bicubic = torch.nn.functional.interpolate(y, scale_factor=2, mode="bicubic", align_corners=False)
    assert float(psnr(out, target)) > float(psnr(bicubic, target))


def test_shipped_pruned_model_is_deq_mri_4x_with_half_the_channels():
    dense, pruned = load_pretrained("deq_mri_4x"), load_pretrained("deq_mri_4x_pruned50")
    assert set(dense.prior.widths) == {32} and set(pruned.prior.widths) == {16}
    assert len(pruned.prior.widths) == len(dense.prior.widths)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pruned) < count(dense) / 3.5
    pruning = read_metadata(weights_path("deq_mri_4x_pruned50"))["pruning"]
    assert pruning["ratio"] == 0.5 and pruning["finetune"] == "supervised"


def test_shipped_e2e_varnet_estimates_its_own_coil_maps_and_is_small():
    from mbdl_fast.physics import MRI

    model = load_pretrained("e2e_varnet_mri_4x")
    assert model.estimates_coil_maps and model.num_cascades == 4
    assert weights_path("e2e_varnet_mri_4x").with_suffix(".safetensors").stat().st_size < 2_000_000
    physics, y, _ = first_test_batch("e2e_varnet_mri_4x", count=1)
    with torch.no_grad():
        # the simulation's coil maps are not used: the mask alone gives the same image
        assert torch.equal(model(y, physics), model(y, MRI(physics.mask)))


def test_shipped_pruned_e2e_varnet_halves_the_wide_layers_of_cascades_and_sensitivity_network():
    from mbdl_fast.solvers import find_priors

    dense, pruned = load_pretrained("e2e_varnet_mri_4x"), load_pretrained("e2e_varnet_mri_4x_pruned50")
    assert pruned.estimates_coil_maps and pruned.num_cascades == dense.num_cascades
    for (name, small), (_, big) in zip(find_priors(pruned), find_priors(dense), strict=True):
        # oneDNN's 16-channel blocks: layers wider than 16 halved, the others kept (sens_net included)
        assert list(small.widths) == [w // 2 if w > 16 else w for w in big.widths], name
    assert read_metadata(weights_path("e2e_varnet_mri_4x_pruned50"))["pruning"] == {
        "ratio": 0.5,
        "strategy": "supervised",
    }
