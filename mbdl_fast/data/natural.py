"""Natural test images shipped with the package, for super-resolution and denoising.

``files/natural_images.npz`` holds eight images copied from the scikit-image wheel (CC0 or public
domain; ``files/LICENSE_natural_images.txt`` lists each source), so scikit-image is not needed at
run time and nothing is downloaded. ``scripts/make_natural_images.py`` builds it.

=========  ==============  ======
name       size (H, W)     colour
=========  ==============  ======
camera     512 x 512       gray
astronaut  512 x 512       RGB
coffee     400 x 600       RGB
chelsea    300 x 451       RGB
rocket     427 x 640       RGB
text       172 x 448       gray
brick      512 x 512       gray
coins      303 x 384       gray
=========  ==============  ======
"""

from __future__ import annotations

import numpy as np
import torch

from mbdl_fast.data._resources import load_npz, parse_size, resize

NATURAL_FILE = "natural_images.npz"
NATURAL_IMAGES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "text", "brick", "coins")

# ITU-R BT.709 luma, the weights of skimage.color.rgb2gray.
_LUMA = torch.tensor([0.2125, 0.7154, 0.0721]).view(3, 1, 1)


def _decode(code: np.ndarray) -> np.ndarray:
    """Invert the stored horizontal difference: a uint8 cumsum wraps modulo 256 exactly as the encoder did."""
    return np.cumsum(code, axis=1, dtype=np.uint8)


def _center_crop(img: torch.Tensor, aspect: float) -> torch.Tensor:
    """Largest centred crop of ``(C, H, W)`` with width / height = ``aspect``."""
    h, w = img.shape[-2:]
    if w / h > aspect:
        new_w = max(1, round(h * aspect))
        left = (w - new_w) // 2
        return img[..., :, left : left + new_w]
    new_h = max(1, round(w / aspect))
    top = (h - new_h) // 2
    return img[..., top : top + new_h, :]


def load_natural_images(
    names: str | list[str] | tuple[str, ...] | None = None,
    gray: bool = True,
    size: int | tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """Natural images as a list of real float32 ``(C, H, W)`` tensors in [0, 1].

    Args:
        names: a name or list of names from ``NATURAL_IMAGES``; ``None`` for all eight, in that order.
        gray: ``True`` gives ``C = 1`` (colour images converted with BT.709 luma,
            Y = 0.2125 R + 0.7154 G + 0.0721 B, as ``skimage.color.rgb2gray``); ``False`` gives
            ``C = 3`` for every image (grayscale ones repeated over the three channels).
        size: ``None`` keeps each image's own size (they differ, hence a list); an even int ``n``
            or an even pair ``(H, W)`` takes the largest centred crop with that aspect ratio and
            resizes it with antialiased bilinear interpolation, so no image is distorted.

    Returns:
        list of CPU tensors, one per name.
    """
    if names is None:
        names = NATURAL_IMAGES
    elif isinstance(names, str):
        names = (names,)
    unknown = [n for n in names if n not in NATURAL_IMAGES]
    if unknown:
        raise ValueError(f"names: expected names from {NATURAL_IMAGES}, got unknown {unknown}")
    hw = parse_size(size)
    npz = load_npz(NATURAL_FILE)
    out = []
    for name in names:
        pixels = _decode(npz[name])
        img = torch.from_numpy(pixels.astype(np.float32) / 255.0)
        img = img.permute(2, 0, 1) if img.dim() == 3 else img[None]
        if gray and img.shape[0] == 3:
            img = (img * _LUMA).sum(0, keepdim=True).clamp_(0.0, 1.0)
        elif not gray and img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        if hw is not None:
            img = resize(_center_crop(img, hw[1] / hw[0])[None], hw)[0]
        out.append(img.contiguous())
    return out
