r"""N:M fine-grained structured sparsity for CNN priors, and SLS's per-layer N search.

**Pattern.** A convolution weight :math:`W \in \mathbb{R}^{C_o \times C_i \times k_h \times k_w}` (or a
linear one, :math:`C_o \times C_i`) is cut, for every output channel :math:`o` and tap :math:`(i, j)`,
into groups of :math:`M` consecutive input channels :math:`W[o, gM:(g+1)M, i, j]`; an N:M weight has at
most :math:`N` nonzeros in every group. The one-shot magnitude mask keeps the :math:`N` largest
:math:`|w|` of each group (ties to the lower channel index), so every group keeps exactly :math:`N`.

**Where it is fast.** Only 2:4 has a hardware speed-up: NVIDIA sparse tensor cores (sm_80+: A100,
H100, ...) in fp16/bf16 (and int8), reached from PyTorch through
``torch.sparse.to_sparse_semi_structured``, and for matrix products only. A convolution must be
lowered to a GEMM (im2col, or a 1x1 conv as a linear layer) whose reduction axis :math:`K` is
ordered tap-major with channels innermost (:math:`K = (i, j, c)`, the layout of a channels-last
implicit GEMM): then the input-channel groups here are the groups of 4 consecutive entries along
:math:`K` that the hardware wants. (PyTorch's ``F.unfold`` orders :math:`K` channel-major: transpose
first.) Every other pattern (1:4, 3:4, SLS's per-layer N) lowers MACs on paper only; dense kernels run
it at dense speed, and :func:`nm_report` says so next to every row.

**SLS** (Oh et al., "Attentive Fine-Grained Structured Sparsity for Image Restoration", CVPR 2022):
:class:`SLSSearch` learns one N per layer under a MAC budget, then fixes the masks for fine-tuning.

Public API: :func:`nm_rank`, :func:`nm_mask`, :func:`select_nm_layers`, :func:`apply_nm`,
:func:`remove_nm`, :class:`NMMask`, :class:`SLSSearch`, :class:`SLSGate`, :func:`nm_report`,
:class:`NMReport`, :class:`NMRow`, :func:`is_2to4_compatible`.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "NMMask",
    "NMReport",
    "NMRow",
    "SLSGate",
    "SLSSearch",
    "apply_nm",
    "is_2to4_compatible",
    "nm_mask",
    "nm_rank",
    "nm_report",
    "remove_nm",
    "select_nm_layers",
]

# A layer with at most this many input or output channels reads or writes an image
# (1: magnitude, 2: complex as real/imaginary, 3: RGB, 4: RGBA): protected by default.
IMAGE_CHANNELS = 4

NO_SPEEDUP_NOTE = (
    "Only 2:4 has a hardware speed-up (NVIDIA sparse tensor cores, sm_80+, fp16/bf16/int8, through "
    "torch.sparse.to_sparse_semi_structured, for GEMMs: convolutions lowered by im2col with K tap-major, or 1x1 "
    "as linear); a pattern with at most 2 nonzeros in every aligned group of 4 (1:4, 2:8, 1:2) runs on the same "
    "kernels at the 2:4 rate, no faster. Every other N:M pattern saves MACs on paper only: dense kernels run it at "
    "dense speed. 'hw MACs' counts what the hardware executes."
)

_Layer = nn.Conv2d | nn.Linear


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
def _check_nm(n: int | None, m: int) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ValueError(f"m: expected an int >= 2 (group size), got {m!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= m):
        raise ValueError(f"n: expected an int in [1, m={m}] (nonzeros kept per group of {m}), got {n!r}")


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """``(C_o, C_i, *k)`` -> ``(C_o * prod(k) * C_i / m, m)``: rows are groups of m consecutive input channels."""
    return t.movedim(1, -1).reshape(-1, m)


def _ungroup(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`_groups` for a weight of ``shape``."""
    moved = (shape[0], *shape[2:], shape[1])
    return g.reshape(moved).movedim(-1, 1).contiguous()


