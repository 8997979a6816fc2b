"""Pruning-ratio sweep of a shipped MRI model (DEQ or deep unfolding) for each fine-tuning strategy (issue 4's target).

    python bench/prune_sweep.py --epochs 10 --lr 1e-3 --out bench/results/prune_sweep_cpu          # both phases
    python bench/prune_sweep.py --phase time --out bench/results/prune_sweep_cpu                   # re-time only
    python bench/prune_sweep.py --model e2e_varnet_mri_4x --ratios 0.5 --round-to 16 \
        --out bench/results/prune_e2e_varnet_cpu                                                   # SPADE's DU case

Phase ``train``: prune the dense model (L1) once per ratio, fine-tune a copy per strategy, and
measure PSNR / SSIM / NMSE and DEQ iterations on the test split, every model at the same DEQ
tolerance and iteration cap; each fine-tuned model is saved under ``--models`` and the JSON is
rewritten after every row, so an interrupted sweep resumes where it stopped. Phase ``time``: the
dense model and every saved pruned model are timed round-robin in one run (``--repeats`` passes
over the test split, median), so the speed-ups come from one measurement of all models together
and background load during the long training phase cannot bias them. Writes JSON, a Markdown table
and a PSNR-vs-time plot (PNG). ``--round-to 4`` gives a finer sweep (the default of ``prune_channels``,
8, keeps tensor-core alignment on GPUs but on a 32-channel prior leaves only widths 24 and 16; ``--round-to 16``
keeps oneDNN's 16-channel blocks whole on a CPU). A deep-unfolding model (VarNet, E2E-VarNet with its sensitivity
network, DeepUnfolding) runs its K iterations for every model, pruned or not; its rows have no iteration count or
convergence.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

import torch

from mbdl_fast.checkpoint import load_model, save_model
from mbdl_fast.evaluate import machine, solver_setting
from mbdl_fast.prune.channels import prune_channels
from mbdl_fast.prune.pipeline import finetune_pruned, load_problem, measure, time_models
from mbdl_fast.weights import SHIPPED, weights_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=("all", "train", "time"), default="all")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--strategies", default="supervised,school,self_supervised")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--round-to", dest="round_to", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", dest="max_iter", type=int, default=100)
    parser.add_argument("--jac-reg", dest="jac_reg", type=float, default=0.0, help="DEQ Jacobian regulariser weight")
    parser.add_argument("--time-images", dest="time_images", type=int, default=None,
                        help="time on the first N test images only (quality always on all)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="timing passes over the test split (median)")
    parser.add_argument("--strategy-budget", dest="strategy_budget", default="{}",
                        help='JSON per strategy overriding epochs / lr, e.g. \'{"self_supervised": {"epochs": 20}}\'')  # fmt: skip
    parser.add_argument("--model", default="deq_mri_4x", help="a shipped model's name or a checkpoint path")
    parser.add_argument("--models", default="runs/prune_sweep", help="where the fine-tuned models are saved")
    parser.add_argument("--out", default="bench/results/prune_sweep_cpu")
    args = parser.parse_args()
    out, models_dir = Path(args.out), Path(args.models)
    out.parent.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    checkpoint = weights_path(args.model) if args.model in SHIPPED else Path(args.model)
    problem = load_problem(checkpoint, args.tol, args.max_iter)
    report = _load_report(out, args)
    report["header"]["test_images"] = sum(y.shape[0] for _, y, _ in problem.batches)
    report["header"]["dense_widths"] = sorted(set(_widths(problem.dense)))
    report["header"]["unrolled"] = _unrolled_iterations(problem.dense)
    if args.phase in ("all", "train"):
        _train_phase(problem, report, args, out, models_dir)
    if args.phase in ("all", "time"):
        _time_phase(problem, report, args, out, models_dir)
    print(_write(out, report))


def _settings(args) -> dict:
    return {"model": args.model, "epochs": args.epochs, "lr": args.lr, "round_to": args.round_to,
            "budget": json.loads(args.strategy_budget), "jac_reg": args.jac_reg,
            "solver": {"f_tol": args.tol, "f_max_iter": args.max_iter}}  # fmt: skip


def _budget(args, strategy: str) -> tuple[int, float]:
    """(epochs, lr) of ``strategy``: the sweep's, unless --strategy-budget gives it its own."""
    own = json.loads(args.strategy_budget).get(strategy, {})
    return int(own.get("epochs", args.epochs)), float(own.get("lr", args.lr))


