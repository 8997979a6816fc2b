"""The summary ``bench/gpu_check.sh`` prints last, and the stand-ins its ``--dry-run`` puts in place of pytest.

    python bench/gpu_check.py summary RESULTS_DIR       # Markdown: versions, stages, the issue's targets, GPU settings
    python bench/gpu_check.py standin PYTEST_ARGS...    # dry run: write what pytest would (made-up rows), say "passed"

RESULTS_DIR is what the script collects (``bench/results/gpu/`` once committed): ``stages.tsv`` (one row per stage
run), ``versions.txt`` and ``gpu_settings.txt`` ("field: value" lines; "# before" and "# after" sections), the
DC-step benchmark JSON and the ladder report. Imports no torch: it runs where nothing else does.

Targets (issue 15): at 8 x 15 x 320 x 320 the CUDA Level-2 DC step >= 5x the fastMRI-style eager step and >= 50 % of
the measured copy bandwidth (bytes at the floor / median time, against the copy's); the full DEQ and DU ladders (the
last rung, ``+ graphs``) >= 3x the dense eager model at the same tolerance or K, losing <= 0.1 dB, DEQ converged.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

TARGET_SIZE = "8x15x320x320"
LEVEL2_VS_EAGER = 5.0
LEVEL2_OF_COPY = 0.5
LADDER_SPEEDUP = 3.0
LADDER_MAX_LOSS_DB = 0.1
FULL_RUNG = "+ graphs"
DRY_DEVICE = "dry run: stand-in numbers, no GPU"


def read_fields(path: Path) -> dict[str, str]:
    """The first value of each "field: value" line of ``path`` (empty where the file is missing)."""
    fields: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition(": ")
            if sep and not key.startswith("#"):
                fields.setdefault(key.strip(), value.strip())
    return fields


def read_settings(path: Path) -> dict[str, dict[str, str]]:
    """``gpu_settings.txt`` as {"before": {field: value}, "after": {...}} (a section is absent until written)."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith("# "):
                current = sections.setdefault(line[2:].strip(), {})
            elif current is not None and ": " in line:
                key, _, value = line.partition(": ")
                current[key] = value
    return sections


def settings_line(path: Path) -> str:
    sections = read_settings(path)
    before, after = sections.get("before"), sections.get("after")
    if before is None:
        return "GPU settings: not read"
    if after is None:
        return "GPU settings: read before the first stage; not yet after the last"
    unreadable = [f"{k}: {v}" for k, v in {**before, **after}.items() if v.startswith("unreadable")]
    if unreadable:
        return "GPU settings could not be read: " + "; ".join(unreadable[:1])
    changed = [f"{k}: {before.get(k)} -> {after.get(k)}" for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k)]  # fmt: skip
    if changed:
        return "GPU settings CHANGED during the run: " + "; ".join(changed)
    return f"GPU settings unchanged ({', '.join(before)}: read before and after)"


