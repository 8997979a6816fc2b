"""The catalogue of the small pre-trained models shipped in ``mbdl_fast/weights/``: names, descriptions, paths.

A leaf: ``mbdl_fast.checkpoint`` resolves shipped names through it, and ``mbdl_fast.weights.load_pretrained``
loads them through the checkpoint module, so neither of those imports the other's package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["SHIPPED", "weights_path"]

SHIPPED = {
    "deq_mri_4x": "DEQ, EDSR prior (32 channels, 13 blocks), 8-coil brain MRI, 4x random mask; Jacobian-regularised "
    "at tol 1e-4 so that it converges (step 7 of scripts/train_shipped.sh)",
    "deq_mri_6x_uniform": "DEQ, EDSR prior (32 channels, 13 blocks), 8-coil brain MRI, SPADE's 6x uniform mask",
    "varnet_mri_4x": "VarNet, 8 cascades of NormUNet (8 channels, 3 poolings), 8-coil brain MRI, 4x random mask",
    "deq_mri_4x_pruned50": "deq_mri_4x with its EDSR prior pruned 50% (L1, 32 -> 16 channels), supervised "
    "Jacobian-regularised fine-tuning 12 + 12 epochs at the training tolerance (step 6 of scripts/train_shipped.sh)",
    "deq_sr_2x": "DEQ, EDSR prior (32 channels, 8 blocks, 1 channel in/out), 2x bicubic super-resolution",
    "deq_mri_4x_real_ss": "deq_mri_4x adapted at test time to the shipped real scan at the demo's 4x random mask: "
    "self-supervised on that scan's undersampled measurements only, never its reference (mbdl-fast adapt-real; "
    "step 10 of scripts/train_shipped.sh); for that scan, not a general model",
    "e2e_varnet_mri_4x": "E2E-VarNet: sensitivity network (NormUNet 8 channels, 2 poolings) on the ACS lines and 4 "
    "cascades of NormUNet (16 channels, 2 poolings), 8-coil brain MRI, 4x random mask (step 11 of "
    "scripts/train_shipped.sh)",
    "e2e_varnet_mri_4x_pruned50": "e2e_varnet_mri_4x with its cascades and sensitivity network pruned 50% (L1, widths "
    "multiples of 16: 32 -> 16, 64 -> 32), supervised fine-tuning 5 epochs (step 12 of scripts/train_shipped.sh; "
    "bench/results/prune_e2e_varnet_cpu.md)",
}


def weights_path(name: str) -> Path:
    """Path (without suffix) of the shipped model ``name``."""
    if name not in SHIPPED:
        raise ValueError(f"name: expected one of {sorted(SHIPPED)}, got {name!r}")
    path = Path(str(resources.files("mbdl_fast") / "weights" / name))
    if not path.with_suffix(".json").is_file():
        raise FileNotFoundError(f"{name}: the shipped weights {path}.json are missing from this install")
    return path