def _load_report(out: Path, args) -> dict:
    """The JSON so far when it was made with the same settings (a resumed sweep), else a fresh one."""
    path = out.with_suffix(".json")
    if path.is_file():
        report = json.loads(path.read_text())
        if report.get("header", {}).get("settings") == _settings(args):
            return report
    return {"header": {"settings": _settings(args), "train_seconds": 0.0}, "dense": None, "rows": []}


def _model_dir(models_dir: Path, ratio: float, strategy: str) -> Path:
    return models_dir / f"r{ratio:.2f}_{strategy}"


def _train_phase(problem, report: dict, args, out: Path, models_dir: Path) -> None:
    started = time.perf_counter() - report["header"]["train_seconds"]
    if report["dense"] is None:
        report["dense"] = measure(problem, problem.dense)
    dense_rows = report["dense"]["per_image"]
    done = {(r["ratio"], r["strategy"]) for r in report["rows"]}
    physics0, y0, _ = problem.batches[0]
    for ratio in (float(r) for r in args.ratios.split(",")):
        strategies = [s for s in args.strategies.split(",") if (ratio, s) not in done]
        if not strategies:
            continue
        pruned = prune_channels(problem.dense, ratio, round_to=args.round_to, check_inputs=(y0, physics0))
        one_shot = measure(problem, pruned, dense_rows)
        for strategy in strategies:
            tuned = copy.deepcopy(pruned)
            epochs, lr = _budget(args, strategy)
            history = finetune_pruned(problem, tuned, strategy, epochs, lr, progress=False, jac_reg=args.jac_reg)
            row = {"strategy": strategy, "ratio": ratio, "widths": _widths(tuned), "epochs": epochs, "lr": lr,
                   "one_shot": one_shot, "tuned": measure(problem, tuned, dense_rows), "history": history}  # fmt: skip
            save_model(tuned, _model_dir(models_dir, ratio, strategy),
                       metadata={"config": problem.meta["config"], "pruning": {"ratio": ratio, "strategy": strategy}})  # fmt: skip
            report["rows"].append(row)
            report["header"]["train_seconds"] = time.perf_counter() - started
            t, d = row["tuned"], report["dense"]
            print(f"{strategy:>16} ratio {ratio:g}: params {t['params']}, PSNR {t['psnr']:.2f} dB (dense "
                  f"{d['psnr']:.2f}, one-shot {one_shot['psnr']:.2f}), dPSNR {t['dpsnr']['mean']:+.2f} "
                  f"[{t['dpsnr']['ci_low']:+.2f}, {t['dpsnr']['ci_high']:+.2f}], iterations {_iterations(t)} vs "
                  f"{_iterations(d)}, converged {_converged(t)}", flush=True)  # fmt: skip
            _write(out, report)


def _unrolled_iterations(model: torch.nn.Module) -> int | None:
    """K of a deep-unfolding model (VarNet cascades, DeepUnfolding iterations); None for a DEQ."""
    if solver_setting(model):
        return None
    return getattr(model, "num_cascades", None) or getattr(model, "num_iters", None)


def _solver_text(report: dict) -> str:
    """What every model of the report runs: the DEQ's tolerance and cap, or the unrolled K."""
    k = report["header"].get("unrolled")
    if k:
        return f"K = {k} unrolled iterations"
    s = report["header"]["settings"]["solver"]
    return f"DEQ tol {s['f_tol']:g}, cap {s['f_max_iter']}"


def _widths(model: torch.nn.Module) -> list[int]:
    from mbdl_fast.solvers import find_priors

    return [w for _, prior in find_priors(model) for w in getattr(prior, "widths", [])]


