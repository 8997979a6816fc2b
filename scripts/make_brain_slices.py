"""Build ``mbdl_fast/data/files/brain_slices.npz`` from the MNI ICBM152 2009a T1 template in nilearn.

Run once by a developer (the output is committed; nothing is fetched at run time)::

    python scripts/make_brain_slices.py

Source: ``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, the skull-stripped
symmetric ICBM152 2009a T1 template that the nilearn wheel carries: 197 x 233 x 189 voxels of 1 mm,
uint8 (0 outside the brain), RAS axes.

What is stored:

- ``images``: uint8 (N, 256, 256), axial slices every 2 mm through the part of the brain where the
  slice's brain area is at least 30% of the largest one (no tiny top/bottom caps). Each slice is
  shown "anterior up" in neurological convention: row 0 is the most anterior y, column 0 the patient's
  left (smallest x); the 197 x 233 slice is zero-padded, centred, to 256 x 256 (1 mm pixels kept,
  no resampling, so the stored values are the template's own).
- ``scale``: the volume's maximum (255); ``images / scale`` is the per-volume [0, 1] normalisation.
- ``z_index``: the template's axial index of each slice.
- ``train`` / ``val`` / ``test``: int64 indices into ``images``, interleaved along z (slice k goes to
  test if k % 8 == 3, to val if k % 8 == 7, else to train). Neighbouring slices of one template are
  correlated, so the split separates slices, not subjects: use it for development, not for claims of
  generalisation.
"""

from __future__ import annotations

import argparse
import pathlib

import nibabel as nib
import nilearn
import numpy as np

SIZE = 256
STEP = 2
MIN_AREA_FRACTION = 0.3
TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
OUT = pathlib.Path(__file__).resolve().parents[1] / "mbdl_fast" / "data" / "files" / "brain_slices.npz"


def find_template() -> pathlib.Path:
    root = pathlib.Path(nilearn.__file__).parent
    hits = sorted(root.rglob(TEMPLATE))
    if not hits:
        raise FileNotFoundError(f"{TEMPLATE} not found under {root}; install nilearn (its wheel carries it)")
    return hits[0]


def pad_center(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    if h > size or w > size:
        raise ValueError(f"slice {img.shape} does not fit in {size} x {size}")
    out = np.zeros((size, size), dtype=img.dtype)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args()

    path = find_template()
    image = nib.load(path)
    if not np.allclose(image.header.get_zooms(), 1.0):
        raise ValueError(f"{path}: expected 1 mm voxels, got {image.header.get_zooms()}")
    volume = np.asarray(image.dataobj)
    if volume.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 voxels, got {volume.dtype}")
    scale = int(volume.max())

    area = (volume > 0).sum(axis=(0, 1))
    brain = np.nonzero(area >= MIN_AREA_FRACTION * area.max())[0]
    z_index = np.arange(brain.min(), brain.max() + 1, STEP)

    # volume[:, :, z] is (x, y); transpose to (y, x) and flip y so anterior is up.
    slices = np.stack([pad_center(np.flipud(volume[:, :, z].T), SIZE) for z in z_index])

    k = np.arange(len(slices))
    test = k[k % 8 == 3]
    val = k[k % 8 == 7]
    train = k[(k % 8 != 3) & (k % 8 != 7)]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        images=slices,
        scale=np.int64(scale),
        z_index=z_index.astype(np.int64),
        train=train.astype(np.int64),
        val=val.astype(np.int64),
        test=test.astype(np.int64),
        source=np.array(f"{TEMPLATE} (nilearn {nilearn.__version__}), axial slices every {STEP} mm, padded to {SIZE}"),
    )
    print(
        f"wrote {args.out}: {slices.shape} {slices.dtype}, train/val/test = {len(train)}/{len(val)}/{len(test)}, "
        f"{args.out.stat().st_size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
