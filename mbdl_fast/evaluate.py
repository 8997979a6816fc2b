"""The evaluation protocol: per-image rows, paired differences with confidence intervals, round-robin timing.

Every table the project prints (``mbdl-fast eval``, ``mbdl-fast prune``, the prune sweep, the demo)
is made here, so that every number means the same thing:

- the test set is fixed: for the MRI tasks, every test slice under ``TEST_DRAWS`` independent mask,
  coil-map and phase draws (``mbdl_fast.tasks.make_dataset(cfg, "test")``, 7 x 6 = 42 images);
- each model gives one row per image: ``psnr``, ``ssim``, ``nmse`` (magnitudes, ``mbdl_fast.metrics``),
  and for DEQs ``iterations`` and ``converged`` (the solver reached its tolerance) at an explicit
  tolerance and cap;
- a model is compared with a reference model by paired per-image differences (same images, masks,
  coils, noise): mean and a 95 % confidence interval, t-distribution with n - 1 degrees of freedom;
- speed is timed round-robin over the models in one process (each repeat runs every model once over
  the whole test set, so background load spreads evenly), median with min-max of ``repeats`` >= 5,
  with the device and the thread count recorded.

    mbdl-fast eval deq_mri_4x --split test --tol 1e-4 --max-iter 100 --out deq.json
    torchrun --nproc_per_node 2 -m mbdl_fast.cli eval runs/deq_mri/model_best   # sharded accuracy rows
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mbdl_fast._validate import check_int, check_number
from mbdl_fast.checkpoint import load_model, read_metadata
from mbdl_fast.metrics import nmse, psnr, ssim
from mbdl_fast.shipped import SHIPPED, weights_path
from mbdl_fast.tasks import TrainConfig, make_dataset, prepare_batch, reconstruct
from mbdl_fast.timing import synchronize

__all__ = [
    "Batch",
    "configure_solver",
    "compare_to",
    "evaluate_checkpoint",
    "evaluate_model",
    "evaluate_rows",
    "paired_difference",
    "prepare_batches",
    "solver_setting",
    "summarise",
    "t_quantile",
    "time_round_robin",
]

#: (physics, model input, target) of one test batch, as ``mbdl_fast.tasks.prepare_batch`` returns it.
Batch = tuple[Any, torch.Tensor, torch.Tensor]


def solver_setting(model: torch.nn.Module | None) -> dict[str, Any]:
    """The tolerance and cap a DEQ runs at ({} for models without a fixed-point solve)."""
    opts = getattr(model, "solver_options", None)
    if not isinstance(opts, dict):
        return {}
    return {k: opts[k] for k in ("f_tol", "f_max_iter") if k in opts}


def configure_solver(model: torch.nn.Module | None, tol: float | None, max_iter: int | None) -> dict[str, Any]:
    """Set a DEQ's forward tolerance / cap where given; returns the setting it now runs at ({} for non-DEQs)."""
    if model is None or not solver_setting(model):
        return {}
    options = {k: v for k, v in (("f_tol", tol), ("f_max_iter", max_iter)) if v is not None}
    if options:
        model.configure(**options)
    return solver_setting(model)


def prepare_batches(
    cfg: Any,
    split: str = "test",
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    num_images: int | None = None,
) -> list[Batch]:
    """The first ``num_images`` (default all) items of ``split`` for ``cfg``'s task, as prepared batches.

    Noise for the denoising task is drawn from a fixed generator, so two calls give the same batches.
    """
    check_int("batch_size", batch_size, 1)
    if num_images is not None:
        check_int("num_images", num_images, 1)
    device = torch.device(device)
    dataset = make_dataset(cfg, split)
    count = len(dataset) if num_images is None else min(num_images, len(dataset))
    gen = torch.Generator().manual_seed(cfg.seed + 54321)
    batches = []
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        batches.append(prepare_batch(cfg, torch.utils.data.default_collate(items), device, gen))
    return batches


def _run(model: torch.nn.Module | None, physics: Any, model_input: torch.Tensor) -> torch.Tensor:
    """A model's reconstruction; ``None`` is the zero-filled A^H y (or the noisy input for denoising)."""
    if model is None:
        return model_input if physics is None else physics.A_adjoint(model_input)
    return reconstruct(model, physics, model_input)


