"""Brain MRI slices shipped with the package: the MNI ICBM152 2009a T1 template.

``files/brain_slices.npz`` holds 58 axial slices of the skull-stripped symmetric ICBM152 2009a T1
template (1 mm voxels, every 2 mm in z through the brain), zero-padded to 256 x 256, anterior up,
stored as uint8 (the template's own values) with a fixed interleaved split of 44 train / 7 val /
7 test slices. ``scripts/make_brain_slices.py`` builds it; ``files/LICENSE_MNI_ICBM152.txt`` carries
the template's copyright notice, which must travel with any copy.

All slices come from one (average) brain and neighbouring slices are correlated, so this data is
for development, tests and demos, not for claims of generalisation: use fastMRI for those.
"""

from __future__ import annotations

import numpy as np
import torch

from mbdl_fast.data._resources import load_npz, parse_size, resize

BRAIN_FILE = "brain_slices.npz"
SPLITS = ("train", "val", "test", "all")


def load_brain_slices(split: str = "train", size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Real brain slices ``(N, H, W)`` float32 in [0, 1] (divided by the volume's maximum).

    Args:
        split: ``"train"`` (44 slices), ``"val"`` (7), ``"test"`` (7) or ``"all"`` (58, in z order).
            The split is fixed in the shipped file: the same slices on every machine.
        size: ``None`` for the stored 256 x 256; an even int ``n`` or an even pair ``(H, W)``
            resizes with antialiased bilinear interpolation (e.g. 64 for fast tests).

    Returns:
        float32 tensor ``(N, H, W)`` on the CPU, a fresh copy the caller may modify.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    hw = parse_size(size)
    npz = load_npz(BRAIN_FILE)
    images = npz["images"]
    if split != "all":
        images = images[npz[split]]
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / float(npz["scale"]))
    if hw is not None:
        x = resize(x[:, None], hw)[:, 0]
    return x.contiguous()
