"""`mbdl-fast prune` end to end on a tiny trained DEQ: one table, every model timed at the same tolerance."""

import json
import warnings

import pytest

from mbdl_fast.cli import main
from mbdl_fast.prune.pipeline import format_table, prune_and_report
from mbdl_fast.train import TrainConfig, train

TINY = {
    "task": "mri",
    "model": "deq",
    "prior": "edsr",
    "prior_args": {"width": 16, "num_blocks": 2},
    "model_args": {"f_max_iter": 6, "f_tol": 1e-3},
    "size": 32,
    "coils": 4,
    "batch_size": 2,
    "max_train_items": 4,
    "max_val_items": 2,
    "epochs": 1,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(TrainConfig.from_dict({**TINY, "out": str(out)}), progress=False)
    return out / "model_best"


@pytest.mark.parametrize("strategy", ["supervised", "school", "self_supervised"])
def test_prune_and_report_rows(checkpoint, tmp_path, strategy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prune_and_report(checkpoint, 0.5, finetune=strategy, epochs=1, tol=1e-3, max_iter=8, num_test=2,
                                  out=tmp_path, progress=False)  # fmt: skip
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["zero-filled", "dense", "pruned (one-shot)", f"fine-tuned ({strategy})"]
    assert rows["pruned (one-shot)"]["params"] < rows["dense"]["params"]
    assert rows["pruned (one-shot)"]["macs_per_prior_call"] < 0.5 * rows["dense"]["macs_per_prior_call"]
    # the same tolerance and cap for every timed row, and the fine-tuning kept the dense training tolerance
    assert result["setting"]["eval_solver"] == {"f_tol": 1e-3, "f_max_iter": 8}
    assert result["setting"]["finetune_solver"] == {"f_tol": 1e-3, "f_max_iter": 6}
    assert all(r["seconds_per_image"] > 0 for r in result["rows"])
    saved = json.loads((tmp_path / "prune_report.json").read_text())
    assert saved["rows"][1]["model"] == "dense"
    assert (tmp_path / "model_pruned.safetensors").is_file()
    assert "speed" in format_table(result)


def test_nm_rows_report_macs_not_speed(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prune_and_report(checkpoint, 0.5, finetune=None, nm="2:4", tol=1e-3, max_iter=4, num_test=2,
                                  progress=False)  # fmt: skip
    last = result["rows"][-1]
    assert last["model"] == "pruned + 2:4"
    assert last["nm_effective_macs"] < last["macs_per_prior_call"]
    assert "no speed-up on CPU" in format_table(result)


def test_cli_prune_prints_the_table(checkpoint, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ["prune", "--checkpoint", str(checkpoint), "--ratio", "0.5", "--tol", "1e-3", "--max-iter", "4",
                "--num-test", "2", "--quiet"]  # fmt: skip
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "pruned (one-shot)" in out


def test_bad_nm_pattern_is_named(checkpoint):
    with pytest.raises(ValueError, match="nm: expected 'N:M'"):
        prune_and_report(checkpoint, 0.5, finetune=None, nm="2-4", num_test=2, progress=False)


def test_sls_search_reaches_its_mac_budget(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prune_and_report(checkpoint, 0.5, finetune="supervised", epochs=10, nm_budget=0.5, tol=1e-3,
                                  max_iter=4, num_test=2, repeats=1, progress=False)  # fmt: skip
    search = result["setting"]["nm_search"]
    assert search["reached"] and search["mac_ratio"] <= 0.5
    assert min(search["n_per_layer"].values()) < 4  # layers really sparsified
    last = result["rows"][-1]
    assert last["nm_effective_macs"] < 0.8 * last["macs_per_prior_call"]
    assert "budget 0.5: reached" in format_table(result)


def test_sls_search_that_falls_short_says_so(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = prune_and_report(checkpoint, 0.5, finetune="supervised", epochs=1, nm_budget=0.25, nm_score_lr=1e-4,
                                  tol=1e-3, max_iter=4, num_test=2, repeats=1, progress=False)  # fmt: skip
    assert result["setting"]["nm_search"]["reached"] is False
    assert "NOT reached" in format_table(result)
    with pytest.raises(ValueError, match="nm_budget: SLS's N:M search runs during fine-tuning"):
        prune_and_report(checkpoint, 0.5, finetune=None, nm_budget=0.5, num_test=2, progress=False)


def test_prune_sweep_reports_a_deep_unfolding_model_at_its_k(tmp_path):
    """bench/prune_sweep.py on a tiny E2E-VarNet checkpoint: K cascades for every row, no DEQ columns."""
    import subprocess
    import sys
    from pathlib import Path

    e2e = {"num_cascades": 2, "chans": 16, "pools": 1, "sens_net": True, "sens_chans": 8, "sens_pools": 1}
    cfg = {**TINY, "model": "varnet", "model_args": e2e, "prior_args": {}, "out": str(tmp_path / "e2e")}
    train(TrainConfig.from_dict(cfg), progress=False)
    script = Path(__file__).resolve().parents[1] / "bench" / "prune_sweep.py"
    out = tmp_path / "report"
    subprocess.run([sys.executable, str(script), "--model", str(tmp_path / "e2e" / "model_best"), "--ratios", "0.5",
                    "--round-to", "8", "--strategies", "supervised", "--epochs", "1", "--repeats", "1",
                    "--models", str(tmp_path / "models"), "--out", str(out)], check=True, capture_output=True)  # fmt: skip
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["header"]["unrolled"] == 2 and report["header"]["test_images"] == 2
    (row,) = report["rows"]
    assert row["tuned"]["iterations"] is None and row["tuned"]["params"] < report["dense"]["params"]
    assert row["tuned"]["dpsnr"]["n"] == 2 and row["tuned"]["psnr"] == row["tuned"]["psnr"]
    table = out.with_suffix(".md").read_text()
    assert "K = 2 unrolled iterations" in table and "DEQ tol" not in table
    assert set(report["timing"]["seconds_per_image"]) == {"dense", "r0.50_supervised"}
