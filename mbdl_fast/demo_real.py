"""``mbdl-fast demo --data real``: the shipped models on real scanner data.

The shipped in-vivo slice (``mbdl_fast.data.load_real_brain``: 16 coils, 128 x 128, fully sampled) is
undersampled retrospectively twice:

- fastMRI's 4x random column mask (8% centre), with the shipped ``deq_mri_4x``, ``deq_mri_4x_pruned50`` and
  ``e2e_varnet_mri_4x``;
- SPADE's 6x uniform mask with its ACS band, with the shipped ``deq_mri_6x_uniform`` (no pruned 6x model
  is shipped).

The reference image is the fully sampled k-space combined with ESPIRiT maps of all of it (``espirit``'s
defaults: 24 x 24 calibration, 6 x 6 kernels): x_ref = Σ_c conj(S_c) F^H y_c. Every reconstruction of an
undersampled scan uses one set of maps estimated from its ACS band only, calibrated over the band's whole
readout length with 4 x 4 kernels (the 6x band is 8 lines wide: a 6-wide kernel fits only 3 positions
across it, and its maps then lose the object's edge). Rows:

- zero-filled: A^H y;
- CG-SENSE: argmin_x ||A x - y||² by CG, stopped after 10 iterations: on noisy scanner data unregularised
  CG amplifies noise as it converges (it loses several dB by 30 iterations), so early stopping is its
  regulariser;
- DEQ, dense and pruned: the shipped models at tol 1e-4, cap 100, all with the same maps. Their maps carry the
  CG-SENSE image's phase (``coils.align_phase``: the same SENSE model, magnitudes unchanged), so the priors,
  trained on smooth-phase simulated images, see a nearly real image rather than this GRE scan's phase wraps;
  their images are kept on the maps' support (``coils.coil_support``), where the SENSE model sees the image
  and the zero-filled and CG-SENSE images are nonzero;
- DEQ adapted to this scan (4x, where ``deq_mri_4x_real_ss`` is shipped): ``deq_mri_4x`` after test-time
  adaptation (``adapt_real.py``): fine-tuned self-supervised on this very scan's undersampled measurements
  (the 4x mask below, the same maps), never on its reference;
- E2E-VarNet (4x): its own coil maps, from its sensitivity network on the ACS lines (16 coils here, 8 in training),
  its image kept on the same support as the DEQs'.

Metrics are PSNR / SSIM of magnitudes against |x_ref| (data range: its maximum). The k-space is scaled as
the loader documents (full scan's root-sum-of-squares maximum = 1), the scale the models were trained at.
Writes a table, one PNG per mask (``demo.plot_reconstructions``) and ``demo_real.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# The scan is looked up at call time (shipped_data.load_real_brain): tests substitute it to show that only its
# undersampled measurements are read.
from mbdl_fast import data as shipped_data
from mbdl_fast.coils import align_phase, coil_support, espirit
from mbdl_fast.demo import DEQ_MAX_ITER, DEQ_TOL, _load, _timed, plot_reconstructions
from mbdl_fast.linalg import conjugate_gradient
from mbdl_fast.metrics import nmse, psnr, ssim
from mbdl_fast.physics import MultiCoilMRI
from mbdl_fast.physics.masks import random_mask, uniform_acs_mask

CG_ITERATIONS = 10
#: Row labels of the shipped models.
LABELS = {
    "deq_mri_4x": "DEQ",
    "deq_mri_4x_pruned50": "DEQ pruned 50%",
    "deq_mri_4x_real_ss": "DEQ adapted to this scan",
    "deq_mri_6x_uniform": "DEQ",
    "e2e_varnet_mri_4x": "E2E-VarNet (own coil maps)",
}
#: The self-supervised losses of ``adapt_real`` (its ``strategy``), as the table's note names them.
ADAPTED_LOSSES = {"split": "predicting held-out k-space columns, SSDU / ZS-SSL",
                  "rei": "measurement consistency + rotation equivariance, REI"}  # fmt: skip
MASK_SEED = 0
#: ESPIRiT on an ACS band: calibrate over all readout points (H) and at most 24 lines, 4 x 4 kernels.
ACS_KERNEL_WIDTH = 4
ACS_CALIB_LINES = 24


def _settings(width: int) -> list[tuple[str, str, torch.Tensor, tuple[str, ...]]]:
    """(key, label, column mask (1, W), shipped DEQ models) per retrospective undersampling."""
    return [
        ("random4x", "fastMRI random 4x (8% centre)", random_mask(width, 4, 0.08, seed=MASK_SEED),
         ("deq_mri_4x", "deq_mri_4x_pruned50", "deq_mri_4x_real_ss", "e2e_varnet_mri_4x")),
        ("uniform6x", "SPADE uniform 6x + ACS", uniform_acs_mask(width, 6), ("deq_mri_6x_uniform",)),
    ]  # fmt: skip


def real_setting(key: str, width: int) -> tuple[str, torch.Tensor, tuple[str, ...]]:
    """(label, column mask (1, W), shipped DEQ models) of the undersampling ``key`` (``"random4x"``, ``"uniform6x"``)."""
    settings = {k: rest for k, *rest in _settings(width)}
    if key not in settings:
        raise ValueError(f"setting: expected one of {sorted(settings)}, got {key!r}")
    return tuple(settings[key])


def acs_maps(y: torch.Tensor) -> torch.Tensor:
    """ESPIRiT maps ``(B, C, H, W)`` from the ACS band of undersampled k-space ``y`` ``(B, C, H, W)``."""
    return espirit(y, calib_width=(y.shape[-2], ACS_CALIB_LINES), kernel_width=ACS_KERNEL_WIDTH)


def cg_sense(physics: torch.nn.Module, y: torch.Tensor, iterations: int = CG_ITERATIONS):
    """(x, info): CG on A^H A x = A^H y from A^H y, a fixed count of ``iterations`` (early stopping regularises)."""
    return conjugate_gradient(physics.A_adjoint_A, physics.A_adjoint(y), tol=1e-9, max_iter=iterations)


def learned_model_physics(mask: torch.Tensor, maps: torch.Tensor, cg: torch.Tensor) -> torch.nn.Module:
    """The operator the learned models get: the ACS maps with the CG-SENSE image's phase (``align_phase``)."""
    return MultiCoilMRI(mask, align_phase(maps, cg))


