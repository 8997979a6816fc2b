"""Simulated multi-coil Cartesian MRI acquisitions from real images.

The forward model is the SENSE model MultiCoilMRI uses, written out here with ``fft2c``:

    y_c = M ⊙ (F(S_c ⊙ x) + n_c),    c = 1..C,

with x the complex image (a real image times a smooth phase), S_c the coil maps normalised so that
Σ_c |S_c|² = 1 per pixel, F the centred orthonormal 2-D FFT, M the 0/1 sampling mask and n_c
complex Gaussian noise. The zero-filled SENSE combination is x_zf = Σ_c conj(S_c) ⊙ F^H(y_c); with
a full mask and no noise it equals x, because F is unitary and Σ_c |S_c|² = 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from mbdl_fast._validate import (
    check_broadcastable,
    check_finite,
    check_int,
    check_nonempty,
    check_number,
    check_real,
    check_tensor,
)
from mbdl_fast.data.brain import load_brain_slices
from mbdl_fast.fft import fft2c, ifft2c
from mbdl_fast.physics.masks import equispaced_mask, random_mask, uniform_acs_mask, variable_density_mask

MASK_TYPES = ("random", "equispaced", "uniform", "variable_density")


#: Longest image side simulated: beyond any MR image, and a typo (10**9) cannot exhaust memory.
MAX_SIDE = 16384


def _check_shape2(shape: object) -> tuple[int, int]:
    hw = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else ()
    if len(hw) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_SIDE for s in hw):
        raise ValueError(f"shape: expected a pair (H, W) of ints in [1, {MAX_SIDE}], got {shape!r}")
    return hw  # type: ignore[return-value]


#: A phase polynomial of higher degree is no longer smooth; the bound also keeps its (order + 1)² terms small.
MAX_PHASE_ORDER = 16
#: Far more receive channels than any scanner has: the bound keeps a typo from allocating C full-size maps.
MAX_COILS = 1024


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(check_int("seed", seed, 0, 2**63 - 1))


def _grid(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixel coordinates as sigpy: x = (j - W/2) / (W/2), y = (i - H/2) / (H/2), in [-1, 1)."""
    h, w = shape
    y = (torch.arange(h, dtype=torch.float64) - h / 2) / (h / 2)
    x = (torch.arange(w, dtype=torch.float64) - w / 2) / (w / 2)
    return y[:, None], x[None, :]


def birdcage_coil_maps(
    num_coils: int,
    shape: tuple[int, int],
    radius: float = 1.5,
    seed: int | None = None,
    jitter: float = 0.1,
) -> torch.Tensor:
    """Birdcage coil sensitivities ``(C, H, W)`` complex64, normalised to Σ_c |S_c|² = 1 per pixel.

    The model of ``sigpy.mri.birdcage_maps``: coil c sits at angle θ_c = 2πc/C on a circle of
    ``radius`` (relative to the half-FOV, so 1.5 is outside the [-1, 1]² image) at
    (x_c, y_c) = radius · (cos θ_c, sin θ_c), and

        S_c(x, y) = exp(i (atan2(x - x_c, -(y - y_c)) - θ_c)) / sqrt((x - x_c)² + (y - y_c)²),

    magnitude falling as 1/distance, phase turning with the angle around the coil. The maps are
    then divided by their root-sum-of-squares, what SENSE-based data consistency assumes.

    Args:
        num_coils: C >= 1.
        shape: image size ``(H, W)``.
        radius: coil ring radius relative to the half-FOV (> 1 keeps the coils outside the image).
        seed: ``None`` gives sigpy's maps exactly. An int rotates the ring by a random angle
            θ_0 ~ U[0, 2π) (θ_c = θ_0 + 2πc/C, phases rotating with it) and scales each coil's
            distance by an independent factor in [1 - jitter, 1 + jitter], reproducibly.
        jitter: relative spread of the coil distances when ``seed`` is given.
    """
    check_int("num_coils", num_coils, 1, MAX_COILS)
    hw = _check_shape2(shape)
    check_number("radius", radius, 0.0, open_min=True)
    check_number("jitter", jitter, 0.0, 1.0, open_max=True)
    theta = 2 * math.pi * torch.arange(num_coils, dtype=torch.float64) / num_coils
    r = torch.full((num_coils,), float(radius), dtype=torch.float64)
    if seed is not None:
        g = _generator(seed)
        theta = theta + 2 * math.pi * torch.rand((), generator=g, dtype=torch.float64)
        r = r * (1 + jitter * (2 * torch.rand(num_coils, generator=g, dtype=torch.float64) - 1))
    y, x = _grid(hw)
    dx = x[None] - (r * torch.cos(theta))[:, None, None]
    dy = y[None] - (r * torch.sin(theta))[:, None, None]
    phase = torch.atan2(dx, -dy) - theta[:, None, None]
    maps = torch.polar(1 / torch.sqrt(dx**2 + dy**2), phase)
    maps = maps / torch.sqrt((maps.abs() ** 2).sum(0, keepdim=True))
    return maps.to(torch.complex64)


