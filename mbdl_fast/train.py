"""Training: one loop for every task and model, single process or data-parallel under torchrun.

    mbdl-fast train --task mri --model deq --prior edsr --epochs 10 --out runs/deq_mri
    torchrun --nproc_per_node 2 -m mbdl_fast.cli train --config runs/deq_mri/config.json

The tasks (data, physics, models) and :class:`TrainConfig` live in ``mbdl_fast.tasks``; their names
are importable from here as well.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (NCCL on
GPUs, gloo on CPUs), each rank reads its shard through a DistributedSampler, and rank 0 alone logs
and writes checkpoints. Seeds: ``seed`` fixes data, initialisation and sampling order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from mbdl_fast.checkpoint import load_training_state, read_training_extra, save_model, save_training_state
from mbdl_fast.metrics import psnr, ssim
from mbdl_fast.tasks import (
    MODELS,
    TASK_MODELS,
    TASKS,
    TEST_DRAWS,
    TrainConfig,
    compared_images,
    make_dataset,
    make_model,
    make_physics,
    make_prior,
    prepare_batch,
    reconstruct,
    unwrap,
)

__all__ = [
    "MODELS",
    "RESUME_MAY_CHANGE",
    "TASKS",
    "TASK_MODELS",
    "TEST_DRAWS",
    "TrainConfig",
    "compared_images",
    "evaluate",
    "make_dataset",
    "make_model",
    "make_physics",
    "make_prior",
    "prepare_batch",
    "reconstruct",
    "train",
]

# the DEQ regularisers' per-epoch means as the training log prints them: (record key, label, format)
_REGULARISER_LOG = (("jac_loss", "jac", ".3g"), ("slow_gain", "gain", ".3f"), ("train_iterations", "it.", ".1f"))
#: Settings a resumed run may change: they do not alter what it computes.
RESUME_MAY_CHANGE = ("resume", "device", "out", "keep_epochs")


def _check_resume(cfg: TrainConfig, out_dir: Path, saved: dict[str, Any] | None) -> None:
    """A resumed run continues with the settings it started with: any other change is refused, never ignored."""
    if saved is None:
        path = out_dir / "config.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is None:
        return
    defaults = dataclasses.asdict(TrainConfig())
    now = dataclasses.asdict(cfg)
    changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k, defaults[k]) != now[k])
    if changed:
        was = ", ".join(f"{k}={saved.get(k, defaults[k])!r}" for k in changed)
        asked = ", ".join(f"{k}={now[k]!r}" for k in changed)
        raise ValueError(
            f"resume: the run in {out_dir} was started with {was}; this call asks for {asked}. A resumed run keeps "
            "its settings (its schedule, data and model depend on them): start a new run in another out directory "
            "(--init-prior takes a trained prior), or resume with the original settings"
        )


def _loss(cfg: TrainConfig, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    diff = torch.view_as_real(out - target) if out.is_complex() else out - target
    if cfg.loss == "l1":
        return diff.abs().mean()
    if cfg.loss == "mse":
        return diff.pow(2).mean()
    return torch.nn.functional.smooth_l1_loss(diff, torch.zeros_like(diff), beta=0.01)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def _dist_setup(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@torch.no_grad()
def evaluate(cfg: TrainConfig, model: torch.nn.Module, dataset: Dataset, device: torch.device) -> dict[str, float]:
    """Mean PSNR / SSIM (magnitudes, Gaussian window) over ``dataset``; sharded across ranks when distributed."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(dataset), world))
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # psnr, ssim, count, iterations, converged
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    for start in range(0, len(indices), cfg.batch_size):
        items = [dataset[i] for i in indices[start : start + cfg.batch_size]]
        batch = torch.utils.data.default_collate(items)
        physics, model_input, target = prepare_batch(cfg, batch, device, gen)
        out = reconstruct(model, physics, model_input)
        mag, ref = out.abs(), target.abs()
        totals[0] += psnr(mag, ref, reduction="none").sum()
        totals[1] += ssim(mag, ref, reduction="none").sum()
        totals[2] += len(items)
        info = getattr(unwrap(model), "last_info", None) or {}
        if "iterations_per_sample" in info:
            totals[3] += info["iterations_per_sample"].sum().item()
            totals[4] += info["converged"].sum().item()
    if dist.is_initialized():
        dist.all_reduce(totals)
    n = max(float(totals[2]), 1.0)
    metrics = {"psnr": float(totals[0]) / n, "ssim": float(totals[1]) / n, "count": int(totals[2])}
    if hasattr(unwrap(model), "last_info"):  # DEQ: mean iterations per image and the fraction that converged
        metrics.update(iterations=float(totals[3]) / n, converged=float(totals[4]) / n)
    return metrics


