"""Test-time adaptation on the real scan: phase-aligned maps, held-out measurement splits, warm starts, early
stopping in the fine-tuning loop, and ``mbdl-fast adapt-real`` end to end with a tiny DEQ (never the reference)."""

import json
import math
import warnings

import pytest
import torch
from conftest import rel_err
from torch import nn

from mbdl_fast.adapt_real import adapt_checkpoint, validation_split
from mbdl_fast.checkpoint import load_model, save_model
from mbdl_fast.cli import main
from mbdl_fast.coils import align_phase
from mbdl_fast.data.simulate import birdcage_coil_maps
from mbdl_fast.demo_real import _settings, cg_sense, real_setting
from mbdl_fast.finetune import SplitMeasurements, WarmStarts, acs_band, finetune
from mbdl_fast.physics import MultiCoilMRI
from mbdl_fast.physics.masks import random_mask
from mbdl_fast.priors import EDSR
from mbdl_fast.solvers import DEQ

SIZE, COILS = 32, 4


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained tiny DEQs may stop at their cap
        yield


def _problem(seed: int = 0, dtype: torch.dtype = torch.complex64) -> tuple[MultiCoilMRI, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, SIZE, SIZE, generator=g, dtype=torch.complex128).to(dtype)
    maps = birdcage_coil_maps(COILS, (SIZE, SIZE), seed=seed)[None].expand(2, -1, -1, -1).to(dtype)
    physics = MultiCoilMRI(random_mask(SIZE, 4, 0.125, seed=seed), maps)
    return physics, physics.A(x), x


class Adjoint(nn.Module):
    def forward(self, y: torch.Tensor, physics: nn.Module) -> torch.Tensor:
        return physics.A_adjoint(y)


def test_align_phase_moves_the_image_phase_into_the_maps_and_keeps_cg_sense_magnitudes():
    physics, y, _ = _problem(dtype=torch.complex128)
    cg, _ = cg_sense(physics, y)
    aligned = MultiCoilMRI(physics.mask, align_phase(physics.coil_maps, cg))
    cg_aligned, _ = cg_sense(aligned, y)
    assert rel_err(cg_aligned.abs(), cg.abs()) < 1e-10  # the same SENSE model: iterates times e^{-i arg cg}
    assert rel_err(cg_aligned, cg.abs().to(cg.dtype)) < 1e-10  # and the image it was aligned to is now real
    assert rel_err((aligned.coil_maps.abs() ** 2).sum(1), (physics.coil_maps.abs() ** 2).sum(1)) < 1e-12
    zero = torch.zeros_like(cg)
    assert torch.equal(align_phase(physics.coil_maps, zero), physics.coil_maps)  # no phase where the image is 0
    with pytest.raises(ValueError, match=r"image: expected complex \(B, H, W\) = \(2, 32, 32\)"):
        align_phase(physics.coil_maps, cg[:1])
    with pytest.raises(TypeError, match="image: expected complex"):
        align_phase(physics.coil_maps, cg.abs())
    with pytest.raises(ValueError, match="image: contains NaN"):
        align_phase(physics.coil_maps, torch.full_like(cg, math.nan))


def test_acs_band_and_validation_split_of_the_demo_masks():
    for key, _, mask, _ in _settings(128):
        band = acs_band(mask)
        sampled = (mask > 0).nonzero()[:, -1]
        # the band is the contiguous sampled run through column 64 and lies inside the mask
        assert bool(band[..., 64]) and bool((mask[band] > 0).all())
        left, right = int(band.nonzero()[:, -1].min()), int(band.nonzero()[:, -1].max())
        assert right - left + 1 == int(band.sum()) >= 8
        assert mask[..., left - 1] == 0 and mask[..., right + 1] == 0
        train, held = validation_split(mask, 0.2, seed=1)
        assert torch.equal(train + held, mask) and not bool((train * held).any()) and bool((train[band] > 0).all())
        outside = len(sampled) - int(band.sum())
        assert int(held.sum()) == max(1, round(0.2 * outside)), key
        assert torch.equal(validation_split(mask, 0.2, seed=1)[1], held)  # seeded
    assert real_setting("random4x", 128)[0].startswith("fastMRI random 4x")
    with pytest.raises(ValueError, match="setting: expected one of"):
        real_setting("random8x", 128)
    with pytest.raises(ValueError, match="validation: expected a number in"):
        validation_split(mask, 1.5)


def test_held_out_error_against_its_definition():
    physics, y, x = _problem(seed=2, dtype=torch.complex128)
    strategy = SplitMeasurements(holdout=0.4)
    keep = strategy.split(physics.mask, torch.Generator().manual_seed(0))
    held = physics.mask - keep
    assert bool((keep[acs_band(physics.mask)] > 0).all()) and float(held.sum()) > 0
    # the definition, by hand: reconstruct from the kept columns, compare on the held-out ones
    inside = MultiCoilMRI(keep, physics.coil_maps)
    x_keep = inside.A_adjoint(keep * y)
    residual = held * (physics.A(x_keep) - y)
    expected = ((residual.abs() ** 2).sum((1, 2, 3)) / ((held * y).abs() ** 2).sum((1, 2, 3))).mean()
    got = strategy.held_out_error(Adjoint(), physics, y, keep)
    assert abs(float(got) - float(expected)) <= 1e-10 * float(expected) and float(got) > 0.1

    class Oracle(nn.Module):  # the true image predicts every held-out measurement of noise-free data
        def forward(self, y, physics):
            return x

    assert float(strategy.held_out_error(Oracle(), physics, y, keep)) < 1e-20
    assert float(strategy(Oracle(), physics, y, generator=torch.Generator().manual_seed(3))["loss"]) < 1e-20
    with pytest.raises(ValueError, match=r"split: expected a column mask"):
        strategy(Adjoint(), MultiCoilMRI(torch.ones(1, 1, SIZE, SIZE), physics.coil_maps), y)
    with pytest.raises(ValueError, match="holdout: expected a number in"):
        SplitMeasurements(holdout=1.0)


