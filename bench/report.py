"""Turn a pytest-benchmark JSON into a Markdown table: median time per variant and ratios in one run.

    python bench/report.py bench/results/dc_step_cpu.json > bench/results/dc_step_cpu.md

Ratios are against ``fastmri_eager`` and ``torch`` of the same size in the same file, never across runs. Where the
rows carry ``floor_gbps`` (the bytes a step must move at least / its median), the table gives it and its share of the
``copy`` row of the same size: the bandwidth the device reached in a plain copy.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def report(path: str) -> str:
    data = json.load(open(path))
    info = data["machine_info"]
    rows: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        rows[extra["size"]][extra["variant"]] = {
            "median": bench["stats"]["median"],
            "err": extra.get("rel_err"),
            "gbps": extra.get("floor_gbps"),
        }
    lines = [
        f"Device: {info.get('device')} | torch {info.get('torch')} | triton {info.get('triton')} | "
        f"CUDA {info.get('cuda')} | {data.get('datetime', '')}",
        "",
        "| size (B x C x H x W) | variant | median ms | vs fastmri_eager | vs torch | GB/s at the floor | % of copy "
        "| rel. err |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size, variants in rows.items():
        base_fm = variants.get("fastmri_eager", {}).get("median")
        base_t = variants.get("torch", {}).get("median")
        copy = variants.get("copy", {}).get("gbps")
        for name, r in sorted(variants.items(), key=lambda kv: -kv[1]["median"]):
            fm = f"{base_fm / r['median']:.2f}x" if base_fm else "-"
            t = f"{base_t / r['median']:.2f}x" if base_t else "-"
            gbps = f"{r['gbps']:.0f}" if r["gbps"] else "-"
            share = f"{r['gbps'] / copy:.0%}" if r["gbps"] and copy else "-"
            err = f"{r['err']:.1e}" if r["err"] is not None else "-"
            lines.append(f"| {size} | {name} | {r['median'] * 1e3:.3f} | {fm} | {t} | {gbps} | {share} | {err} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1]))
