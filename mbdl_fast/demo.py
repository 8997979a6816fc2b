"""``mbdl-fast demo``: the shipped models on the shipped test slices.

Simulated 8-coil brain acquisitions at 4x (the test split of the shipped DEQ's training set-up),
reconstructed by
- zero-filled: A^H y;
- CG-SENSE: argmin_x ||A x - y||² by CG (classical reference, no learning);
- DEQ: SPADE's deep equilibrium model with the shipped EDSR prior (Anderson, tol 1e-4, <= 100 iterations);
- DU: the shipped E2E-VarNet (unrolled k-space cascades; coil maps from its own sensitivity network, not the
  simulation's).
Prints a table (PSNR, SSIM, NMSE, iterations, time per image), writes a PNG figure (ground truth,
reconstructions, error maps) and a JSON of the numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from mbdl_fast.checkpoint import load_model, read_metadata
from mbdl_fast.linalg import conjugate_gradient
from mbdl_fast.metrics import nmse, psnr, ssim
from mbdl_fast.shipped import weights_path
from mbdl_fast.tasks import TrainConfig, make_dataset, prepare_batch
from mbdl_fast.timing import synchronize

DEQ_TOL, DEQ_MAX_ITER = 1e-4, 100


def _timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def _load(name: str, weights_dir: Path | None, device: torch.device):
    path = weights_path(name) if weights_dir is None else Path(weights_dir) / name
    return load_model(path, map_location=device), read_metadata(path)


def run_demo(
    num_images: int = 4, device: torch.device | None = None, out_dir: Path = Path("mbdl_fast_demo"),
    weights_dir: Path | None = None, cg_iterations: int = 30,
) -> dict[str, Any]:  # fmt: skip
    """Reconstruct ``num_images`` shipped test slices with every method; returns rows, table and file paths."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes = []
    try:
        deq, deq_meta = _load("deq_mri_4x", weights_dir, device)
        deq_pruned, _ = _load("deq_mri_4x_pruned50", weights_dir, device)
        varnet, _ = _load("e2e_varnet_mri_4x", weights_dir, device)
        deq.configure(f_tol=DEQ_TOL, f_max_iter=DEQ_MAX_ITER)
        deq_pruned.configure(f_tol=DEQ_TOL, f_max_iter=DEQ_MAX_ITER)  # the same tolerance as the dense DEQ
        cfg = TrainConfig.from_dict(deq_meta["config"])
    except FileNotFoundError as err:
        if weights_dir is not None:
            raise
        # An install without the shipped weights still shows the classical reconstructions, and says why.
        notes.append(f"learned models skipped: {err}")
        deq = deq_pruned = varnet = None
        cfg = TrainConfig(task="mri", size=128, coils=8, acceleration=4, mask_type="random")
    dataset = make_dataset(cfg, "test")
    n = min(num_images, len(dataset))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(n)])
    physics, kspace, target = prepare_batch(cfg, batch, device)

    recons: dict[str, tuple[torch.Tensor, float, float | None]] = {}
    converged: dict[str, float] = {}  # DEQ rows: the fraction of images that reached the tolerance
    with torch.no_grad():
        zf, t = _timed(lambda: physics.A_adjoint(kspace), device)
        recons["zero-filled"] = (zf, t, None)
        (cg, info), t = _timed(lambda: conjugate_gradient(physics.A_adjoint_A, zf, tol=1e-5, max_iter=cg_iterations),
                               device)  # fmt: skip
        recons["CG-SENSE"] = (cg, t, float(info["iterations"]))
        for name, model in (
            (f"DEQ (tol {DEQ_TOL:g}, cap {DEQ_MAX_ITER})", deq),
            (f"DEQ pruned 50% (tol {DEQ_TOL:g}, cap {DEQ_MAX_ITER})", deq_pruned),
        ):
            if model is not None:
                x, t = _timed(lambda model=model: model(kspace, physics), device)
                iters = model.last_info["iterations_per_sample"].float().mean().item()
                recons[name] = (x, t, iters)
                converged[name] = model.last_info["converged"].float().mean().item()
        if varnet is not None:
            x, t = _timed(lambda: varnet(kspace, physics), device)
            recons["DU (E2E-VarNet, own coil maps)"] = (x, t, float(varnet.num_cascades))

    rows = []
    for name, (image, seconds, iterations) in recons.items():
        mag, ref = image.abs(), target.abs()
        rows.append({"method": name, "psnr": float(psnr(mag, ref)), "ssim": float(ssim(mag, ref)),
                     "nmse": float(nmse(mag, ref)), "iterations": iterations,
                     "converged": converged.get(name), "seconds_per_image": seconds / n})  # fmt: skip
    b, c, h, w = kspace.shape
    header = (f"{n} shipped test brain slices {h}x{w}, {c} coils, {cfg.mask_type} mask {cfg.acceleration:g}x "
              f"(keeps {float(physics.mask.mean()):.1%}), device {device}")  # fmt: skip
    lines = [header, f"{'method':<38}{'PSNR':>8}{'SSIM':>8}{'NMSE':>10}{'iters':>8}{'converged':>11}{'s/image':>10}"]
    for r in rows:
        iters = f"{r['iterations']:.1f}" if r["iterations"] is not None else "-"
        conv = f"{round(r['converged'] * n)}/{n}" if r["converged"] is not None else "-"
        lines.append(f"{r['method']:<38}{r['psnr']:>8.2f}{r['ssim']:>8.4f}{r['nmse']:>10.5f}{iters:>8}{conv:>11}"
                     f"{r['seconds_per_image']:>10.3f}")  # fmt: skip
    for r in rows:
        if r["converged"] is not None and r["converged"] < 1:
            lines.append(f"WARNING: {r['method']}: {round((1 - r['converged']) * n)} of {n} images stopped at the cap "
                         f"of {DEQ_MAX_ITER} iterations before reaching tol {DEQ_TOL:g}: not an equilibrium result")  # fmt: skip
    table = "\n".join(lines + notes)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = out_dir / "demo.png"
    plot_reconstructions(target, {name: image for name, (image, _, _) in recons.items()}, physics.mask, figure)
    result = {"setting": header, "rows": rows, "notes": notes}
    json_path = out_dir / "demo.json"
    json_path.write_text(json.dumps(result, indent=2))
    return {**result, "table": table, "figure": str(figure), "json": str(json_path)}


