"""``mbdl-fast prune``: prune a trained model, fine-tune it, and report dense vs pruned in one run.

    mbdl-fast prune --checkpoint runs/deq/model_best --ratio 0.3 --importance l1 --finetune school --epochs 3
    mbdl-fast prune --checkpoint ... --ratio 0.3 --nm 2:4          # plus one-shot N:M masks
    mbdl-fast prune --checkpoint ... --ratio 0.3 --nm-budget 0.5   # plus SLS's per-layer N:M search

The table: parameters, MACs per prior application, PSNR / SSIM / NMSE on the test split for
zero-filled, dense, one-shot pruned and fine-tuned, and time per image of each model. Every model
(dense included) is timed in this run at the same solver tolerance and iteration cap (DEQ:
``tol``, ``max_iter``); fine-tuning keeps the dense model's training tolerance (the fine-tuning
guard refuses anything else). N:M rows report MACs only: N:M masks give no speed on a CPU, and on
a GPU only 2:4 through semi-structured sparse kernels, which this pipeline does not deploy.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mbdl_fast.checkpoint import load_model, read_metadata, save_model
from mbdl_fast.metrics import nmse, psnr, ssim
from mbdl_fast.prune.channels import prune_channels
from mbdl_fast.prune.counting import count_params_and_macs
from mbdl_fast.timing import synchronize


def _set_solver(model: torch.nn.Module, options: dict[str, Any]) -> None:
    if hasattr(model, "configure") and options:
        model.configure(**options)


def _solver_options(model: torch.nn.Module) -> dict[str, Any]:
    opts = getattr(model, "solver_options", None)
    if not isinstance(opts, dict):
        return {}
    return {k: opts[k] for k in ("f_tol", "f_max_iter") if k in opts}


@torch.no_grad()
def _evaluate(model, cfg, batches, device, repeats: int = 1) -> dict[str, float]:
    """Metrics and median time per image of ``model`` (None: zero-filled A^H y) over prepared test batches."""
    rows, seconds, iters = [], [], []
    for physics, y, target in batches:
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            out = physics.A_adjoint(y) if model is None else model(y, physics)
            synchronize(device)
            times.append(time.perf_counter() - start)
        seconds.append(sorted(times)[len(times) // 2] / y.shape[0])
        info = getattr(model, "last_info", None) if model is not None else None
        if info and "iterations_per_sample" in info:
            iters.extend(info["iterations_per_sample"].tolist())
        mag, ref = out.abs(), target.abs()
        rows.append(
            (psnr(mag, ref, reduction="none"), ssim(mag, ref, reduction="none"), nmse(mag, ref, reduction="none"))
        )
    cat = [torch.cat([r[k] for r in rows]) for k in range(3)]
    return {
        "psnr": float(cat[0].mean()),
        "ssim": float(cat[1].mean()),
        "nmse": float(cat[2].mean()),
        "seconds_per_image": sum(seconds) / len(seconds),
        "iterations": sum(iters) / len(iters) if iters else None,
    }


def _prior_shape(cfg) -> tuple[int, int, int, int]:
    channels = 2 if cfg.task in ("mri", "denoise") else 1
    return (1, channels, cfg.size, cfg.size)


def _nm_step(model, nm: str | None, nm_budget: float | None, prior_shape):
    """Attach one-shot N:M masks or an SLS search to ``model``'s priors; returns (search or None, label)."""
    from mbdl_fast.prune.channels import find_priors
    from mbdl_fast.prune.nm import SLSSearch, apply_nm

    if nm:
        try:
            n, m = (int(v) for v in nm.split(":"))
        except ValueError as err:
            raise ValueError(f"nm: expected 'N:M' such as '2:4', got {nm!r}") from err
        for _, prior in find_priors(model):
            apply_nm(prior, n, m)
        return None, f"{n}:{m}"
    searches = [SLSSearch(prior, m=4, budget=nm_budget, input_shape=prior_shape) for _, prior in find_priors(model)]
    return searches, f"SLS budget {nm_budget:g}"


class _WithSearch:
    """A fine-tuning strategy plus SLS's MAC regulariser, advancing the search schedule once per call."""

    def __init__(self, strategy, searches) -> None:
        self.strategy, self.searches, self.step = strategy, searches, 0
        self.name, self.needs_target, self.needs_teacher = strategy.name, strategy.needs_target, strategy.needs_teacher

    def __call__(self, model, physics, y, target, teacher, generator=None):
        if self.step:
            for s in self.searches:
                s.step_schedule(self.step - 1)  # after the previous optimizer step
        self.step += 1
        parts = dict(self.strategy(model, physics, y, target, teacher, generator))
        reg = sum(s.regularizer() for s in self.searches)
        parts["loss"] = parts["loss"] + reg
        return parts


