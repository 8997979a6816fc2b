"""The evaluation protocol (mbdl_fast.evaluate): paired differences, t quantiles, rows, round-robin timing, the CLI."""

import json
import math
import random
import warnings

import pytest
import torch

from mbdl_fast.evaluate import (
    evaluate_rows,
    paired_difference,
    summarise,
    t_quantile,
    time_round_robin,
)
from mbdl_fast.solvers import DEQ
from mbdl_fast.solvers.deq import jacobian_frobenius_estimate
from mbdl_fast.tasks import TEST_DRAWS, TrainConfig, make_dataset

# Student-t 0.975 quantiles (statistical tables, 4 decimals)
T975 = {5: 2.5706, 6: 2.4469, 10: 2.2281, 20: 2.0860, 41: 2.0195, 100: 1.9840}


@pytest.mark.parametrize("dof", sorted(T975))
def test_t_quantile_matches_tables(dof):
    assert abs(t_quantile(0.975, dof) - T975[dof]) < 2e-3


def test_t_quantile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="p: expected"):
        t_quantile(1.0, 10)
    with pytest.raises(ValueError, match="dof: expected"):
        t_quantile(0.975, 0)


def _rows(values):
    return [{"index": i, "psnr": v, "ssim": v / 100} for i, v in enumerate(values)]


def test_paired_difference_mean_and_interval():
    rng = random.Random(0)
    ref = [30 + rng.gauss(0, 2) for _ in range(42)]
    diffs = [rng.gauss(-0.05, 0.2) for _ in range(42)]
    out = paired_difference(_rows([r + d for r, d in zip(ref, diffs, strict=True)]), _rows(ref))
    mean = sum(diffs) / 42
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 41)
    assert out["n"] == 42
    assert abs(out["mean"] - mean) < 1e-9
    assert abs(out["std"] - sd) < 1e-9
    assert abs((out["ci_high"] - out["ci_low"]) / 2 - T975[41] * sd / math.sqrt(42)) < 1e-3 * sd
    # the per-image spread of the reference does not widen the paired interval
    assert out["ci_high"] - out["ci_low"] < 0.2


def test_paired_difference_refuses_unpaired_rows():
    with pytest.raises(ValueError, match="paired"):
        paired_difference(_rows([1.0, 2.0]), list(reversed(_rows([1.0, 2.0]))))
    with pytest.raises(ValueError, match="as many rows"):
        paired_difference(_rows([1.0, 2.0]), _rows([1.0]))


def test_mri_test_split_has_at_least_40_distinct_images():
    cfg = TrainConfig(task="mri", size=32, coils=2)
    test = make_dataset(cfg, "test")
    assert len(test) == 7 * TEST_DRAWS >= 40
    a, b = test[0], test[7]  # the same slice, another draw
    assert torch.allclose(a["target"].abs(), b["target"].abs(), atol=1e-6)
    assert not torch.equal(a["mask"], b["mask"]) or not torch.equal(a["coil_maps"], b["coil_maps"])
    assert torch.equal(test[3]["kspace"], test[3]["kspace"])  # reproducible
    assert len(make_dataset(cfg, "val")) == 7  # validation unchanged


def _tiny_deq(tol=1e-5, cap=200):
    """A DEQ whose prior is 0.5 x (a 1x1 conv): T is a contraction by 0.75, so it converges fast."""
    prior = torch.nn.Conv2d(2, 2, 1)
    with torch.no_grad():
        prior.weight.copy_(0.5 * torch.eye(2).view(2, 2, 1, 1))
        prior.bias.zero_()
    return DEQ(prior, alpha=0.5, f_tol=tol, f_max_iter=cap)


def _batches(n=3):
    cfg = TrainConfig(task="mri", size=16, coils=2, max_val_items=n)
    from mbdl_fast.evaluate import prepare_batches

    return prepare_batches(cfg, "test", batch_size=2, num_images=n)


def test_rows_report_convergence_and_summary():
    deq = _tiny_deq()
    rows = evaluate_rows(deq, _batches(3))
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all(r["converged"] is True and r["iterations"] >= 1 for r in rows)
    zero = evaluate_rows(None, _batches(3))
    assert all(r["iterations"] is None and r["converged"] is None for r in zero)
    s = summarise(rows)
    assert s["converged"] == 1.0 and s["images"] == 3
    assert abs(s["psnr"] - sum(r["psnr"] for r in rows) / 3) < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        capped = evaluate_rows(_tiny_deq(tol=1e-12, cap=2), _batches(3))
    assert summarise(capped)["converged"] == 0.0


