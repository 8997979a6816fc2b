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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mbdl_fast.checkpoint import load_model, read_metadata, save_model
from mbdl_fast.evaluate import (
    evaluate_rows,
    machine,
    paired_difference,
    prepare_batches,
    solver_setting,
    summarise,
    time_round_robin,
)
from mbdl_fast.finetune import finetune as run_finetune
from mbdl_fast.finetune.strategies import make_strategy
from mbdl_fast.prune.channels import prune_channels
from mbdl_fast.prune.counting import count_params_and_macs
from mbdl_fast.prune.nm import SLSSearch, apply_nm, nm_report
from mbdl_fast.solvers import find_priors
from mbdl_fast.tasks import TrainConfig, make_dataset


def _set_solver(model: torch.nn.Module, options: dict[str, Any]) -> None:
    if hasattr(model, "configure") and options:
        model.configure(**options)


def _prior_shape(cfg) -> tuple[int, int, int, int]:
    channels = 2 if cfg.task in ("mri", "denoise") else 1
    return (1, channels, cfg.size, cfg.size)


def _nm_step(model, nm: str | None, nm_budget: float | None, prior_shape):
    """Attach one-shot N:M masks or an SLS search to ``model``'s priors; returns (search or None, label)."""
    if nm:
        try:
            n, m = (int(v) for v in nm.split(":"))
        except ValueError as err:
            raise ValueError(f"nm: expected 'N:M' such as '2:4', got {nm!r}") from err
        for _, prior in find_priors(model):
            apply_nm(prior, n, m)
        return None, f"{n}:{m}"
    # Fine-tuning runs tens to hundreds of steps: lambda doubles every 10 (SLS's default of 100 would barely anneal),
    # and every layer starts dense but near the threshold (keep 0.6, not 0.9), so the scores, at their own learning
    # rate, can reach the budget within the fine-tuning.
    searches = [SLSSearch(prior, m=4, budget=nm_budget, input_shape=prior_shape, anneal_every=10, init_keep=0.6)
                for _, prior in find_priors(model)]  # fmt: skip
    return searches, f"SLS budget {nm_budget:g}"