@dataclass
class PruneProblem:
    """A trained checkpoint ready to prune and measure: the dense model, its test batches and solver settings.

    ``train_options``: the DEQ tolerance the model was trained at (fine-tuning keeps it);
    ``eval_options``: the tolerance and iteration cap every measured model gets (empty for non-DEQs).
    """

    checkpoint: Path
    meta: dict[str, Any]
    cfg: Any  # mbdl_fast.train.TrainConfig
    dense: torch.nn.Module
    batches: list[tuple[Any, torch.Tensor, torch.Tensor]]
    train_options: dict[str, Any]
    eval_options: dict[str, Any]
    prior_shape: tuple[int, int, int, int]
    device: torch.device


def load_problem(
    checkpoint: str | Path,
    tol: float = 1e-4,
    max_iter: int = 100,
    batch_size: int = 2,
    num_test: int | None = None,
    device: str | torch.device | None = None,
) -> PruneProblem:
    """Load ``checkpoint`` (with its training config) and prepare its test split as (physics, y, target) batches."""
    from mbdl_fast.train import TrainConfig, make_dataset, prepare_batch

    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = read_metadata(checkpoint)
    if "config" not in meta:
        raise ValueError(f"checkpoint: {checkpoint} carries no training config in its metadata")
    cfg = TrainConfig.from_dict(meta["config"])
    dense = load_model(checkpoint, map_location=device)
    train_options = _solver_options(dense)
    eval_options = {"f_tol": tol, "f_max_iter": max_iter} if train_options else {}
    test = make_dataset(cfg, "test")
    count = len(test) if num_test is None else min(num_test, len(test))
    batches = []
    for start in range(0, count, batch_size):
        batch = torch.utils.data.default_collate([test[i] for i in range(start, min(start + batch_size, count))])
        batches.append(prepare_batch(cfg, batch, device))
    return PruneProblem(Path(checkpoint), meta, cfg, dense, batches, train_options, eval_options, _prior_shape(cfg),
                        device)  # fmt: skip


