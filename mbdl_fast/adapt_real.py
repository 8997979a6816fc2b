"""``mbdl-fast adapt-real``: test-time adaptation of a DEQ to the shipped real scan, never seeing its reference.

The shipped DEQs were trained on one simulated template brain; on the real scan (``demo_real``) they meet
another contrast, 16 ESPIRiT coils and scanner noise. Adaptation fine-tunes a model on the undersampled
measurements of that very scan, the ones the demo reconstructs (same mask, same maps: ``undersampled_real_scan``),
never on the fully sampled k-space: test-time adaptation, run as zero-shot self-supervised learning does for one
scan (ZS-SSL, Yaman et al., ICLR 2022):

- the sampled non-ACS columns are split once (seeded): Γ, a fraction ``validation`` of them, is kept out of
  training; Ω \\ Γ is the training scan;
- every step, a self-supervised loss on the training scan: ``"split"`` (``SplitMeasurements``: reconstruct
  without a random 40% of its non-ACS columns and predict them, SSDU) or ``"rei"`` (``SelfSupervised``:
  measurement consistency + rotation equivariance, SPADE's third strategy), plus ``jac_reg`` times the DEQ's
  Jacobian penalty, so the adapted DEQ stays contractive and converges;
- after every step the validation error: reconstruct from Ω \\ Γ and predict Γ (``held_out_error``); the model
  with the lowest one is kept, and ``patience`` steps without a lower one end the run.

The DEQ solves at the demo's tolerance and cap (1e-4, 100) throughout, warm-started from its previous output
(``WarmStarts``); the result is checked as the demo runs it: from A^H y, on all measurements.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mbdl_fast.checkpoint import load_model, save_model
from mbdl_fast.demo import DEQ_MAX_ITER, DEQ_TOL
from mbdl_fast.demo_real import undersampled_real_scan
from mbdl_fast.finetune import SelfSupervised, SplitMeasurements, acs_band, finetune
from mbdl_fast.solvers.deq import DEQ

__all__ = ["ADAPT_STRATEGIES", "adapt_checkpoint", "adapt_to_real_scan", "validation_split"]

ADAPT_STRATEGIES = ("split", "rei")
ADAPT_STEPS, ADAPT_LR, ADAPT_JAC_REG, ADAPT_PATIENCE = 40, 1e-4, 0.02, 8
#: ZS-SSL's validation share of the sampled non-ACS columns.
VALIDATION_FRACTION = 0.2


def validation_split(mask: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(training mask, validation mask): ``fraction`` of the sampled non-ACS columns of ``mask`` (at least one),
    drawn with ``seed``, moved to the validation mask. ``mask``: a column mask ``(..., 1, W)``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"validation: expected a number in (0, 1), got {fraction!r}")
    candidates = ((mask > 0) & ~acs_band(mask)).reshape(-1).nonzero().squeeze(1)
    if candidates.numel() < 2:
        raise ValueError(f"mask: needs at least 2 sampled columns outside the ACS band, got {candidates.numel()}")
    order = torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(seed))
    count = max(1, round(fraction * candidates.numel()))
    held = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    held[candidates[order[:count].to(mask.device)]] = True
    held = held.reshape(mask.shape)
    return torch.where(held, torch.zeros_like(mask), mask), held.to(mask.dtype)


def adapt_to_real_scan(
    model: nn.Module,
    setting: str = "random4x",
    *,
    strategy: str = "split",
    steps: int = ADAPT_STEPS,
    lr: float = ADAPT_LR,
    jac_reg: float = ADAPT_JAC_REG,
    patience: int | None = ADAPT_PATIENCE,
    validation: float = VALIDATION_FRACTION,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Adapt ``model`` in place to the real scan's undersampled measurements of ``setting`` (module docstring).

    Args:
        model: a reconstruction model ``model(y, physics)`` on the device to adapt on, typically a shipped DEQ
            (``load_model``); DEQs are set to the demo's tolerance and cap and keep them.
        setting: the demo's undersampling, ``"random4x"`` or ``"uniform6x"``.
        strategy: ``"split"`` (held-out measurements, SSDU) or ``"rei"`` (SPADE's self-supervised strategy).
        steps, lr, jac_reg: Adam steps (one per step on the one scan, cosine schedule), learning rate, weight of
            the Jacobian penalty (DEQs).
        patience: stop after this many steps without a lower validation error (``None``: run all steps).
        validation: the fraction of sampled non-ACS columns held out for validation (``validation_split``).
        seed: the validation split, the random splits / rotations of the loss, the Jacobian penalty's probes.

    Returns:
        ``{"model", "history"`` (``finetune``'s, one record per step), ``"best_step"`` (the kept step, 0-based),
        ``"final"``: ``{"iterations", "converged", "validation_error"}`` of the kept model run from A^H y on all
        measurements, ``"options"``: the settings above}``.
    """
    if strategy not in ADAPT_STRATEGIES:
        raise ValueError(f"strategy: expected one of {ADAPT_STRATEGIES}, got {strategy!r}")
    device = next(model.parameters()).device
    y, physics = undersampled_real_scan(setting, device)
    train_mask, _ = validation_split(physics.mask, validation, seed)
    item = {"kspace": (train_mask * y)[0], "coil_maps": physics.coil_maps[0], "mask": train_mask[0]}
    loss = SplitMeasurements(warm_start=True) if strategy == "split" else SelfSupervised(warm_start=True)
    validator = SplitMeasurements(warm_start=True)

    def validation_error(model: nn.Module) -> float:
        return float(validator.held_out_error(model, physics, y, train_mask, slot="validation"))

    solver = (
        {"f_tol": DEQ_TOL, "f_max_iter": DEQ_MAX_ITER} if any(isinstance(m, DEQ) for m in model.modules()) else None
    )
    # the Jacobian penalty's Hutchinson probes come from the global generator: seeded here, the caller's kept
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        result = finetune(
            model, [item], loss, epochs=steps, lr=lr, batch_size=1, jac_reg=jac_reg, solver_options=solver,
            allow_different_tolerance=True, val_objective=validation_error, patience=patience, progress=progress,
            seed=seed,
        )  # fmt: skip
    model.eval()
    with torch.no_grad():
        model(y, physics)
        info = getattr(model, "last_info", {})
        final = {"validation_error": validation_error(model)}
    if "converged" in info:
        final.update(iterations=float(info["iterations_per_sample"].float().mean()),
                     converged=float(info["converged"].float().mean()))  # fmt: skip
    options = {"setting": setting, "strategy": strategy, "steps": steps, "lr": lr, "jac_reg": jac_reg,
               "patience": patience, "validation": validation, "seed": seed}  # fmt: skip
    return {"model": model, "history": result["history"], "best_step": result["best_epoch"], "final": final,
            "options": options}  # fmt: skip


def adapt_checkpoint(checkpoint: str | Path, out: str | Path, setting: str = "random4x", **options: Any) -> dict:
    """Load ``checkpoint`` (path without suffix), ``adapt_to_real_scan`` it, save it to ``out`` (without suffix).

    The saved metadata (``"adapted"``) records the source checkpoint and its SHA-256, the options, the history
    and the final check; ``options`` are ``adapt_to_real_scan``'s keyword arguments (``device`` too).
    """
    device = options.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(checkpoint, map_location=device)
    started = time.perf_counter()
    result = adapt_to_real_scan(model, setting, **options)
    source = json.loads(Path(f"{checkpoint}.json").read_text())
    metadata = {"adapted": {"source": str(checkpoint), "source_sha256": source.get("sha256"),
                            "note": "test-time adaptation: self-supervised on the shipped real scan's undersampled "
                                    "measurements (demo_real's mask and maps), never on its reference",
                            **result["options"], "best_step": result["best_step"], "final": result["final"],
                            "seconds": time.perf_counter() - started, "history": result["history"]}}  # fmt: skip
    save_model(model, out, metadata=metadata)
    return result