def test_warm_starts_reach_the_same_fixed_point_in_fewer_iterations():
    physics, y, _ = _problem(seed=4)
    torch.manual_seed(0)
    model = DEQ(EDSR(width=4, num_blocks=1), alpha=0.2, f_tol=1e-5, f_max_iter=200).eval()
    warm = WarmStarts(enabled=True)
    with torch.no_grad():
        cold = warm(model, physics, y)
        cold_iterations = model.last_info["iterations_per_sample"]
        again = warm(model, physics, y)  # starts at its own fixed point
    assert bool(model.last_info["converged"].all())
    assert bool((model.last_info["iterations_per_sample"] < cold_iterations).all())
    assert rel_err(again, cold) < 1e-4
    with pytest.raises(TypeError, match="warm_start: expected a bool"):
        WarmStarts("yes")


def test_finetune_keeps_the_model_of_the_lowest_val_objective_and_stops_on_patience():
    physics, y, _ = _problem(seed=5)
    item = {"kspace": y[0], "coil_maps": physics.coil_maps[0], "mask": physics.mask[0]}
    torch.manual_seed(0)
    model = DEQ(EDSR(width=4, num_blocks=1), alpha=0.2, f_tol=1e-3, f_max_iter=10)
    scores, states = iter([3.0, 1.0, 2.0, 2.5, 0.5]), []

    def objective(m: nn.Module) -> float:
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scores)

    result = finetune(model, [item], SplitMeasurements(), epochs=5, lr=1e-2, batch_size=1, val_objective=objective,
                      patience=2, progress=False)  # fmt: skip
    assert [r["val_objective"] for r in result["history"]] == [3.0, 1.0, 2.0, 2.5]  # stopped before 0.5
    assert result["best_epoch"] == 1
    assert all(torch.equal(v, states[1][k]) for k, v in model.state_dict().items())
    assert not torch.equal(states[1]["prior.head.weight"], states[3]["prior.head.weight"])
    with pytest.raises(ValueError, match="patience: early stopping needs a val_objective"):
        finetune(model, [item], SplitMeasurements(), patience=2, progress=False)


def test_adapt_real_end_to_end_never_reads_the_unsampled_kspace(tmp_path, monkeypatch, capsys):
    """A tiny DEQ adapted on the real scan by the CLI; the same run on k-space whose unsampled columns are zeroed
    gives the same weights: the adaptation sees the undersampled measurements only."""
    import mbdl_fast.data

    torch.manual_seed(0)
    source = tmp_path / "tiny"
    save_model(DEQ(EDSR(width=4, num_blocks=1), alpha=0.2, f_tol=1e-3, f_max_iter=20), source)
    args = ["adapt-real", "--checkpoint", str(source), "--out", str(tmp_path / "adapted"), "--steps", "2",
            "--lr", "1e-3", "--jac-reg", "0.01", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "kept step" in capsys.readouterr().out
    adapted = load_model(tmp_path / "adapted")
    header = json.loads((tmp_path / "adapted.json").read_text())
    record = header["metadata"]["adapted"]
    assert record["source_sha256"] == json.loads((tmp_path / "tiny.json").read_text())["sha256"]
    assert record["setting"] == "random4x" and len(record["history"]) == 2 and record["best_step"] in (0, 1)
    assert 1 <= record["final"]["iterations"] <= 100 and 0 <= record["final"]["validation_error"] < 10
    assert (adapted.solver_options["f_tol"], adapted.solver_options["f_max_iter"]) == (1e-4, 100)  # the demo's
    original = load_model(source)
    assert not all(
        torch.equal(a, b) for a, b in zip(adapted.state_dict().values(), original.state_dict().values(), strict=True)
    )

    full = mbdl_fast.data.load_real_brain()
    _, mask, _ = real_setting("random4x", full.shape[-1])
    monkeypatch.setattr(mbdl_fast.data, "load_real_brain", lambda: mask * full)
    again = adapt_checkpoint(source, tmp_path / "again", "random4x", steps=2, lr=1e-3, jac_reg=0.01, progress=False)
    for (name, a), b in zip(adapted.state_dict().items(), again["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_shipped_adapted_model_is_deq_mri_4x_adapted_without_the_reference():
    """Its record names the shipped deq_mri_4x it came from (rerun ``STEPS=10 scripts/train_shipped.sh`` after new
    deq_mri_4x weights), the demo's 4x setting, and a converged final check at the demo's tolerance."""
    from mbdl_fast.checkpoint import read_metadata
    from mbdl_fast.weights import load_pretrained, weights_path

    record = read_metadata(weights_path("deq_mri_4x_real_ss"))["adapted"]
    source = json.loads(weights_path("deq_mri_4x").with_suffix(".json").read_text())
    assert record["source_sha256"] == source["sha256"] and record["setting"] == "random4x"
    assert "never on its reference" in record["note"] and record["final"]["converged"] == 1.0
    model = load_pretrained("deq_mri_4x_real_ss")
    assert (model.solver_options["f_tol"], model.solver_options["f_max_iter"]) == (1e-4, 100)
    assert set(model.prior.widths) == {32}