def nm_rank(weight: torch.Tensor, m: int, name: str = "weight") -> torch.Tensor:
    r"""Rank of every entry by magnitude inside its group of M consecutive input channels.

    ``weight`` is ``(C_o, C_i, *kernel)`` (conv) or ``(C_o, C_i)`` (linear); the result is an int64
    tensor of the same shape with values in ``[0, m)``, 0 for the largest :math:`|w|` of the group.
    Ranks are a permutation inside every group (a stable sort: equal magnitudes rank by channel
    index), so the N:M masks of all N are nested: ``rank < n`` keeps exactly ``n`` per group.

    Raises ``ValueError`` naming ``name`` when ``C_i`` (per group of a grouped conv: dimension 1 of
    the weight) is not a multiple of ``m``. There is no padding: a padded group would not be an
    N:M group of the real tensor, and the 2:4 kernels need whole groups along K anyway.
    """
    _check_nm(None, m)
    if weight.dim() < 2:
        raise ValueError(f"{name}: expected a weight (C_out, C_in, ...), got shape {tuple(weight.shape)}")
    cin = weight.shape[1]
    if cin % m:
        raise ValueError(
            f"{name}: {cin} input channels (dimension 1 of weight {tuple(weight.shape)}) is not a multiple of "
            f"M={m}; N:M groups M consecutive input channels: leave this layer dense (skip it) or pick an M "
            f"dividing {cin}"
        )
    groups = _groups(weight.detach().abs().float(), m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m, device=order.device).expand_as(order))
    return _ungroup(rank, weight.shape)


