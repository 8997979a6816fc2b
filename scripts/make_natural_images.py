"""Build ``mbdl_fast/data/files/natural_images.npz`` from images bundled inside the scikit-image wheel.

Run once by a developer (the output is committed; scikit-image is not needed at run time and
nothing is fetched: only files already in ``skimage/data/`` are read)::

    python scripts/make_natural_images.py

Only images whose scikit-image docstring states CC0, public domain or no known copyright
restrictions are taken; ``mbdl_fast/data/files/LICENSE_natural_images.txt`` records each one.

Storage: every image is uint8, grayscale ``(H, W)`` or colour ``(H, W, 3)``, coded as its
horizontal difference ``d[:, j] = x[:, j] - x[:, j - 1] (mod 256)`` (PNG's "Sub" filter), which
deflate compresses ~25% better than raw pixels; the loader decodes with a wrapping uint8 cumsum.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import skimage
import skimage.io

OUT = pathlib.Path(__file__).resolve().parents[1] / "mbdl_fast" / "data" / "files" / "natural_images.npz"

# name -> file inside skimage/data (all ship in the wheel; none needs pooch).
IMAGES = {
    "camera": "camera.png",
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
    "text": "text.png",
    "brick": "brick.png",
    "coins": "coins.png",
}


def encode(img: np.ndarray) -> np.ndarray:
    """Horizontal difference modulo 256 (exactly invertible by ``np.cumsum(d, axis=1, dtype=np.uint8)``)."""
    return np.diff(img, axis=1, prepend=np.zeros_like(img[:, :1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args()

    data_dir = pathlib.Path(skimage.__file__).parent / "data"
    arrays = {}
    for name, fname in IMAGES.items():
        path = data_dir / fname
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not in this scikit-image wheel ({skimage.__version__})")
        img = skimage.io.imread(path)
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[..., :3]
        if img.dtype != np.uint8 or img.ndim not in (2, 3):
            raise ValueError(f"{path}: expected uint8 (H, W) or (H, W, 3), got {img.dtype} {img.shape}")
        code = encode(img)
        assert np.array_equal(np.cumsum(code, axis=1, dtype=np.uint8), img)
        arrays[name] = code
        print(f"{name:10s} {img.shape}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        names=np.array(list(IMAGES)),
        encoding=np.array("uint8 horizontal difference mod 256; decode with cumsum(axis=1, dtype=uint8)"),
        source=np.array(f"scikit-image {skimage.__version__} skimage/data"),
        **arrays,
    )
    print(f"wrote {args.out}: {len(arrays)} images, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
