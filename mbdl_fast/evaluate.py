"""Batch inference over a dataset split: per-image PSNR / SSIM / NMSE and time, sharded across ranks.

    mbdl-fast eval runs/deq_mri/model_best --split test
    torchrun --nproc_per_node 2 -m mbdl_fast.cli eval runs/deq_mri/model_best

Each rank reconstructs every world_size-th image; rank 0 gathers the rows and prints the table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mbdl_fast.checkpoint import load_model, read_metadata
from mbdl_fast.metrics import nmse, psnr, ssim
from mbdl_fast.timing import synchronize


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, cfg: Any, split: str = "test", batch_size: int = 4) -> list[dict[str, Any]]:
    """Per-image rows {index, psnr, ssim, nmse, seconds, iterations} for ``model`` on ``split`` of ``cfg``'s task."""
    from mbdl_fast.train import make_dataset, prepare_batch, reconstruct

    device = next(model.parameters()).device
    model.eval()
    dataset = make_dataset(cfg, split)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))
    gen = torch.Generator().manual_seed(cfg.seed + 54321)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        batch = torch.utils.data.default_collate([dataset[i] for i in chunk])
        physics, model_input, target = prepare_batch(cfg, batch, device, gen)
        synchronize(device)
        started = time.perf_counter()
        out = reconstruct(model, physics, model_input)
        synchronize(device)
        seconds = (time.perf_counter() - started) / len(chunk)
        info = getattr(model, "last_info", None) or {}
        per_sample_iters = info.get("iterations_per_sample")
        mag, ref = out.abs(), target.abs()
        values = (psnr(mag, ref, reduction="none"), ssim(mag, ref, reduction="none"), nmse(mag, ref, reduction="none"))
        for k, index in enumerate(chunk):
            iters = int(per_sample_iters[k]) if per_sample_iters is not None else None
            rows.append({"index": index, "psnr": float(values[0][k]), "ssim": float(values[1][k]),
                         "nmse": float(values[2][k]), "seconds": seconds, "iterations": iters})  # fmt: skip
    if dist.is_initialized():
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over images (iterations: mean of the per-image counts where the model reports them)."""
    n = max(len(rows), 1)
    iters = [r["iterations"] for r in rows if r["iterations"] is not None]
    return {
        "psnr": sum(r["psnr"] for r in rows) / n,
        "ssim": sum(r["ssim"] for r in rows) / n,
        "nmse": sum(r["nmse"] for r in rows) / n,
        "seconds_per_image": sum(r["seconds"] for r in rows) / n,
        "iterations": sum(iters) / len(iters) if iters else None,
        "images": len(rows),
    }


def evaluate_checkpoint(path: str, split: str = "test", batch_size: int = 4, out: str | None = None) -> dict[str, Any]:
    """Load a checkpoint saved by ``mbdl-fast train`` and evaluate it on ``split`` of its own task."""
    import os

    from mbdl_fast.train import TrainConfig

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
    rows = evaluate_model(model, cfg, split, batch_size)
    summary = summarise(rows)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{path} on {split} ({summary['images']} images, {cfg.task}, device {device}):")
        iters = f", iterations {summary['iterations']:.1f}" if summary["iterations"] is not None else ""
        print(f"  PSNR {summary['psnr']:.2f} dB, SSIM {summary['ssim']:.4f}, NMSE {summary['nmse']:.5f}, "
              f"{summary['seconds_per_image'] * 1e3:.1f} ms/image{iters}")  # fmt: skip
        if out:
            Path(out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    return {"summary": summary, "rows": rows}