def test_round_robin_timing_has_median_min_max():
    out = time_round_robin({"zero-filled": None, "deq": _tiny_deq()}, _batches(2), repeats=3)
    for t in out.values():
        assert 0 < t["min"] <= t["median"] <= t["max"]
    with pytest.raises(ValueError, match="repeats"):
        time_round_robin({"deq": _tiny_deq()}, _batches(2), repeats=0)


def test_jacobian_estimate_is_unbiased_on_a_linear_map():
    torch.manual_seed(0)
    n = 6
    mat = torch.randn(n, n, dtype=torch.float64)
    z = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    fz = z @ mat.T  # per-sample J = mat, so ||J||_F^2 over the batch = 3 ||mat||_F^2
    estimates = torch.stack([jacobian_frobenius_estimate(fz, z) for _ in range(4000)])
    exact = 3 * mat.pow(2).sum() / z.numel()
    assert torch.isfinite(estimates).all()
    assert abs(float(estimates.mean() / exact) - 1) < 0.05
    # differentiable: the estimate's gradient reaches the map's parameters
    w = mat.clone().requires_grad_()
    z2 = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    jacobian_frobenius_estimate(z2 @ w.T, z2).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_deq_jac_loss_and_warm_start():
    deq = _tiny_deq()
    physics, y, _ = _batches(2)[0]
    out, info = deq(y, physics, return_info=True, jac_loss=True)
    assert info["jac_loss"].requires_grad and float(info["jac_loss"]) > 0
    info["jac_loss"].backward()
    assert any(p.grad is not None for p in deq.prior.parameters())
    # a warm start at the fixed point converges at once
    with torch.no_grad():
        cold, cold_info = deq(y, physics, return_info=True)
        warm, warm_info = deq(y, physics, return_info=True, z0=cold)
    assert warm_info["iterations"] < cold_info["iterations"]
    assert (warm - cold).abs().max() / cold.abs().max() < 1e-3
    with pytest.raises(ValueError, match="z0"):
        deq(y, physics, x0=cold, z0=cold)


def test_cli_eval_takes_tolerance_and_writes_rows(tmp_path, capsys):
    from mbdl_fast.checkpoint import save_model
    from mbdl_fast.cli import main
    from mbdl_fast.priors import EDSR

    cfg = {**TrainConfig(task="mri", size=16, coils=2, max_val_items=2).__dict__}
    prior = EDSR(2, 2, width=4, num_blocks=1)
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(0.1)  # a small prior: T is close to a contraction by 1 - alpha
    save_model(DEQ(prior, alpha=0.5), tmp_path / "deq", metadata={"config": cfg})
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "deq"), "--tol", "1e-3", "--max-iter", "7", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tol 0.001, cap 7" in printed
    saved = json.loads(out.read_text())
    assert saved["solver"] == {"f_tol": 1e-3, "f_max_iter": 7}
    assert len(saved["rows"]) == 2
    assert set(saved["rows"][0]) >= {"psnr", "ssim", "iterations", "converged", "seconds"}


def test_cli_eval_compares_paired_with_a_reference_run(tmp_path, capsys):
    from mbdl_fast.checkpoint import save_model
    from mbdl_fast.cli import main
    from mbdl_fast.priors import EDSR

    cfg = {**TrainConfig(task="mri", size=16, coils=2, max_val_items=3).__dict__}
    for name, scale in (("a", 0.1), ("b", 0.05)):
        torch.manual_seed(0)
        prior = EDSR(2, 2, width=4, num_blocks=1)
        with torch.no_grad():
            for p in prior.parameters():
                p.mul_(scale)
        save_model(DEQ(prior, alpha=0.5), tmp_path / name, metadata={"config": cfg})
    common = ["--tol", "1e-3", "--max-iter", "50"]
    assert main(["eval", str(tmp_path / "a"), *common, "--out", str(tmp_path / "a_eval.json")]) == 0
    assert main(["eval", str(tmp_path / "b"), *common, "--out", str(tmp_path / "b_eval.json"),
                 "--compare", str(tmp_path / "a_eval.json")]) == 0  # fmt: skip
    assert "dPSNR" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / f"{n}_eval.json").read_text()) for n in "ab")
    c = b["comparison"]
    expected = sum(rb["psnr"] - ra["psnr"] for ra, rb in zip(a["rows"], b["rows"], strict=True)) / 3
    assert abs(c["dpsnr"]["mean"] - expected) < 1e-9 and c["dpsnr"]["n"] == 3
    assert c["dpsnr"]["ci_low"] <= c["dpsnr"]["mean"] <= c["dpsnr"]["ci_high"]
    with pytest.raises(ValueError, match="same split and tolerance"):
        main(["eval", str(tmp_path / "b"), "--tol", "1e-2", "--compare", str(tmp_path / "a_eval.json"), "--debug"])
