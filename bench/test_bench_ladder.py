"""DEQ and DU end to end as a ladder, every rung in one run, PSNR beside each time.

Rungs, each adding one thing to the one before (where it runs here; a row says what it ran):

    dense eager     the shipped DEQ as trained, DC step by the torch reference
    + pruned        the shipped ``deq_mri_4x_pruned50`` (fine-tuned) with the shipped DEQ; else
                    MBDL_FAST_LADDER_PRUNED, or ``prune_channels(deq, 0.25)`` one-shot as the last resort
    + fused DC      the fused Triton DC step (CUDA)
    + fast layers   ``to_fast`` + channels_last (CUDA: fused Triton / cuDNN per shape; CPU: F.conv2d in NHWC)
    + graphs        CUDA graphs: DEQ iterations in captured chunks, DU forward in one graph (CUDA)

DEQ rows: Anderson at the same tolerance and iteration cap for every rung (``LADDER_TOL``,
``LADDER_MAX_ITER``: 1e-4 and 100, the evaluation protocol's, at which the shipped DEQs converge; each
row records whether every image converged). DU rows: ``DU_ITERS`` unrolled iterations of the same DEQ operator T (a
``DeepUnfolding`` whose prior is alpha D + (1 - alpha) I and step gamma: no DU model with a DC step
is shipped), the same K for every rung. Run with ``--benchmark-json`` and turn the JSON into the
Markdown / JSON / PNG report with ``python bench/ladder_report.py report <json>``.

Environment: MBDL_FAST_LADDER_CHECKPOINT (default: the shipped ``deq_mri_4x``),
MBDL_FAST_LADDER_PRUNED (a pruned checkpoint instead of the one-shot pruning),
MBDL_FAST_LADDER_SIZE ("batch,coils,size"; default 8,15,320 on a GPU, 2,8,128 on a CPU),
MBDL_FAST_LADDER_TOL, MBDL_FAST_LADDER_MAX_ITER, MBDL_FAST_BENCH_NOTES (a JSON-lines file for skip reasons).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import device_name, sync
from torch import nn

LADDER_TOL = float(os.environ.get("MBDL_FAST_LADDER_TOL", "1e-4"))
LADDER_MAX_ITER = int(os.environ.get("MBDL_FAST_LADDER_MAX_ITER", "100"))
DU_ITERS = 10
PRUNE_RATIO = 0.25
RUNGS = ["dense eager", "+ pruned", "+ fused DC", "+ fast layers", "+ graphs"]
# The step each rung adds, as accelerate() names it (None: no acceleration step).
RUNG_STEP = {"+ fused DC": "fused DC", "+ fast layers": "fast layers", "+ graphs": "CUDA graphs"}


def _note(ladder: str, rung: str, reason: str) -> None:
    path = os.environ.get("MBDL_FAST_BENCH_NOTES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"suite": "ladder", "ladder": ladder, "rung": rung, "skipped": reason}) + "\n")


def _skip(ladder: str, rung: str, reason: str):
    _note(ladder, rung, reason)
    pytest.skip(f"{ladder} {rung}: {reason}")


def _size(device: torch.device) -> tuple[int, int, int]:
    text = os.environ.get("MBDL_FAST_LADDER_SIZE")
    if text:
        batch, coils, size = (int(v) for v in text.split(","))
        return batch, coils, size
    return (8, 15, 320) if device.type == "cuda" else (2, 8, 128)


class _Relaxed(nn.Module):
    """alpha D(x) + (1 - alpha) x: a DEQ's prior step, so that DU iterations are the DEQ's operator T."""

    def __init__(self, prior: nn.Module, alpha: float) -> None:
        super().__init__()
        self.prior = prior
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.prior(x) + (1 - self.alpha) * x


def _unrolled(deq: nn.Module, iterations: int) -> nn.Module:
    from mbdl_fast.solvers import DeepUnfolding

    prior = _Relaxed(deq.prior, float(deq.alpha))
    return DeepUnfolding(prior, num_iters=iterations, gamma_init=float(deq.gamma), learn_gamma=False).eval()


@pytest.fixture(scope="module")
def ladder(bench_device):
    """Dense and pruned DEQ on the bench device, and one test batch (physics, y, target)."""
    from mbdl_fast.checkpoint import load_model, read_metadata
    from mbdl_fast.prune import count_params_and_macs, prune_channels
    from mbdl_fast.train import TrainConfig, make_dataset, prepare_batch
    from mbdl_fast.weights import weights_path

    path = os.environ.get("MBDL_FAST_LADDER_CHECKPOINT")
    try:
        path = Path(path) if path else weights_path("deq_mri_4x")
        if not path.with_suffix(".json").is_file():
            raise FileNotFoundError(f"{path}.json is missing")
    except FileNotFoundError as err:
        _note("all", "all", f"no model: {err}")
        pytest.skip(f"ladder: the shipped DEQ weights are missing ({err}); set MBDL_FAST_LADDER_CHECKPOINT")
    meta = read_metadata(path)
    dense = load_model(path, map_location=bench_device).eval()
    batch, coils, size = _size(bench_device)
    cfg = TrainConfig.from_dict({**meta["config"], "size": size, "coils": coils})
    test = make_dataset(cfg, "test")
    items = [test[i % len(test)] for i in range(batch)]  # the test split cycled to fill the batch
    physics, y, target = prepare_batch(cfg, torch.utils.data.default_collate(items), bench_device)
    pruned_path = os.environ.get("MBDL_FAST_LADDER_PRUNED")
    if not pruned_path and path == weights_path("deq_mri_4x"):
        pruned_path = str(weights_path("deq_mri_4x_pruned50"))
    if pruned_path:
        pruned = load_model(pruned_path, map_location=bench_device).eval()
        pruned_label = f"pruned ({Path(pruned_path).name})"
    else:
        pruned = prune_channels(dense, PRUNE_RATIO).eval()
        pruned_label = f"pruned one-shot {PRUNE_RATIO:g} (no fine-tuning)"
    for model in (dense, pruned):
        model.configure(f_tol=LADDER_TOL, f_max_iter=LADDER_MAX_ITER, dc_backend="torch")
    shape = (1, 2, size, size)
    return {
        "dense": dense,
        "pruned": pruned,
        "pruned_label": pruned_label,
        "problem": (physics, y, target),
        "size": f"{batch}x{coils}x{size}x{size}",
        "checkpoint": str(path),
        "macs": {k: count_params_and_macs(m.prior, shape)["macs"] for k, m in (("dense", dense), ("pruned", pruned))},
        "widths": {k: list(m.prior.widths) for k, m in (("dense", dense), ("pruned", pruned))},
    }


def _build(ladder: dict, kind: str, rung: int) -> tuple[nn.Module, dict]:
    from mbdl_fast.accelerate import accelerate

    base = copy.deepcopy(ladder["pruned" if rung >= 1 else "dense"])
    model = base if kind == "DEQ" else _unrolled(base, DU_ITERS)
    if kind == "DU":
        model.dc_backend = "torch"
    steps = {}
    if rung >= 2:
        accelerate(
            model,
            fused_dc=True,
            fast_layers=rung >= 3,
            channels_last=rung >= 3,
            cuda_graphs="auto" if rung >= 4 else "off",
        )
        steps = {s.name: f"{s.status}: {s.detail}" for s in model.acceleration.steps}
    return model, steps


@pytest.mark.parametrize("rung", RUNGS)
@pytest.mark.parametrize("kind", ["DEQ", "DU"])
def test_ladder(benchmark, ladder, kind, rung, bench_device):
    from mbdl_fast.metrics import psnr

    index = RUNGS.index(rung)
    model, steps = _build(ladder, kind, index)
    step = RUNG_STEP.get(rung)
    if step is not None:
        status, detail = steps[step].split(": ", 1)
        if status == "skipped":
            _skip(kind, rung, detail)
    physics, y, target = ladder["problem"]

    def run():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a capped DEQ solve is reported below, not warned per round
            out = model(y, physics)
        sync(bench_device)
        return out

    out = run()  # warm-up: compilation, conv choices, graph capture; and the numbers below
    info = getattr(model, "last_info", None) or {}
    iterations = float(info["iterations_per_sample"].float().mean()) if "iterations_per_sample" in info else DU_ITERS
    evaluations = info.get("evaluations_run", info.get("iterations", DU_ITERS))
    converged = bool(info["converged"].all()) if "converged" in info else None
    quality = float(psnr(out.abs(), target.abs()))
    benchmark.extra_info.update({
        "suite": "ladder", "ladder": kind, "rung": rung, "rung_index": index, "size": ladder["size"],
        "device": device_name(bench_device), "psnr": quality, "iterations": iterations, "evaluations": evaluations,
        "converged": converged, "tol": LADDER_TOL if kind == "DEQ" else None,
        "max_iter": LADDER_MAX_ITER if kind == "DEQ" else None, "du_iters": DU_ITERS if kind == "DU" else None,
        "model": "dense" if index == 0 else ladder["pruned_label"], "checkpoint": ladder["checkpoint"],
        "macs_per_prior_call": ladder["macs"]["dense" if index == 0 else "pruned"],
        "widths": ladder["widths"]["dense" if index == 0 else "pruned"], "steps": steps,
        "dc_backend": model.solver_options["dc_backend"] if kind == "DEQ" else model.dc_backend,
        "last_mode": model.acceleration.last_mode if hasattr(model, "acceleration") else "eager",
    })  # fmt: skip
    rounds = 3 if bench_device.type == "cpu" else 10
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0 if bench_device.type == "cpu" else 1)
