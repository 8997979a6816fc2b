"""Cartesian MRI: single-coil ``MRI`` and multi-coil ``MultiCoilMRI`` (SENSE).

    A x   = M ⊙ F_c (S_c ⊙ x)              x: (B, H, W) complex64 -> y: (B, C, H, W) complex64
    A^H y = Σ_c conj(S_c) ⊙ F_c^H (M ⊙ y_c)

F_c is fastMRI's centered orthonormal 2-D FFT, M a real mask broadcast against k-space (zero-filled,
full size), S the coil maps (single coil: S = 1, C = 1). When M varies along one image axis only
(Cartesian lines), F_c^H M² F_c transforms along that axis only: the other 1-D FFTs cancel. The
normal operator and the DC step with a precomputed A^H y use that.

Layouts: ``layout="complex"`` (default) takes complex tensors; ``layout="real_packed"`` takes
deepinv's real (B, 2, H, W) images and returns real (B, 2, C, H, W) k-space (single-coil ``MRI``:
(B, 2, H, W), as deepinv's ``MRI``), converting exactly at the boundary. A real tensor given to a complex-layout operator is an error, not a silent FFT.
"""

from __future__ import annotations

import torch

from mbdl_fast._validate import (
    check_broadcastable,
    check_complex,
    check_finite,
    check_nonempty,
    check_real,
    check_same_device,
    check_tensor,
    describe,
    value_checks_wanted,
)
from mbdl_fast.complex import from_real_packed, to_real_packed
from mbdl_fast.fft import fftc, ifftc
from mbdl_fast.physics.base import LinearPhysics, _gamma_view
from mbdl_fast.physics.masks import mask_axes

_LAYOUTS = ("complex", "real_packed")


