"""SPADE's three fine-tuning strategies, each a loss of (model, physics, y, target, teacher).

A strategy is a callable

    strategy(model, physics, y, target, teacher, generator=None) -> {"loss": scalar, <parts>: scalars}

with ``model`` the network being tuned (called as ``tasks.reconstruct(model, physics, y)``: DEQ, DU,
VarNet, ... take the measurements and the operator and start from A^H y), ``y`` the measurements
(k-space ``(B, C, H, W)`` for MRI), ``target`` the ground truth image (``(B, H, W)`` complex for MRI)
or ``None``, ``teacher`` the frozen dense model or ``None``. ``needs_target`` / ``needs_teacher`` say
what the strategy uses; the fine-tuning loop passes ``target=None`` to every strategy with
``needs_target = False``, so the ground-truth-free strategies cannot read a ground truth even when
the data set has one.

- ``Supervised``: L(f(y), x) against the ground truth x.
- ``School``: L(f(y), f_T(y)) against the frozen teacher f_T on the same measurements (SPADE's
  "school": the dense network teaches its pruned version, no ground truth).
- ``SelfSupervised``: measurement consistency plus rotation equivariance, as Robust Equivariant
  Imaging (REI, Chen, Tachella & Davies, CVPR 2022) and SPADE's self-supervised variant; measurements
  and operator only (see the class docstring for the maths).
- ``SplitMeasurements`` (beyond SPADE): reconstruct without a random part of the sampled k-space columns and
  predict them (SSDU; with a fixed held-out part, ZS-SSL's validation for adapting to one scan).

The image losses L (``image_loss``): ``"l1"``, ``"mse"`` and ``"smooth_l1"`` on the complex
difference (its real and imaginary parts, as ``train.py``), ``"ssim"``: 1 - SSIM of the magnitudes
(Gaussian window, data range the per-image maximum of the reference; differentiable).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from mbdl_fast.metrics import ssim
from mbdl_fast.physics import MultiCoilMRI
from mbdl_fast.solvers.deq import DEQ
from mbdl_fast.tasks import compared_images, reconstruct
from mbdl_fast.transforms import check_rotations, rotate, rotate_physics

__all__ = [
    "IMAGE_LOSSES",
    "STRATEGIES",
    "School",
    "SelfSupervised",
    "SplitMeasurements",
    "Strategy",
    "Supervised",
    "WarmStarts",
    "acs_band",
    "image_loss",
    "make_strategy",
    "relative_squared_error",
]

IMAGE_LOSSES = ("smooth_l1", "l1", "mse", "ssim")
STRATEGIES = ("supervised", "school", "self_supervised")

#: smooth-L1's quadratic zone, as ``train.py`` (images of magnitude ~1; errors above 0.01 count as L1).
SMOOTH_L1_BETA = 0.01


class Strategy(Protocol):
    """What the fine-tuning loop calls: a loss of (model, physics, y, target, teacher)."""

    name: str
    needs_target: bool
    needs_teacher: bool

    def __call__(
        self,
        model: nn.Module,
        physics: nn.Module | None,
        y: torch.Tensor,
        target: torch.Tensor | None,
        teacher: nn.Module | None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]: ...


def image_loss(x: torch.Tensor, reference: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """L(x, reference) for images of the same shape (complex ``(B, H, W)`` or real ``(B, C, H, W)``).

    ``"l1"``: mean |d|, ``"mse"``: mean d², ``"smooth_l1"``: Huber with beta = 0.01, all over the real
    and imaginary parts d of x - reference; ``"ssim"``: 1 - mean SSIM(|x|, |reference|).
    """
    _check_loss(kind)
    if x.shape != reference.shape:
        raise ValueError(
            f"loss: expected the reference shaped like the output {tuple(x.shape)}, got {tuple(reference.shape)}"
        )
    if kind == "ssim":
        return (1 - ssim(x.abs(), reference.abs())).to(x.real.dtype)
    diff = torch.view_as_real(x - reference) if x.is_complex() else x - reference
    if kind == "l1":
        return diff.abs().mean()
    if kind == "mse":
        return diff.square().mean()
    return nn.functional.smooth_l1_loss(diff, torch.zeros_like(diff), beta=SMOOTH_L1_BETA)


def _check_loss(kind: str) -> str:
    if kind not in IMAGE_LOSSES:
        raise ValueError(f"loss: expected one of {IMAGE_LOSSES}, got {kind!r}")
    return kind


def relative_squared_error(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """mean_b ||x_b - r_b||² / ||r_b||² over the batch (dim 0); the denominator carries no gradient."""
    dims = tuple(range(1, x.dim()))
    err = (x - reference).abs().square().sum(dims)
    norm = reference.detach().abs().square().sum(dims).clamp_min(torch.finfo(err.dtype).tiny)
    return (err / norm).mean()


class Supervised:
    """Ground truth available: loss L(f(y), x) (``image_loss`` ``loss``)."""

    name = "supervised"
    needs_target = True
    needs_teacher = False

    def __init__(self, loss: str = "smooth_l1") -> None:
        self.loss = _check_loss(loss)

    def __call__(self, model, physics, y, target, teacher=None, generator=None) -> dict[str, torch.Tensor]:
        if target is None:
            raise ValueError("supervised: needs the ground truth image ('target') of every item")
        return {"loss": image_loss(*compared_images(model, reconstruct(model, physics, y), target), self.loss)}


class School:
    """No ground truth: the frozen teacher's reconstruction of the same y is the target, L(f(y), f_T(y)).

    The teacher runs under ``torch.no_grad`` (the loop puts it in eval mode); a teacher identical to
    the student gives a zero loss.
    """

    name = "school"
    needs_target = False
    needs_teacher = True

    def __init__(self, loss: str = "smooth_l1") -> None:
        self.loss = _check_loss(loss)

    def __call__(self, model, physics, y, target=None, teacher=None, generator=None) -> dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("school: needs a teacher (the frozen dense model)")
        with torch.no_grad():
            reference = reconstruct(teacher, physics, y)
        return {"loss": image_loss(*compared_images(model, reconstruct(model, physics, y), reference), self.loss)}


class WarmStarts:
    """Reconstructions f(y, A) whose DEQ solves start at the previous output of the same slot (or A^H y).

    For test-time adaptation, where every step sees the same scan: after a small parameter step the previous
    fixed point is a close start (about half the iterations). The fixed point does not depend on the start where
    the solver reaches its tolerance. A slot is used only while its measurements keep their shape; models without
    a DEQ, or ``enabled=False``, reconstruct as ``tasks.reconstruct``.
    """

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"warm_start: expected a bool, got {type(enabled).__name__}")
        self.enabled = enabled
        self._starts: dict[object, tuple[torch.Size, torch.Tensor]] = {}  # slot -> (y's shape, last output)

    def __call__(self, model: nn.Module, physics: nn.Module, y: torch.Tensor, slot: object = 0) -> torch.Tensor:
        if not (self.enabled and isinstance(model, DEQ)):
            return reconstruct(model, physics, y)
        shape, start = self._starts.get(slot, (None, None))
        x = model(y, physics, x0=start if shape == y.shape else None)
        self._starts[slot] = (y.shape, x.detach())
        return x


class SelfSupervised:
    r"""Measurements and operator only: measurement consistency plus rotation equivariance (REI).

    For a batch of measurements y of an operator A and a rotation T = R^k drawn uniformly from
    ``rotations`` (quarter turns, exact, ``transforms.rotate``; one draw per batch)::

        x1 = f(y, A)                                 the reconstruction
        x2 = T x1                                    a rotated image: as plausible as x1 (the image set
                                                     is assumed invariant under rotations)
        y2 = A_T x2 + n,   n ~ N(0, noise_std²)      measured again by the same acquisition (MRI: coil
                                                     maps rotated with the image, mask not rotated)
        x3 = f(y2, A_T)                              its reconstruction

        L_MC = mean_b ||A x1 - y||² / ||y||²         (measurement consistency)
        L_EQ = mean_b ||x3 - x2||² / ||x2||²         (equivariance: f(A_T T x1) should be T x1)
        L    = L_MC + rei_weight · L_EQ

    Both terms are relative squared errors per sample (``relative_squared_error``): dimensionless, so
    ``rei_weight = 1`` weighs them equally whatever the scale of the data or the number of
    measurements, and a perfect fit of y gives L_MC = 0. L_MC alone cannot see the null space of A
    (any x with A x = y scores 0); L_EQ can, because the same mask applied to the rotated image
    samples other frequencies of the object. Gradients flow through x1 in both terms and through x2,
    as deepinv's ``EILoss``.

    A model that estimates its own coil maps (E2E-VarNet: ``model.image_physics(y, physics)`` and
    ``estimates_coil_maps``) is measured through those maps, A = M F_c(S(y) ·), rotated with x2 as the
    data set's would be, and L_EQ compares magnitudes (the phase of its image is its maps' convention):
    what works on a real scan, whose maps nobody knows.

    Against REI as published: its measurement term is the SURE estimate of the MSE for noisy y; here it
    is plain measurement consistency (exact for noise-free or low-noise data); the ``noise_std`` of the
    second measurement is REI's robustness noise (0 turns it off). Rotations by 90/270 degrees need
    square images (``ValueError`` naming the size; ``rotations=(2,)`` works on any size).

    Test-time adaptation (one acquisition, every batch the same y) may set ``warm_start`` (``WarmStarts``, one
    slot per rotation, k = 0 for x1).

    Args:
        rei_weight: weight of L_EQ (>= 0).
        rotations: quarter turns to draw from (1, 2, 3 = 90, 180, 270 degrees).
        noise_std: standard deviation of n per real/imaginary part (the data sets' convention); for
            MRI only sampled k-space locations get noise.
        rotate_physics: ``(physics, k) -> physics for rotated images`` (default ``transforms.rotate_physics``);
            supply one for a user operator with parameters in the image plane.
        warm_start: DEQ models: start each solve at the previous output of the same rotation (``WarmStarts``).
    """

    name = "self_supervised"
    needs_target = False
    needs_teacher = False

    def __init__(
        self,
        rei_weight: float = 1.0,
        rotations: Sequence[int] = (1, 2, 3),
        noise_std: float = 0.0,
        rotate_physics: Callable[[nn.Module, int], nn.Module] = rotate_physics,
        warm_start: bool = False,
    ) -> None:
        if not (isinstance(rei_weight, (int, float)) and rei_weight >= 0):
            raise ValueError(f"rei_weight: expected a number >= 0, got {rei_weight!r}")
        rotations = tuple(rotations)
        if not rotations or any(isinstance(k, bool) or not isinstance(k, int) or k % 4 == 0 for k in rotations):
            raise ValueError(f"rotations: expected quarter turns among (1, 2, 3), got {rotations!r}")
        if not (isinstance(noise_std, (int, float)) and noise_std >= 0):
            raise ValueError(f"noise_std: expected a number >= 0, got {noise_std!r}")
        self.rei_weight = float(rei_weight)
        self.rotations = tuple(k % 4 for k in rotations)
        self.noise_std = float(noise_std)
        self.rotate_physics = rotate_physics
        self.reconstruct = WarmStarts(warm_start)

    def __call__(self, model, physics, y, target=None, teacher=None, generator=None) -> dict[str, torch.Tensor]:
        if physics is None:
            raise ValueError("self_supervised: needs a measurement operator (a task with physics, not denoise)")
        x1 = self.reconstruct(model, physics, y, 0)
        check_rotations(self.rotations, x1.shape[-2], x1.shape[-1])
        # A model with its own coil maps (E2E-VarNet) is measured through them: they, not the data set's, fit x1.
        image_physics = getattr(model, "image_physics", None)
        measured = image_physics(y, physics) if image_physics is not None else physics
        mc = relative_squared_error(measured.A(x1), y)
        k = self.rotations[int(torch.randint(len(self.rotations), (), generator=generator))]
        rotated = self.rotate_physics(measured, k)
        x2 = rotate(x1, k)
        y2 = rotated.A(x2)
        if self.noise_std > 0:
            y2 = y2 + self._noise(rotated, y2, generator)
        eq = relative_squared_error(*compared_images(model, self.reconstruct(model, rotated, y2, k), x2))
        return {"loss": mc + self.rei_weight * eq, "mc": mc, "eq": eq}

    def _noise(self, physics: nn.Module, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        shape = (*y.shape, 2) if y.is_complex() else y.shape
        n = torch.randn(shape, generator=generator, dtype=y.real.dtype).to(y.device) * self.noise_std
        n = torch.view_as_complex(n) if y.is_complex() else n
        if isinstance(physics, MultiCoilMRI) and physics.layout == "complex":
            n = n * physics.mask  # unsampled k-space stays zero, as in the simulated acquisitions
        return n


def acs_band(mask: torch.Tensor) -> torch.Tensor:
    """Boolean, shaped like ``mask`` ``(..., W)``: the contiguous run of sampled entries through W // 2 (the ACS band)."""
    sampled = mask > 0
    width = mask.shape[-1]
    position = torch.arange(width, device=mask.device)
    centre = width // 2
    left = torch.where(~sampled & (position < centre), position, -1).amax(-1, keepdim=True)
    right = torch.where(~sampled & (position > centre), position, width).amin(-1, keepdim=True)
    return sampled[..., centre : centre + 1] & (position > left) & (position < right)


def _column_mask(physics: nn.Module | None) -> torch.Tensor:
    mask = getattr(physics, "mask", None)
    if mask is None or not hasattr(physics, "update"):
        raise ValueError(f"split: needs an MRI operator with a mask, got {type(physics).__name__}")
    if mask.shape[-2] != 1:
        raise ValueError(f"split: expected a column mask (..., 1, W) (Cartesian lines), got mask {tuple(mask.shape)}")
    return mask


class SplitMeasurements:
    r"""Measurements and operator only: predict held-out measurements (SSDU, Yaman et al. 2020; ZS-SSL 2022).

    Per batch, the sampled columns of the mask M outside its ACS band (``acs_band``) are split at random, each
    held out with probability ``holdout``; M_Λ keeps the held-out ones, M_Θ = M - M_Λ the rest (ACS included)::

        x = f(M_Θ y, A_Θ)                                reconstruct without the held-out columns
        L = mean_b ||M_Λ (A x - y)||² / ||M_Λ y||²       and predict them

    The noise of the held-out columns is independent of x's input, so L rewards neither fitting the noise
    (as measurement consistency on the input does) nor smoothing detail away (which equivariance alone can
    favour on one noisy scan): its expectation is the error of x on Λ plus a constant noise floor.
    ``held_out_error`` with a fixed split is ZS-SSL's validation for stopping on a single scan.

    Args:
        holdout: probability that a sampled non-ACS column is held out (SSDU: 0.4), in (0, 1).
        warm_start: DEQ models: start each solve at the previous output (``WarmStarts``).
    """

    name = "split_measurements"
    needs_target = False
    needs_teacher = False

    def __init__(self, holdout: float = 0.4, warm_start: bool = False) -> None:
        if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
            raise ValueError(f"holdout: expected a number in (0, 1), got {holdout!r}")
        self.holdout = float(holdout)
        self.reconstruct = WarmStarts(warm_start)

    def split(self, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """M_Θ: ``mask`` without a random ``holdout`` fraction of its sampled non-ACS columns."""
        draw = torch.rand(mask.shape, generator=generator).to(mask.device)
        held = (mask > 0) & ~acs_band(mask) & (draw < self.holdout)
        return torch.where(held, torch.zeros_like(mask), mask)

    def held_out_error(
        self, model: nn.Module, physics: nn.Module, y: torch.Tensor, keep: torch.Tensor, slot: object = "split"
    ) -> torch.Tensor:
        """mean_b ||M_Λ (A f(M_Θ y, A_Θ) - y)||² / ||M_Λ y||² for M_Θ = ``keep`` (a part of physics' mask)."""
        mask = _column_mask(physics)
        if keep.shape != mask.shape:
            raise ValueError(f"keep: expected the mask's shape {tuple(mask.shape)}, got {tuple(keep.shape)}")
        inside = copy.copy(physics)
        inside.update(mask=keep)
        x = self.reconstruct(model, inside, keep * y, slot)
        held = (mask - keep).to(y.real.dtype)
        return relative_squared_error(held * physics.A(x), held * y)

    def __call__(self, model, physics, y, target=None, teacher=None, generator=None) -> dict[str, torch.Tensor]:
        keep = self.split(_column_mask(physics), generator)
        return {"loss": self.held_out_error(model, physics, y, keep)}


def make_strategy(
    strategy: str | Strategy,
    loss: str = "smooth_l1",
    rei_weight: float = 1.0,
    rotations: Sequence[int] = (1, 2, 3),
    noise_std: float = 0.0,
) -> Strategy:
    """A strategy by name (``STRATEGIES``) with its options, or ``strategy`` itself if it is one already."""
    if not isinstance(strategy, str):
        if not all(hasattr(strategy, a) for a in ("name", "needs_target", "needs_teacher")) or not callable(strategy):
            raise TypeError(f"strategy: expected one of {STRATEGIES} or a Strategy, got {strategy!r}")
        return strategy
    if strategy == "supervised":
        return Supervised(loss)
    if strategy == "school":
        return School(loss)
    if strategy == "self_supervised":
        return SelfSupervised(rei_weight, rotations, noise_std)
    raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