def read_stages(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _benchmarks(path: Path) -> dict[tuple[str, str], dict]:
    """(size, variant) -> {"median": seconds, "gbps": GB/s at the floor or None} from a pytest-benchmark JSON."""
    data = json.loads(path.read_text())
    rows = {}
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        rows[(extra.get("size"), extra.get("variant"))] = {
            "median": bench["stats"]["median"],
            "gbps": extra.get("floor_gbps"),
        }
    return rows


def dc_step_targets(results: Path) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, met) for the Level-2 DC step rows at TARGET_SIZE."""
    path = results / "dc_step_gpu.json"
    label = f"DC step {TARGET_SIZE}"
    if not path.is_file():
        return [(label, "not run", f">= {LEVEL2_VS_EAGER:g}x eager, >= {LEVEL2_OF_COPY:.0%} of copy", "-")]
    rows = _benchmarks(path)
    eager = rows.get((TARGET_SIZE, "fastmri_eager"))
    copy = rows.get((TARGET_SIZE, "copy"))
    out = []
    for variant in ("cuda_l2", "cuda_l2_ahy"):
        row = rows.get((TARGET_SIZE, variant))
        if row is None:
            out.append((f"{label}, {variant}", "no row", f">= {LEVEL2_VS_EAGER:g}x eager", "no"))
            continue
        if eager:
            ratio = eager["median"] / row["median"]
            out.append((f"{label}, {variant} vs fastmri_eager", f"{ratio:.2f}x ({row['median'] * 1e3:.3f} ms)",
                        f">= {LEVEL2_VS_EAGER:g}x", "yes" if ratio >= LEVEL2_VS_EAGER else "no"))  # fmt: skip
        else:
            out.append((f"{label}, {variant} vs fastmri_eager", "no eager row", f">= {LEVEL2_VS_EAGER:g}x", "-"))
        if copy and copy["gbps"] and row["gbps"]:
            share = row["gbps"] / copy["gbps"]
            measured = f"{share:.0%} ({row['gbps']:.0f} of {copy['gbps']:.0f} GB/s)"
            out.append((f"{label}, {variant} GB/s at the floor vs copy", measured, f">= {LEVEL2_OF_COPY:.0%}",
                        "yes" if share >= LEVEL2_OF_COPY else "no"))  # fmt: skip
        else:
            out.append((f"{label}, {variant} GB/s vs copy", "no copy row", f">= {LEVEL2_OF_COPY:.0%}", "-"))
    return out


def ladder_targets(results: Path) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, met) for the last rung of each ladder against its dense eager row."""
    path = results / "ladder" / "report.json"
    goal = f">= {LADDER_SPEEDUP:g}x, >= -{LADDER_MAX_LOSS_DB:g} dB"
    if not path.is_file():
        return [("DEQ / DU ladder", "not run", goal, "-")]
    ladders = json.loads(path.read_text()).get("ladders", {})
    if not ladders:
        return [("DEQ / DU ladder", "no rung ran", goal, "no")]
    out = []
    for kind, rows in ladders.items():
        last = max(rows, key=lambda r: r["rung_index"])
        speed, delta = last.get("speedup_vs_dense"), last.get("psnr_change_db")
        if speed is None or delta is None:
            out.append((f"{kind} ladder, {last['rung']}", "no dense eager row", goal, "no"))
            continue
        converged = last.get("converged")
        measured = f"{speed:.2f}x, {delta:+.2f} dB"
        if converged is not None:
            measured += ", converged" if converged else ", NOT converged"
        if last["rung"] != FULL_RUNG:
            measured += f" (last rung run; {FULL_RUNG} missing)"
        met = (last["rung"] == FULL_RUNG and speed >= LADDER_SPEEDUP and delta >= -LADDER_MAX_LOSS_DB
               and converged is not False)  # fmt: skip
        out.append((f"{kind} ladder, {last['rung']} vs dense eager", measured, goal, "yes" if met else "no"))
    return out


def summary(results: Path) -> str:
    """The Markdown summary of a (possibly partial) run."""
    versions = read_fields(results / "versions.txt")
    dry = "dry run" in read_fields(results / "gpu_settings.txt")
    stages = read_stages(results / "stages.tsv")
    lines = [
        f"## GPU check: {versions.get('device') or 'device not read'} | torch {versions.get('torch') or '-'} | "
        f"triton {versions.get('triton') or '-'} | {versions.get('date', '')}",
        "",
    ]
    if dry:
        lines += [f"**DRY RUN** ({DRY_DEVICE}; times scaled by 1/60): it checks the script, not the kernels.", ""]
    lines += ["| stage | result | seconds | cap s | note |", "|---|---|---:|---:|---|"]
    lines += [f"| {s['stage']} | {s['result']} | {s['seconds']} | {s['cap']} | {s['note']} |" for s in stages]
    not_ok = [f"{s['stage']} ({s['result']})" for s in stages if s["result"] != "ok"]
    lines += [
        "",
        f"All {len(stages)} stages passed." if not not_ok else f"Not passed: {', '.join(not_ok)}.",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t} | {m} | {g} | {ok} |" for t, m, g, ok in dc_step_targets(results) + ladder_targets(results)]
    lines += ["", settings_line(results / "gpu_settings.txt")]
    return "\n".join(lines) + "\n"


# --- Dry-run stand-ins: rows shaped as the bench files write them (extra_info), with made-up times.


def _dc_step_rows() -> list[dict]:
    floor = {TARGET_SIZE: 210_000_000, "1x1x256x256": 1_600_000}
    ms = {TARGET_SIZE: {"fastmri_eager": 1.20, "torch": 0.90, "torch_compile": 0.60, "triton": 0.16, "cuda_l1": 0.20,
                        "cuda_l2": 0.12, "cuda_l2_ahy": 0.07, "copy": 0.05},
          "1x1x256x256": {"fastmri_eager": 0.060, "torch": 0.050, "cuda_l2": 0.010, "copy": 0.004}}  # fmt: skip
    return [{"size": size, "variant": variant, "median": t / 1e3, "floor_bytes": floor[size],
             "floor_gbps": floor[size] / (t / 1e3) / 1e9, "rel_err": None if variant == "copy" else 2e-7}
            for size, variants in ms.items() for variant, t in variants.items()]  # fmt: skip