class MultiCoilMRI(LinearPhysics):
    """Multi-coil Cartesian MRI with known coil maps.

    Args:
        mask: real sampling mask broadcastable to k-space (B, C, H, W); leading dims 1 or B, coil dim 1.
            Column masks ``(1, W)`` from ``mbdl_fast.physics.masks`` are the usual input.
        coil_maps: complex64 (B, C, H, W) (or (1, C, H, W) shared by the batch); ``None`` means a single coil.
        layout: "complex" or "real_packed" (deepinv's (B, 2, ...) real tensors).
        cg_tol, cg_max_iter: tolerance (relative residual) and iteration cap of the CG prox.
    """

    def __init__(
        self,
        mask: torch.Tensor,
        coil_maps: torch.Tensor | None = None,
        layout: str = "complex",
        cg_tol: float = 1e-6,
        cg_max_iter: int = 50,
    ) -> None:
        super().__init__(cg_tol=cg_tol, cg_max_iter=cg_max_iter)
        if layout not in _LAYOUTS:
            raise ValueError(f"layout: expected one of {_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.coil_maps: torch.Tensor | None = None
        self._set_coil_maps(coil_maps)
        self._set_mask(mask)

    # -- parameters -----------------------------------------------------------------------------
    def _set_mask(self, mask: torch.Tensor) -> None:
        check_real("mask", mask, "(..., H, W) broadcastable to k-space (B, C, H, W)", (1, 2, 3, 4))
        check_finite("mask", mask)
        if mask.dim() == 1:
            mask = mask.reshape(1, -1)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if mask.shape[1] != 1:
            raise ValueError(f"mask: expected coil dim 1 (the same mask for every coil), got {describe(mask)}")
        if self.coil_maps is not None:
            check_same_device([("coil_maps", self.coil_maps), ("mask", mask)])
        # float64 is kept (a soft mask rounded to float32 would be off by 1e-8 in complex128 results); each
        # operator casts it to the precision of its data (``mask_for``), so it never promotes complex64 data.
        # Always a copy: the cached axes below must describe this mask even if the caller's buffer changes later.
        self.mask = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32, copy=True)
        self._mask_axes = mask_axes(self.mask, mask.shape[-2], mask.shape[-1])

    def _set_coil_maps(self, coil_maps: torch.Tensor | None) -> None:
        if coil_maps is not None:
            check_complex("coil_maps", coil_maps, "(B, C, H, W)", 4)
            if coil_maps.dtype not in (torch.complex64, torch.complex128):
                raise TypeError(f"coil_maps: expected complex64 (B, C, H, W), got {describe(coil_maps)}")
            check_nonempty("coil_maps", coil_maps, "complex64 (B, C, H, W)")
            check_finite("coil_maps", coil_maps)
        self.coil_maps = coil_maps

    def mask_for(self, t: torch.Tensor) -> torch.Tensor:
        """The mask in the real precision of ``t`` (complex64 -> float32, complex128 -> float64)."""
        return self.mask.to(t.real.dtype) if t.is_complex() else self.mask.to(t.dtype)

    @property
    def num_coils(self) -> int:
        return 1 if self.coil_maps is None else self.coil_maps.shape[1]

    def transform_dims(self, height: int, width: int) -> tuple[int, ...]:
        """Axes the normal operator must transform: those along which the mask varies (never none)."""
        axes = self._mask_axes if self.mask.shape[-2] in (1, height) and self.mask.shape[-1] in (1, width) else (-2, -1)
        return axes if axes else (-1,)

    # -- argument checks ------------------------------------------------------------------------
    def _image_in(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Accept (B, H, W) or (B, 1, H, W) complex (or (B, 2, H, W) real-packed); return (B, H, W)."""
        check_tensor(name, x)
        if self.layout == "real_packed":
            check_real(name, x, "real-packed (B, 2, H, W)", 4)
            x = from_real_packed(x)
            return self._check_image(name, x), False
        check_complex(name, x, "(B, H, W) or (B, 1, H, W)", (3, 4))
        channel = x.dim() == 4
        if channel:
            if x.shape[1] != 1:
                raise ValueError(f"{name}: expected complex (B, H, W) or (B, 1, H, W), got {describe(x)}")
            x = x[:, 0]
        return self._check_image(name, x), channel

    def _check_image(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.complex64 and x.dtype != torch.complex128:
            raise TypeError(f"{name}: expected complex64 (B, H, W), got {describe(x)}")
        check_nonempty(name, x, "complex (B, H, W)")
        if self.coil_maps is not None and self.coil_maps.dtype != x.dtype:
            raise TypeError(f"coil_maps: expected {x.dtype} like {name}, got {describe(self.coil_maps)}")
        b, h, w = x.shape
        check_broadcastable("mask", self.mask, (b, 1, h, w), f"the k-space (B, C, H, W) of {name}")
        check_same_device([(name, x), ("mask", self.mask)])
        if self.coil_maps is not None:
            check_same_device([(name, x), ("coil_maps", self.coil_maps)])
            if self.coil_maps.shape[0] not in (1, b) or tuple(self.coil_maps.shape[-2:]) != (h, w):
                raise ValueError(
                    f"coil_maps: expected complex64 ({b}, C, {h}, {w}) (or batch 1) to match {name} {describe(x)}, "
                    f"got {describe(self.coil_maps)}"
                )
        if value_checks_wanted():
            check_finite(name, x)
        return x

    def _image_out(self, x: torch.Tensor, channel: bool) -> torch.Tensor:
        if self.layout == "real_packed":
            return to_real_packed(x)
        return x.unsqueeze(1) if channel else x

    def _kspace_in(
        self, name: str, y: torch.Tensor, image: torch.Tensor | None = None, any_coils: bool = False
    ) -> torch.Tensor:
        """Complex k-space (B, C, H, W) from ``y`` in this operator's layout, C = ``num_coils`` unless ``any_coils``."""
        check_tensor(name, y)
        if self.layout == "real_packed":
            check_real(name, y, "real-packed (B, 2, C, H, W)", 5)
            y = from_real_packed(y)
        else:
            check_complex(name, y, "k-space (B, C, H, W)", 4)
        check_nonempty(name, y, "k-space (B, C, H, W)")
        if value_checks_wanted():
            check_finite(name, y)
        if not any_coils and y.shape[1] != self.num_coils:
            raise ValueError(
                f"{name}: expected k-space (B, {self.num_coils}, H, W) ({self.num_coils} coils), got {describe(y)}"
            )
        if image is not None and (y.shape[0] != image.shape[0] or y.shape[-2:] != image.shape[-2:]):
            b, h, w = image.shape
            raise ValueError(
                f"{name}: expected k-space ({b}, {self.num_coils}, {h}, {w}) to match the image, got {describe(y)}"
            )
        check_same_device([(name, y), ("mask", self.mask)])
        if image is None:
            self._check_image(name, y[:, 0])
        return y

    def _kspace_out(self, y: torch.Tensor) -> torch.Tensor:
        return to_real_packed(y) if self.layout == "real_packed" else y

    # -- plain PyTorch operators (the reference) ------------------------------------------------
    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        """S ⊙ x: (B, H, W) -> (B, C, H, W)."""
        return x.unsqueeze(1) if self.coil_maps is None else self.coil_maps * x.unsqueeze(1)

    def _combine(self, z: torch.Tensor) -> torch.Tensor:
        """Σ_c conj(S_c) ⊙ z_c: (B, C, H, W) -> (B, H, W)."""
        return z[:, 0] if self.coil_maps is None else torch.sum(self.coil_maps.conj() * z, dim=1)

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """y = M ⊙ F_c(S ⊙ x): (B, H, W) complex -> (B, C, H, W) complex."""
        x, _ = self._image_in("x", x)
        return self._kspace_out(self.mask_for(x) * fftc(self._expand(x)))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """x = Σ_c conj(S_c) F_c^H(M ⊙ y_c): (B, C, H, W) complex -> (B, H, W) complex."""
        y = self._kspace_in("y", y)
        return self._image_out(self._combine(ifftc(self.mask_for(y) * y)), False)

    def A_adjoint_A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """A^H A x = Σ_c conj(S_c) F^H M² F (S_c x), transforming only the axes the mask varies along."""
        x, channel = self._image_in("x", x)
        dims = self.transform_dims(x.shape[-2], x.shape[-1])
        m = self.mask_for(x)
        m2 = m if self._mask_is_binary() else m * m
        return self._image_out(self._combine(ifftc(m2 * fftc(self._expand(x), dims), dims)), channel)

    def _mask_is_binary(self) -> bool:
        return bool(((self.mask == 0) | (self.mask == 1)).all())

    def dc_step_reference(self, x: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """x - gamma A^H(A x - y), literally (2-D FFTs): the definition the fast paths are checked against."""
        x, channel = self._image_in("x", x)
        y = self._kspace_in("y", y, x)
        m = self.mask_for(x)
        residual = m * fftc(self._expand(x)) - y
        out = x - _gamma_view(gamma, x) * self._combine(ifftc(m * residual))
        return self._image_out(out, channel)

    def prox_l2(
        self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor, backend: str = "auto"
    ) -> torch.Tensor:
        """argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||² through ``backend`` (see ``mbdl_fast.prox_l2``).

        Single coil, closed form: x = F_c^H [(F_c z + gamma M y) / (1 + gamma M²)] (fused: one k-space pass between
        two FFTs). Multi-coil: CG on (I + gamma A^H A) x = z + gamma A^H y (``cg_tol``, ``cg_max_iter``; fused: the
        DC step of the backend as the normal operator). ``backend="torch"`` is :meth:`prox_l2_reference`.
        """
        from mbdl_fast.prox import prox_l2

        return prox_l2(self, z, y, gamma, backend=backend)

    def prox_l2_reference(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||², in plain PyTorch: the definition the fast paths are checked
        against.

        Single coil, closed form: x = F_c^H [(F_c z + gamma M y) / (1 + gamma M²)].
        Multi-coil: CG on (I + gamma A^H A) x = z + gamma A^H y (``cg_tol``, ``cg_max_iter``).
        """
        if self.coil_maps is not None:
            return super().prox_l2(z, y, gamma)
        z_img, channel = self._image_in("z", z)
        y = self._kspace_in("y", y, z_img)
        g = _gamma_view(gamma, y)
        m = self.mask_for(z_img)
        x = ifftc((fftc(z_img.unsqueeze(1)) + g * m * y) / (1 + g * m * m))[:, 0]
        return self._image_out(x, channel)


class MRI(MultiCoilMRI):
    """Single-coil Cartesian MRI: A x = M ⊙ F_c x, k-space (B, 1, H, W). Closed-form prox.

    With ``layout="real_packed"`` the k-space is deepinv's single-coil ``(B, 2, H, W)`` (as ``deepinv.physics.MRI``);
    ``(B, 2, 1, H, W)`` is accepted as input too.
    """

    def __init__(self, mask: torch.Tensor, layout: str = "complex") -> None:
        super().__init__(mask, coil_maps=None, layout=layout)

    def _kspace_in(
        self, name: str, y: torch.Tensor, image: torch.Tensor | None = None, any_coils: bool = False
    ) -> torch.Tensor:
        if self.layout == "real_packed" and isinstance(y, torch.Tensor) and y.dim() == 4:
            y = y.unsqueeze(2)  # deepinv's single-coil (B, 2, H, W)
        return super()._kspace_in(name, y, image, any_coils)

    def _kspace_out(self, y: torch.Tensor) -> torch.Tensor:
        out = super()._kspace_out(y)
        return out[:, :, 0] if self.layout == "real_packed" and y.shape[1] == 1 else out

    def _set_coil_maps(self, coil_maps: torch.Tensor | None) -> None:
        if coil_maps is not None:
            raise ValueError("coil_maps: single-coil MRI takes none; use MultiCoilMRI")
        self.coil_maps = None