def train(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
    """Train ``cfg``; returns the history. Checkpoints go to ``cfg.out`` (``last`` and ``best`` by val PSNR; with ``cfg.keep_epochs`` also ``model_epoch<N>``, N from 1).

    ``stop_after`` ends this call after that many epochs (the schedule still spans ``cfg.epochs``), so
    a long run can be split into calls resumed with ``cfg.resume``.
    """
    cfg.validate()
    device = _device(cfg)
    rank, world = _dist_setup(device)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out)
    resuming = cfg.resume and (out_dir / "last.json").exists()
    if resuming:  # before config.json is rewritten: a refused resume leaves the run as it was
        _check_resume(cfg, out_dir, read_training_extra(out_dir / "last").get("train_config"))
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    train_set, val_set = make_dataset(cfg, "train"), make_dataset(cfg, "val")
    model = make_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    # The denoising task's noise: one generator per rank, saved and restored with the other random states.
    noise_gen = torch.Generator().manual_seed(cfg.seed + rank)
    if resuming:
        state = load_training_state(
            out_dir / "last", model, optimizer, scheduler=scheduler, restore_rng=True,
            generators={f"noise/rank{rank}": noise_gen},
        )  # fmt: skip
        start_epoch = int(state["epoch"]) + 1
        history = list(state.get("extra", {}).get("history", []))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=world > 1)
    best = max((h["val_psnr"] for h in history), default=-math.inf)
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end_epoch):
        sampler.set_epoch(epoch)
        model.train()
        started, losses = time.perf_counter(), []
        regularised: dict[str, list[float]] = {"jac_loss": [], "slow_gain": [], "train_iterations": []}
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank != 0, leave=False)
        for batch in bar:
            physics, model_input, target = prepare_batch(cfg, batch, device, noise_gen)
            if cfg.jac_reg > 0 or cfg.slow_reg > 0:
                out, info = model(model_input, physics, return_info=True, jac_loss=cfg.jac_reg > 0,
                                  slow_gain=cfg.slow_reg > 0)  # fmt: skip
                loss = _loss(cfg, out, target)
                if cfg.jac_reg > 0:
                    loss = loss + cfg.jac_reg * info["jac_loss"]
                    regularised["jac_loss"].append(info["jac_loss"].item())
                if cfg.slow_reg > 0:
                    loss = loss + cfg.slow_reg * torch.relu(info["slow_gain"] - cfg.slow_target).mean()
                    regularised["slow_gain"].append(info["slow_gain"].max().item())
                regularised["train_iterations"].append(float(info["iterations"]))
            else:
                loss = _loss(cfg, *compared_images(model, reconstruct(model, physics, model_input), target))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        scheduler.step()
        metrics = evaluate(cfg, model, val_set, device)
        record = {
            "epoch": epoch,
            "train_loss": sum(losses) / max(len(losses), 1),
            "val_psnr": metrics["psnr"],
            "val_ssim": metrics["ssim"],
            **{f"val_{k}": metrics[k] for k in ("iterations", "converged") if k in metrics},
            "seconds": time.perf_counter() - started,
        }
        record.update({key: sum(values) / len(values) for key, values in regularised.items() if values})
        history.append(record)
        noise_states = [noise_gen.get_state()]
        if world > 1:
            noise_states = [None] * world
            dist.all_gather_object(noise_states, noise_gen.get_state())
        if rank == 0:
            print(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4g}, val PSNR {metrics['psnr']:.2f} dB, "
                f"SSIM {metrics['ssim']:.4f} ({record['seconds']:.1f} s)"
                + "".join(f", {label} {record[key]:{spec}}" for key, label, spec in _REGULARISER_LOG if key in record)
                + (
                    f", val {metrics['iterations']:.1f} it., {metrics['converged']:.0%} converged"
                    if "iterations" in metrics
                    else ""
                ),  # fmt: skip
                flush=True,
            )
            meta = {"config": dataclasses.asdict(cfg), "epoch": epoch, "val_psnr": metrics["psnr"]}
            save_training_state(
                out_dir / "last", unwrap(model), optimizer, epoch,
                {"history": history, "train_config": dataclasses.asdict(cfg)}, scheduler=scheduler,
                generators={f"noise/rank{r}": noise for r, noise in enumerate(noise_states)},
            )  # fmt: skip
            save_model(unwrap(model), out_dir / "model_last", metadata=meta)
            if cfg.keep_epochs:
                save_model(unwrap(model), out_dir / f"model_epoch{epoch + 1}", metadata=meta)
            if metrics["psnr"] > best:
                best = metrics["psnr"]
                save_model(unwrap(model), out_dir / "model_best", metadata=meta)
    if dist.is_initialized():
        dist.barrier()
    return {"history": history, "model": unwrap(model), "rank": rank, "world_size": world}