def _prox_rows() -> list[dict]:
    ms = {TARGET_SIZE: {"torch": 9.0, "triton": 2.0, "cuda": 1.6}, "1x1x256x256": {"torch": 0.08, "cuda": 0.01}}
    return [{"size": size, "variant": variant, "median": t / 1e3, "rel_err": 3e-7}
            for size, variants in ms.items() for variant, t in variants.items()]  # fmt: skip


def _conv_rows() -> list[dict]:
    ms = {"torch_nchw": 0.30, "torch_channels_last": 0.20, "triton": 0.15, "fast_auto": 0.15}
    return [{"suite": "conv", "layer": layer, "variant": variant, "dtype": "bf16", "size": f"8x{c}x320x320->{c}",
             "rel_err": 4e-3, "flops": 2 * 8 * 320 * 320 * c * c * 9, "inner": 20, "median": 20 * t / 1e3,
             "auto_choice": "triton" if variant == "fast_auto" else None}
            for layer, c in (("3x3_32_relu", 32), ("3x3_64_relu", 64)) for variant, t in ms.items()]  # fmt: skip


def _ladder_rows() -> list[dict]:
    rungs = ["dense eager", "+ pruned", "+ fused DC", "+ fast layers", "+ graphs"]
    seconds = {"DEQ": [2.0, 1.0, 0.8, 0.6, 0.5], "DU": [0.40, 0.20, 0.16, 0.12, 0.11]}
    rows = []
    for kind, times in seconds.items():
        for index, (rung, t) in enumerate(zip(rungs, times, strict=True)):
            rows.append({
                "suite": "ladder", "ladder": kind, "rung": rung, "rung_index": index, "size": "8x15x320x320",
                "psnr": 38.0 - 0.05 * (index > 0), "iterations": 30.0 if kind == "DEQ" else 10,
                "evaluations": 31 if kind == "DEQ" else 10, "converged": True if kind == "DEQ" else None,
                "tol": 1e-3 if kind == "DEQ" else None, "max_iter": 100 if kind == "DEQ" else None,
                "du_iters": 10 if kind == "DU" else None, "model": "dense" if index == 0 else "pruned (stand-in)",
                "dc_backend": "torch" if index < 2 else "triton", "steps": {}, "median": t,
            })  # fmt: skip
    return rows


def _nm_rows() -> list[dict]:
    return [{"size": "8x64x320x320", "variant": variant, "median": t / 1e3, "rel_err": 1e-3}
            for variant, t in (("dense_gemm", 0.30), ("sparse_2to4", 0.20))]  # fmt: skip


STANDIN_ROWS = {"dc_step": _dc_step_rows, "prox": _prox_rows, "conv": _conv_rows, "ladder": _ladder_rows,
                "nm": _nm_rows}  # fmt: skip


def standin(pytest_args: list[str]) -> int:
    """What ``pytest PYTEST_ARGS`` would leave behind, in a dry run: the benchmark JSON of a bench file, and a
    pytest-like last line."""
    print("stand-in (dry run) for: pytest " + " ".join(pytest_args))
    files = [a for a in pytest_args if a.endswith(".py")]
    json_arg = next((a for a in pytest_args if a.startswith("--benchmark-json=")), None)
    if json_arg is None:
        print(f"{len(files)} passed in 0.01s")  # one stand-in test per file
        return 0
    kind = Path(files[0]).stem.removeprefix("test_bench_")
    rows = STANDIN_ROWS[kind]()
    benchmarks = [{"name": f"test_{kind}[{i}]", "stats": {"median": row.pop("median")}, "extra_info": row}
                  for i, row in enumerate(rows)]  # fmt: skip
    data = {"machine_info": {"device": DRY_DEVICE, "torch": "-", "triton": "-", "cuda": "-"},
            "datetime": "dry run", "benchmarks": benchmarks}  # fmt: skip
    Path(json_arg.split("=", 1)[1]).write_text(json.dumps(data, indent=1))
    print(f"{len(rows)} passed in 0.01s")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "summary":
        sys.stdout.write(summary(Path(argv[1])))
        return 0
    if argv and argv[0] == "standin":
        return standin(argv[1:])
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