def undersampled_real_scan(key: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.nn.Module]:
    """(y, physics) of the shipped real scan as the learned models see it in the demo, without the reference.

    y ``(1, C, H, W)``: the scan under the mask of ``key`` (``real_setting``); physics: ``learned_model_physics``
    (ESPIRiT maps from y's ACS band, phase of y's CG-SENSE image). Only y is ever read, never the full k-space's
    unsampled lines.
    """
    kspace = shipped_data.load_real_brain().to(device)
    _, mask, _ = real_setting(key, kspace.shape[-1])
    mask = mask.to(device)
    y = mask * kspace
    maps = acs_maps(y)
    with torch.no_grad():
        cg, _ = cg_sense(MultiCoilMRI(mask, maps), y)
    return y, learned_model_physics(mask, maps, cg)


def reference_image(kspace: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_ref, maps): fully sampled ``(B, C, H, W)`` k-space combined with its own ESPIRiT maps, x_ref ``(B, H, W)``."""
    maps = espirit(kspace)
    full = torch.ones(1, kspace.shape[-1], device=kspace.device)
    return MultiCoilMRI(full, maps).A_adjoint(kspace), maps  # Σ_c conj(S_c) F^H y_c


def run_real_demo(
    device: torch.device | None = None, out_dir: Path = Path("mbdl_fast_demo"), weights_dir: Path | None = None,
    cg_iterations: int = CG_ITERATIONS,
) -> dict[str, Any]:  # fmt: skip
    """Reconstruct the shipped real slice at both masks with every method; returns rows, table and file paths.

    Each row: ``mask``, ``method``, ``psnr``, ``ssim``, ``nmse``, ``iterations`` (CG or DEQ iterations, else
    ``None``), ``converged`` (DEQ: fraction of images that reached the tolerance, else ``None``),
    ``seconds_per_image`` (the reconstruction only; the ACS ESPIRiT time is in ``espirit_seconds``).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kspace = shipped_data.load_real_brain().to(device)
    b, c, h, w = kspace.shape
    target, _ = reference_image(kspace)
    ref = target.abs()
    notes: list[str] = []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    lines = [f"real in-vivo brain slice {h}x{w}, {c} coils (3 T GRE), device {device}; reference: full k-space "
             "with its ESPIRiT maps; every method uses ESPIRiT maps from the ACS band only"]  # fmt: skip
    lines.append(f"{'method':<40}{'PSNR':>8}{'SSIM':>8}{'NMSE':>10}{'iters':>8}{'conv':>6}{'s/image':>10}")
    figures, espirit_seconds = {}, {}
    for key, label, mask, model_names in _settings(w):
        mask = mask.to(device)
        y = mask * kspace
        maps, espirit_seconds[key] = _timed(lambda y=y: acs_maps(y), device)
        physics = MultiCoilMRI(mask, maps)
        images: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            zf, t = _timed(lambda physics=physics, y=y: physics.A_adjoint(y), device)
            found = [("zero-filled", zf, t, None, None)]
            (cg, info), t = _timed(lambda physics=physics, y=y: cg_sense(physics, y, cg_iterations), device)
            found.append((f"CG-SENSE ({info['iterations']} it.)", cg, t, float(info["iterations"]), None))
            physics = learned_model_physics(mask, maps, cg)
            support = coil_support(maps)
            for name in model_names:
                try:
                    model, meta = _load(name, weights_dir, device)
                except FileNotFoundError as err:
                    if weights_dir is not None:
                        raise
                    notes.append(f"{name} skipped: {err}")  # an install without the shipped weights
                    continue
                if not hasattr(model, "configure"):  # deep unfolding: its K cascades, its own coil maps
                    x, t = _timed(lambda model=model, y=y, physics=physics, s=support: model(y, physics) * s, device)
                    found.append((LABELS[name], x, t, float(model.num_cascades), None))
                    continue
                model.configure(f_tol=DEQ_TOL, f_max_iter=DEQ_MAX_ITER)  # dense and pruned at one tolerance
                x, t = _timed(lambda model=model, y=y, physics=physics, s=support: model(y, physics) * s, device)
                if "adapted" in meta:  # a model fine-tuned on the very scan it is shown on: say so
                    notes.append(f"{label}, {LABELS[name]}: test-time adaptation, fine-tuned self-supervised "
                                 f"({ADAPTED_LOSSES[meta['adapted']['strategy']]}) on this scan's own undersampled "
                                 "measurements, never on its reference")  # fmt: skip
                info = model.last_info
                found.append((f"{LABELS[name]} (tol {DEQ_TOL:g})", x, t,
                              info["iterations_per_sample"].float().mean().item(),
                              info["converged"].float().mean().item()))  # fmt: skip
        lines.append(f"{label}: keeps {float(mask.mean()):.1%} of k-space; ACS ESPIRiT {espirit_seconds[key]:.2f} s")
        for method, image, seconds, iterations, converged in found:
            images[method] = image
            mag = image.abs()
            row = {"mask": label, "method": method, "psnr": float(psnr(mag, ref)), "ssim": float(ssim(mag, ref)),
                   "nmse": float(nmse(mag, ref)), "iterations": iterations, "converged": converged,
                   "seconds_per_image": seconds / b}  # fmt: skip
            rows.append(row)
            if converged is not None and converged < 1:  # DESIGN: a DEQ row at the cap is a different method
                notes.append(f"{label}, {method}: {b - round(converged * b)} of {b} image(s) stopped at the cap of "
                             f"{DEQ_MAX_ITER} iterations, not at the fixed point: a {DEQ_MAX_ITER}-iteration method there")  # fmt: skip
            iters = f"{iterations:.0f}" if iterations is not None else "-"
            conv = f"{round(converged * b)}/{b}" if converged is not None else "-"
            lines.append(f"  {method:<38}{row['psnr']:>8.2f}{row['ssim']:>8.4f}{row['nmse']:>10.5f}{iters:>8}"
                         f"{conv:>6}{seconds / b:>10.3f}")  # fmt: skip
        figures[key] = out_dir / f"demo_real_{key}.png"
        plot_reconstructions(target, images, mask, figures[key])
    result = {"setting": lines[0], "rows": rows, "espirit_seconds": espirit_seconds, "notes": notes}
    json_path = out_dir / "demo_real.json"
    json_path.write_text(json.dumps(result, indent=2))
    return {**result, "table": "\n".join(lines + notes), "figures": [str(p) for p in figures.values()],
            "json": str(json_path)}  # fmt: skip
