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
row records whether every image converged). DU rows: the shipped E2E-VarNet (``e2e_varnet_mri_4x``: K k-space
cascades and its sensitivity network), dense, then pruned (the shipped ``e2e_varnet_mri_4x_pruned50``, else
MBDL_FAST_LADDER_DU_PRUNED, else ``prune_channels(varnet, 0.5, round_to=16)`` one-shot), the same K for every rung;
its DC is the cascades' k-space soft DC, which has no fused backend. Run with ``--benchmark-json`` and turn the JSON
into the Markdown / JSON / PNG report with ``python bench/ladder_report.py report <json>``.

Environment: MBDL_FAST_LADDER_CHECKPOINT (default: the shipped ``deq_mri_4x``),
MBDL_FAST_LADDER_PRUNED (a pruned checkpoint instead of the one-shot pruning),
MBDL_FAST_LADDER_DU, MBDL_FAST_LADDER_DU_PRUNED (the DU ladder's dense and pruned checkpoints),
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
PRUNE_RATIO = 0.25
#: one-shot pruning of the DU when no pruned one is shipped: halves the 32- and 64-channel layers, keeps 16 (oneDNN's
#: channel block on a CPU, so the smaller widths are real speed)
DU_PRUNE_RATIO, DU_ROUND_TO = 0.5, 16
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


def _checkpoint(variable: str, shipped: str) -> Path:
    """The checkpoint named by the environment ``variable``, else the shipped model ``shipped``."""
    from mbdl_fast.weights import weights_path

    path = os.environ.get(variable)
    path = Path(path) if path else weights_path(shipped)
    if not path.with_suffix(".json").is_file():
        raise FileNotFoundError(f"{path}.json is missing")
    return path


def _du_models(physics, y, device: torch.device) -> tuple[nn.Module, nn.Module, str, Path]:
    """The DU ladder's E2E-VarNet, dense and pruned, with the pruned one's label and the dense checkpoint."""
    from mbdl_fast.checkpoint import load_model
    from mbdl_fast.prune import prune_channels
    from mbdl_fast.weights import SHIPPED, weights_path

    # the shipped pruned model pairs with the shipped dense one only
    path = _checkpoint("MBDL_FAST_LADDER_DU", "e2e_varnet_mri_4x")
    dense = load_model(path, map_location=device).eval()
    pruned_path = os.environ.get("MBDL_FAST_LADDER_DU_PRUNED")
    if not pruned_path and not os.environ.get("MBDL_FAST_LADDER_DU") and "e2e_varnet_mri_4x_pruned50" in SHIPPED:
        pruned_path = str(weights_path("e2e_varnet_mri_4x_pruned50"))
    if pruned_path:
        return dense, load_model(pruned_path, map_location=device).eval(), f"pruned ({Path(pruned_path).name})", path
    pruned = prune_channels(dense, DU_PRUNE_RATIO, round_to=DU_ROUND_TO, check_inputs=(y, physics)).eval()
    return dense, pruned, f"pruned one-shot {DU_PRUNE_RATIO:g} (no fine-tuning)", path


def _widths(model: nn.Module) -> list[int]:
    from mbdl_fast.solvers import find_priors

    return [w for _, prior in find_priors(model) for w in prior.widths]


@pytest.fixture(scope="module")
def ladder(bench_device):
    """Dense and pruned DEQ on the bench device, and one test batch (physics, y, target)."""
    from mbdl_fast.checkpoint import load_model, read_metadata
    from mbdl_fast.prune import count_params_and_macs, prune_channels
    from mbdl_fast.tasks import TrainConfig, make_dataset, prepare_batch
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
    try:
        du_dense, du_pruned, du_label, du_path = _du_models(physics, y, bench_device)
    except FileNotFoundError as err:
        _note("DU", "all", f"no model: {err}")
        du_dense = du_pruned = du_label = du_path = None
    return {
        "DEQ": {
            "dense": dense,
            "pruned": pruned,
            "pruned_label": pruned_label,
            "checkpoint": str(path),
            "macs": {
                k: count_params_and_macs(m.prior, shape)["macs"] for k, m in (("dense", dense), ("pruned", pruned))
            },
            "widths": {k: list(m.prior.widths) for k, m in (("dense", dense), ("pruned", pruned))},
        },
        "DU": None
        if du_dense is None
        else {
            "dense": du_dense,
            "pruned": du_pruned,
            "pruned_label": du_label,
            "checkpoint": str(du_path),
            # every cascade's MACs on one image plus the sensitivity network's on one coil image
            "macs": {
                k: count_params_and_macs(m, shape)["macs_per_forward"]
                for k, m in (("dense", du_dense), ("pruned", du_pruned))
            },
            "widths": {k: _widths(m) for k, m in (("dense", du_dense), ("pruned", du_pruned))},
        },
        "problem": (physics, y, target),
        "size": f"{batch}x{coils}x{size}x{size}",
    }


def _build(models: dict, rung: int) -> tuple[nn.Module, dict]:
    from mbdl_fast.accelerate import accelerate

    model = copy.deepcopy(models["pruned" if rung >= 1 else "dense"])
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
    models = ladder[kind]
    if models is None:
        _skip(kind, rung, "no DU model: the shipped e2e_varnet_mri_4x is missing; set MBDL_FAST_LADDER_DU")
    model, steps = _build(models, index)
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
    unrolled = None if kind == "DEQ" else model.num_cascades
    iterations = float(info["iterations_per_sample"].float().mean()) if "iterations_per_sample" in info else unrolled
    evaluations = info.get("evaluations_run", info.get("iterations", unrolled))
    converged = bool(info["converged"].all()) if "converged" in info else None
    quality = float(psnr(out.abs(), target.abs()))
    benchmark.extra_info.update({
        "suite": "ladder", "ladder": kind, "rung": rung, "rung_index": index, "size": ladder["size"],
        "device": device_name(bench_device), "psnr": quality, "iterations": iterations, "evaluations": evaluations,
        "converged": converged, "tol": LADDER_TOL if kind == "DEQ" else None,
        "max_iter": LADDER_MAX_ITER if kind == "DEQ" else None, "du_iters": unrolled,
        "model": "dense" if index == 0 else models["pruned_label"], "checkpoint": models["checkpoint"],
        "macs_per_prior_call" if kind == "DEQ" else "macs_per_forward": models["macs"]["dense" if index == 0 else "pruned"],
        "widths": models["widths"]["dense" if index == 0 else "pruned"], "steps": steps,
        "dc_backend": model.solver_options["dc_backend"] if kind == "DEQ" else "k-space soft DC (torch)",
        "last_mode": model.acceleration.last_mode if hasattr(model, "acceleration") else "eager",
    })  # fmt: skip
    rounds = 3 if bench_device.type == "cpu" else 10
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0 if bench_device.type == "cpu" else 1)
