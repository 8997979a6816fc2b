"""Pruning-ratio sweep of the shipped DEQ-MRI model for each fine-tuning strategy (issue 4's target).

    python bench/prune_sweep.py --epochs 2 --out bench/results/prune_sweep_cpu

For each ratio and strategy: prune (L1), fine-tune, and measure on the test split with every model
at the same DEQ tolerance and iteration cap, dense timed in the same call. Writes JSON, a Markdown
table and a PSNR-vs-time plot (PNG). ``--round-to 4`` gives a finer sweep on CPUs (the default 8
keeps tensor-core alignment on GPUs, and on a 32-channel prior leaves only widths 24 and 16).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch

from mbdl_fast.prune.pipeline import prune_and_report
from mbdl_fast.weights import weights_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    parser.add_argument("--strategies", default="supervised,school,self_supervised")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--round-to", dest="round_to", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", dest="max_iter", type=int, default=100)
    parser.add_argument("--model", default="deq_mri_4x")
    parser.add_argument("--out", default="bench/results/prune_sweep_cpu")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    rows = []
    started = time.perf_counter()
    for ratio in (float(r) for r in args.ratios.split(",")):
        for strategy in args.strategies.split(","):
            result = prune_and_report(weights_path(args.model), ratio, finetune=strategy, epochs=args.epochs,
                                      lr=args.lr, round_to=args.round_to, tol=args.tol, max_iter=args.max_iter,
                                      progress=False)  # fmt: skip
            dense, one_shot, tuned = result["rows"][1], result["rows"][2], result["rows"][3]
            rows.append({"strategy": strategy, "ratio": ratio, "dense": dense, "one_shot": one_shot, "tuned": tuned})
            print(f"{strategy:>16} ratio {ratio:.1f}: params {tuned['params']}, PSNR {tuned['psnr']:.2f} dB "
                  f"(dense {dense['psnr']:.2f}, one-shot {one_shot['psnr']:.2f}), {tuned['seconds_per_image'] * 1e3:.0f} ms "
                  f"vs dense {dense['seconds_per_image'] * 1e3:.0f} ms: {tuned['speedup_vs_dense']:.2f}x", flush=True)  # fmt: skip
            _write(out, rows, args, started)
    print(_write(out, rows, args, started))


def _write(out: Path, rows: list, args, started: float) -> str:
    """JSON, Markdown table and plot of the rows so far; returns the table."""
    header = {
        "model": args.model,
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "epochs": args.epochs,
        "lr": args.lr,
        "round_to": args.round_to,
        "solver": {"f_tol": args.tol, "f_max_iter": args.max_iter},
        "seconds": time.perf_counter() - started,
    }
    (out.with_suffix(".json")).write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    lines = [
        f"Shipped `{args.model}`, {header['device']}, torch {header['torch']}; every row timed at DEQ tol "
        f"{args.tol:g}, cap {args.max_iter}, dense re-timed in the same call; fine-tuning {args.epochs} epochs, "
        f"lr {args.lr:g}; channels rounded to multiples of {args.round_to}.",
        "",
        "| strategy | ratio | params | GMACs/prior call | PSNR dense | PSNR one-shot | PSNR fine-tuned | ΔPSNR | "
        "iters dense | iters pruned | ms/img dense | ms/img pruned | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, o, t = r["dense"], r["one_shot"], r["tuned"]
        lines.append(
            f"| {r['strategy']} | {r['ratio']:.1f} | {t['params']} | {t['macs_per_prior_call'] / 1e9:.3f} | {d['psnr']:.2f} | "
            f"{o['psnr']:.2f} | {t['psnr']:.2f} | {t['psnr'] - d['psnr']:+.2f} | {d['iterations']:.1f} | "
            f"{t['iterations']:.1f} | {d['seconds_per_image'] * 1e3:.0f} | {t['seconds_per_image'] * 1e3:.0f} | "
            f"{t['speedup_vs_dense']:.2f}x |"
        )
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    _plot(rows, out.with_suffix(".png"), header)
    return "\n".join(lines)


def _plot(rows, path: Path, header) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        sel = [r for r in rows if r["strategy"] == strategy]
        ax.plot([r["tuned"]["seconds_per_image"] * 1e3 for r in sel], [r["tuned"]["psnr"] for r in sel], "o-",
                label=strategy)  # fmt: skip
        for r in sel:
            ax.annotate(f"{r['ratio']:.1f}", (r["tuned"]["seconds_per_image"] * 1e3, r["tuned"]["psnr"]), fontsize=7)
    dense = rows[0]["dense"]
    ax.plot([dense["seconds_per_image"] * 1e3], [dense["psnr"]], "k*", markersize=12, label="dense")
    ax.set_xlabel("time per image (ms), same DEQ tolerance")
    ax.set_ylabel("PSNR (dB), test slices")
    ax.set_title(f"{header['model']}: pruning ratio sweep ({header['device']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