def smooth_phase(
    shape: tuple[int, int], seed: int | None = None, max_phase: float = math.pi / 2, order: int = 3
) -> torch.Tensor:
    """A smooth random phase map ``(H, W)`` float32 with max |φ| = ``max_phase``.

    φ(x, y) = a · Σ_{i+j <= order} c_ij x^i y^j on the [-1, 1)² grid, c_ij ~ N(0, 1) and ``a`` the
    scale that makes the largest |φ| equal ``max_phase``: a low-order field like the slowly varying
    phase of real MR images (B0 inhomogeneity, receiver phase).

    Args:
        shape: ``(H, W)``.
        seed: int for a reproducible map; ``None`` draws from torch's global RNG.
        max_phase: the largest |φ| in radians (>= 0).
        order: the polynomial's total degree (>= 0; 0 is a constant phase).
    """
    hw = _check_shape2(shape)
    check_number("max_phase", max_phase, 0.0)
    check_int("order", order, 0, MAX_PHASE_ORDER)
    g = _generator(seed) if seed is not None else None
    p = torch.arange(order + 1)
    # coef[j, i] multiplies y^j x^i; only total degrees i + j <= order are kept.
    coef = torch.randn(order + 1, order + 1, generator=g, dtype=torch.float64) * (p[:, None] + p[None, :] <= order)
    y, x = _grid(hw)
    phi = (y**p) @ coef @ (x.reshape(-1, 1) ** p).T  # Σ_ij coef[j, i] y^j x^i as a separable (H, W) product
    peak = phi.abs().max()
    phi = phi * (max_phase / peak) if peak > 0 else phi * 0
    return phi.to(torch.float32)