@torch.no_grad()
def evaluate_rows(
    model: torch.nn.Module | None, batches: Sequence[Batch], first_index: int = 0, device: torch.device | None = None
) -> list[dict[str, Any]]:
    """One row per image: ``index``, ``psnr``, ``ssim``, ``nmse`` (of magnitudes), ``seconds`` (the batch's time
    per image), and ``iterations`` / ``converged`` for DEQs (None otherwise). ``model=None``: zero-filled."""
    if model is not None:
        model.eval()
    rows: list[dict[str, Any]] = []
    index = first_index
    for physics, model_input, target in batches:
        dev = device or target.device
        synchronize(dev)
        start = time.perf_counter()
        out = _run(model, physics, model_input)
        synchronize(dev)
        n = target.shape[0]
        seconds = (time.perf_counter() - start) / n
        info = getattr(model, "last_info", None) or {}
        iters, conv = info.get("iterations_per_sample"), info.get("converged")
        mag, ref = out.abs(), target.abs()
        values = (psnr(mag, ref, reduction="none"), ssim(mag, ref, reduction="none"), nmse(mag, ref, reduction="none"))
        for k in range(n):
            rows.append({"index": index, "psnr": float(values[0][k]), "ssim": float(values[1][k]),
                         "nmse": float(values[2][k]), "seconds": seconds,
                         "iterations": int(iters[k]) if iters is not None else None,
                         "converged": bool(conv[k]) if conv is not None else None})  # fmt: skip
            index += 1
    return rows


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t with ``dof`` degrees of freedom (Cornish-Fisher expansion about the normal
    quantile; error below 1e-3 for dof >= 5, exact as dof -> infinity)."""
    check_number("p", p, 0.0, 1.0, open_min=True, open_max=True, meaning="a probability")
    check_int("dof", dof, 1)
    z = statistics.NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4


def paired_difference(rows: Sequence[dict], reference: Sequence[dict], key: str = "psnr") -> dict[str, float]:
    """Mean of ``rows[i][key] - reference[i][key]`` over paired images with its 95 % confidence interval.

    Returns ``{"mean", "ci_low", "ci_high", "std", "n"}``; the interval is mean -/+ t_{0.975, n-1} s / sqrt(n).
    The rows must pair up by ``index`` (the same test images in the same order).
    """
    if len(rows) != len(reference) or len(rows) == 0:
        raise ValueError(f"rows: expected as many rows as reference ({len(reference)}) and at least 1, got {len(rows)}")
    for a, b in zip(rows, reference, strict=True):
        if a["index"] != b["index"]:
            raise ValueError(f"rows: image {a['index']} is paired with reference image {b['index']}: not the same set")
    diffs = [float(a[key]) - float(b[key]) for a, b in zip(rows, reference, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    std = statistics.stdev(diffs) if n > 1 else math.nan
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "std": std, "n": n}


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over images; for DEQs also ``iterations`` (mean) and ``converged`` (fraction 0..1)."""
    n = max(len(rows), 1)
    iters = [r["iterations"] for r in rows if r.get("iterations") is not None]
    conv = [r["converged"] for r in rows if r.get("converged") is not None]
    return {
        "psnr": sum(r["psnr"] for r in rows) / n,
        "ssim": sum(r["ssim"] for r in rows) / n,
        "nmse": sum(r["nmse"] for r in rows) / n,
        "seconds_per_image": sum(r["seconds"] for r in rows) / n,
        "iterations": sum(iters) / len(iters) if iters else None,
        "converged": sum(conv) / len(conv) if conv else None,
        "images": len(rows),
    }


@torch.no_grad()
def time_round_robin(
    models: dict[str, torch.nn.Module | None], batches: Sequence[Batch], repeats: int = 5
) -> dict[str, dict[str, float]]:
    """Seconds per image of each model over ``batches``, timed round-robin: ``{name: {median, min, max}}``.

    Every repeat runs each model once over all batches, in turn, so that load from elsewhere on the
    machine falls on every model alike; ratios between models from one call are what a report quotes.
    """
    check_int("repeats", repeats, 1)
    images = sum(t.shape[0] for _, _, t in batches)
    if images == 0:
        raise ValueError("batches: expected at least one test image, got none")
    device = batches[0][2].device
    for model in models.values():
        if model is not None:
            model.eval()
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            synchronize(device)
            start = time.perf_counter()
            for physics, model_input, _ in batches:
                _run(model, physics, model_input)
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / images)
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v)} for name, v in samples.items()}


