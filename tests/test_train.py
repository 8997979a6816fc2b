"""Training, resuming, data-parallel training under torchrun, sharded evaluation, and the demo, on tiny settings."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from mbdl_fast.checkpoint import load_model, read_metadata
from mbdl_fast.train import TrainConfig, train

TINY_DEQ = {
    "task": "mri",
    "model": "deq",
    "prior": "edsr",
    "prior_args": {"width": 8, "num_blocks": 2},
    "model_args": {"f_max_iter": 8, "f_tol": 1e-3},
    "size": 32,
    "coils": 4,
    "batch_size": 2,
    "max_train_items": 4,
    "max_val_items": 2,
    "epochs": 1,
}


TINY_E2E = {"num_cascades": 2, "chans": 4, "pools": 2, "sens_net": True, "sens_chans": 4, "sens_pools": 1}


def run(cfg: dict, out, stop_after=None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny DEQs stop at their iteration cap by design here
        return train(TrainConfig.from_dict({**cfg, "out": str(out)}), progress=False, stop_after=stop_after)


def test_train_writes_loadable_checkpoints_with_config(tmp_path):
    result = run(TINY_DEQ, tmp_path)
    assert len(result["history"]) == 1 and result["history"][0]["val_psnr"] > 0
    for name in ("model_best", "model_last", "last"):
        assert (tmp_path / f"{name}.safetensors").is_file() and (tmp_path / f"{name}.json").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"] == "deq" and saved["seed"] == 0
    assert read_metadata(tmp_path / "model_best")["config"] == saved
    model = load_model(tmp_path / "model_best")
    for a, b in zip(model.state_dict().values(), result["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_keep_epochs_saves_every_epoch_and_the_last_equals_model_last(tmp_path):
    result = run({**TINY_DEQ, "epochs": 2, "keep_epochs": True}, tmp_path)
    assert [read_metadata(tmp_path / f"model_epoch{n}")["epoch"] for n in (1, 2)] == [0, 1]
    assert not (tmp_path / "model_epoch3.json").exists()
    last, kept = load_model(tmp_path / "model_last"), load_model(tmp_path / "model_epoch2")
    for a, b in zip(last.state_dict().values(), kept.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len(result["history"]) == 2


def test_keep_epochs_must_be_a_bool():
    with pytest.raises(TypeError, match="keep_epochs: expected true or false"):
        TrainConfig.from_dict({**TINY_DEQ, "keep_epochs": "yes"})


def test_resume_continues_where_it_stopped(tmp_path):
    run({**TINY_DEQ, "epochs": 2}, tmp_path / "a", stop_after=1)
    resumed = run({**TINY_DEQ, "epochs": 2, "resume": True}, tmp_path / "a")
    straight = run({**TINY_DEQ, "epochs": 2}, tmp_path / "b")
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    # the resumed run reproduces the uninterrupted one (same data order, optimizer state, RNG)
    for a, b in zip(resumed["model"].state_dict().values(), straight["model"].state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    ("task", "model", "extra"),
    [
        ("mri", "du", {"prior": "dncnn", "prior_args": {"depth": 3, "width": 8}, "model_args": {"num_iters": 2}}),
        ("mri", "varnet", {"model_args": {"num_cascades": 2, "chans": 4, "pools": 2}}),
        ("block-cs", "recursion", {"size": 66, "model_args": {"block": "coast", "channels": 8, "num_blocks": 2}}),
        ("denoise", "edsr", {"prior_args": {"width": 8, "num_blocks": 2}}),
        ("sr", "deq", {"prior_args": {"width": 8, "num_blocks": 2}, "model_args": {"f_max_iter": 5}}),
    ],
)
def test_every_task_and_model_trains(tmp_path, task, model, extra):
    cfg = {**TINY_DEQ, "task": task, "model": model, "model_args": {}, **extra}
    history = run(cfg, tmp_path)["history"]
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))


def test_e2e_varnet_trains_from_the_config_and_compares_magnitudes(tmp_path):
    from mbdl_fast.tasks import compared_images, make_model

    cfg = {**TINY_DEQ, "model": "varnet", "model_args": TINY_E2E}
    result = run(cfg, tmp_path)
    assert torch.isfinite(torch.tensor(result["history"][0]["train_loss"]))
    model = load_model(tmp_path / "model_best")
    assert model.estimates_coil_maps and model.sens_net.widths[0] == 4 and model.num_cascades == 2
    # its image phase is its maps' convention: the loss sees magnitudes, so a phase on the target changes nothing
    gen = torch.Generator().manual_seed(0)
    out, target = (torch.randn(2, 8, 8, dtype=torch.complex64, generator=gen) for _ in range(2))
    phase = torch.polar(torch.ones(8, 8), torch.rand(8, 8, generator=gen) * 6)
    a, b = compared_images(model, out, target * phase)
    assert torch.allclose(b, target.abs(), atol=1e-6) and torch.equal(a, out.abs())
    # with the physics' coil maps the phase is the target's: compared as they are
    physics_maps = make_model(TrainConfig.from_dict({**cfg, "model_args": {"num_cascades": 1, "chans": 4}}))
    kept = compared_images(physics_maps, out, target)
    assert kept[0] is out and kept[1] is target


def test_bad_config_is_refused():
    with pytest.raises(TypeError, match="config: unknown keys \\['epochz'\\]"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="task: expected one of"):
        TrainConfig.from_dict({"task": "ct"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_hold_identical_weights_after_a_step(tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(
        textwrap.dedent(f"""
        import json, os, warnings
        import torch
        from mbdl_fast.train import TrainConfig, train
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        cfg = TrainConfig.from_dict({{**{TINY_DEQ!r}, "out": {str(tmp_path / "run")!r}, "batch_size": 1}})
        result = train(cfg, progress=False)
        state = result["model"].state_dict()
        rank = int(os.environ["RANK"])
        flat = torch.cat([v.flatten().double() for v in state.values()])
        json.dump({{"world": result["world_size"], "sum": flat.sum().item(), "sq": flat.pow(2).sum().item(),
                   "head": flat[:64].tolist()}}, open({str(tmp_path)!r} + f"/rank{{rank}}.json", "w"))
    """)
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0] == ranks[1]
    assert (tmp_path / "run" / "model_last.json").is_file()  # rank 0 checkpointed


def test_eval_reports_per_image_rows(tmp_path):
    from mbdl_fast.evaluate import evaluate_checkpoint

    run(TINY_DEQ, tmp_path)
    result = evaluate_checkpoint(str(tmp_path / "model_best"), split="test", out=str(tmp_path / "eval.json"))
    assert result["summary"]["images"] == 2
    assert all(r["iterations"] is not None and r["psnr"] > 0 for r in result["rows"])
    assert json.loads((tmp_path / "eval.json").read_text())["summary"]["images"] == 2


def test_demo_runs_end_to_end_with_tiny_models(tmp_path, capsys):
    from mbdl_fast.checkpoint import load_model, read_metadata, save_model
    from mbdl_fast.cli import main
    from mbdl_fast.prune import prune_channels

    weights = tmp_path / "weights"
    run(TINY_DEQ, tmp_path / "deq")
    run({**TINY_DEQ, "model": "varnet", "model_args": TINY_E2E}, tmp_path / "vn")
    weights.mkdir()
    for run_dir, name in (("deq", "deq_mri_4x"), ("vn", "e2e_varnet_mri_4x")):
        for suffix in (".safetensors", ".json"):
            (weights / f"{name}{suffix}").write_bytes((tmp_path / run_dir / f"model_best{suffix}").read_bytes())
    dense = tmp_path / "deq" / "model_best"
    pruned = prune_channels(load_model(dense), 0.5, round_to=2)
    save_model(pruned, weights / "deq_mri_4x_pruned50", metadata=read_metadata(dense))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["demo", "--num-images", "2", "--weights-dir", str(weights), "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "demo.json").read_text())
    assert [r["method"] for r in result["rows"]] == [
        "zero-filled",
        "CG-SENSE",
        "DEQ (tol 0.0001, cap 100)",
        "DEQ pruned 50% (tol 0.0001, cap 100)",
        "DU (E2E-VarNet, own coil maps)",
    ]
    deq_rows = [r for r in result["rows"] if r["method"].startswith("DEQ")]
    assert all(0 <= r["converged"] <= 1 and r["iterations"] >= 1 for r in deq_rows)
    assert all(r["converged"] is None for r in result["rows"] if not r["method"].startswith("DEQ"))
    assert (tmp_path / "o" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "converged" in printed
    # a tiny DEQ that stops at the cap is flagged in the table itself
    if any(r["converged"] < 1 for r in deq_rows):
        assert "WARNING" in printed
