"""Coil sensitivity estimation from k-space: ESPIRiT (Uecker et al., MRM 2014), batched, any device.

ESPIRiT in five steps, all batched tensor operations (the same computation as sigpy's
``EspiritCalib``, which the tests compare against):

1. Calibration matrix: every ``k x k`` window (k = ``kernel_width``) of the fully sampled centre of
   k-space, all coils, one row per window position: A_cal of shape (windows, C k²).
2. Signal subspace: the right singular vectors of A_cal whose singular values exceed
   ``threshold`` times the largest; P = Σ_kept v_k v_kᴴ is the projector onto it (C k² x C k²).
3. Image-domain Gram: the kernels v_k, zero-padded to (H, W) and inverse-FFT'd, give per pixel r

       G(r) = (H W / k²) Σ_kept v_k(r) v_k(r)ᴴ      (C x C, Hermitian),

   computed without forming any kernel image: G_{cc'}(r) sums P over kernel-offset pairs with the
   same difference Δ = t - t' (a (2k-1)² stencil per coil pair), then one centred inverse FFT per
   coil pair, C² in all.
4. Maps: the eigenvector of G(r) with the largest eigenvalue, per pixel (one batched ``eigh`` of
   (B H W) C x C matrices), its phase referred to coil 0.
5. Crop: maps are zero where that eigenvalue is <= ``crop`` (outside the object it falls towards 0).

Inside the object Σ_c |S_c|² = 1 per pixel, the normalisation the SENSE operators assume.

Maps are unique only up to a common phase per pixel: S_c e^{iφ} reconstructs the image x e^{-iφ}, of the same
magnitude. ``align_phase`` picks φ so that a given reconstruction becomes real and non-negative.
"""

from __future__ import annotations

import math

import torch

from mbdl_fast._validate import check_complex, check_finite, describe

__all__ = ["align_phase", "calibration_shape", "coil_support", "espirit"]


def _centred_box(n: int, size: int) -> slice:
    """Indices of a length-``size`` window centred on index n // 2 (sigpy's ``resize`` convention)."""
    start = n // 2 - size // 2
    return slice(start, start + size)


