"""Resuming a run: the same settings continue it exactly (every random state restored, the denoising noise
included); changed settings are refused before the run's folder is touched, never silently ignored."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mbdl_fast.train import TrainConfig, train

TINY_DENOISE = {
    "task": "denoise",
    "model": "edsr",
    "prior_args": {"width": 4, "num_blocks": 1},
    "size": 32,
    "batch_size": 2,
    "max_train_items": 4,
    "max_val_items": 2,
    "epochs": 2,
}


def run(cfg: dict, out, stop_after=None) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(TrainConfig.from_dict({**cfg, "out": str(out)}), progress=False, stop_after=stop_after)


def test_denoising_resume_is_exact(tmp_path):
    """The noise generator is part of the saved state: one epoch + resume equals two epochs straight."""
    run(TINY_DENOISE, tmp_path / "a", stop_after=1)
    resumed = run({**TINY_DENOISE, "resume": True}, tmp_path / "a")
    straight = run(TINY_DENOISE, tmp_path / "b")
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    for (name, a), b in zip(
        resumed["model"].state_dict().items(), straight["model"].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("change", "named"), [({"lr": 5e-4}, "lr=0.0005"), ({"epochs": 3}, "epochs=3"),
                                               ({"denoise_sigma": 0.1, "seed": 1}, "denoise_sigma=0.1, seed=1")])  # fmt: skip
def test_resume_refuses_changed_settings(tmp_path, change, named):
    run(TINY_DENOISE, tmp_path, stop_after=1)
    before = (tmp_path / "config.json").read_text(), (tmp_path / "last.json").read_text()
    with pytest.raises(ValueError, match=rf"^resume: the run in .* was started with .*; this call asks for {named}\."):
        run({**TINY_DENOISE, **change, "resume": True}, tmp_path)
    assert ((tmp_path / "config.json").read_text(), (tmp_path / "last.json").read_text()) == before


def test_resume_may_change_where_it_runs(tmp_path):
    run(TINY_DENOISE, tmp_path, stop_after=1)
    result = run({**TINY_DENOISE, "resume": True, "device": "cpu"}, tmp_path)
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["device"] == "cpu" and saved["resume"] is True