def finetune_pruned(
    problem: PruneProblem,
    model: torch.nn.Module,
    finetune: str,
    epochs: int,
    lr: float,
    batch_size: int = 2,
    searches: list | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` (a pruned model) in place by strategy ``finetune`` at the dense model's training tolerance.

    ``school`` uses the dense model as the frozen teacher. ``searches``: SLS N:M searches whose MAC
    regulariser joins the loss. Returns the per-epoch history.
    """
    from mbdl_fast.finetune import finetune as run_finetune
    from mbdl_fast.finetune.strategies import make_strategy
    from mbdl_fast.train import make_dataset

    strategy = make_strategy(finetune)
    if searches:
        strategy = _WithSearch(strategy, searches)
    _set_solver(model, problem.train_options)
    _set_solver(problem.dense, problem.train_options)
    cfg = problem.cfg
    result = run_finetune(
        model, make_dataset(cfg, "train"), strategy, batch_to_problem=cfg, epochs=epochs, lr=lr,
        batch_size=batch_size, teacher=problem.dense if finetune == "school" else None,
        val_dataset=make_dataset(cfg, "val"), progress=progress,
    )  # fmt: skip
    return result["history"]


def measure(problem: PruneProblem, model: torch.nn.Module | None, repeats: int = 1) -> dict[str, Any]:
    """Params, MACs per prior call, test metrics, iterations and time per image of ``model`` (None: zero-filled)
    at the problem's evaluation tolerance."""
    if model is not None:
        _set_solver(model, problem.eval_options)
        model.eval()
    metrics = _evaluate(model, problem.cfg, problem.batches, problem.device, repeats)
    counts = count_params_and_macs(model, problem.prior_shape) if model is not None else {"params": 0, "macs": 0}
    return {"params": counts["params"], "macs_per_prior_call": counts["macs"], **metrics}


@torch.no_grad()
def time_models(problem: PruneProblem, models: dict[str, torch.nn.Module], repeats: int = 3) -> dict[str, float]:
    """Median seconds per test image of each model, all at the evaluation tolerance, timed round-robin.

    Interleaving the models (every repeat runs each model over the whole test split once) spreads any
    background load evenly, so the ratios between models are what one run can trust.
    """
    for model in models.values():
        _set_solver(model, problem.eval_options)
        model.eval()
    samples: dict[str, list[float]] = {name: [] for name in models}
    images = sum(y.shape[0] for _, y, _ in problem.batches)
    for _ in range(repeats):
        for name, model in models.items():
            synchronize(problem.device)
            start = time.perf_counter()
            for physics, y, _ in problem.batches:
                model(y, physics)
            synchronize(problem.device)
            samples[name].append((time.perf_counter() - start) / images)
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


def prune_and_report(
    checkpoint: str | Path,
    ratio: float,
    importance: str = "l1",
    finetune: str | None = "supervised",
    round_to: int = 8,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 2,
    nm: str | None = None,
    nm_budget: float | None = None,
    tol: float = 1e-4,
    max_iter: int = 100,
    num_test: int | None = None,
    repeats: int = 1,
    out: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Prune ``checkpoint``'s model, fine-tune, and measure everything in one run; returns the numbers.

    Returns ``{"rows": [...], "setting": {...}}``: one row per model (zero-filled, dense, one-shot
    pruned, fine-tuned, and N:M when asked) with params, MACs, PSNR, SSIM, NMSE, iterations and
    seconds per image, all timed here at ``tol`` / ``max_iter`` (DEQs). Saves the fine-tuned model
    and a JSON report under ``out`` when given.
    """
    problem = load_problem(checkpoint, tol, max_iter, batch_size, num_test, device)
    dense, meta = problem.dense, problem.meta
    physics0, y0, _ = problem.batches[0]

    started = time.perf_counter()
    pruned = prune_channels(dense, ratio, importance=importance, round_to=round_to, check_inputs=(y0, physics0))
    prune_seconds = time.perf_counter() - started
    models: dict[str, torch.nn.Module | None] = {"zero-filled": None, "dense": dense, "pruned (one-shot)": pruned}

    history = None
    label = None
    if finetune or nm or nm_budget:
        tuned = copy.deepcopy(pruned)
        searches = None
        if nm or nm_budget:
            searches, label = _nm_step(tuned, nm, nm_budget, problem.prior_shape)
        if finetune:
            history = finetune_pruned(problem, tuned, finetune, epochs, lr, batch_size, searches, progress)
        name = f"fine-tuned ({finetune})" if finetune else "pruned"
        models[name + (f" + {label}" if label else "")] = tuned

    rows = []
    shape = problem.prior_shape
    for name, model in models.items():
        row = {"model": name, **measure(problem, model, repeats)}
        if label and name.endswith(label):
            from mbdl_fast.prune.channels import find_priors
            from mbdl_fast.prune.nm import nm_report

            report = [nm_report(p, input_shape=shape) for _, p in find_priors(model)]
            row["nm_effective_macs"] = sum(r.effective_macs for r in report)
        rows.append(row)
    dense_time = rows[1]["seconds_per_image"]
    for row in rows[1:]:
        row["speedup_vs_dense"] = dense_time / row["seconds_per_image"]
    setting = {
        "checkpoint": str(checkpoint),
        "ratio": ratio,
        "importance": importance,
        "round_to": round_to,
        "finetune": finetune,
        "epochs": epochs,
        "nm": nm,
        "nm_budget": nm_budget,
        "eval_solver": problem.eval_options,
        "finetune_solver": problem.train_options,
        "test_images": sum(y.shape[0] for _, y, _ in problem.batches),
        "device": str(device),
        "prune_seconds": prune_seconds,
        "torch": torch.__version__,
    }
    result = {"setting": setting, "rows": rows, "history": history}
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        final = list(models.values())[-1]
        save_model(final, out / "model_pruned", metadata={"config": meta["config"], "pruning": setting})
        (out / "prune_report.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def format_table(result: dict[str, Any]) -> str:
    """The report as a text table."""
    s = result["setting"]
    solver = s["eval_solver"]
    head = (f"ratio {s['ratio']}, importance {s['importance']}, fine-tune {s['finetune']} ({s['epochs']} epochs), "
            f"{s['test_images']} test images, device {s['device']}"
            + (f", DEQ tol {solver['f_tol']:g}, cap {solver['f_max_iter']} for every row" if solver else ""))  # fmt: skip
    lines = [
        head,
        f"{'model':<34}{'params':>10}{'GMACs':>8}{'PSNR':>8}{'SSIM':>8}{'NMSE':>9}{'iters':>7}{'ms/img':>9}{'speed':>7}",
    ]
    for r in result["rows"]:
        iters = f"{r['iterations']:.1f}" if r.get("iterations") is not None else "-"
        speed = f"{r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else "-"
        lines.append(
            f"{r['model']:<34}{r['params']:>10}{r['macs_per_prior_call'] / 1e9:>8.3f}{r['psnr']:>8.2f}{r['ssim']:>8.4f}"
            f"{r['nmse']:>9.5f}{iters:>7}{r['seconds_per_image'] * 1e3:>9.1f}{speed:>7}"
        )
        if "nm_effective_macs" in r:
            lines.append(f"{'':<34}N:M effective GMACs {r['nm_effective_macs'] / 1e9:.3f} (no speed-up on CPU)")
    return "\n".join(lines)