def _finish_search(searches: list, budget: float) -> dict[str, Any]:
    """Fix the searched N per layer (``finalize``) and say whether the MAC budget was reached."""
    ratios, chosen = [], {}
    for k, search in enumerate(searches):
        ratios.append((search.mac_ratio(), float(sum(search.dense_macs.values()))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported below, in the table, instead
            chosen.update({f"prior{k}.{name}": n for name, n in search.finalize().items()})
    ratio = sum(r * w for r, w in ratios) / sum(w for _, w in ratios)
    return {"budget": budget, "mac_ratio": ratio, "reached": ratio <= budget + 1e-9, "n_per_layer": chosen}


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
    cfg: Any  # mbdl_fast.tasks.TrainConfig
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
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = read_metadata(checkpoint)
    if "config" not in meta:
        raise ValueError(f"checkpoint: {checkpoint} carries no training config in its metadata")
    cfg = TrainConfig.from_dict(meta["config"])
    dense = load_model(checkpoint, map_location=device)
    train_options = solver_setting(dense)
    eval_options = {"f_tol": tol, "f_max_iter": max_iter} if train_options else {}
    batches = prepare_batches(cfg, "test", batch_size, device, num_test)
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
    score_lr: float = 0.1,
    jac_reg: float = 0.0,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` (a pruned model) in place by strategy ``finetune`` at the dense model's training tolerance.

    ``school`` uses the dense model as the frozen teacher. ``searches``: SLS N:M searches whose MAC
    regulariser joins the loss; their priority scores train with their own learning rate ``score_lr`` (no
    weight decay, no clipping), as SLS's search does. ``jac_reg``: weight of the DEQ Jacobian regulariser (see
    ``mbdl_fast.finetune``). Returns the per-epoch history.
    """
    strategy = make_strategy(finetune)
    groups = []
    if searches:
        strategy = _WithSearch(strategy, searches)
        scores = [p for s in searches for p in s.score_parameters()]
        groups = [{"params": scores, "lr": score_lr, "weight_decay": 0.0}]
    _set_solver(model, problem.train_options)
    _set_solver(problem.dense, problem.train_options)
    cfg = problem.cfg
    result = run_finetune(
        model, make_dataset(cfg, "train"), strategy, batch_to_problem=cfg, epochs=epochs, lr=lr,
        batch_size=batch_size, teacher=problem.dense if finetune == "school" else None,
        val_dataset=make_dataset(cfg, "val"), progress=progress, param_groups=groups, jac_reg=jac_reg,
    )  # fmt: skip
    return result["history"]


def measure(
    problem: PruneProblem, model: torch.nn.Module | None, reference_rows: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Params, MACs per prior call, test metrics, convergence and per-image rows of ``model`` (None: zero-filled)
    at the problem's evaluation tolerance; with ``reference_rows`` (the dense model's), paired dPSNR / dSSIM with
    95 % confidence intervals (``mbdl_fast.evaluate.paired_difference``)."""
    if model is not None:
        _set_solver(model, problem.eval_options)
    rows = evaluate_rows(model, problem.batches, device=problem.device)
    counts = count_params_and_macs(model, problem.prior_shape) if model is not None else {"params": 0, "macs": 0}
    result = {"params": counts["params"], "macs_per_prior_call": counts["macs"], **summarise(rows)}
    if reference_rows is not None:
        result["dpsnr"] = paired_difference(rows, reference_rows, "psnr")
        result["dssim"] = paired_difference(rows, reference_rows, "ssim")
    result["per_image"] = rows
    return result


def time_models(
    problem: PruneProblem, models: dict[str, torch.nn.Module | None], repeats: int = 5, num_batches: int | None = None
) -> dict[str, dict[str, float]]:
    """Seconds per test image of each model (median, min, max), all at the evaluation tolerance, round-robin,
    over the first ``num_batches`` test batches (default all)."""
    for model in models.values():
        if model is not None:
            _set_solver(model, problem.eval_options)
    return time_round_robin(models, problem.batches[:num_batches], repeats)


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
    nm_score_lr: float = 0.1,
    jac_reg: float = 0.0,
    tol: float = 1e-4,
    max_iter: int = 100,
    num_test: int | None = None,
    repeats: int = 5,
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
    if nm_budget is not None and not finetune:
        raise ValueError("nm_budget: SLS's N:M search runs during fine-tuning; give a fine-tuning strategy too")
    problem = load_problem(checkpoint, tol, max_iter, batch_size, num_test, device)
    dense, meta = problem.dense, problem.meta
    physics0, y0, _ = problem.batches[0]

    started = time.perf_counter()
    pruned = prune_channels(dense, ratio, importance=importance, round_to=round_to, check_inputs=(y0, physics0))
    prune_seconds = time.perf_counter() - started
    models: dict[str, torch.nn.Module | None] = {"zero-filled": None, "dense": dense, "pruned (one-shot)": pruned}

    history = None
    label = None
    nm_search = None
    if finetune or nm or nm_budget:
        tuned = copy.deepcopy(pruned)
        searches = None
        if nm or nm_budget:
            searches, label = _nm_step(tuned, nm, nm_budget, problem.prior_shape)
        if finetune:
            history = finetune_pruned(problem, tuned, finetune, epochs, lr, batch_size, searches, progress,
                                      score_lr=nm_score_lr, jac_reg=jac_reg)  # fmt: skip
        if searches:
            nm_search = _finish_search(searches, nm_budget)
        name = f"fine-tuned ({finetune})" if finetune else "pruned"
        models[name + (f" + {label}" if label else "")] = tuned

    rows = []
    shape = problem.prior_shape
    dense_rows = None
    for name, model in models.items():
        row = {"model": name, **measure(problem, model, dense_rows if model is not dense else None)}
        if model is dense:
            dense_rows = row["per_image"]
        if label and name.endswith(label):
            report = [nm_report(p, input_shape=shape) for _, p in find_priors(model)]
            row["nm_effective_macs"] = sum(r.effective_macs for r in report)
        rows.append(row)
    # zero-filled rows were measured before dense: pair them now
    rows[0]["dpsnr"] = paired_difference(rows[0]["per_image"], dense_rows, "psnr")
    rows[0]["dssim"] = paired_difference(rows[0]["per_image"], dense_rows, "ssim")
    timing = time_models(problem, {n: m for n, m in models.items() if m is not None}, repeats)
    dense_time = timing["dense"]["median"]
    for row in rows[1:]:
        t = timing[row["model"]]
        row.update(seconds_per_image=t["median"], seconds_min=t["min"], seconds_max=t["max"],
                   speedup_vs_dense=dense_time / t["median"])  # fmt: skip
    setting = {
        "checkpoint": str(checkpoint),
        "ratio": ratio,
        "importance": importance,
        "round_to": round_to,
        "finetune": finetune,
        "epochs": epochs,
        "lr": lr,
        "jac_reg": jac_reg,
        "nm": nm,
        "nm_budget": nm_budget,
        "nm_search": nm_search,
        "eval_solver": problem.eval_options,
        "finetune_solver": problem.train_options,
        "test_images": sum(y.shape[0] for _, y, _ in problem.batches),
        "prune_seconds": prune_seconds,
        "timing": f"round-robin over the models, median of {repeats} repeats",
        **machine(),
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
    """The report as a text table: every row with its convergence, and paired differences against dense."""
    s = result["setting"]
    solver = s["eval_solver"]
    head = (f"ratio {s['ratio']}, importance {s['importance']}, fine-tune {s['finetune']} ({s['epochs']} epochs), "
            f"{s['test_images']} test images, {s['device']}, {s['threads']} threads"
            + (f", DEQ tol {solver['f_tol']:g}, cap {solver['f_max_iter']} for every row" if solver else ""))  # fmt: skip
    lines = [
        head,
        f"{'model':<34}{'params':>9}{'GMACs':>7}{'PSNR':>7}{'dPSNR [95% CI]':>24}{'SSIM':>8}{'iters':>7}"
        f"{'conv':>6}{'ms/img':>9}{'speed':>7}",
    ]
    for r in result["rows"]:
        iters = f"{r['iterations']:.1f}" if r.get("iterations") is not None else "-"
        conv = f"{r['converged']:.0%}" if r.get("converged") is not None else "-"
        speed = f"{r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else "-"
        d = r.get("dpsnr")
        diff = f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]" if d else "-"
        lines.append(
            f"{r['model']:<34}{r['params']:>9}{r['macs_per_prior_call'] / 1e9:>7.3f}{r['psnr']:>7.2f}{diff:>24}"
            f"{r['ssim']:>8.4f}{iters:>7}{conv:>6}{r['seconds_per_image'] * 1e3:>9.1f}{speed:>7}"
        )
        if "nm_effective_macs" in r:
            lines.append(f"{'':<34}N:M effective GMACs {r['nm_effective_macs'] / 1e9:.3f} (no speed-up on CPU)")
    search = s.get("nm_search")
    if search:
        verdict = "reached" if search["reached"] else "NOT reached: more epochs, or a larger score learning rate"
        lines.append(f"SLS N:M search: MAC ratio {search['mac_ratio']:.3f} of the searched layers, budget "
                     f"{search['budget']:g}: {verdict}")  # fmt: skip
    unconverged = [r["model"] for r in result["rows"] if r.get("converged") is not None and r["converged"] < 1]
    if unconverged:
        lines.append(f"WARNING: not every image converged for {', '.join(unconverged)}: those rows are capped "
                     "iterations, not equilibrium results")  # fmt: skip
    return "\n".join(lines)
