"""The operator demo behind ``mbdl-fast demo``: classical reconstructions with our operators.

Reconstructions of a simulated multi-coil acquisition y = M F_c S x:
- zero-filled: A^H y;
- CG-SENSE: argmin_x ||A x - y||² by CG on A^H A x = A^H y (``iterations`` steps, from zero);
- DC gradient descent with Nesterov momentum: x <- dc_step(x, y, gamma = 1) (Σ|S|² = 1 and a binary
  mask give ||A^H A|| <= 1, so gamma = 1 is a safe step), A^H y precomputed so a column mask needs
  1-D FFTs only.
The DC step is timed per available backend on the same tensors.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import mbdl_fast
from mbdl_fast.linalg import conjugate_gradient
from mbdl_fast.metrics import nmse, psnr, ssim
from mbdl_fast.physics import MultiCoilMRI


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_operator_demo(data: dict, device: torch.device, iterations: int, out_dir: Path) -> dict:
    """Reconstruct ``data`` (from ``simulate_multicoil``); returns the numbers, the table and the file paths."""
    target = data["target"].to(device)
    kspace = data["kspace"].to(device)
    physics = MultiCoilMRI(data["mask"].to(device), data["coil_maps"].to(device))
    n = target.shape[0]
    recons: dict[str, tuple[torch.Tensor, float, int]] = {}

    start = time.perf_counter()
    zero_filled = physics.A_adjoint(kspace)
    _sync(device)
    recons["zero-filled"] = (zero_filled, time.perf_counter() - start, 0)

    start = time.perf_counter()
    cg, info = conjugate_gradient(physics.A_adjoint_A, zero_filled, tol=1e-5, max_iter=iterations)
    _sync(device)
    recons["CG-SENSE"] = (cg, time.perf_counter() - start, info["iterations"])

    start = time.perf_counter()
    x = zero_filled.clone()
    previous = x
    for k in range(iterations):
        z = x + (k / (k + 3)) * (x - previous)
        previous = x
        x = mbdl_fast.dc_step(physics, z, None, 1.0, AHy=zero_filled, check_inputs=False)
    _sync(device)
    recons["DC steps (Nesterov)"] = (x, time.perf_counter() - start, iterations)

    rows = []
    for name, (image, seconds, iters) in recons.items():
        mag, ref = image.abs(), target.abs()
        rows.append(
            {
                "method": name,
                "psnr": float(psnr(mag, ref)),
                "ssim": float(ssim(mag, ref)),
                "nmse": float(nmse(mag, ref)),
                "iterations": iters,
                "seconds_per_image": seconds / n,
            }
        )

    timings = {}
    ahy = zero_filled
    for backend, status in mbdl_fast.backends(device).items():
        if status.available:
            timings[backend] = _time(
                lambda b=backend: mbdl_fast.dc_step(physics, zero_filled, None, 1.0, backend=b, AHy=ahy,
                                                    check_inputs=False),
                device,
            )  # fmt: skip
        else:
            timings[backend] = None

    b, c, h, w = kspace.shape
    header = f"{n} brain slices {h}x{w}, {c} coils, mask keeps {float(physics.mask.mean()):.1%}, device {device}"
    lines = [header, f"{'method':<22}{'PSNR':>8}{'SSIM':>8}{'NMSE':>10}{'iters':>7}{'s/image':>10}"]
    for r in rows:
        lines.append(
            f"{r['method']:<22}{r['psnr']:>8.2f}{r['ssim']:>8.4f}{r['nmse']:>10.5f}{r['iterations']:>7}"
            f"{r['seconds_per_image']:>10.4f}"
        )
    lines.append("DC step (A^H y precomputed), median ms per call: " + ", ".join(
        f"{k} {v * 1e3:.2f}" if v is not None else f"{k} n/a" for k, v in timings.items()
    ))  # fmt: skip
    table = "\n".join(lines)

    out_dir.mkdir(parents=True, exist_ok=True)
    figure = out_dir / "demo.png"
    _figure(target, recons, rows, figure)
    result = {"setting": header, "rows": rows, "dc_step_seconds": timings}
    json_path = out_dir / "demo.json"
    json_path.write_text(json.dumps(result, indent=2))
    return {**result, "table": table, "figure": str(figure), "json": str(json_path)}


def _figure(target: torch.Tensor, recons: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = target[0].abs().cpu().numpy()
    vmax = float(ref.max())
    cols = 1 + len(recons)
    fig, axes = plt.subplots(2, cols, figsize=(3 * cols, 6.6))
    axes[0, 0].imshow(ref, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title("ground truth")
    axes[1, 0].axis("off")
    for k, ((name, (image, _, _)), row) in enumerate(zip(recons.items(), rows, strict=True), start=1):
        mag = image[0].abs().cpu().numpy()
        axes[0, k].imshow(mag, cmap="gray", vmin=0, vmax=vmax)
        axes[0, k].set_title(f"{name}\n{row['psnr']:.2f} dB")
        axes[1, k].imshow(abs(mag - ref), cmap="magma", vmin=0, vmax=0.2 * vmax)
        axes[1, k].set_title("|error| (x5)")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
