"""Block compressive sensing (ISTA-Net+ / COAST): a Gaussian matrix with orthonormal rows per 33×33 block.

The image ``x`` ``(B, 1, H, W)`` (real; H and W multiples of ``block``) is cut into non-overlapping
``block × block`` patches, taken in row-major order of the block grid (block (i, j) is patch
``i · W/block + j``); each patch is vectorised row-major (pixel (p, q) is entry ``p · block + q``)
and multiplied by Φ ``(m, n)``, n = block²:

    y_b = Φ x_b,   y ``(B, n_blocks, m)``,   A^H y = fold(Φ^T y_b).

Φ Φ^T = I (orthonormal rows), so A^H A is the orthogonal projection Φ^T Φ on every block and

    (I + γ Φ^T Φ)^{-1} = I - γ/(1 + γ) Φ^T Φ,
    prox_l2(z, y, γ) = argmin_x γ/2 ||A x - y||² + 1/2 ||x - z||² = z - γ/(1 + γ) A^H (A z - y).

Images whose sides are not multiples of ``block`` are refused rather than padded: ISTA-Net pads
with zeros on the bottom and right (``torch.nn.functional.pad(x, (0, -W % 33, 0, -H % 33))``),
which the caller can do and undo explicitly.
"""

from __future__ import annotations

import math

import torch

from mbdl_fast._validate import (
    check_finite,
    check_nonempty,
    check_real,
    check_same_device,
    check_step,
    describe,
    value_checks_wanted,
)
from mbdl_fast.physics.base import LinearPhysics

__all__ = ["BlockCS", "ISTA_NET_MEASUREMENTS", "measurement_count", "orthonormal_rows"]

#: Measurements per 33×33 block used by ISTA-Net / ISTA-Net+ / COAST for their CS ratios.
ISTA_NET_MEASUREMENTS: dict[float, int] = {0.01: 10, 0.04: 43, 0.10: 109, 0.25: 272, 0.30: 327, 0.40: 436, 0.50: 545}


def measurement_count(ratio: float, block: int = 33) -> int:
    """Rows m of Φ: ISTA-Net's table for 33×33 blocks at its ratios, else round(ratio · block²) (halves up)."""
    if block == 33:
        for r, m in ISTA_NET_MEASUREMENTS.items():
            if abs(ratio - r) < 1e-9:
                return m
    return max(1, math.floor(ratio * block * block + 0.5))