def _time_phase(problem, report: dict, args, out: Path, models_dir: Path) -> None:
    models = {"dense": problem.dense}
    for row in report["rows"]:
        key = f"r{row['ratio']:.2f}_{row['strategy']}"
        models[key] = load_model(_model_dir(models_dir, row["ratio"], row["strategy"]), map_location=problem.device)
    started = time.perf_counter()
    batch = problem.batches[0][2].shape[0]
    num_batches = None if args.time_images is None else max(1, args.time_images // batch)
    seconds = time_models(problem, models, repeats=args.repeats, num_batches=num_batches)
    report["timing"] = {
        **machine(),
        "repeats": args.repeats,
        "test_images": sum(y.shape[0] for _, y, _ in problem.batches[:num_batches]),
        "seconds": time.perf_counter() - started,
        "seconds_per_image": seconds,
    }
    _write(out, report)


def _write(out: Path, report: dict) -> str:
    """JSON, Markdown table and (once timed) plot of the rows so far; returns the table."""
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    s, d, timing = report["header"]["settings"], report["dense"], report.get("timing")
    secs = {k: v["median"] for k, v in timing["seconds_per_image"].items()} if timing else {}
    head = (f"Model `{s['model']}`: L1 channel pruning (widths rounded to multiples of {s['round_to']}), "
            f"fine-tuning {s['epochs']} epochs at lr {s['lr']:g} (per-strategy budgets: {s.get('budget') or 'none'}) "
            f"with the model's training tolerance; every model measured at {_solver_text(report)}, on the "
            f"{report['header']['test_images']} test images; dPSNR is the mean paired difference against dense with "
            "its 95 % confidence interval.")  # fmt: skip
    if timing:
        head += (f" Times: {timing['device']}, {timing['threads']} threads, torch {timing['torch']}, all models "
                 f"timed round-robin in one run, median of {timing['repeats']} passes over {timing['test_images']} "
                 "images.")  # fmt: skip
    lines = [
        head,
        "",
        "| strategy | epochs, lr | ratio | widths | params | GMACs/prior call | PSNR one-shot | PSNR fine-tuned | "
        "dPSNR vs dense [95% CI] | SSIM | dSSIM | iterations | converged | ms/image | speed-up vs dense |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if d:
        dense_ms = secs.get("dense")
        widths = "/".join(map(str, report["header"]["dense_widths"]))
        lines.append(f"| dense | - | 0 | {widths} | {d['params']} | {d['macs_per_prior_call'] / 1e9:.3f} | - | "
                     f"{d['psnr']:.2f} | - | {d['ssim']:.4f} | - | {_iterations(d)} | {_converged(d)} | "
                     f"{_ms(dense_ms)} | 1.00x |")  # fmt: skip
    for r in sorted(report["rows"], key=lambda r: (r["strategy"], r["ratio"])):
        o, t = r["one_shot"], r["tuned"]
        key = f"r{r['ratio']:.2f}_{r['strategy']}"
        speed = f"{secs['dense'] / secs[key]:.2f}x" if key in secs else "-"
        widths = sorted(set(r["widths"]))
        dp, ds = t["dpsnr"], t["dssim"]
        lines.append(
            f"| {r['strategy']} | {r['epochs']}, {r['lr']:g} | {r['ratio']:g} | {'/'.join(map(str, widths))} | "
            f"{t['params']} | {t['macs_per_prior_call'] / 1e9:.3f} | {o['psnr']:.2f} | {t['psnr']:.2f} | "
            f"{dp['mean']:+.2f} [{dp['ci_low']:+.2f}, {dp['ci_high']:+.2f}] | {t['ssim']:.4f} | {ds['mean']:+.4f} | "
            f"{_iterations(t)} | {_converged(t)} | {_ms(secs.get(key))} | {speed} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if timing:
        _plot(report, out.with_suffix(".png"))
    return "\n".join(lines)


def _iterations(row: dict) -> str:
    return f"{row['iterations']:.1f}" if row.get("iterations") is not None else "-"


def _converged(row: dict) -> str:
    return f"{row['converged']:.0%}" if row.get("converged") is not None else "-"


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1e3:.0f}" if seconds is not None else "-"


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = {k: v["median"] for k, v in report["timing"]["seconds_per_image"].items()}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for strategy in dict.fromkeys(r["strategy"] for r in report["rows"]):
        sel = sorted((r for r in report["rows"] if r["strategy"] == strategy), key=lambda r: r["ratio"])
        xs = [secs[f"r{r['ratio']:.2f}_{strategy}"] * 1e3 for r in sel]
        ys = [r["tuned"]["psnr"] for r in sel]
        ax.plot(xs, ys, "o-", label=strategy)
        for r, x, y in zip(sel, xs, ys, strict=True):
            ax.annotate(f"{r['ratio']:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    d = report["dense"]
    ax.plot([secs["dense"] * 1e3], [d["psnr"]], "k*", markersize=12, label="dense")
    ax.axhline(d["psnr"] - 0.1, color="gray", lw=0.8, ls="--", label="dense − 0.1 dB")
    s = report["header"]["settings"]
    ax.set_xlabel(f"time per image (ms), {_solver_text(report)}")
    ax.set_ylabel("PSNR (dB), test slices")
    ax.set_title(f"{s['model']}: pruning ratio sweep, {s['epochs']} fine-tuning epochs "
                 f"({report['timing']['device']})", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