def _growth_order(n: int, size: int) -> torch.Tensor:
    """The index that ``_centred_box(n, s)`` adds to ``_centred_box(n, s - 1)``, for s = 1..size."""
    return torch.tensor([n // 2 - s // 2 if s % 2 == 0 else n // 2 + s // 2 for s in range(1, size + 1)])


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def calibration_shape(
    kspace: torch.Tensor, calib_width: int | tuple[int, int] = 24, kernel_width: int = 6
) -> tuple[int, int]:
    """The ``(h, w)`` calibration region ``espirit`` uses: the largest centred box, at most ``calib_width``
    per side, whose k-space points are sampled in every image of the batch.

    A point counts as sampled where any coil is non-zero (undersampled k-space is zero-filled). Fully
    sampled k-space gives ``calib_width`` x ``calib_width``, as sigpy; a Cartesian ACS band of n lines
    gives ``calib_width`` x n. Raises ``ValueError`` when a side is shorter than ``kernel_width``.

    Args:
        kspace: complex ``(B, C, H, W)``.
        calib_width: the largest side, an int or ``(h, w)``.
        kernel_width: the ESPIRiT kernel size k.
    """
    kspace = check_complex("kspace", kspace, "(B, C, H, W)", 4)
    _check_int("kernel_width", kernel_width, 1)
    widths = (calib_width, calib_width) if isinstance(calib_width, int) else tuple(calib_width)
    if len(widths) != 2:
        raise ValueError(f"calib_width: expected an int or a pair (h, w) of ints, got {calib_width!r}")
    for w in widths:
        _check_int("calib_width", w, kernel_width)
    _, _, height, width = kspace.shape
    cap_h, cap_w = min(widths[0], height), min(widths[1], width)
    sampled = (kspace != 0).any(dim=1).all(dim=0).cpu()  # (H, W), common to the batch
    # Centred boxes are nested: box(n + 1) adds one line to box(n). Ordering rows and columns by when they
    # join, box(h) x box(w) is fully sampled iff the leading h x w block of the reordered grid is.
    block = sampled[_growth_order(height, cap_h)][:, _growth_order(width, cap_w)].to(torch.int64)
    widest = block.cumprod(dim=0).cumprod(dim=1).sum(dim=1)  # for each h, the widest fully sampled w
    area = torch.arange(1, cap_h + 1) * widest
    h = int(area.argmax()) + 1
    best = (h, int(widest[h - 1]))
    if min(best) < kernel_width:
        raise ValueError(
            f"kspace: the fully sampled centre is {best[0]} x {best[1]} points, smaller than kernel_width="
            f"{kernel_width} on a side ({describe(kspace)}); sample a wider ACS band or use a smaller kernel"
        )
    return best


def _difference_index(k: int, device: torch.device) -> torch.Tensor:
    """For kernel offsets t, t' (k² each, row-major), the flat index of Δ = t - t' in the (2k-1)² stencil."""
    ty, tx = torch.meshgrid(torch.arange(k, device=device), torch.arange(k, device=device), indexing="ij")
    ty, tx = ty.reshape(-1), tx.reshape(-1)
    dy = ty[:, None] - ty[None, :] + k - 1
    dx = tx[:, None] - tx[None, :] + k - 1
    return (dy * (2 * k - 1) + dx).reshape(-1)


def espirit(
    kspace: torch.Tensor,
    calib_width: int | tuple[int, int] = 24,
    kernel_width: int = 6,
    threshold: float = 0.02,
    crop: float = 0.95,
) -> torch.Tensor:
    """ESPIRiT coil maps (one set) from multi-coil k-space (see the module docstring for the maths).

    Args:
        kspace: complex ``(B, C, H, W)``, centred (fastMRI's ``fft2c`` layout), fully sampled or zero-filled
            with a fully sampled centre (an ACS band); the calibration region is ``calibration_shape``.
        calib_width: the largest side of the calibration region, an int or ``(h, w)`` (24, as sigpy).
        kernel_width: the kernel size k (6); H and W must be at least 2k - 1.
        threshold: keep the singular vectors of the calibration matrix above ``threshold`` times the largest.
        crop: zero the maps where the largest eigenvalue is <= ``crop`` (outside the object); 0 keeps all.

    Returns:
        complex64 ``(B, C, H, W)`` maps on ``kspace``'s device, unit norm over coils where not cropped, the
        phase of coil 0 removed (as sigpy's ``EspiritCalib``).
    """
    kspace = check_complex("kspace", kspace, "(B, C, H, W)", 4)
    check_finite("kspace", kspace)
    _check_int("kernel_width", kernel_width, 1)
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a number in (0, 1), got {threshold!r}")
    if not 0 <= crop < 1:
        raise ValueError(f"crop: expected a number in [0, 1), got {crop!r}")
    b, c, height, width = kspace.shape
    k = kernel_width
    if min(height, width) < 2 * k - 1:
        raise ValueError(f"kspace: expected H and W >= 2 * kernel_width - 1 = {2 * k - 1}, got {describe(kspace)}")
    cal_h, cal_w = calibration_shape(kspace, calib_width, k)
    calib = kspace[..., _centred_box(height, cal_h), _centred_box(width, cal_w)].to(torch.complex64)

    # 1-2. Calibration matrix (windows, C k²) with sigpy's column order (coil, ky, kx), its signal subspace.
    windows = calib.unfold(2, k, 1).unfold(3, k, 1)  # (B, C, nh, nw, k, k)
    matrix = windows.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * k * k)
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
    kept = (singular > threshold * singular[:, :1]).to(vh.dtype)
    # P[a, a'] = Σ_kept vh[j, a] conj(vh[j, a']): sigpy's kernels are the rows of vh.
    projector = vh.transpose(-2, -1) @ (kept[..., None] * vh.conj())

    # 3. Gram stencil per coil pair c >= c' (G is Hermitian; eigh reads its lower triangle only): sum P over
    # kernel offsets (t, t') with the same difference t - t'.
    d = 2 * k - 1
    rows, cols = torch.tril_indices(c, c, device=kspace.device)
    pairs = projector.reshape(b, c, k * k, c, k * k).permute(0, 1, 3, 2, 4)[:, rows, cols].reshape(b, -1, k**4)
    stencil = torch.zeros(b, rows.numel(), d * d, dtype=pairs.dtype, device=pairs.device)
    stencil.index_add_(-1, _difference_index(k, pairs.device), pairs)
    # sigpy's Gram Σ_j v_j(r) v_j(r)^H, v_j the orthonormal centred IFFT of kernel j, times H W / k², equals
    # Σ_Δ stencil(Δ) e^{2πi Δ·(r - N/2)/N} / k²: an unnormalised plain IFFT of the stencil placed at Δ mod N
    # and multiplied by e^{-2πi Δ·(N/2)/N}, which spares the centred FFT's full-size sign passes.
    offsets = torch.arange(-(k - 1), k, device=pairs.device)
    phase_h = torch.exp(-2j * math.pi * offsets * (height // 2) / height)
    phase_w = torch.exp(-2j * math.pi * offsets * (width // 2) / width)
    stencil = stencil.reshape(b, -1, d, d) * ((phase_h[:, None] * phase_w[None, :]) / (k * k)).to(pairs.dtype)
    placed = torch.zeros(b, rows.numel(), height, width, dtype=pairs.dtype, device=pairs.device)
    placed[..., (offsets % height)[:, None], (offsets % width)[None, :]] = stencil
    gram = torch.fft.ifft2(placed, norm="forward").permute(0, 2, 3, 1)  # (B, H, W, pairs)

    # 4-5. Largest eigenpair per pixel. Since G is positive semi-definite, λ_max <= ||G||_F: pixels with
    # ||G||_F <= crop are cropped without an eigen-decomposition (outside the object, about half the image).
    weight = torch.where(rows == cols, 1.0, 2.0).to(gram.real.dtype)
    need = (gram.real.square() + gram.imag.square()) @ weight > crop * crop
    selected = torch.zeros(int(need.sum()), c, c, dtype=gram.dtype, device=gram.device)
    selected[:, rows, cols] = gram[need]
    eigenvalues, eigenvectors = torch.linalg.eigh(selected, UPLO="L")
    vectors = eigenvectors[..., -1]  # (N, C), unit norm
    ref = vectors[:, :1]
    magnitude = ref.abs()
    vectors = vectors * torch.where(
        magnitude > 0, ref.conj() / magnitude.clamp_min(torch.finfo(magnitude.dtype).tiny), 1
    )
    maps = torch.zeros(b, height, width, c, dtype=gram.dtype, device=gram.device)
    maps[need] = vectors * (eigenvalues[:, -1:] > crop)
    return maps.permute(0, 3, 1, 2).contiguous().to(torch.complex64)


def align_phase(maps: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Coil maps S_c e^{iφ}, φ = arg(image): the same SENSE model, with ``image``'s phase moved into the maps.

    With the new maps every reconstruction x becomes x e^{-iφ}: its magnitude is unchanged (so are CG-SENSE and
    zero-filled magnitudes, whose iterates are multiplied by e^{-iφ} exactly), and ``image`` itself becomes
    real and non-negative. A learned prior trained on smooth-phase images then sees a nearly real image instead
    of the scan's own phase (B0 and coil-0 phase wraps). Where ``image`` is 0 the maps are kept.

    Args:
        maps: complex ``(B, C, H, W)`` coil maps (e.g. ``espirit``'s).
        image: complex ``(B, H, W)`` reconstruction with these maps (e.g. CG-SENSE of the undersampled scan).

    Returns:
        complex ``(B, C, H, W)`` maps, Σ_c |S_c|² unchanged.
    """
    maps = check_complex("maps", maps, "(B, C, H, W)", 4)
    image = check_complex("image", image, "(B, H, W)", 3)
    if image.shape != (maps.shape[0], *maps.shape[2:]):
        raise ValueError(
            f"image: expected complex (B, H, W) = {(maps.shape[0], *maps.shape[2:])}, got {describe(image)}"
        )
    check_finite("image", image)
    magnitude = image.abs()
    phase = torch.where(magnitude > 0, image / magnitude.clamp_min(torch.finfo(magnitude.dtype).tiny), 1)
    return maps * phase[:, None].to(maps.dtype)


def coil_support(maps: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, H, W)``: the pixels some coil sees, Σ_c |S_c|² > 0, for complex maps ``(B, C, H, W)``.

    ESPIRiT crops its maps to zero outside the object; there the SENSE model A = M F S cannot see the image at
    all (zero-filled and CG-SENSE images are 0 there by construction), and no measurement-based loss can
    constrain what a learned prior puts there.
    """
    maps = check_complex("maps", maps, "(B, C, H, W)", 4)
    return (maps.real.square() + maps.imag.square()).sum(1) > 0