def orthonormal_rows(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Seeded Gaussian ``(m, n)`` matrix with orthonormal rows, float64 on the CPU.

    The transpose of the Q factor of a ``(n, m)`` standard Gaussian matrix drawn from a CPU
    ``torch.Generator`` seeded with ``seed``; the signs are fixed so that R has a positive diagonal
    (the unique QR), so the result does not depend on the LAPACK build beyond float64 rounding.
    """
    if m > n:
        raise ValueError(f"m: expected at most n = {n} rows for orthonormal rows, got {m}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    gauss = torch.randn(n, m, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return (q * signs).T.contiguous()


class BlockCS(LinearPhysics):
    """Block compressive sensing ``y_b = Φ x_b`` per ``block × block`` patch (see the module docstring).

    Args:
        ratio: CS ratio in (0, 1]; Φ has ``m = measurement_count(ratio, block)`` rows
            (ISTA-Net's 10, 43, 109, 272, 327, 436, 545 for 1, 4, 10, 25, 30, 40, 50 % at block 33).
        block: patch side (33 as ISTA-Net+).
        seed: seed of Φ (``orthonormal_rows(m, block², seed)``): the same on every machine.
        img_size: optional ``(H, W)``; fixes the input size and lets ``A_adjoint(y)`` fold without
            being told the size (``(B, n_blocks, m)`` does not determine H and W).

    ``x``: real float32/float64 ``(B, 1, H, W)``, H and W multiples of ``block``; ``y``:
    ``(B, n_blocks, m)`` of the same dtype. Φ is generated once in float64 and cached per
    (device, dtype) by ``phi``. Inputs are scanned for NaN/Inf (a device sync) except inside solvers,
    which scan once per solve (``mbdl_fast.skip_value_checks``).
    """

    def __init__(
        self,
        ratio: float,
        block: int = 33,
        seed: int = 0,
        img_size: tuple[int, int] | None = None,
        cg_tol: float = 1e-6,
        cg_max_iter: int = 100,
    ) -> None:
        super().__init__(cg_tol=cg_tol, cg_max_iter=cg_max_iter)
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block: expected an int >= 1, got {block!r}")
        self.block = block
        self.img_size = self._check_img_size(img_size)
        self._build(ratio, seed)

    def _build(self, ratio: float, seed: int) -> None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"ratio: expected a number in (0, 1], got {ratio!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        self.ratio = float(ratio)
        self.seed = seed
        self.n = self.block * self.block
        self.m = measurement_count(self.ratio, self.block)
        self._phi64 = orthonormal_rows(self.m, self.n, seed)
        self._phi_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # -- parameters -------------------------------------------------------------------------------
    def _set_ratio(self, ratio: float) -> None:
        self._build(ratio, self.seed)

    def _set_seed(self, seed: int) -> None:
        self._build(self.ratio, seed)

    def _set_img_size(self, img_size: tuple[int, int] | None) -> None:
        self.img_size = self._check_img_size(img_size)

    def phi(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """Φ ``(m, block²)`` in ``dtype`` on ``device`` (cast from the float64 original, cached)."""
        device = torch.device(device)
        key = (device, dtype)
        hit = self._phi_cache.get(key)
        if hit is None:
            hit = self._phi64.to(device=device, dtype=dtype)
            self._phi_cache[key] = hit
        return hit

    # -- the operator -----------------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        """``x`` ``(B, 1, H, W)`` -> ``y`` ``(B, (H/block)(W/block), m)``."""
        self._check_image("x", x)
        B, _, H, W = x.shape
        b = self.block
        patches = x.reshape(B, H // b, b, W // b, b).transpose(2, 3).reshape(B, -1, self.n)
        return patches @ self.phi(x.dtype, x.device).T

    def A_adjoint(self, y: torch.Tensor, img_size: tuple[int, int] | None = None) -> torch.Tensor:  # noqa: N802
        """``y`` ``(B, n_blocks, m)`` -> ``x`` ``(B, 1, H, W)``: Φ^T per block, then fold.

        ``img_size`` ``(H, W)`` defaults to the one given at construction; one of them is needed.
        """
        H, W = self._fold_size(y, img_size)
        B = y.shape[0]
        b = self.block
        patches = y @ self.phi(y.dtype, y.device)
        return patches.reshape(B, H // b, W // b, b, b).transpose(2, 3).reshape(B, 1, H, W)

    def A_adjoint_A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """A^H A x (the block projection Φ^T Φ), folding to the size of ``x``."""
        return self.A_adjoint(self.A(x), img_size=tuple(x.shape[-2:]))

    def initial(self, y: torch.Tensor, img_size: tuple[int, int] | None = None) -> torch.Tensor:
        """ISTA-Net's non-learned initialisation x0 = A^H y = fold(Φ^T y_b)."""
        return self.A_adjoint(y, img_size=img_size)

    def dc_step_reference(self, x: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """x - γ A^H(A x - y) in plain PyTorch, folding to the size of ``x``."""
        self._check_pair("x", x, y)
        g = _gamma_in_measurement_space(gamma, y)
        return x - self.A_adjoint(g * (self.A(x) - y), img_size=tuple(x.shape[-2:]))

    def prox_l2_reference(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """argmin_x γ/2 ||A x - y||² + 1/2 ||x - z||² = z - γ/(1+γ) A^H(A z - y) (exact since Φ Φ^T = I).

        ``gamma``: a scalar or one step per sample ``(B,)``.
        """
        self._check_pair("z", z, y)
        g = _gamma_in_measurement_space(gamma, y)
        return z - self.A_adjoint((g / (1 + g)) * (self.A(z) - y), img_size=tuple(z.shape[-2:]))

    # -- checks -----------------------------------------------------------------------------------
    def _check_img_size(self, img_size: object) -> tuple[int, int] | None:
        if img_size is None:
            return None
        try:
            H, W = (int(v) for v in img_size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"img_size: expected (H, W) or None, got {img_size!r}") from None
        b = self.block
        if H < 1 or W < 1 or H % b or W % b:
            raise ValueError(f"img_size: expected positive (H, W), multiples of block={b}, got {img_size!r}")
        return (H, W)

    def _check_image(self, name: str, x: object) -> None:
        x = check_real(name, x, "(B, 1, H, W)", 4)
        b = self.block
        H, W = x.shape[-2:]
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}: expected float32 or float64 (B, 1, H, W), got {describe(x)}")
        if x.shape[1] != 1:
            raise ValueError(f"{name}: expected one channel (B, 1, H, W), got {describe(x)}")
        check_nonempty(name, x, "real (B, 1, H, W)")
        if value_checks_wanted():
            check_finite(name, x)
        if H % b or W % b:
            raise ValueError(
                f"{name}: expected H and W multiples of block={b}, got (H, W) = ({H}, {W}) ({describe(x)}); "
                "pad the image first (ISTA-Net pads bottom/right with zeros)"
            )
        if self.img_size is not None and (H, W) != self.img_size:
            raise ValueError(f"{name}: expected (H, W) = {self.img_size} (img_size), got {describe(x)}")

    def _check_measurement(self, name: str, y: object) -> None:
        y = check_real(name, y, "(B, n_blocks, m)", 3)
        if y.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}: expected float32 or float64 (B, n_blocks, m), got {describe(y)}")
        if y.shape[-1] != self.m:
            raise ValueError(f"{name}: expected (B, n_blocks, m={self.m}), got {describe(y)}")
        check_nonempty(name, y, f"(B, n_blocks, m={self.m})")
        if value_checks_wanted():
            check_finite(name, y)

    def _fold_size(self, y: object, img_size: tuple[int, int] | None) -> tuple[int, int]:
        self._check_measurement("y", y)
        size = self._check_img_size(img_size) if img_size is not None else self.img_size
        if size is None:
            raise ValueError(
                "img_size: needed to fold (B, n_blocks, m) measurements back into an image; "
                "pass img_size=(H, W) to BlockCS(...) or to A_adjoint/initial"
            )
        n_blocks = (size[0] // self.block) * (size[1] // self.block)
        if y.shape[1] != n_blocks:
            raise ValueError(f"y: expected (B, n_blocks={n_blocks}, m={self.m}) for img_size={size}, got {describe(y)}")
        return size

    def _check_pair(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self._check_image(name, x)
        self._check_measurement("y", y)
        B, _, H, W = x.shape
        expected = (B, (H // self.block) * (W // self.block), self.m)
        if tuple(y.shape) != expected:
            raise ValueError(f"y: expected {expected} (the measurements of {name}), got {describe(y)}")
        check_same_device([(name, x), ("y", y)])

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, m={self.m}, block={self.block}, seed={self.seed}, img_size={self.img_size}"


def _gamma_in_measurement_space(gamma: float | torch.Tensor, y: torch.Tensor) -> float | torch.Tensor:
    """A step >= 0 (``check_step``), a scalar or one per sample ``(B,)`` viewed as ``(B, 1, 1)`` against ``y``."""
    check_step("gamma", gamma, y.shape[0], value_checks_wanted())
    if isinstance(gamma, torch.Tensor):
        return gamma.to(y.dtype).reshape(-1, 1, 1) if gamma.dim() == 1 else gamma.to(y.dtype)
    return gamma
