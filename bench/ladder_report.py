"""The ladder and conv benchmark report: Markdown table, JSON summary and PNG bar chart from one pytest-benchmark run.

    python bench/ladder_report.py report bench/results/ladder_cpu.json --out bench/results/ladder_cpu
    python bench/ladder_report.py run --out bench/results/gpu [--suite ladder|conv|all]   # pytest, then report

``run`` is what ``mbdl-fast bench`` calls: it runs ``pytest bench/test_bench_ladder.py
bench/test_bench_conv.py --benchmark-json=OUT/bench.json`` and writes OUT/report.md,
OUT/report.json and OUT/report.png. Ratios compare rows of the same file only (one run, one
device): each ladder rung against that ladder's dense eager row and against the rung before it;
each conv variant against ``torch_channels_last`` (cuDNN / oneDNN in NHWC) of the same layer and dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SUITES = {"ladder": ["test_bench_ladder.py"], "conv": ["test_bench_conv.py"],
          "all": ["test_bench_ladder.py", "test_bench_conv.py"]}  # fmt: skip
RUNGS = ["dense eager", "+ pruned", "+ fused DC", "+ fast layers", "+ graphs"]


def _median(bench: dict) -> float:
    return bench["stats"]["median"]


def _notes(path: str | None) -> list[dict]:
    if not path or not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarise(data: dict, notes: list[dict] | None = None) -> dict:
    """The report's rows: ladder rows with ratios, conv rows with ratios, skipped rungs with reasons."""
    info = data.get("machine_info", {})
    ladders: dict[str, list[dict]] = defaultdict(list)
    convs: list[dict] = []
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        if extra.get("suite") == "ladder":
            ladders[extra["ladder"]].append({**extra, "seconds": _median(bench)})
        elif extra.get("suite") == "conv":
            convs.append({**extra, "seconds": _median(bench) / extra.get("inner", 1)})
    for rows in ladders.values():
        rows.sort(key=lambda r: r["rung_index"])
        base = next((r for r in rows if r["rung"] == "dense eager"), None)
        previous = None
        for r in rows:
            r["ms_per_iteration"] = r["seconds"] * 1e3 / max(r["evaluations"], 1)
            r["speedup_vs_dense"] = base["seconds"] / r["seconds"] if base else None
            r["psnr_change_db"] = r["psnr"] - base["psnr"] if base else None
            r["speedup_vs_previous"] = previous["seconds"] / r["seconds"] if previous else None
            previous = r
    baseline = {(r["layer"], r["dtype"]): r["seconds"] for r in convs if r["variant"] == "torch_channels_last"}
    for r in convs:
        base = baseline.get((r["layer"], r["dtype"]))
        r["speedup_vs_channels_last_torch"] = base / r["seconds"] if base else None
        r["tflops"] = r["flops"] / r["seconds"] / 1e12
    skipped = [n for n in (notes or []) if n.get("suite") == "ladder"]
    sizes = sorted({r["size"] for rows in ladders.values() for r in rows})
    header = {
        "device": info.get("device"),
        "torch": info.get("torch"),
        "triton": info.get("triton"),
        "cuda": info.get("cuda"),
        "datetime": data.get("datetime"),
        "ladder_sizes (B x coils x H x W)": sizes,
    }
    return {"header": header, "ladders": dict(ladders), "conv": convs, "skipped": skipped}


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    h = summary["header"]
    lines = [
        f"Device: {h['device'] or 'nothing ran'} | torch {h['torch']} | triton {h['triton']} | CUDA {h['cuda']} | {h['datetime']}",
        f"Ladder sizes (B x coils x H x W): {', '.join(h['ladder_sizes (B x coils x H x W)']) or '-'}",
        "",
    ]
    for kind, rows in summary["ladders"].items():
        first = rows[0]
        stop = (f"tolerance {first['tol']:g}, cap {first['max_iter']} iterations (Anderson) for every row"
                if kind == "DEQ" else f"K = {first['du_iters']} unrolled iterations for every row")  # fmt: skip
        lines += [
            f"### {kind} ladder ({stop})",
            "",
            "| rung | model | DC | median ms | iters (run) | converged | ms / iter | PSNR dB | Δ dB | vs dense eager | "
            "vs previous |",
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            iters = f"{r['iterations']:.1f} ({r['evaluations']})"
            lines.append(
                f"| {r['rung']} | {r['model']} | {r['dc_backend']} | {r['seconds'] * 1e3:.1f} | {iters} | "
                f"{ {True: 'all', False: 'NO', None: '-'}[r.get('converged')] } | "
                f"{r['ms_per_iteration']:.1f} | {r['psnr']:.2f} | {_fmt(r['psnr_change_db'], '+.2f')} | "
                f"{_fmt(r['speedup_vs_dense'], '.2f')}x | {_fmt(r['speedup_vs_previous'], '.2f')}x |"
            )
        for r in rows:
            for step, detail in r.get("steps", {}).items():
                if not detail.startswith("applied"):
                    lines.append(f"- {r['rung']}: {step} {detail}")
        missing = [n for n in summary["skipped"] if n["ladder"] in (kind, "all")]
        lines += [f"- {n['rung']}: skipped, {n['skipped']}" for n in missing]
        lines.append("")
    rest = [n for n in summary["skipped"] if n["ladder"] not in summary["ladders"]]
    if rest:
        lines += ["### Skipped", ""] + [f"- {n['ladder']} {n['rung']}: {n['skipped']}" for n in rest] + [""]
    if summary["conv"]:
        lines += [
            "### Pruned-prior convolutions (median per call; ratio against torch in channels_last, same layer and dtype)",
            "",
            "| layer | size | dtype | variant | median ms | TFLOP/s | vs torch channels_last | auto chose | rel. err |",
            "|---|---|---|---|---:|---:|---:|---|---:|",
        ]
        for r in sorted(summary["conv"], key=lambda r: (r["dtype"], r["layer"], r["variant"])):
            lines.append(
                f"| {r['layer']} | {r['size']} | {r['dtype']} | {r['variant']} | {r['seconds'] * 1e3:.3f} | "
                f"{r['tflops']:.2f} | {_fmt(r['speedup_vs_channels_last_torch'], '.2f')}x | "
                f"{r.get('auto_choice') or '-'} | {r['rel_err']:.1e} |"
            )
    return "\n".join(lines)


def bar_chart(summary: dict, path: Path) -> Path | None:
    """Speed-up against dense eager per rung and ladder, PSNR written on each bar."""
    if not summary["ladders"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(summary["ladders"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        rows = summary["ladders"][kind]
        names = [r["rung"] for r in rows]
        values = [r["speedup_vs_dense"] or 0.0 for r in rows]
        bars = ax.bar(names, values, color=["#888888"] + ["#2a7ab9"] * (len(rows) - 1))
        for bar, r in zip(bars, rows, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r['psnr']:.2f} dB",
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_title(f"{kind}, {rows[0]['size']}", fontsize=10)
        ax.set_ylabel("speed-up vs dense eager (x)")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    h = summary["header"]
    fig.suptitle(f"{h['device']} | torch {h['torch']} | triton {h['triton']} | CUDA {h['cuda']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(json_path: str | Path | None, out: str | Path, notes: str | None = None) -> dict:
    """Write OUT.md, OUT.json and OUT.png (``out`` without suffix) from a pytest-benchmark JSON; return the summary.

    Without a JSON (nothing ran) the report still lists what was skipped and why.
    """
    data = json.loads(Path(json_path).read_text()) if json_path else {}
    summary = summarise(data, _notes(notes))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(summary) + "\n")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str))
    bar_chart(summary, out.with_suffix(".png"))
    return summary


def run(out: str | Path, suite: str = "all", pytest_args: list[str] | None = None) -> int:
    """pytest on the bench files of ``suite`` with --benchmark-json=OUT/bench.json, then the report in OUT/."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = out / "skipped.jsonl"
    notes.unlink(missing_ok=True)
    files = [str(BENCH_DIR / f) for f in SUITES[suite]]
    # The pytest script, not `python -m pytest`: -m would put the source tree first on sys.path, and the
    # installed package (mbdl_fast.kernels lives in kernels/ in the source) must be the one imported.
    script = Path(sys.executable).with_name("pytest")
    pytest = [str(script)] if script.is_file() else [sys.executable, "-m", "pytest"]
    cmd = [*pytest, *files, "-q", "-rs", "-p", "no:cacheprovider", f"--benchmark-json={out / 'bench.json'}",
           *(pytest_args or [])]  # fmt: skip
    env = {**os.environ, "MBDL_FAST_BENCH_NOTES": str(notes)}
    print("$", " ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=BENCH_DIR.parent, env=env)
    ran = (out / "bench.json").is_file()
    if not ran:
        print(f"no benchmark ran (pytest exit code {code}); the report lists the reasons", file=sys.stderr)
    write_report(out / "bench.json" if ran else None, out / "report", str(notes))
    print((out / "report.md").read_text())
    written = [
        str(out / f"report{suffix}") for suffix in (".md", ".json", ".png") if (out / f"report{suffix}").is_file()
    ]
    print(f"wrote {', '.join(written)}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="Markdown + JSON + PNG from a pytest-benchmark JSON")
    rep.add_argument("json")
    rep.add_argument("--out", help="output path without suffix (default: beside the JSON)")
    rep.add_argument("--notes", help="skip reasons (JSON lines) written by the ladder bench")
    r = sub.add_parser("run", help="run the benches with pytest, then the report")
    r.add_argument("--out", required=True)
    r.add_argument("--suite", choices=list(SUITES), default="all")
    args, extra = parser.parse_known_args(argv)
    if args.command == "report":
        out = args.out or str(Path(args.json).with_suffix(""))
        write_report(args.json, out, args.notes)
        print(Path(out).with_suffix(".md").read_text())
        return 0
    return run(args.out, args.suite, extra)


if __name__ == "__main__":
    sys.exit(main())
