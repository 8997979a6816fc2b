"""ESPIRiT coil maps: ``mbdl_fast.coils.espirit`` against sigpy's ``EspiritCalib`` (the reference), time and agreement.

    python bench/espirit_vs_sigpy.py --threads 1 --out bench/results/espirit_cpu

Inputs: the shipped real slice (16 coils, 128 x 128, fully sampled; batch 1) and a batch of 4 (the slice
turned by 0-3 quarter turns: four different k-spaces), both with the defaults of both (24 x 24 calibration,
6 x 6 kernels, threshold 0.02, crop 0.95). sigpy takes one image per call, so a batch is a loop of calls.
Both run on the CPU with the same thread count (set before numpy and torch load their thread pools), timed
round-robin in one process, ``--repeats`` times each after a warm-up (sigpy's numba kernels compile then),
median with min-max. Agreement: pixels where only one crops, and min |<S, S_sigpy>| where both keep.
Writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="bench/results/espirit_cpu")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import numpy as np
    import sigpy
    import sigpy.mri.app as sigpy_app
    import torch

    from mbdl_fast.coils import espirit
    from mbdl_fast.data import load_real_brain
    from mbdl_fast.finetune import rotate

    torch.set_num_threads(args.threads)
    slice_ = load_real_brain()
    inputs = {"1x16x128x128": slice_, "4x16x128x128": torch.cat([rotate(slice_, k) for k in range(4)])}

    def ours(kspace):
        return espirit(kspace)

    def reference(kspace):
        return torch.stack([torch.from_numpy(sigpy_app.EspiritCalib(k, show_pbar=False).run()) for k in kspace.numpy()])

    rows = []
    for size, kspace in inputs.items():
        maps, ref = ours(kspace), reference(kspace)  # warm-up, and the maps compared
        kept, ref_kept = maps.abs().sum(1) > 0, ref.abs().sum(1) > 0
        both = kept & ref_kept
        inner = (maps.conj() * ref).sum(1).abs()[both]
        times: dict[str, list[float]] = {"mbdl_fast": [], "sigpy": []}
        for _ in range(args.repeats):
            for name, fn in (("mbdl_fast", ours), ("sigpy", reference)):
                start = time.perf_counter()
                fn(kspace)
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append({
            "size": size, "threads": args.threads, "repeats": args.repeats,
            "seconds": {name: {"median": med[name], "min": min(t), "max": max(t)} for name, t in times.items()},
            "speedup": med["sigpy"] / med["mbdl_fast"],
            "crop_mismatch_pixels": int((kept ^ ref_kept).sum()), "kept_pixels": int(ref_kept.sum()),
            "min_inner": float(inner.min()), "mean_inner": float(inner.mean()),
        })  # fmt: skip
        print(f"{size}: ours {med['mbdl_fast']:.3f} s, sigpy {med['sigpy']:.3f} s, {rows[-1]['speedup']:.1f}x")

    device = f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s)"
    info = {"device": device, "torch": torch.__version__, "numpy": np.__version__, "sigpy": sigpy.__version__,
            "datetime": datetime.now(timezone.utc).isoformat()}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine_info": info, "rows": rows}, indent=2))
    lines = [
        f"Device: {device} | torch {info['torch']} | numpy {info['numpy']} | sigpy {info['sigpy']} | {info['datetime']}",
        "",
        f"ESPIRiT maps of the shipped real slice (defaults of both), round-robin, {args.repeats} repeats: "
        "median (min-max) seconds.",
        "",
        "| size (B x C x H x W) | mbdl_fast s | sigpy s | speed-up | crop mismatch (px) | min / mean abs<S, S_sigpy> |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours_s, ref_s = r["seconds"]["mbdl_fast"], r["seconds"]["sigpy"]
        lines.append(
            f"| {r['size']} | {ours_s['median']:.3f} ({ours_s['min']:.3f}-{ours_s['max']:.3f}) | {ref_s['median']:.3f} "
            f"({ref_s['min']:.3f}-{ref_s['max']:.3f}) | {r['speedup']:.1f}x | {r['crop_mismatch_pixels']} of "
            f"{r['kept_pixels']} | {r['min_inner']:.5f} / {r['mean_inner']:.6f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