def plot_reconstructions(
    target: torch.Tensor, images: dict[str, torch.Tensor], mask: torch.Tensor, path: Path, index: int = 0
) -> dict[str, tuple[float, float]]:
    """A PNG of image ``index``: the reference, each reconstruction with its own PSNR / SSIM, the magnitude
    error maps ||x| - |target||, and the sampling mask, each with a colour bar.

    Args:
        target: the reference, complex or real ``(B, H, W)``.
        images: reconstructions by method name, each ``(B, H, W)`` like ``target``.
        mask: the sampling mask, broadcastable to ``(B, 1, H, W)`` (e.g. ``(B, 1, 1, W)`` or ``(1, W)``).
        path: the PNG file to write.
        index: which image of the batch to show; the titles quote that image's numbers, not the batch mean.

    Returns:
        the (PSNR, SSIM) of image ``index`` per method, as the titles print them.
    """
    # Here, not at the top: the non-interactive backend must be chosen before pyplot is imported, and only the
    # figures need it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = target[index : index + 1].abs()
    height, width = ref.shape[-2:]
    sampled = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    sampled = sampled[min(index, sampled.shape[0] - 1), 0].expand(height, width).cpu().numpy()
    vmax = float(ref.max())
    cols = 1 + len(images)
    fig, axes = plt.subplots(2, cols, figsize=(3.3 * cols, 6.4), squeeze=False)

    def show(ax, picture, title: str, cmap: str, vmax_: float) -> None:
        artist = ax.imshow(picture, cmap=cmap, vmin=0, vmax=vmax_)
        ax.set_title(title, fontsize=9)
        fig.colorbar(artist, ax=ax, fraction=0.046, pad=0.03)

    show(axes[0, 0], ref[0].cpu().numpy(), "reference", "gray", vmax)
    show(axes[1, 0], sampled, f"mask ({sampled.mean():.1%} of k-space)", "gray", 1.0)
    quality = {}
    for k, (name, image) in enumerate(images.items(), start=1):
        mag = image[index : index + 1].abs()
        quality[name] = (float(psnr(mag, ref)), float(ssim(mag, ref)))
        title = f"{name}\n{quality[name][0]:.2f} dB, SSIM {quality[name][1]:.3f}"
        show(axes[0, k], mag[0].cpu().numpy(), title, "gray", vmax)
        show(axes[1, k], (mag - ref)[0].abs().cpu().numpy(), "|error| (scale: 20% of max)", "magma", 0.2 * vmax)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return quality
