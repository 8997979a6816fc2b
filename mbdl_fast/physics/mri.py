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
    run_unchecked,
    value_checks_wanted,
)
from mbdl_fast.complex import from_real_packed, to_real_packed
from mbdl_fast.fft import fftc, ifftc
from mbdl_fast.linalg import solve_hpd
from mbdl_fast.ops.dc_step import OP as DC_STEP_OP
from mbdl_fast.ops.dc_step import mri_dc_step_op, mri_dc_step_ref
from mbdl_fast.ops.mri_forward import coil_combine, coil_expand, mri_adjoint_ref, mri_forward_ref
from mbdl_fast.ops.mri_prox import OP as PROX_OP
from mbdl_fast.ops.mri_prox import mri_prox_l2_op, mri_prox_l2_ref
from mbdl_fast.physics.base import LinearPhysics, _gamma_view, dc_step_arguments, dc_step_torch, prox_l2_arguments
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

    # -- the boundary between the caller's layout and complex (B, H, W) / (B, C, H, W), with the checks -------
    def image_in(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Accept (B, H, W) or (B, 1, H, W) complex (or (B, 2, H, W) real-packed); return complex (B, H, W) and
        whether a channel axis was given (for :meth:`image_out`)."""
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

    def image_out(self, x: torch.Tensor, channel: bool) -> torch.Tensor:
        """Complex (B, H, W) back to this operator's layout (with the channel axis when :meth:`image_in` saw one)."""
        if self.layout == "real_packed":
            return to_real_packed(x)
        return x.unsqueeze(1) if channel else x

    def kspace_in(
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

    def kspace_out(self, y: torch.Tensor) -> torch.Tensor:
        """Complex k-space (B, C, H, W) in this operator's layout."""
        return to_real_packed(y) if self.layout == "real_packed" else y

    # -- plain PyTorch operators (the reference): the ops' references on this operator's tensors ---
    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """y = M ⊙ F_c(S ⊙ x): (B, H, W) complex -> (B, C, H, W) complex."""
        x, _ = self.image_in("x", x)
        return self.kspace_out(mri_forward_ref(x, self.coil_maps, self.mask_for(x)))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """x = Σ_c conj(S_c) F_c^H(M ⊙ y_c): (B, C, H, W) complex -> (B, H, W) complex."""
        y = self.kspace_in("y", y)
        return self.image_out(mri_adjoint_ref(y, self.coil_maps, self.mask_for(y)), False)

    def A_adjoint_A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        """A^H A x = Σ_c conj(S_c) F^H M² F (S_c x), transforming only the axes the mask varies along."""
        x, channel = self.image_in("x", x)
        dims = self.transform_dims(x.shape[-2], x.shape[-1])
        m = self.mask_for(x)
        m2 = m if self.mask_is_binary() else m * m
        normal = coil_combine(ifftc(m2 * fftc(coil_expand(x, self.coil_maps), dims), dims), self.coil_maps)
        return self.image_out(normal, channel)

    def mask_is_binary(self) -> bool:
        """True when every mask entry is 0 or 1 (then M² = M); a host synchronisation."""
        return bool(((self.mask == 0) | (self.mask == 1)).all())

    def dc_step_reference(self, x: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """x - gamma A^H(A x - y), literally (2-D FFTs): the definition the fast paths are checked against."""
        x, channel = self.image_in("x", x)
        y = self.kspace_in("y", y, x)
        out = mri_dc_step_ref(x, self.coil_maps, self.mask_for(x), y, None, _gamma_view(gamma, x))
        return self.image_out(out, channel)

    def dc_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        gamma: float | torch.Tensor,
        backend: str = "auto",
        AHy: torch.Tensor | None = None,
        check_inputs: bool = True,
    ) -> torch.Tensor:
        """x - gamma A^H(A x - y) by ``backend``: "torch" is :meth:`dc_step_reference` (or x - gamma (A^H A x - AHy)
        with ``AHy``), the others the fused op ``mbdl_fast.ops.dc_step`` on complex64 (arguments: ``mbdl_fast.dc_step``)."""
        name = dc_step_arguments(x, y, gamma, AHy, backend, DC_STEP_OP, check_inputs)
        return run_unchecked(self._dc_step_by, name, x, y, gamma, AHy)

    def _dc_step_by(
        self, backend: str, x: torch.Tensor, y_in: torch.Tensor | None, gamma: float | torch.Tensor, ahy_in
    ) -> torch.Tensor:
        img, channel = self.image_in("x", x)
        y = None if y_in is None else self.kspace_in("y", y_in, img)
        ahy = None
        if ahy_in is not None:
            if ahy_in.shape != x.shape or ahy_in.dtype != x.dtype:
                dtype = str(x.dtype).replace("torch.", "")
                raise ValueError(f"AHy: expected {dtype} {tuple(x.shape)} like x (A^H y), got {describe(ahy_in)}")
            ahy, _ = self.image_in("AHy", ahy_in)
        if backend == "torch":
            # The operator's own methods, on the arguments in its layout (complex or real-packed), as given.
            return dc_step_torch(self, x, y_in, gamma, ahy_in)
        if img.dtype != torch.complex64:
            raise TypeError(f"x: backend {backend!r} expects complex64 (B, H, W), got {describe(img)}")
        self._check_fused_operator(backend)
        if y is not None and y.dtype != torch.complex64:
            raise TypeError(f"y: backend {backend!r} expects complex64 (B, C, H, W), got {describe(y)}")
        check_complex("x", img, "(B, H, W)", 3)
        h, w = img.shape[-2:]
        dims = (-2, -1) if ahy is None else self.transform_dims(h, w)
        out = mri_dc_step_op(
            img.contiguous(),
            self._contiguous_maps(),
            self.mask_for(img),
            y.contiguous() if ahy is None else None,
            ahy.contiguous().to(torch.complex64) if ahy is not None else None,
            _gamma_vector(gamma, img.shape[0], img.device),
            -2 in dims,
            -1 in dims,
            backend,
        )
        return self.image_out(out, channel)

    def prox_l2(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        gamma: float | torch.Tensor,
        backend: str = "auto",
        check_inputs: bool = True,
    ) -> torch.Tensor:
        """argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||² by ``backend`` (arguments: ``mbdl_fast.prox_l2``).

        Single coil, closed form: x = F_c^H [(F_c z + gamma M y) / (1 + gamma M²)] (fused: ``mbdl_fast.ops.mri_prox``,
        one k-space pass between two FFTs). Multi-coil: CG on (I + gamma A^H A) x = z + gamma A^H y (``cg_tol``,
        ``cg_max_iter``; fused: the DC step of the backend, y = 0 and step -gamma, as the normal operator
        (I + gamma A^H A) v = v - (-gamma) A^H A v, one fused op per iteration, transforming only the axes the mask
        varies along; gamma A^H y is one fused step at x = 0). ``backend="torch"`` is :meth:`prox_l2_reference`;
        "auto" uses it too where the fused backends cannot run the call (complex128, an operator whose coil maps or
        mask require grad), where an explicit fused backend refuses the call.
        """
        name = prox_l2_arguments(z, y, gamma, backend, PROX_OP, check_inputs)
        return run_unchecked(self._prox_l2_by, name, z, y, gamma, backend == "auto")

    def _prox_l2_by(self, backend: str, z: torch.Tensor, y: torch.Tensor, gamma, auto: bool) -> torch.Tensor:
        img, channel = self.image_in("z", z)
        ky = self.kspace_in("y", y, img)
        if backend != "torch":
            refusal = self._fused_refusal(img, ky, backend)
            if refusal is not None:
                if not auto:
                    raise refusal
                backend = "torch"
        if backend == "torch":
            return self.prox_l2_reference(z, y, gamma)
        g = _gamma_vector(gamma, img.shape[0], img.device).contiguous()
        img = img.contiguous()
        mask = self.mask_for(img)
        if self.coil_maps is None:
            return self.image_out(mri_prox_l2_op(img, mask, ky.contiguous(), g, backend), channel)
        coil_maps = self._contiguous_maps()
        dims = self.transform_dims(*img.shape[-2:])
        th, tw = -2 in dims, -1 in dims
        rhs = img + mri_dc_step_op(
            torch.zeros_like(img), coil_maps, mask, ky.contiguous(), None, g, True, True, backend
        )
        minus_g = -g

        def normal(v: torch.Tensor) -> torch.Tensor:  # (I + gamma A^H A) v = dc_step(v, y = 0, -gamma)
            return mri_dc_step_op(v.contiguous(), coil_maps, mask, None, None, minus_g, th, tw, backend)

        x, info = solve_hpd(
            normal, rhs, x0=img, tol=self.cg_tol, max_iter=self.cg_max_iter, warn_as=f"prox_l2 ({backend})"
        )
        self.last_prox_info = info
        return self.image_out(x, channel)

    # -- what the fused ops take ---------------------------------------------------------------------
    def _contiguous_maps(self) -> torch.Tensor | None:
        return self.coil_maps.contiguous() if self.coil_maps is not None else None

    def _check_fused_operator(self, backend: str) -> None:
        exc = self._operator_refusal(backend)
        if exc is not None:
            raise exc

    def _operator_refusal(self, backend: str) -> Exception | None:
        for arg, t in (("coil_maps", self.coil_maps), ("mask", self.mask)):
            if t is not None and t.requires_grad:
                return ValueError(
                    f"{arg}: backend {backend!r} does not differentiate the operator; use backend='torch'"
                )
        return None

    def _fused_refusal(self, img: torch.Tensor, ky: torch.Tensor, backend: str) -> Exception | None:
        """Why ``backend`` cannot run this prox call (an exception to raise), or None."""
        if img.dtype != torch.complex64:
            return TypeError(f"z: backend {backend!r} expects complex64 (B, H, W), got {describe(img)}")
        if ky.dtype != torch.complex64:
            return TypeError(f"y: backend {backend!r} expects complex64 (B, C, H, W), got {describe(ky)}")
        return self._operator_refusal(backend)

    def prox_l2_reference(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||², in plain PyTorch: the definition the fast paths are checked
        against.

        Single coil, closed form: x = F_c^H [(F_c z + gamma M y) / (1 + gamma M²)].
        Multi-coil: CG on (I + gamma A^H A) x = z + gamma A^H y (``cg_tol``, ``cg_max_iter``).
        """
        if self.coil_maps is not None:
            return super().prox_l2_reference(z, y, gamma)
        z_img, channel = self.image_in("z", z)
        y = self.kspace_in("y", y, z_img)
        x = mri_prox_l2_ref(z_img, self.mask_for(z_img), y, _gamma_view(gamma, y))
        return self.image_out(x, channel)


class MRI(MultiCoilMRI):
    """Single-coil Cartesian MRI: A x = M ⊙ F_c x, k-space (B, 1, H, W). Closed-form prox.

    With ``layout="real_packed"`` the k-space is deepinv's single-coil ``(B, 2, H, W)`` (as ``deepinv.physics.MRI``);
    ``(B, 2, 1, H, W)`` is accepted as input too.
    """

    def __init__(self, mask: torch.Tensor, layout: str = "complex") -> None:
        super().__init__(mask, coil_maps=None, layout=layout)

    def kspace_in(
        self, name: str, y: torch.Tensor, image: torch.Tensor | None = None, any_coils: bool = False
    ) -> torch.Tensor:
        if self.layout == "real_packed" and isinstance(y, torch.Tensor) and y.dim() == 4:
            y = y.unsqueeze(2)  # deepinv's single-coil (B, 2, H, W)
        return super().kspace_in(name, y, image, any_coils)

    def kspace_out(self, y: torch.Tensor) -> torch.Tensor:
        out = super().kspace_out(y)
        return out[:, :, 0] if self.layout == "real_packed" and y.shape[1] == 1 else out

    def _set_coil_maps(self, coil_maps: torch.Tensor | None) -> None:
        if coil_maps is not None:
            raise ValueError("coil_maps: single-coil MRI takes none; use MultiCoilMRI")
        self.coil_maps = None


def _gamma_vector(gamma: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """The step as the fused ops take it: float32 (B,) on ``device``."""
    if not isinstance(gamma, torch.Tensor):
        return torch.full((batch,), float(gamma), dtype=torch.float32, device=device)
    if gamma.is_complex() or gamma.dim() > 1 or (gamma.dim() == 1 and gamma.shape[0] != batch):
        raise ValueError(
            f"gamma: expected a real scalar or a ({batch},) tensor (one per sample), got {describe(gamma)}"
        )
    check_same_device([("x", torch.empty(0, device=device)), ("gamma", gamma)])
    return gamma.to(torch.float32).expand(batch).contiguous() if gamma.dim() == 0 else gamma.to(torch.float32)