def simulate_multicoil(
    images: torch.Tensor,
    num_coils: int = 8,
    mask: torch.Tensor | None = None,
    noise_std: float = 0.0,
    seed: int = 0,
    phase: bool = True,
    max_phase: float = math.pi / 2,
    random_coils: bool = True,
    radius: float = 1.5,
) -> dict[str, torch.Tensor]:
    """Simulate multi-coil k-space from real images ``(N, H, W)``.

    For each image n (on ``images``' device; all randomness from a CPU ``torch.Generator`` seeded
    with ``seed``, so results do not depend on the device):

    - target x_n = image_n · exp(i φ_n), φ_n = ``smooth_phase`` (or x_n = image_n if ``phase=False``);
    - coil maps S_n = ``birdcage_coil_maps(num_coils, (H, W), radius, seed=s_n)`` with a per-image
      seed s_n (or sigpy's fixed maps for every image if ``random_coils=False``);
    - k-space y_n = M ⊙ (fft2c(S_n ⊙ x_n) + noise), noise complex Gaussian with standard deviation
      ``noise_std`` in each of the real and imaginary parts, zero-filled at full size;
    - zero-filled image Σ_c conj(S_nc) ⊙ ifft2c(y_nc).

    Args:
        images: real ``(N, H, W)`` (e.g. ``load_brain_slices()``).
        num_coils: C.
        mask: 0/1 mask broadcastable to ``(N, C, H, W)``, e.g. a ``(1, W)`` column mask from
            ``mbdl_fast.physics.masks`` or an ``(H, W)`` 2-D mask; ``None`` samples everything.
        noise_std: per-component noise standard deviation (k-space is orthonormal, so it is also
            the image-domain noise level per coil).
        seed: seed of all random draws (phases, coil placement, noise).
        phase: multiply the images by a smooth random phase of at most ``max_phase`` radians.
        random_coils: rotate and jitter the coil ring per image (``False``: sigpy's fixed maps).
        radius: coil ring radius relative to the half-FOV.

    Returns:
        dict with ``"target"`` complex64 ``(N, H, W)``, ``"coil_maps"`` complex64 ``(N, C, H, W)``,
        ``"mask"`` float32, the given mask with ones prepended to 4 dims (``(1, W)`` becomes
        ``(1, 1, 1, W)``, ``(H, W)`` becomes ``(1, 1, H, W)``), ``"kspace"`` complex64
        ``(N, C, H, W)`` and ``"zero_filled"`` complex64 ``(N, H, W)``.
    """
    images = check_real("images", images, "(N, H, W)", 3)
    check_nonempty("images", images, "real (N, H, W)")
    check_finite("images", images)
    check_int("num_coils", num_coils, 1, MAX_COILS)
    check_number("noise_std", noise_std, 0.0)
    check_number("max_phase", max_phase, 0.0)
    check_number("radius", radius, 0.0, open_min=True)
    check_int("seed", seed, 0, 2**63 - 1)
    n, h, w = images.shape
    device = images.device
    if mask is None:
        mask = torch.ones(1, 1, 1, w)
    mask = check_broadcastable("mask", check_tensor("mask", mask), (n, num_coils, h, w), "(N, C, H, W)")
    if mask.is_complex():
        raise TypeError(f"mask: expected a real 0/1 tensor broadcastable to (N, C, H, W), got {mask.dtype}")
    check_finite("mask", mask)
    mask = mask.to(device=device, dtype=torch.float32).reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))

    g = _generator(seed)
    item_seeds = torch.randint(0, 2**62, (n, 2), generator=g).tolist()
    fixed_maps = None if random_coils else birdcage_coil_maps(num_coils, (h, w), radius)
    targets, maps = [], []
    for phase_seed, coil_seed in item_seeds:
        phi = smooth_phase((h, w), seed=phase_seed, max_phase=max_phase) if phase else torch.zeros(h, w)
        targets.append(torch.polar(torch.ones(h, w), phi))
        maps.append(fixed_maps if fixed_maps is not None else birdcage_coil_maps(num_coils, (h, w), radius, coil_seed))
    target = images.to(torch.float32) * torch.stack(targets).to(device)
    coil_maps = torch.stack(maps).to(device)

    kspace = fft2c(coil_maps * target[:, None])
    if noise_std > 0:
        noise = torch.randn((*kspace.shape, 2), generator=g) * noise_std
        kspace = kspace + torch.view_as_complex(noise).to(device)
    kspace = mask * kspace
    zero_filled = (coil_maps.conj() * ifft2c(kspace)).sum(1)
    return {"target": target, "coil_maps": coil_maps, "mask": mask, "kspace": kspace, "zero_filled": zero_filled}