def nm_mask(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    r"""One-shot magnitude N:M mask: bool, shape of ``weight``, exactly ``n`` True in every group.

    Groups are M consecutive input channels for each output channel and kernel tap:
    :math:`\{W[o, gM + r, i, j]\}_{r=0}^{M-1}`; the mask keeps the ``n`` largest :math:`|w|` of each
    (ties to the lower channel index), which minimises :math:`\|W - W \odot \text{mask}\|_F` over N:M
    masks. See :func:`nm_rank` for the shape rules and the error when ``C_in % m != 0``.
    """
    _check_nm(n, m)
    return nm_rank(weight, m, name) < n


def is_2to4_compatible(n: int, m: int) -> bool:
    """True when every N:M weight has at most 2 nonzeros in every aligned group of 4 along K.

    Such a weight runs on the 2:4 sparse kernels (at the 2:4 rate, whatever N/M is): 2:4 itself,
    1:4, 1:2, and N <= 2 with M a multiple of 4 (2:8, 1:8, ...).
    """
    if m % 4 == 0:
        return n <= 2
    return 4 % m == 0 and n * (4 // m) <= 2


def _max_nonzeros_per_group(weight: torch.Tensor, m: int) -> int:
    return int((_groups(weight.detach(), m) != 0).sum(-1).max())


class NMMask(nn.Module):
    """Weight parametrization ``w -> w * mask`` with a fixed N:M ``mask`` (a bool buffer).

    Registered by :func:`apply_nm` through ``torch.nn.utils.parametrize``: the optimizer updates the
    dense ``parametrizations.weight.original``; every forward (and the gradient) sees the masked
    weight, so training keeps the pattern. ``n`` and ``m`` are recorded for reports.
    """

    def __init__(self, mask: torch.Tensor, n: int, m: int) -> None:
        super().__init__()
        _check_nm(n, m)
        self.n, self.m = n, m
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}"


# ------------------------------------------------------------------------------------------------
# Layer selection, apply, remove
# ------------------------------------------------------------------------------------------------
def _channels(module: _Layer) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _our_parametrization(module: nn.Module) -> nn.Module | None:
    """Our NMMask / SLSGate on ``module.weight``, None when the weight is plain; other parametrizations refused."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations.weight
    if len(plist) == 1 and isinstance(plist[0], NMMask | SLSGate):
        return plist[0]
    return plist  # someone else's: callers refuse it


def select_nm_layers(
    model: nn.Module,
    m: int,
    layers: Sequence[str] | None = None,
    skip: Iterable[str] = (),
    protect_image_layers: bool = True,
) -> tuple[list[str], dict[str, str]]:
    """The layers an N:M mask goes on, and why each other candidate is left dense.

    Candidates are the ``nn.Conv2d`` and ``nn.Linear`` modules of ``model`` (transposed convolutions
    are not: their input channels are weight dimension 0). With ``layers=None`` a candidate is
    left dense when its name matches a ``skip`` pattern (``fnmatch``, e.g. ``"blocks.0.*"``), when
    ``protect_image_layers`` and it has at most 4 input or output channels (the first conv, which
    reads the image, and the image-output conv), or when its input channels are not a multiple of
    ``m``. Explicit ``layers`` are taken as given (protection and ``skip`` do not apply) and any
    that is missing, not a candidate or not divisible by ``m`` is an error naming it.

    Returns ``(selected names, {left-dense name: reason})``.
    """
    _check_nm(None, m)
    candidates = {name: mod for name, mod in model.named_modules() if isinstance(mod, _Layer)}
    skip = list(skip)
    if layers is not None:
        for name in layers:
            if name not in candidates:
                what = "no such module" if name not in dict(model.named_modules()) else "not an nn.Conv2d/nn.Linear"
                raise ValueError(f"layers: {name!r}: {what}")
            cin = candidates[name].weight.shape[1]
            if cin % m:
                raise ValueError(
                    f"layers: {name!r} has {cin} input channels per group, not a multiple of M={m}: "
                    "N:M groups M consecutive input channels; leave it out or pick another M"
                )
        return list(layers), {}
    selected, dense = [], {}
    for name, mod in candidates.items():
        cin, cout = _channels(mod)
        if any(fnmatch.fnmatchcase(name, pat) for pat in skip):
            dense[name] = "skipped by pattern"
        elif protect_image_layers and min(cin, cout) <= IMAGE_CHANNELS:
            dense[name] = f"protected: {cin} -> {cout} channels touches the image"
        elif mod.weight.shape[1] % m:
            dense[name] = f"{mod.weight.shape[1]} input channels not a multiple of M={m}"
        else:
            selected.append(name)
    return selected, dense


def _check_free(name: str, module: nn.Module) -> None:
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(
            f"{name}: its weight already has a parametrization ({_our_parametrization(module)!r}); "
            "call remove_nm(model) first (other parametrizations cannot be combined with N:M masks)"
        )


def apply_nm(
    model: nn.Module,
    n: int,
    m: int,
    layers: Sequence[str] | None = None,
    skip: Iterable[str] = (),
    protect_image_layers: bool = True,
) -> list[str]:
    """Put one-shot magnitude N:M masks on the selected layers, in place; returns their names.

    Each selected layer's weight gets an :class:`NMMask` parametrization with the mask computed
    now from its magnitudes (:func:`nm_mask`); the dense parameter stays the same object (an
    existing optimizer keeps working) and every forward uses ``weight * mask``, so fine-tuning keeps
    the pattern. :func:`remove_nm` makes it permanent. Selection: :func:`select_nm_layers`.
    """
    _check_nm(n, m)
    names, _ = select_nm_layers(model, m, layers, skip, protect_image_layers)
    modules = dict(model.named_modules())
    for name in names:
        _check_free(name, modules[name])
    for name in names:
        module = modules[name]
        mask = nm_mask(module.weight, n, m, name)
        parametrize.register_parametrization(module, "weight", NMMask(mask, n, m))
    return names


def remove_nm(model: nn.Module) -> list[str]:
    """Make every N:M mask (fixed or SLS search) permanent: ``weight = original * mask`` as a plain parameter.

    The parameter object is kept, so an optimizer holding it stays valid; its pruned entries are
    zero from now on but no longer forced to stay so (a later optimizer step may refill them).
    An SLS layer still searching keeps its current hard pattern. Returns the layer names.
    """
    done = []
    for name, module in model.named_modules():
        p = _our_parametrization(module)
        if p is None:
            continue
        if not isinstance(p, NMMask | SLSGate):
            continue  # not ours: leave it alone
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        done.append(name)
    return done


# ------------------------------------------------------------------------------------------------
# SLS search
# ------------------------------------------------------------------------------------------------
class SLSGate(nn.Module):
    r"""SLS parametrization of one layer's weight: learnable N through M-1 priority scores.

    With scores :math:`s \in \mathbb{R}^{M-1}` and :math:`q_j = \sigma(s_j)`, the probability of
    keeping level :math:`k` (the k-th largest entry of every group) is the cumulative product

    .. math:: P_1 = 1, \qquad P_k = \prod_{j=1}^{k-1} q_j \quad (k = 2..M),

    non-increasing in :math:`k` (a level is kept only if all larger ones are: priority order).
    With :math:`D_k = \text{mask}_{N=k} - \text{mask}_{N=k-1}` (the entries of rank :math:`k-1`,
    from :func:`nm_rank`), the soft weight is the mixture over N with
    :math:`p_N = P_N - P_{N+1}`:

    .. math:: \sum_{N=1}^{M} p_N\, \text{mask}_{N} \odot W = \sum_{k=1}^{M} P_k\, D_k \odot W,
              \qquad \mathbb{E}[N] = \sum_k P_k .

    **Straight-through estimator.** The forward uses hard gates :math:`h_k = 1[P_k > 0.5]`, so the
    forward weight is exactly :math:`\text{mask}_{\hat N} \odot W` with
    :math:`\hat N = \#\{k : P_k > 0.5\}`; the backward treats :math:`h_k` as :math:`P_k`
    (``gate = P + (h - P).detach()``). Hence, for a loss :math:`L` with
    :math:`G = \partial L / \partial W_\text{eff}`:

    - the weight gets :math:`G \odot \text{mask}_{\hat N}` (pruned entries get nothing);
    - level :math:`k` gets :math:`g_k = \langle G, D_k \odot W \rangle`, including pruned levels,
      which is what lets a pruned level come back;
    - score :math:`s_j` gets :math:`(1 - q_j) \sum_{k > j} P_k\, g_k`
      (:math:`\partial P_k / \partial s_j = P_k (1 - q_j)` for :math:`j < k`).

    ``rank`` (a buffer, refreshed by :meth:`SLSSearch.step_schedule`) fixes which entries form each
    level; ``fixed_n`` > 0 freezes N (then the forward is ``W * (rank < fixed_n)``, no scores).
    """

    def __init__(self, weight: torch.Tensor, m: int, init_keep: float = 0.9, name: str = "weight") -> None:
        super().__init__()
        _check_nm(None, m)
        if not 0.5 < init_keep < 1:
            raise ValueError(f"init_keep: expected a probability in (0.5, 1), got {init_keep!r}")
        self.m = m
        # every q_j = init_keep^(1/(M-1)): the search starts dense, P_M = init_keep > 0.5
        q0 = init_keep ** (1.0 / (m - 1))
        self.scores = nn.Parameter(torch.full((m - 1,), math.log(q0 / (1 - q0)), device=weight.device))
        self.register_buffer("rank", nm_rank(weight, m, name))
        self.register_buffer("fixed_n", torch.zeros((), dtype=torch.long, device=weight.device))

    @property
    def frozen(self) -> bool:
        return bool(self.fixed_n > 0)

    def keep_probs(self) -> torch.Tensor:
        """:math:`P` ``(M,)``: probability of keeping each level, differentiable in the scores."""
        one = torch.ones(1, device=self.scores.device, dtype=self.scores.dtype)
        return torch.cat([one, torch.cumprod(torch.sigmoid(self.scores), 0)])

    def gates(self) -> torch.Tensor:
        """``(M,)`` straight-through gates: value :math:`1[P_k > 0.5]`, gradient of :math:`P_k`."""
        p = self.keep_probs()
        return p + ((p > 0.5).to(p.dtype) - p).detach()

    def hard_n(self) -> int:
        """:math:`\\hat N`: the frozen N, or the number of levels with :math:`P_k > 0.5`."""
        if self.frozen:
            return int(self.fixed_n)
        with torch.no_grad():
            return int((self.keep_probs() > 0.5).sum())

    def expected_n(self) -> torch.Tensor:
        """:math:`\\mathbb{E}[N] = \\sum_k P_k` (differentiable)."""
        return self.keep_probs().sum()

    def ste_n(self) -> torch.Tensor:
        """:math:`\\hat N` as a value, :math:`\\mathbb{E}[N]` as a gradient."""
        return self.gates().sum()

    def refresh(self, weight: torch.Tensor) -> None:
        """Re-rank by the current magnitudes (levels follow the weights while searching)."""
        self.rank.copy_(nm_rank(weight, self.m))

    def freeze(self) -> int:
        n = self.hard_n()
        self.fixed_n.fill_(n)
        self.scores.requires_grad_(False)
        return n

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            return weight * (self.rank < self.fixed_n)
        return weight * self.gates().to(weight.dtype)[self.rank]

    def extra_repr(self) -> str:
        state = f"frozen N={int(self.fixed_n)}" if self.frozen else f"searching, N={self.hard_n()}"
        return f"M={self.m}, {state}"


class SLSSearch:
    r"""SLS's per-layer N:M search under a MAC budget, then fixed masks for fine-tuning.

    Puts an :class:`SLSGate` on every selected layer (:func:`select_nm_layers`: by default all
    convolutions and linear layers whose input channels divide by ``m``, except the image-side
    ones). The cost is over the searched layers :math:`l` with dense MACs :math:`c_l`:

    .. math::
        r = \frac{\sum_l c_l\, N_l / M}{\sum_l c_l}, \qquad
        R = \lambda_t\, \mathrm{ReLU}(r - \beta),

    where :math:`N_l` is the straight-through :math:`\hat N_l` (value: the hard N that would be
    deployed; gradient: that of :math:`\mathbb{E}[N_l]`) and :math:`\beta` the ``budget``.
    :math:`\lambda_t = \lambda_0\, \gamma^{\lfloor t / T \rfloor}` grows geometrically (``lam``,
    ``lam_growth``, ``anneal_every``), so the cost eventually wins over the task loss. As soon as
    the hard ratio :math:`\hat r \le \beta`, the search freezes: every layer keeps its
    :math:`\hat N_l` and its current magnitude masks, the scores stop, :meth:`regularizer` is 0.
    Fine-tuning then runs with fixed N:M masks (before or after :meth:`finalize`, same forward).

    ``c_l`` comes from a forward on ``input_shape`` (on the meta device: no compute; MACs per call,
    summed over calls, as in :func:`nm_report`); without it, :math:`c_l` is the weight size, i.e.
    MACs per output pixel, exact when all layers run at one resolution (EDSR, DnCNN).

    Usage (the optimizer must hold the scores: build it after the search, and keep weight decay
    off the scores, which would pull them towards pruning)::

        search = SLSSearch(prior, m=4, budget=0.5, input_shape=(1, 2, 64, 64))
        scores = {id(p) for p in search.score_parameters()}
        opt = torch.optim.Adam([
            {"params": [p for p in prior.parameters() if id(p) not in scores], "lr": 1e-4},
            {"params": search.score_parameters(), "lr": 1e-2, "weight_decay": 0.0},
        ])
        for step in range(steps):
            loss = task_loss(prior(x), target) + search.regularizer()
            opt.zero_grad(); loss.backward(); opt.step()
            search.step_schedule(step)          # anneal, re-rank, freeze at the budget
        search.finalize()                       # NMMask parametrizations; fine-tune on

    **Departures from the paper / official code** (JungHunOh/SLS_CVPR2022):

    - Scores pass through a sigmoid (:math:`q_j = \sigma(s_j)`), where the official code clamps raw
      scores to ``[0, 1.03]``; initialised so every layer starts dense (:math:`P_M` = ``init_keep``).
    - The cost is the MAC *ratio* over the searched layers, hinged at the budget
      (:math:`\mathrm{ReLU}(r - \beta)`), where the official code adds :math:`\lambda` times the
      absolute MACs; both stop at the same point: the hard cost reaching the budget.
    - :math:`\lambda` grows on a fixed geometric schedule, where the official code multiplies it
      when the pruned ratio stalls over two epochs.
    - Levels are re-ranked every ``refresh_every`` steps (official: every epoch) while searching and
      fixed at the freeze (official: re-ranked every epoch through fine-tuning too).
    - The MAC ratio counts the searched layers only (as the official code, whose unsearched layers
      are plain convs): protected layers stay dense, so ``budget`` below ``1/m`` is unreachable and
      refused. :func:`nm_report` gives whole-model numbers.
    """

    def __init__(
        self,
        model: nn.Module,
        m: int = 4,
        budget: float = 0.5,
        *,
        layers: Sequence[str] | None = None,
        skip: Iterable[str] = (),
        protect_image_layers: bool = True,
        input_shape: Sequence[int] | None = None,
        lam: float = 1.0,
        lam_growth: float = 2.0,
        anneal_every: int = 100,
        refresh_every: int = 1,
        init_keep: float = 0.9,
    ) -> None:
        _check_nm(None, m)
        if not 1.0 / m <= budget <= 1.0:
            raise ValueError(
                f"budget: expected a MAC ratio in [1/M, 1] = [{1 / m:.4g}, 1] (N >= 1 in every searched layer), "
                f"got {budget!r}"
            )
        if lam <= 0 or lam_growth < 1 or anneal_every < 1 or refresh_every < 1:
            raise ValueError(
                "lam > 0, lam_growth >= 1, anneal_every >= 1 and refresh_every >= 1 expected, got "
                f"{lam}, {lam_growth}, {anneal_every}, {refresh_every}"
            )
        self.model, self.m, self.budget = model, m, float(budget)
        self.lam0, self.lam_growth, self.anneal_every = float(lam), float(lam_growth), int(anneal_every)
        self.refresh_every = int(refresh_every)
        self.lam = self.lam0
        self.finalized = False
        names, self.left_dense = select_nm_layers(model, m, layers, skip, protect_image_layers)
        if not names:
            raise ValueError(f"no layer to search: every candidate was left dense: {self.left_dense}")
        modules = dict(model.named_modules())
        for name in names:
            _check_free(name, modules[name])
        if input_shape is not None:
            macs = _dense_macs(model, input_shape=input_shape)
            missing = [name for name in names if not macs.get(name)]
            if missing:
                raise ValueError(f"layers {missing} did not run on an input of shape {tuple(input_shape)}")
            costs = [macs[name] for name in names]
        else:
            costs = [modules[name].weight.numel() for name in names]
        self.modules: dict[str, _Layer] = {name: modules[name] for name in names}
        self.gates: dict[str, SLSGate] = {}
        for name, module in self.modules.items():
            gate = SLSGate(module.weight, m, init_keep, name)
            parametrize.register_parametrization(module, "weight", gate)
            self.gates[name] = gate
        self.dense_macs: dict[str, int] = dict(zip(names, costs, strict=True))
        self._total = float(sum(costs))

    # -- state ----------------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        """True once the budget was reached (or :meth:`freeze`/:meth:`finalize` was called)."""
        return all(g.frozen for g in self.gates.values())

    def score_parameters(self) -> list[nn.Parameter]:
        """The priority scores (one ``(M-1,)`` parameter per searched layer)."""
        return [g.scores for g in self.gates.values()]

    def chosen_n(self) -> dict[str, int]:
        """N per searched layer: frozen, or the current hard :math:`\\hat N`; in ``[1, M]``."""
        return {name: g.hard_n() for name, g in self.gates.items()}

    def _ratio(self, per_layer: dict[str, torch.Tensor | float]) -> torch.Tensor | float:
        return sum(self.dense_macs[name] * n for name, n in per_layer.items()) / (self.m * self._total)

    def mac_ratio(self) -> float:
        """Hard MAC ratio :math:`\\hat r` over the searched layers (what :meth:`finalize` deploys)."""
        return float(self._ratio(self.chosen_n()))

    def expected_mac_ratio(self) -> torch.Tensor:
        """Soft :math:`\\mathbb{E}[r]` from :math:`\\mathbb{E}[N_l]` (differentiable; frozen layers count their N)."""
        per_layer = {n: (g.fixed_n.float() if g.frozen else g.expected_n()) for n, g in self.gates.items()}
        return self._ratio(per_layer)

    # -- training hooks ---------------------------------------------------------------------------
    def regularizer(self) -> torch.Tensor:
        """:math:`\\lambda_t\\,\\mathrm{ReLU}(r - \\beta)`, r straight-through (value hard, gradient soft); 0 once frozen."""
        device = next(iter(self.gates.values())).scores.device
        if self.frozen:
            return torch.zeros((), device=device)
        ratio = self._ratio({name: g.ste_n() for name, g in self.gates.items()})
        return self.lam * torch.relu(ratio - self.budget)

    @torch.no_grad()
    def refresh_masks(self) -> None:
        """Re-rank every searching layer by its current weight magnitudes."""
        for name, g in self.gates.items():
            if not g.frozen:
                g.refresh(self.modules[name].parametrizations.weight.original)

    def step_schedule(self, step: int) -> bool:
        """Call after each optimizer step: freeze at the budget, else anneal λ and re-rank; returns ``frozen``.

        :math:`\\lambda = \\lambda_0 \\gamma^{\\lfloor step / T \\rfloor}` for the next
        :meth:`regularizer`; levels are re-ranked every ``refresh_every`` steps.
        """
        if self.frozen:
            return True
        if self.mac_ratio() <= self.budget + 1e-12:
            self.freeze()
            return True
        self.lam = self.lam0 * self.lam_growth ** (step // self.anneal_every)
        if (step + 1) % self.refresh_every == 0:
            self.refresh_masks()
        return False

    def freeze(self) -> dict[str, int]:
        """Fix every layer's N at its hard :math:`\\hat N` and its masks at the current ranks."""
        return {name: g.freeze() for name, g in self.gates.items()}

    def finalize(self) -> dict[str, int]:
        """Swap the search gates for fixed :class:`NMMask` parametrizations; returns N per layer.

        Freezes first when the search has not (with a warning when the hard ratio is still above the
        budget). The forward does not change; the weights stay the same parameter objects, so the
        same optimizer can fine-tune on (the scores leave the model; their gradients stay None).
        """
        if self.finalized:
            return {name: int(g.fixed_n) for name, g in self.gates.items()}
        if not self.frozen:
            ratio = self.mac_ratio()
            if ratio > self.budget + 1e-12:
                warnings.warn(
                    f"SLSSearch.finalize: MAC ratio {ratio:.4f} is above the budget {self.budget:.4f}; "
                    "the search did not reach it (more steps, or a larger lam / lam_growth)",
                    stacklevel=2,
                )
            self.freeze()
        chosen = {}
        for name, g in self.gates.items():
            module, n = self.modules[name], int(g.fixed_n)
            mask = g.rank < n
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            parametrize.register_parametrization(module, "weight", NMMask(mask, n, self.m))
            chosen[name] = n
        self.finalized = True
        return chosen


# ------------------------------------------------------------------------------------------------
# MACs and the report
# ------------------------------------------------------------------------------------------------
def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """MACs of one call (biases not counted)."""
    w = module.weight
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return inp.numel() * w[0].numel()  # every input value meets C_out/groups * prod(k) weights
    if isinstance(module, nn.modules.conv._ConvNd):
        return out.numel() * w[0].numel()  # every output value sums C_in/groups * prod(k) products
    return out.numel() * module.in_features


def _dense_macs(
    model: nn.Module, input_shape: Sequence[int] | None = None, example_inputs: tuple | None = None
) -> dict[str, int]:
    """Dense MACs of every conv / transposed conv / linear module over one forward, summed over calls.

    With ``input_shape`` the forward runs on a meta-device copy (shapes only, nothing computed),
    falling back to a real ``no_grad`` eval-mode forward on the model's device when the model
    cannot run on meta (data-dependent control flow, custom kernels). ``example_inputs`` (a tuple
    of arguments) always runs for real.
    """
    if (input_shape is None) == (example_inputs is None):
        raise TypeError("pass exactly one of input_shape and example_inputs")

    def run(net: nn.Module, args: tuple) -> dict[str, int]:
        macs: dict[str, int] = {}
        handles = []
        for name, mod in net.named_modules():
            if isinstance(mod, nn.modules.conv._ConvNd | nn.Linear):

                def hook(mod, inputs, out, name=name):
                    macs[name] = macs.get(name, 0) + _layer_macs(mod, inputs[0], out)

                handles.append(mod.register_forward_hook(hook))
        was_training = net.training
        net.eval()  # no batch-norm statistics updated by a report
        try:
            with torch.no_grad():
                net(*args)
        finally:
            net.train(was_training)
            for h in handles:
                h.remove()
        return macs

    if example_inputs is not None:
        return run(model, tuple(example_inputs))
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        meta = copy.deepcopy(model).to("meta")
        return run(meta, (torch.empty(tuple(input_shape), device="meta", dtype=dtype),))
    except Exception:  # noqa: BLE001 - any failure on meta means: run it for real
        device = param.device if param is not None else torch.device("cpu")
        return run(model, (torch.zeros(tuple(input_shape), device=device, dtype=dtype),))


@dataclass(frozen=True)
class NMRow:
    """One layer of :func:`nm_report`.

    ``effective_macs`` = dense x N/M (what the pattern skips on paper); ``hardware_macs`` = what a
    GPU executes: dense / 2 for a 2:4-compatible pattern on the 2:4 sparse kernels, dense otherwise.
    """

    layer: str
    shape: str
    pattern: str
    n: int | None
    m: int | None
    dense_macs: int
    effective_macs: int
    hardware_macs: int
    accelerated: bool
    note: str


@dataclass(frozen=True)
class NMReport:
    """Rows per layer and totals; ``str(report)`` is a text table with the hardware note."""

    rows: list[NMRow]
    input_shape: tuple[int, ...] | None

    @property
    def dense_macs(self) -> int:
        return sum(r.dense_macs for r in self.rows)

    @property
    def effective_macs(self) -> int:
        return sum(r.effective_macs for r in self.rows)

    @property
    def hardware_macs(self) -> int:
        return sum(r.hardware_macs for r in self.rows)

    @property
    def mac_ratio(self) -> float:
        return self.effective_macs / max(self.dense_macs, 1)

    def table(self) -> str:
        head = ("layer", "weight", "pattern", "dense MACs", "N:M MACs", "hw MACs", "2:4 kernel", "note")
        body = [
            (r.layer, r.shape, r.pattern, f"{r.dense_macs:,}", f"{r.effective_macs:,}", f"{r.hardware_macs:,}",
             "yes" if r.accelerated else "no", r.note)
            for r in self.rows
        ]  # fmt: skip
        total = ("total", "", f"{self.mac_ratio:.3f} of dense", f"{self.dense_macs:,}", f"{self.effective_macs:,}",
                 f"{self.hardware_macs:,}", "", "")  # fmt: skip
        widths = [max(len(row[i]) for row in [head, *body, total]) for i in range(len(head))]
        fmt = "  ".join(f"{{:{'<' if i in (0, 1, 2, 6, 7) else '>'}{w}}}" for i, w in enumerate(widths))
        shape = "x".join(map(str, self.input_shape)) if self.input_shape else "example inputs"
        lines = [f"N:M sparsity, MACs per forward on {shape}", fmt.format(*head)]
        lines += [fmt.format(*row) for row in body] + [fmt.format(*total), "", NO_SPEEDUP_NOTE]
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.table()


def nm_report(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    example_inputs: tuple | None = None,
    m: int | None = None,
) -> NMReport:
    """MACs per layer of ``model`` for one forward: dense, under its N:M pattern, and on real hardware.

    Rows cover every convolution, transposed convolution and linear module that runs. A layer's
    pattern is that of its :class:`NMMask` (:func:`apply_nm`, :meth:`SLSSearch.finalize`) or
    :class:`SLSGate` (its current hard N); a plain layer is dense, unless ``m`` is given and its
    weight has at most N < M nonzeros in every group (a pattern made permanent by
    :func:`remove_nm`), read from its zeros. MACs: ``B * H_out * W_out * C_out * C_in/groups * kh * kw``
    per call (biases not counted), summed over calls (a shared layer applied R times counts R).

    Only 2:4 (and patterns that fit inside it) has a hardware speed-up, and only on sm_80+ GPUs
    through PyTorch's semi-structured sparse GEMM; ``hardware_macs`` keeps every other pattern
    at its dense cost. Pass ``input_shape`` (run on the meta device) or ``example_inputs``.
    """
    if m is not None:
        _check_nm(None, m)
    macs = _dense_macs(model, input_shape, example_inputs)
    rows = []
    for name, mod in model.named_modules():
        if name not in macs:
            continue
        dense = macs[name]
        p = _our_parametrization(mod)
        weight = mod.parametrizations.weight.original if p is not None else mod.weight
        shape = "x".join(map(str, weight.shape))
        n_, m_, note = None, None, ""
        if isinstance(p, NMMask):
            n_, m_ = p.n, p.m
        elif isinstance(p, SLSGate):
            n_, m_ = p.hard_n(), p.m
            note = "SLS, frozen" if p.frozen else "SLS, searching (hard N)"
        elif m is not None and not isinstance(mod, nn.modules.conv._ConvTransposeNd) and weight.shape[1] % m == 0:
            found = _max_nonzeros_per_group(weight, m)
            if found < m:
                n_, m_, note = max(found, 1), m, "read from zeros"
        if n_ is None:
            rows.append(NMRow(name, shape, "dense", None, None, dense, dense, dense, False, note))
            continue
        accelerated = is_2to4_compatible(n_, m_)
        if accelerated:
            speed = "2:4 kernels, sm_80+ GPU, GEMM-lowered"
        else:
            speed = "N = M: dense" if n_ == m_ else "no hardware speed-up: MACs only"
        effective = dense * n_ // m_
        rows.append(
            NMRow(name, shape, f"{n_}:{m_}", n_, m_, dense, effective, dense // 2 if accelerated else dense,
                  accelerated, f"{note}; {speed}" if note else speed)
        )  # fmt: skip
    return NMReport(rows, tuple(input_shape) if input_shape is not None else None)