def machine() -> dict[str, Any]:
    """Device, threads and versions that a timing belongs to."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    cfg: Any,
    split: str = "test",
    batch_size: int = 4,
    tol: float | None = None,
    max_iter: int | None = None,
) -> list[dict[str, Any]]:
    """Per-image rows (``evaluate_rows``) of ``model`` on ``split`` of ``cfg``'s task, sharded across ranks when
    distributed (each rank takes every world-th batch; rank order restored). DEQs run at ``tol`` / ``max_iter``
    where given."""
    configure_solver(model, tol, max_iter)
    device = next(model.parameters()).device
    batches = prepare_batches(cfg, split, batch_size, device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows: list[dict[str, Any]] = []
    first = 0
    for b, batch in enumerate(batches):
        if b % world == rank:
            rows.extend(evaluate_rows(model, [batch], first_index=first, device=device))
        first += batch[2].shape[0]
    if dist.is_initialized():
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    return rows


def format_solver(setting: dict[str, Any]) -> str:
    """'tol 0.0001, cap 100' for a DEQ's setting; '' for models without a fixed-point solve."""
    return f"tol {setting['f_tol']:g}, cap {setting['f_max_iter']}" if setting else ""


def compare_to(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Paired dPSNR / dSSIM of ``result`` against ``reference`` (both ``evaluate_checkpoint`` results, e.g. pruned
    against dense) and the ratio of their mean seconds per image; refuses results that are not comparable (other
    split, other test images, other DEQ tolerance or cap)."""
    for key in ("split", "solver"):
        if reference.get(key) != result.get(key) and (key != "solver" or (reference[key] and result[key])):
            raise ValueError(f"compare: reference {key} {reference.get(key)!r} differs from this run's "
                             f"{result.get(key)!r}; compare models at the same split and tolerance")  # fmt: skip
    rows, ref = result["rows"], reference["rows"]
    return {
        "reference": reference.get("checkpoint"),
        "dpsnr": paired_difference(rows, ref, "psnr"),
        "dssim": paired_difference(rows, ref, "ssim"),
        "speedup": reference["summary"]["seconds_per_image"] / result["summary"]["seconds_per_image"],
    }


def evaluate_checkpoint(
    path: str,
    split: str = "test",
    batch_size: int = 4,
    out: str | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    compare: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (a path without suffix, or a shipped model's name) on ``split`` of its own task.

    DEQs run at ``tol`` / ``max_iter`` where given, else at the tolerance stored in the checkpoint; the
    setting used is printed and saved. ``out``: JSON with the setting, the summary and the per-image rows.
    ``compare``: the JSON ``out`` of another model's evaluation (e.g. the dense one): prints and saves the
    paired differences against it (``compare_to``).
    """
    if path in SHIPPED:
        path = str(weights_path(path))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    meta = read_metadata(path)
    if "config" not in meta:
        raise ValueError(f"checkpoint: {path} carries no training config in its metadata; evaluate it in Python")
    cfg = TrainConfig.from_dict(meta["config"])
    model = load_model(path, map_location=device)
    setting = configure_solver(model, tol, max_iter)
    rows = evaluate_model(model, cfg, split, batch_size)
    summary = summarise(rows)
    result = {"checkpoint": str(path), "split": split, "solver": setting, "machine": machine(), "summary": summary,
              "rows": rows}  # fmt: skip
    if compare:
        result["comparison"] = compare_to(result, json.loads(Path(compare).read_text()))
    if not dist.is_initialized() or dist.get_rank() == 0:
        solver = f", DEQ {format_solver(setting)}" if setting else ""
        print(f"{path} on {split} ({summary['images']} images, {cfg.task}, device {device}{solver}):")
        extra = ""
        if summary["iterations"] is not None:
            extra = f", iterations {summary['iterations']:.1f}, converged {summary['converged']:.0%}"
        print(f"  PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f}, NMSE {summary['nmse']:.5f}, "
              f"{summary['seconds_per_image'] * 1e3:.1f} ms/image{extra}")  # fmt: skip
        if summary["converged"] is not None and summary["converged"] < 1:
            print(f"  WARNING: {1 - summary['converged']:.0%} of the images stopped at the cap of "
                  f"{setting['f_max_iter']} iterations: their rows are not equilibrium results")  # fmt: skip
        if compare:
            c = result["comparison"]
            d, e = c["dpsnr"], c["dssim"]
            print(f"  vs {c['reference']} ({d['n']} paired images): dPSNR {d['mean']:+.3f} dB "
                  f"[95% CI {d['ci_low']:+.3f}, {d['ci_high']:+.3f}], dSSIM {e['mean']:+.4f} "
                  f"[{e['ci_low']:+.4f}, {e['ci_high']:+.4f}], {c['speedup']:.2f}x its time per image")  # fmt: skip
        if out:
            Path(out).write_text(json.dumps(result, indent=2))
    return result