def _item_seed(seed: int, index: int, stream: int) -> int:
    """Independent, reproducible seed for item ``index`` of a dataset seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class MultiCoilBrainDataset(Dataset):
    """Simulated multi-coil acquisitions of the shipped brain slices, one slice per item.

    Item ``i`` is ``simulate_multicoil`` of slice ``i mod n`` of ``load_brain_slices(split, size)``
    (n slices; ``draws`` > 1 repeats every slice with new draws) with its own seeds derived from
    ``(seed, i)``: the same item is identical on every access and every machine, and random masks,
    coil maps and phases differ between items but not between epochs. Each item is the
    dict of ``simulate_multicoil`` without the batch dimension: ``"target"`` ``(H, W)``,
    ``"coil_maps"`` / ``"kspace"`` ``(C, H, W)``, ``"zero_filled"`` ``(H, W)``, ``"mask"``
    ``(1, 1, W)`` (column masks) or ``(1, H, W)`` (2-D), so the default collate gives a mask
    ``(B, 1, 1, W)`` / ``(B, 1, H, W)`` that broadcasts against ``(B, C, H, W)`` k-space; plus
    ``"index"``.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        num_coils: number of coils C.
        acceleration: R, the undersampling factor.
        mask_type: ``"random"`` / ``"equispaced"`` (fastMRI's column masks), ``"uniform"`` (SPADE's
            every-R-th column plus an ACS band; ``center_fraction`` unused) or ``"variable_density"``
            (2-D).
        center_fraction: fully sampled low-frequency fraction.
        size: image size, as ``load_brain_slices`` (``None`` for 256 x 256).
        noise_std: k-space noise standard deviation per real/imaginary part.
        seed: base seed of all random draws.
        phase: multiply the images by a smooth random phase.
        draws: independent acquisitions (mask, coils, phase, noise) of every slice; ``len`` is n * draws.
    """

    def __init__(
        self,
        split: str = "train",
        num_coils: int = 8,
        acceleration: float = 4,
        mask_type: str = "random",
        center_fraction: float = 0.08,
        size: int | tuple[int, int] | None = None,
        noise_std: float = 0.0,
        seed: int = 0,
        phase: bool = True,
        draws: int = 1,
    ) -> None:
        check_int("draws", draws, 1)
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type: expected one of {MASK_TYPES}, got {mask_type!r}")
        check_int("num_coils", num_coils, 1, MAX_COILS)
        check_number("noise_std", noise_std, 0.0)
        check_int("seed", seed, 0, 2**63 - 1)
        self.images = load_brain_slices(split, size)
        self.num_coils = num_coils
        self.acceleration = acceleration
        self.mask_type = mask_type
        self.center_fraction = center_fraction
        self.noise_std = noise_std
        self.seed = seed
        self.phase = phase
        self.draws = draws
        self.mask(0)  # fail now, not in a worker, on an impossible acceleration / center_fraction

    def __len__(self) -> int:
        return self.images.shape[0] * self.draws

    def mask(self, index: int) -> torch.Tensor:
        """The sampling mask of item ``index``: ``(1, W)`` for column masks, ``(H, W)`` for 2-D ones."""
        h, w = self.images.shape[-2:]
        s = _item_seed(self.seed, index, 0)
        if self.mask_type == "random":
            return random_mask(w, self.acceleration, self.center_fraction, seed=s % 2**32)
        if self.mask_type == "equispaced":
            return equispaced_mask(w, self.acceleration, self.center_fraction, seed=s % 2**32)
        if self.mask_type == "uniform":
            return uniform_acs_mask(w, self.acceleration)
        return variable_density_mask((h, w), self.acceleration, self.center_fraction, seed=s % 2**32)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        index = check_int("index", index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index: expected an int in [0, {len(self)}), got {index}")
        index = index % len(self)
        slice_index = index % self.images.shape[0]
        out = simulate_multicoil(
            self.images[slice_index : slice_index + 1],
            num_coils=self.num_coils,
            mask=self.mask(index),
            noise_std=self.noise_std,
            seed=_item_seed(self.seed, index, 1),
            phase=self.phase,
        )
        item: dict[str, torch.Tensor | int] = {k: v[0] for k, v in out.items()}
        item["index"] = index
        return item
