"""The real-data demo end to end (tiny untrained models in the shipped models' places) and the demo figure."""

import json
import warnings

import pytest
import torch

from mbdl_fast.checkpoint import save_model
from mbdl_fast.cli import main
from mbdl_fast.demo import plot_reconstructions
from mbdl_fast.metrics import psnr, ssim
from mbdl_fast.priors import EDSR
from mbdl_fast.solvers import DEQ, VarNet

ROW_KEYS = {"mask", "method", "psnr", "ssim", "nmse", "iterations", "converged", "seconds_per_image"}


def test_real_demo_rows_figures_and_json(tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    for name in ("deq_mri_4x", "deq_mri_4x_pruned50", "deq_mri_4x_real_ss", "deq_mri_6x_uniform"):
        meta = {"adapted": {"strategy": "split"}} if name.endswith("_real_ss") else None  # adapt-real records it
        save_model(DEQ(EDSR(width=4, num_blocks=1), alpha=0.1), weights / name, metadata=meta)
    e2e = VarNet(num_cascades=1, chans=4, pools=1, sens_net=True, sens_chans=4, sens_pools=1)
    save_model(e2e, weights / "e2e_varnet_mri_4x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained DEQs may stop at the cap
        assert main(["demo", "--data", "real", "--weights-dir", str(weights), "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "demo_real.json").read_text())
    rows = result["rows"]
    assert all(set(r) == ROW_KEYS for r in rows)
    assert [r["method"] for r in rows] == [
        "zero-filled", "CG-SENSE (10 it.)", "DEQ (tol 0.0001)", "DEQ pruned 50% (tol 0.0001)",
        "DEQ adapted to this scan (tol 0.0001)", "E2E-VarNet (own coil maps)",
        "zero-filled", "CG-SENSE (10 it.)", "DEQ (tol 0.0001)",
    ]  # fmt: skip
    assert [r["mask"] for r in rows] == ["fastMRI random 4x (8% centre)"] * 6 + ["SPADE uniform 6x + ACS"] * 3
    # E2E-VarNet on the 16-coil scan (any coil count: its maps are its own): its K cascades, no convergence
    assert rows[5]["iterations"] == 1 and rows[5]["converged"] is None and rows[5]["psnr"] == rows[5]["psnr"]
    adapted = [note for note in result["notes"] if "test-time adaptation" in note]
    assert len(adapted) == 1 and "SSDU" in adapted[0] and "never on its reference" in adapted[0]
    for zero_filled, cg in ((rows[0], rows[1]), (rows[6], rows[7])):
        # the classical pipeline on real data: ESPIRiT maps from the ACS, CG-SENSE well above zero-filled
        assert zero_filled["psnr"] > 15 and cg["psnr"] > zero_filled["psnr"] + 3
        assert zero_filled["iterations"] is None and cg["iterations"] == 10 and cg["converged"] is None
    for deq in (rows[2], rows[3], rows[4], rows[8]):
        assert 1 <= deq["iterations"] <= 100 and 0 <= deq["converged"] <= 1 and deq["psnr"] == deq["psnr"]
    for key in ("random4x", "uniform6x"):
        assert (tmp_path / "o" / f"demo_real_{key}.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "ACS ESPIRiT" in out and "demo_real.json" in out


def test_real_demo_names_a_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="deq_mri_4x"):
        main(["demo", "--data", "real", "--weights-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--debug"])


def test_figure_titles_quote_the_shown_image_not_the_mean(tmp_path):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 32, 32, generator=g).to(torch.complex64)
    noisy = target + 0.05 * torch.arange(1, 4).view(3, 1, 1) * torch.randn(3, 32, 32, generator=g)
    mask = torch.zeros(3, 1, 1, 32)
    mask[..., ::2] = 1
    quality = plot_reconstructions(target, {"noisy": noisy}, mask, tmp_path / "f.png", index=2)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    shown_psnr, shown_ssim = quality["noisy"]
    assert shown_psnr == pytest.approx(float(psnr(noisy[2:].abs(), target[2:].abs())))
    assert shown_ssim == pytest.approx(float(ssim(noisy[2:].abs(), target[2:].abs())))
    assert abs(shown_psnr - float(psnr(noisy.abs(), target.abs()))) > 1  # the batch mean is another number
