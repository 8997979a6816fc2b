"""The one fine-tuning loop the three strategies share, what a batch becomes, and the DEQ tolerance guard.

A batch (a dict collated from the data set's items) becomes a *problem* ``(physics, y, target)``
through a ``batch_to_problem(batch, device)`` callable: the operator, the measurements and the ground
truth, or ``None`` where the items have none. ``mri_problem`` reads ``kspace``, ``coil_maps`` and
``mask`` (``MultiCoilBrainDataset`` items, or a user's acquisitions without any ``target``);
``problem_from_config(cfg)`` covers every task of a ``TrainConfig``.

The strategy (``strategies.py``) turns a problem into a loss; the loop hands ``target=None`` to the
strategies that do not use a ground truth, so they run on data sets with no ``target`` at all.
Validation reports the strategy's loss on the validation set and, only where its items carry a
``target``, PSNR and SSIM of the magnitudes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mbdl_fast._validate import check_number
from mbdl_fast.checkpoint import save_model
from mbdl_fast.finetune.strategies import Strategy, make_strategy
from mbdl_fast.metrics import psnr, ssim
from mbdl_fast.physics import MultiCoilMRI
from mbdl_fast.solvers.deq import DEQ
from mbdl_fast.tasks import TrainConfig, make_physics, reconstruct

__all__ = [
    "GUARDED_SOLVER_OPTIONS",
    "BatchToProblem",
    "Problem",
    "configure_solver",
    "evaluate",
    "finetune",
    "mri_problem",
    "problem_from_config",
]

#: (physics or None, measurements y, ground truth or None)
Problem = tuple[nn.Module | None, torch.Tensor, torch.Tensor | None]
BatchToProblem = Callable[[dict[str, Any], torch.device], Problem]

#: DEQ solver options that set how exactly the fixed point is solved; fine-tuning keeps them equal to
#: the dense model's unless told otherwise (``configure_solver``).
GUARDED_SOLVER_OPTIONS = (
    "f_solver",
    "f_tol",
    "f_max_iter",
    "f_stop_mode",
    "b_solver",
    "b_tol",
    "b_max_iter",
    "b_stop_mode",
)


# ------------------------------------------------------------------------------------------------
# Batches -> problems
# ------------------------------------------------------------------------------------------------
def mri_problem(batch: dict[str, Any], device: torch.device) -> Problem:
    """Multi-coil MRI: ``MultiCoilMRI(mask, coil_maps)``, y = ``kspace``, and ``target`` if the items have one.

    Keys: ``kspace`` complex ``(B, C, H, W)``, ``coil_maps`` complex ``(B, C, H, W)``, ``mask`` real,
    broadcastable (``(B, 1, 1, W)`` column masks); ``target`` complex ``(B, H, W)`` optional.
    """
    missing = [key for key in ("kspace", "coil_maps", "mask") if key not in batch]
    if missing:
        raise KeyError(
            f"mri_problem: items need 'kspace', 'coil_maps' and 'mask'; missing {missing} in {sorted(batch)}"
        )
    physics = MultiCoilMRI(batch["mask"].to(device), batch["coil_maps"].to(device))
    target = batch["target"].to(device) if "target" in batch else None
    return physics, batch["kspace"].to(device), target


def problem_from_config(cfg: TrainConfig) -> BatchToProblem:
    """``batch_to_problem`` for the task of ``cfg`` (the data of ``tasks.make_dataset(cfg, split)``).

    ``mri``: ``mri_problem``. ``sr`` / ``block-cs``: the operator of ``tasks.make_physics``, y = the
    items' ``y`` if given, else A(target) (simulated measurements: the data, not supervision).
    ``denoise``: no operator, y = the items' ``y`` or target + ``cfg.denoise_sigma`` · noise (seeded).
    """
    cfg.validate()
    if cfg.task == "mri":
        return mri_problem
    noise = torch.Generator().manual_seed(cfg.seed + 54321)

    def to_problem(batch: dict[str, Any], device: torch.device) -> Problem:
        physics = make_physics(cfg, batch, device)
        target = batch["target"].to(device) if "target" in batch else None
        if "y" in batch:
            y = batch["y"].to(device)
        elif target is None:
            raise KeyError(f"task {cfg.task!r}: items need measurements 'y' or a 'target' to simulate them from")
        elif physics is None:
            y = target + cfg.denoise_sigma * torch.randn(target.shape, dtype=target.dtype, generator=noise).to(device)
        else:
            y = physics.A(target)
        return physics, y, target

    return to_problem


def _as_batch_to_problem(batch_to_problem: BatchToProblem | TrainConfig | None) -> BatchToProblem:
    if batch_to_problem is None:
        return mri_problem
    if isinstance(batch_to_problem, TrainConfig):
        return problem_from_config(batch_to_problem)
    if not callable(batch_to_problem):
        raise TypeError(
            f"batch_to_problem: expected a callable (batch, device) -> (physics, y, target), a TrainConfig or None, "
            f"got {type(batch_to_problem).__name__}"
        )
    return batch_to_problem


# ------------------------------------------------------------------------------------------------
# DEQ solver tolerance
# ------------------------------------------------------------------------------------------------
def _deqs(model: nn.Module | None) -> list[DEQ]:
    return [] if model is None else [m for m in model.modules() if isinstance(m, DEQ)]


def _guarded(options: dict[str, Any]) -> dict[str, Any]:
    return {key: options[key] for key in GUARDED_SOLVER_OPTIONS}


def configure_solver(
    model: nn.Module,
    teacher: nn.Module | None = None,
    solver_options: dict[str, Any] | None = None,
    allow_different_tolerance: bool = False,
) -> dict[str, Any] | None:
    """Apply ``solver_options`` to every DEQ in ``model``, refusing a tolerance unlike the dense model's.

    The reference is the teacher's DEQ solver (when ``teacher`` contains DEQs, paired in module order)
    or else the model's own options before this call (a pruned model is rebuilt from the dense model's
    config, so it carries the dense tolerance). After the override, the guarded options
    (``GUARDED_SOLVER_OPTIONS``: solver, tolerance, iteration cap, stop mode, forward and backward)
    must equal the reference's; otherwise ``ValueError`` (and the model is left as it was) unless
    ``allow_different_tolerance=True``. SPADE tuned and timed its pruned DEQs at a looser tolerance than
    the dense one; here a different tolerance is only ever chosen explicitly, and recorded.

    Returns ``None`` for a model without DEQ, else ``{"solver": ..., "reference": ..., "reference_from":
    "teacher" | "model", "same_tolerance": bool}`` (the first DEQ's guarded options and its reference's).
    """
    deqs = _deqs(model)
    options = dict(solver_options or {})
    if not deqs:
        if options:
            raise ValueError(f"solver_options: apply to DEQ models only; {type(model).__name__} contains no DEQ")
        return None
    teachers = _deqs(teacher)
    if teachers and len(teachers) != len(deqs):
        raise ValueError(
            f"teacher: contains {len(teachers)} DEQ solvers, the model {len(deqs)}; cannot pair their tolerances"
        )
    before = [dict(d.solver_options) for d in deqs]
    references = [_guarded(t.solver_options) for t in teachers] if teachers else [_guarded(b) for b in before]
    for deq in deqs:
        deq.configure(**options)
    differences = [
        f"{key}={d.solver_options[key]!r} (reference {ref[key]!r})"
        for d, ref in zip(deqs, references, strict=True)
        for key in GUARDED_SOLVER_OPTIONS
        if d.solver_options[key] != ref[key]
    ]
    if differences and not allow_different_tolerance:
        for deq, old in zip(deqs, before, strict=True):
            deq.solver_options.update(old)
        source = "the teacher" if teachers else "the dense model"
        raise ValueError(
            f"DEQ solver: fine-tuning would run at {', '.join(sorted(set(differences)))}, unlike {source}. "
            "Pruned and dense models are tuned and compared at the same tolerance; pass "
            "allow_different_tolerance=True to use another one on purpose (both are then recorded)."
        )
    return {
        "solver": _guarded(deqs[0].solver_options),
        "reference": references[0],
        "reference_from": "teacher" if teachers else "model",
        "same_tolerance": not differences,
    }


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    strategy: str | Strategy = "supervised",
    batch_to_problem: BatchToProblem | TrainConfig | None = None,
    teacher: nn.Module | None = None,
    batch_size: int = 4,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Mean strategy loss over ``dataset`` and, over the items with a ``target``, mean PSNR / SSIM.

    Returns ``{"loss", "psnr", "ssim", "count", "count_with_target"}``; ``psnr`` and ``ssim`` are
    ``None`` when no item has a ground truth (and ``loss`` too for the supervised strategy; ``count``
    counts the items the loss covers). Random draws of the strategy (rotations) come from a
    generator seeded with ``seed``, so repeated evaluations see the same draws.
    """
    strategy = make_strategy(strategy)
    to_problem = _as_batch_to_problem(batch_to_problem)
    device = torch.device(device) if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    loss_sum, psnr_sum, ssim_sum, count, with_target = 0.0, 0.0, 0.0, 0, 0
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            physics, y, target = to_problem(batch, device)
            n = y.shape[0]
            if target is not None or not strategy.needs_target:
                visible = target if strategy.needs_target else None
                loss_sum += float(strategy(model, physics, y, visible, teacher, generator=generator)["loss"]) * n
                count += n
            if target is not None:
                out = reconstruct(model, physics, y)
                psnr_sum += float(psnr(out.abs(), target.abs(), reduction="none").sum())
                ssim_sum += float(ssim(out.abs(), target.abs(), reduction="none").sum())
                with_target += n
    finally:
        model.train(was_training)
    return {
        "loss": loss_sum / count if count else None,
        "psnr": psnr_sum / with_target if with_target else None,
        "ssim": ssim_sum / with_target if with_target else None,
        "count": count,
        "count_with_target": with_target,
    }


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def finetune(
    model: nn.Module,
    dataset: Dataset,
    strategy: str | Strategy = "supervised",
    *,
    batch_to_problem: BatchToProblem | TrainConfig | None = None,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 4,
    teacher: nn.Module | None = None,
    loss: str = "smooth_l1",
    rei_weight: float = 1.0,
    rotations: Sequence[int] = (1, 2, 3),
    rei_noise_std: float = 0.0,
    val_dataset: Dataset | None = None,
    solver_options: dict[str, Any] | None = None,
    allow_different_tolerance: bool = False,
    grad_clip: float | None = 1.0,
    out: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
    param_groups: Sequence[dict[str, Any]] = (),
    jac_reg: float = 0.0,
    val_objective: Callable[[nn.Module], float] | None = None,
    patience: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place with one of SPADE's strategies; returns the history.

    Args:
        model: any reconstruction network called as ``model(y, physics)`` (DEQ, DU, VarNet, a pruned
            one: a smaller module of the same class), or a bare prior for the denoise task. Trained on
            the device of its parameters.
        dataset: items (dicts) that ``batch_to_problem`` understands. ``"school"`` and
            ``"self_supervised"`` never read a ground truth: their items may lack ``target``.
        strategy: ``"supervised"`` (ground truth), ``"school"`` (frozen teacher, no ground truth),
            ``"self_supervised"`` (measurement consistency + rotation equivariance, REI), or a
            ``Strategy`` object (see ``strategies.py`` for the maths).
        batch_to_problem: ``(batch, device) -> (physics, y, target or None)``; a ``TrainConfig``
            (``problem_from_config``); ``None``: multi-coil MRI items (``mri_problem``).
        epochs, lr, batch_size, grad_clip: Adam at ``lr`` with a cosine schedule over ``epochs``,
            gradient norm clipped to ``grad_clip`` (``None``: off), as ``train.py``.
        teacher: the frozen dense model (required by ``"school"``; put in eval mode and run without
            gradients; must not share parameters with ``model``). For every strategy it is also the
            reference of the DEQ solver tolerance.
        loss: image loss of ``"supervised"`` / ``"school"``: ``"smooth_l1"``, ``"l1"``, ``"mse"``, ``"ssim"``.
        rei_weight, rotations, rei_noise_std: ``"self_supervised"``: weight of the equivariance term,
            quarter turns to draw from, noise of the second measurement.
        val_dataset: validated after every epoch (strategy loss; PSNR / SSIM where items have ``target``).
        solver_options: DEQ solver options for the fine-tuning (and afterwards: they stay set); a
            tolerance unlike the teacher's / dense model's is refused unless
            ``allow_different_tolerance=True`` (``configure_solver``).
        out: directory for ``model_last`` and, by validation PSNR, ``model_best`` (``save_model``:
            registered models only); ``None`` saves nothing.
        progress: tqdm bar per epoch.
        seed: data order and the strategy's random draws (rotations, noise).
        jac_reg: DEQ models: weight of the Jacobian regulariser ``DEQ.jacobian_penalty`` (||dT/dz||_F^2 / n at the
            last fixed point, Bai et al. 2021) added to every strategy's loss, so a pruned DEQ stays contractive
            and converges at the tolerance it was trained for; reported as ``train_jac``.
        param_groups: extra Adam parameter groups with their own settings, e.g. SLS's priority scores
            ``{"params": search.score_parameters(), "lr": 1e-2, "weight_decay": 0.0}``; their parameters
            leave the main group (``lr``) and gradient clipping, and share the cosine schedule.
        val_objective: ``model -> float`` (lower is better, e.g. ZS-SSL's error on held-out measurements),
            evaluated after every epoch in eval mode without gradients; the model of the lowest value is
            restored at the end. ``patience``: stop after that many epochs without a new lowest value.

    Returns:
        ``{"history": [...], "model": model, "strategy": name, "solver": configure_solver's record or None,
        "best_epoch": the restored epoch or None}``;
        one history record per epoch: ``epoch``, ``train_loss`` (mean over the epoch's batches) and the
        strategy's parts (``train_mc``, ``train_eq`` for self-supervised), ``lr``, ``seconds``,
        ``val_loss`` / ``val_psnr`` / ``val_ssim`` (``None`` without a validation set or, for PSNR /
        SSIM, without ground truth in it), ``val_objective`` (or ``None``), and for DEQ models ``f_tol`` and
        ``f_max_iter``.
    """
    strategy = make_strategy(strategy, loss=loss, rei_weight=rei_weight, rotations=rotations, noise_std=rei_noise_std)
    to_problem = _as_batch_to_problem(batch_to_problem)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr: expected a number > 0, got {lr!r}")
    if strategy.needs_teacher and teacher is None:
        raise ValueError(f"{strategy.name}: needs a teacher (the frozen dense model)")
    if teacher is not None:
        if teacher is model or {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}:
            raise ValueError("teacher: must be a separate frozen copy; it shares parameters with the model being tuned")
        teacher.eval()
    own = {id(p) for group in param_groups for p in group["params"]}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    if not params:
        raise ValueError(f"model: {type(model).__name__} has no trainable parameters")
    solver = configure_solver(model, teacher, solver_options, allow_different_tolerance)
    deq = _deqs(model)[0] if solver is not None else None
    check_number("jac_reg", jac_reg, 0.0)
    if jac_reg > 0 and deq is None:
        raise ValueError(f"jac_reg: the Jacobian regulariser needs a DEQ model, got {type(model).__name__}")
    if val_objective is not None and not callable(val_objective):
        raise TypeError(f"val_objective: expected a callable model -> float, got {type(val_objective).__name__}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience: expected an int >= 1 or None, got {patience!r}")
    if patience is not None and val_objective is None:
        raise ValueError("patience: early stopping needs a val_objective")

    device = _device_of(model)
    optimizer = torch.optim.Adam(
        [{"params": params}, *(dict(g, params=list(g["params"])) for g in param_groups)], lr=lr
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    draws = torch.Generator().manual_seed(seed + 1)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    history: list[dict[str, Any]] = []
    best = -math.inf
    lowest, best_epoch, best_state = math.inf, None, None
    for epoch in range(epochs):
        model.train()
        started, sums, steps = time.perf_counter(), {}, 0
        current_lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(loader, desc=f"{strategy.name} {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for batch in bar:
            physics, y, target = to_problem(batch, device)
            parts = strategy(model, physics, y, target if strategy.needs_target else None, teacher, generator=draws)
            if jac_reg > 0:
                parts = dict(parts, jac=sum(d.jacobian_penalty() for d in _deqs(model)))
                parts["loss"] = parts["loss"] + jac_reg * parts["jac"]
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            steps += 1
            bar.set_postfix(loss=f"{parts['loss'].item():.4g}")
        scheduler.step()
        record: dict[str, Any] = {"epoch": epoch}
        record.update({f"train_{key}": value / max(steps, 1) for key, value in sums.items()})
        record.update({"lr": current_lr, "val_loss": None, "val_psnr": None, "val_ssim": None})
        if val_dataset is not None:
            metrics = evaluate(model, val_dataset, strategy, to_problem, teacher, batch_size, seed + 2, device)
            record.update({"val_loss": metrics["loss"], "val_psnr": metrics["psnr"], "val_ssim": metrics["ssim"]})
        record["val_objective"] = None
        if val_objective is not None:
            model.eval()
            with torch.no_grad():
                record["val_objective"] = float(val_objective(model))
            if record["val_objective"] < lowest:
                lowest, best_epoch = record["val_objective"], epoch
                best_state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        if deq is not None:
            record.update({"f_tol": deq.solver_options["f_tol"], "f_max_iter": deq.solver_options["f_max_iter"]})
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if progress:
            val = (
                ""
                if record["val_psnr"] is None
                else f", val PSNR {record['val_psnr']:.2f} dB, SSIM {record['val_ssim']:.4f}"
            )
            if record["val_objective"] is not None:
                val += f", val objective {record['val_objective']:.5g}"
            print(f"{strategy.name} epoch {epoch + 1}/{epochs}: loss {record['train_loss']:.4g}{val}", flush=True)
        if out_dir is not None:
            meta = {"finetune": {"strategy": strategy.name, "epoch": epoch, "history": history, "solver": solver}}
            save_model(model, out_dir / "model_last", metadata=meta)
            if record["val_psnr"] is not None and record["val_psnr"] > best:
                best = record["val_psnr"]
                save_model(model, out_dir / "model_best", metadata=meta)
        if patience is not None and epoch - best_epoch >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"history": history, "model": model, "strategy": strategy.name, "solver": solver, "best_epoch": best_epoch}
