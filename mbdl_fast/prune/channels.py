r"""Structured channel pruning of the CNN priors inside MBDL models, on Torch-Pruning's dependency graph.

:func:`prune_channels` finds the prior(s) of a model (:func:`find_priors`), and prunes each one
separately with Torch-Pruning (``torch_pruning``): its ``DependencyGraph`` couples every layer whose
channels must shrink together (a conv's outputs, the next conv's inputs, residual additions,
concatenations, norms), an importance ranks the channels of each coupled group, and the pruner
removes the least important ones, leaving physically smaller dense convolutions.

What this module adds on top of Torch-Pruning:

- **Image channels are protected automatically.** Each prior is traced between identity marker
  layers, ``out_marker(prior(in_marker(x)))`` (1x1 identity convolutions on the image channels).
  Any group of coupled channels that reaches a marker carries image channels: the prior's input,
  its output layer(s) (EDSR ``tail``, DnCNN's last conv, the U-Net's final 1x1 conv), and anything
  added to or concatenated with the input (DnCNN ``residual``, EDSR ``residual_to_input``). Every
  conv/linear layer whose output channels belong to such a group is left out (its output channels
  are kept). For recursion blocks the modulation scales are a third marker (their channels are the
  modulation MLP's features). Priors that describe their widths (``width_layers()``) are also
  restricted to those layers, so that their config can describe the result. ``protect`` adds
  layers by name.
- **Channel counts stay multiples of** ``round_to`` (8: tensor-core friendly). In a group of
  :math:`c` channels asked to lose a fraction :math:`r`, Torch-Pruning keeps
  :math:`\lfloor c(1 - r) \rfloor` rounded *down* to a multiple of ``round_to`` (so at least the
  ratio asked is removed); here the result is never below ``round_to``, and a group with at most
  ``round_to`` channels is not pruned at all. E.g. with ``round_to=8``: 64 channels at r = 0.5
  keep 32, at r = 0.3 keep 40 (44 rounded down); 16 at r = 0.5 keep 8; 12 at any r keep 8; 8 keep 8.
- **Checks.** After pruning, each prior must have fewer parameters (else :class:`PruningError`:
  nothing was pruned, e.g. inside a DEQ wrapper), its output on the example input must have the
  dense shape, residually tied widths must stay equal, and a registered model's JSON config must
  rebuild exactly the pruned shapes (``save_model`` / ``load_model`` with no pickle). With
  ``check_inputs`` the whole model also runs on real data, shapes compared with the dense model.
- **A record of what was kept** (``pruned.pruning_record``): for every pruned layer the original
  indices of its kept output and input channels. Before any fine-tuning the pruned model computes
  exactly what the dense model computes with the removed output channels of those layers zeroed.

Importance (per coupled group, Torch-Pruning's group importances, mean-reduced over the group and
mean-normalised): ``"l1"`` / ``"l2"``, :math:`\sum |w|^p` over each channel's weights in every
layer of the group; ``"taylor"``, :math:`\sum |w \odot \partial L / \partial w|` (first-order
Taylor, Molchanov et al. 2019), which needs gradients of a loss: pass ``taylor_batches``;
``"random"``, a baseline (torch's global RNG: seed it with ``torch.manual_seed``).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mbdl_fast.registry import build, config_of
from mbdl_fast.solvers import find_priors

__all__ = ["PruningError", "PruningRecord", "PruningWarning", "UnitRecord", "find_priors", "prune_channels"]

IMPORTANCES = ("l1", "l2", "taylor", "random")
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


class PruningError(RuntimeError):
    """Pruning did not produce a valid smaller model: nothing pruned, wrong output shape, broken ties."""


class PruningWarning(UserWarning):
    """The pruned model works, but its config cannot describe it (``save_model`` would write a checkpoint
    that ``load_model`` refuses)."""


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
@dataclass
class UnitRecord:
    """What happened to one prior.

    Attributes:
        name: its module path in the model ("" for the model itself).
        kind: its class name.
        kept: ``{layer: {"out": [...], "in": [...]}}`` (layer names relative to the model): the
            original indices of the channels kept, for every layer that lost channels.
        protected_auto: layers whose output channels carry image channels (found by tracing).
        protected_fixed: layers outside ``width_layers()`` (the prior's config cannot change them).
        protected_user: layers named in ``protect``.
        widths_before, widths_after: the prior's ``widths`` (None when it has none).
        params_before, params_after: its parameter counts.
        config_rebuilds: whether its JSON config rebuilds the pruned shapes (None: not a registered model).
    """

    name: str
    kind: str
    kept: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    protected_auto: list[str] = field(default_factory=list)
    protected_fixed: list[str] = field(default_factory=list)
    protected_user: list[str] = field(default_factory=list)
    widths_before: tuple[int, ...] | None = None
    widths_after: tuple[int, ...] | None = None
    params_before: int = 0
    params_after: int = 0
    config_rebuilds: bool | None = None


@dataclass
class PruningRecord:
    """The settings of a :func:`prune_channels` call and a :class:`UnitRecord` per prior (``to_dict()`` is JSON)."""

    ratio: float
    importance: str
    round_to: int
    global_pruning: bool
    iterative_steps: int
    units: list[UnitRecord]
    params_before: int
    params_after: int

    @property
    def kept(self) -> dict[str, dict[str, list[int]]]:
        """Kept channel indices of every pruned layer of the model (names relative to the model)."""
        return {layer: dirs for unit in self.units for layer, dirs in unit.kept.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (e.g. for checkpoint metadata)."""
        out = dict(vars(self))
        out["units"] = [dict(vars(u)) for u in self.units]
        for u in out["units"]:
            for key in ("widths_before", "widths_after"):
                u[key] = None if u[key] is None else list(u[key])
        return out


# ------------------------------------------------------------------------------------------------
# Tracing harness: a prior between identity markers
# ------------------------------------------------------------------------------------------------
class _IdentityPhysics(nn.Module):
    """A = I, so that a recovery block's CNN runs on an image without a real operator."""

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (deepinv's operator names)
        return x

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return y

    def A_adjoint_A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return x


def _takes_physics(unit: nn.Module) -> bool:
    try:
        return "physics" in inspect.signature(unit.forward).parameters
    except (TypeError, ValueError):
        return False


def _marker(channels: int, dim: int, like: torch.Tensor) -> nn.Module:
    """An identity layer on ``channels`` channels of ``dim``-dimensional tensors (1x1 depthwise conv or linear)."""
    if dim == 2:
        layer: nn.Module = nn.Linear(channels, channels, bias=False)
        init = torch.eye(channels)
    elif dim in (3, 4, 5):
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 3]
        layer = conv(channels, channels, 1, groups=channels, bias=False)
        init = torch.ones_like(layer.weight)
    else:
        raise PruningError(f"prune_channels: cannot trace a prior whose input/output is {dim}-dimensional")
    with torch.no_grad():
        layer.weight.copy_(init)
    return layer.to(dtype=like.dtype, device=like.device)


class _UnitHarness(nn.Module):
    """``out_marker(unit(in_marker(x)))``: a prior between identity layers (see the module docstring).

    With ``markers=False`` the markers are ``nn.Identity`` (counting MACs). A recovery block (a
    module taking ``physics``) runs as ``block(x, x, I, scales=scale_marker(1), AHy=x)``, in
    training mode when ``markers`` (ISTA-Net+'s training-mode symmetry term ties channels that
    the eval-mode graph does not show).
    """

    def __init__(self, unit: nn.Module, example: torch.Tensor, markers: bool = True) -> None:
        super().__init__()
        self.unit = unit
        self.markers = markers
        self.block = _takes_physics(unit)
        identity = nn.Identity()
        self.in_marker = _marker(example.shape[1], example.dim(), example) if markers else identity
        if self.block:
            channels = int(unit.channels)
            self.register_buffer("ones", torch.ones(1, channels, dtype=example.dtype, device=example.device))
            self.scale_marker = _marker(channels, 2, example) if markers else identity
        with torch.no_grad():
            out = self._run(example)[0]
        self.out_marker = _marker(out.shape[1], out.dim(), out) if markers else identity

    def marker_modules(self) -> list[nn.Module]:
        if not self.markers:
            return []
        return [self.in_marker, self.out_marker] + ([self.scale_marker] if self.block else [])

    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.block:
            return [self.unit(x)]
        was = self.unit.training
        self.unit.train(self.markers or was)
        try:
            out, aux = self.unit(x, x, _IdentityPhysics(), scales=self.scale_marker(self.ones), AHy=x)
        finally:
            self.unit.train(was)
        return [out, *aux.values()]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out, *extra = self._run(self.in_marker(x))
        out = self.out_marker(out)
        return [out, *extra] if extra else out


def _call(model: nn.Module, x: torch.Tensor) -> Any:
    return model(x)


def _default_size(unit: nn.Module) -> int:
    """32, or 2^(P+1) for a U-Net with P poolings (its bottleneck needs 2 x 2 pixels)."""
    pools = getattr(unit, "num_pool_layers", None) or getattr(getattr(unit, "unet", None), "num_pool_layers", None)
    return max(32, 2 ** (int(pools) + 1)) if pools else 32


def _first_layer(unit: nn.Module) -> nn.Module | None:
    return next((m for m in unit.modules() if isinstance(m, _LAYERS)), None)


def _example_for(
    unit: nn.Module, shape: Sequence[int] | None = None, given: torch.Tensor | None = None
) -> torch.Tensor:
    """A real example input of ``unit``: ``given``, zeros of ``shape``, or randn (1, C, H, W), H = W = 32.

    C is the unit's ``in_channels`` (priors) or ``image_channels`` (recovery blocks), else the
    first conv's input channels; a unit whose first layer is linear gets (1, in_features).
    Dtype and device are those of the unit's parameters.
    """
    param = next((p for p in unit.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if given is not None:
        if not isinstance(given, torch.Tensor) or given.is_complex() or not given.is_floating_point():
            raise TypeError(f"example_inputs: expected a real floating tensor (B, C, H, W), got {given!r:.80}")
        return given.detach().to(dtype=dtype, device=device)
    if shape is not None:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    channels = getattr(unit, "in_channels", None) or getattr(unit, "image_channels", None)
    first = _first_layer(unit)
    if isinstance(first, nn.Linear) and channels is None:
        dims: tuple[int, ...] = (1, first.in_features)
    else:
        if channels is None:
            if first is None:
                raise PruningError(f"prune_channels: {type(unit).__name__} has no conv or linear layer to prune")
            channels = first.in_channels
        size = _default_size(unit)
        dims = (1, int(channels), size, size)
    g = torch.Generator().manual_seed(0)
    return torch.randn(dims, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# Torch-Pruning with our rounding
# ------------------------------------------------------------------------------------------------
class _Pruner(tp.pruner.BasePruner):
    """Torch-Pruning's pruner with channel counts rounded down to multiples of round_to, never below it."""

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        if current_channels <= round_to:
            return 0
        kept = current_channels - n_pruned
        kept = max(round_to, kept - kept % round_to)
        return max(current_channels - kept, 0)


def _importance(importance: str | tp.importance.Importance) -> tp.importance.Importance:
    if isinstance(importance, tp.importance.Importance):
        return importance
    if importance == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if importance == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.RandomImportance()


def _channels(module: nn.Module) -> tuple[int, int] | None:
    """(output, input) channels of a conv, linear or batch-norm layer."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features, module.num_features
    return None


def _free_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """Parameters not held by a layer Torch-Pruning knows (its "unwrapped parameters")."""
    known = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.PReLU)
    held = {id(p) for m in unit.modules() if isinstance(m, known) for p in m.parameters(recurse=False)}
    return [p for p in unit.parameters() if id(p) not in held]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _set_widths(unit: nn.Module) -> tuple[int, ...] | None:
    """Write the actual output channels of ``width_layers()`` into the prior's ``widths``."""
    if not hasattr(unit, "width_layers"):
        return None
    modules = dict(unit.named_modules())
    widths = tuple(int(_channels(modules[name])[0]) for name in unit.width_layers())
    owner = unit
    # NormUNet exposes its U-Net's widths as a read-only property.
    while isinstance(getattr(type(owner), "widths", None), property) and hasattr(owner, "unet"):
        owner = owner.unet
    owner.widths = widths
    return widths


def _sync_num_features(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    module.num_features = int(inputs[0].shape[1])


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _config_rebuilds(module: nn.Module) -> bool | None:
    """Whether ``build(config_of(module))`` has the module's state-dict shapes; None if not registered."""
    try:
        config = config_of(module)
    except TypeError:
        return None
    return _shapes(build(config)) == _shapes(module)


class _UnitPruner:
    """Torch-Pruning on one prior: protection, pruning steps with a record of kept channels, checks."""

    def __init__(
        self,
        name: str,
        unit: nn.Module,
        example: torch.Tensor,
        importance: str | tp.importance.Importance,
        user_protected: set[nn.Module],
        *,
        ratio: float,
        round_to: int,
        global_pruning: bool,
        iterative_steps: int,
    ) -> None:
        self.name, self.unit, self.example = name, unit, example
        prefix = f"{name}." if name else ""
        self.names = {m: prefix + n for n, m in unit.named_modules() if n}
        self.record = UnitRecord(name=name, kind=type(unit).__name__)
        self.record.params_before = _params(unit)
        self.record.widths_before = tuple(unit.widths) if hasattr(unit, "widths") else None
        self.original = {m: c for m in self.names if (c := _channels(m)) is not None}

        self.harness = _UnitHarness(unit, example)
        with torch.no_grad():
            self.expected = [tuple(t.shape) for t in self._outputs()]
        markers = set(self.harness.marker_modules())
        layers = {m for m in unit.modules() if isinstance(m, _LAYERS)}

        with warnings.catch_warnings():
            if all(p.numel() == 1 for p in _free_parameters(unit)):
                # Scalars (step sizes, thresholds) have no channel to prune; Torch-Pruning still warns.
                warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            graph = tp.DependencyGraph().build_dependency(self.harness, example_inputs=example, forward_fn=_call)
            auto: set[nn.Module] = set()
            for group in graph.get_all_groups(root_module_types=list(_LAYERS)):
                if any(dep.target.module in markers for dep, _ in group):
                    auto |= {
                        dep.target.module
                        for dep, _ in group
                        if dep.target.module in layers and graph.is_out_channel_pruning_fn(dep.handler)
                    }
            fixed: set[nn.Module] = set()
            if hasattr(unit, "width_layers"):
                modules = dict(unit.named_modules())
                fixed = layers - {modules[n] for n in unit.width_layers()} - auto
            user = {m for m in layers if m in user_protected}
            self.record.protected_auto = sorted(self.names[m] for m in auto)
            self.record.protected_fixed = sorted(self.names[m] for m in fixed)
            self.record.protected_user = sorted(self.names[m] for m in user)

            self.pruner = _Pruner(
                self.harness,
                example,
                importance=_importance(importance),
                global_pruning=global_pruning,
                pruning_ratio=ratio,
                iterative_steps=iterative_steps,
                ignored_layers=list(markers | auto | fixed | user),
                round_to=round_to,
                forward_fn=_call,
            )

    def _outputs(self) -> list[torch.Tensor]:
        out = self.harness(self.example)
        return out if isinstance(out, list) else [out]

    def step(self) -> None:
        graph = self.pruner.DG
        for group in self.pruner.step(interactive=True):
            if len(group[0].idxs) == 0:
                continue
            for item in group:
                module = item.dep.target.module
                if module not in self.names:
                    continue  # markers and Torch-Pruning's stand-ins for functional ops
                removed = set(item.idxs)
                for direction, is_fn, count in (
                    ("out", graph.is_out_channel_pruning_fn, graph.get_out_channels),
                    ("in", graph.is_in_channel_pruning_fn, graph.get_in_channels),
                ):
                    if not is_fn(item.dep.handler):
                        continue
                    kept = self.record.kept.setdefault(self.names[module], {})
                    if direction not in kept:
                        kept[direction] = list(range(count(module)))
                    kept[direction] = [k for i, k in enumerate(kept[direction]) if i not in removed]
            group.prune()

    def finish(self) -> UnitRecord:
        """Sync widths and check the pruned prior; return its record."""
        rec, unit = self.record, self.unit
        rec.params_after = _params(unit)
        where = f"{rec.kind}" + (f" at {rec.name!r}" if rec.name else "")
        if rec.params_after >= rec.params_before:
            raise PruningError(
                f"prune_channels: nothing was pruned in {where} (torch-pruning found no prunable groups: every "
                f"layer is protected or has at most round_to channels, or the ratio removes no channel); "
                f"protected automatically: {rec.protected_auto}, by the config: {rec.protected_fixed}, "
                f"by you: {rec.protected_user}"
            )
        self._check_kept()
        rec.widths_after = _set_widths(unit)
        # Torch-Pruning leaves num_features of affine-free instance norms stale (PyTorch then warns on
        # every call): set it from the first input they see.
        hooks = [
            m.register_forward_pre_hook(_sync_num_features)
            for m in unit.modules()
            if isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.affine
        ]
        try:
            with torch.no_grad():
                got = [tuple(t.shape) for t in self._outputs()]
        except RuntimeError as err:
            raise PruningError(f"prune_channels: the pruned {where} fails on its example input ({err})") from err
        finally:
            for h in hooks:
                h.remove()
        if got != self.expected:
            raise PruningError(
                f"prune_channels: the pruned {where} outputs shapes {got} on its example input "
                f"{tuple(self.example.shape)}, the dense one {self.expected}"
            )
        for tied in unit.tied_widths() if hasattr(unit, "tied_widths") else []:
            values = {rec.widths_after[i] for i in tied}
            if len(values) != 1:
                raise PruningError(
                    f"prune_channels: tied widths {tied} of {where} differ after pruning: {rec.widths_after}"
                )
        rec.config_rebuilds = _config_rebuilds(unit)
        if rec.config_rebuilds is False:
            if hasattr(unit, "width_layers"):
                raise PruningError(f"prune_channels: the config of the pruned {where} does not rebuild its shapes")
            warnings.warn(
                f"prune_channels: {rec.kind}'s config has no per-layer widths, so the pruned {where} cannot be "
                "rebuilt from it: save_model would write a checkpoint that load_model refuses",
                PruningWarning,
                stacklevel=3,
            )
        return rec

    def _check_kept(self) -> None:
        """The record must describe the actual shapes: every layer's kept counts equal its channels."""
        for module, (out0, in0) in self.original.items():
            now = _channels(module)
            kept = self.record.kept.get(self.names[module], {})
            want = (len(kept.get("out", range(out0))), len(kept.get("in", range(in0))))
            if now != want:
                raise PruningError(
                    f"prune_channels: internal error: {self.names[module]} has (out, in) channels {now}, "
                    f"the pruning record says {want}"
                )


# ------------------------------------------------------------------------------------------------
# Taylor importance: gradients of a loss
# ------------------------------------------------------------------------------------------------
TaylorBatches = Iterable[tuple[Any, torch.Tensor]] | Callable[[nn.Module], torch.Tensor]


def _gradients(model: nn.Module, batches: list[tuple[Any, torch.Tensor]] | Callable[[nn.Module], torch.Tensor]) -> None:
    """Accumulate d loss / d parameters in ``.grad`` (from zero)."""
    for p in model.parameters():
        p.grad = None
    if callable(batches):
        losses = [batches(model)]
    else:
        losses = []
        for item in batches:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise TypeError(f"taylor_batches: expected (model input, target) pairs, got {type(item).__name__}")
            inputs, target = item
            out = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
            losses.append((out - target).abs().pow(2).mean())
    if not losses:
        raise ValueError("taylor_batches: expected at least one batch, got none")
    for loss in losses:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise TypeError("taylor_batches: the loss must be a scalar tensor that depends on the model's parameters")
        loss.backward()


# ------------------------------------------------------------------------------------------------
# The public entry point
# ------------------------------------------------------------------------------------------------
def _check_args(ratio: float, importance: Any, round_to: int, iterative_steps: int, taylor_batches: Any) -> str:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"ratio: expected a fraction of channels to remove, 0 < ratio < 1, got {ratio!r}")
    if isinstance(importance, tp.importance.Importance):
        name = type(importance).__name__
    elif importance in IMPORTANCES:
        name = importance
    else:
        raise ValueError(f"importance: expected one of {IMPORTANCES} or a torch_pruning Importance, got {importance!r}")
    for arg, value in (("round_to", round_to), ("iterative_steps", iterative_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected an int >= 1, got {value!r}")
    if name == "taylor" and taylor_batches is None:
        raise ValueError(
            "importance='taylor' needs gradients: pass taylor_batches, an iterable of (model input, target) "
            "pairs or a callable model -> scalar loss"
        )
    return name


def _protected_modules(model: nn.Module, copy_: nn.Module, protect: Iterable[str | nn.Module]) -> set[nn.Module]:
    """The layers of ``copy_`` named (or given as modules of ``model``) in ``protect``, with their sublayers."""
    if isinstance(protect, (str, nn.Module)):
        protect = [protect]
    by_name = dict(model.named_modules())
    by_module = {id(m): n for n, m in by_name.items()}
    in_copy = dict(copy_.named_modules())
    out: set[nn.Module] = set()
    for item in protect:
        name = by_module.get(id(item)) if isinstance(item, nn.Module) else item
        if not isinstance(name, str) or name not in by_name:
            known = [n for n, m in by_name.items() if isinstance(m, _LAYERS)][:12]
            raise ValueError(f"protect: {item!r:.60} is not a module of the model; layer names look like {known}")
        out |= set(in_copy[name].modules())
    return out


def _forward_check(model: nn.Module, pruned: nn.Module, check_inputs: Sequence[Any]) -> None:
    if not isinstance(check_inputs, (tuple, list)):
        check_inputs = (check_inputs,)
    with torch.no_grad():
        dense_out = model(*check_inputs)
        try:
            out = pruned(*check_inputs)
        except RuntimeError as err:
            raise PruningError(f"prune_channels: the pruned model fails on check_inputs ({err})") from err
    if not isinstance(out, torch.Tensor) or out.shape != dense_out.shape or out.dtype != dense_out.dtype:
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise PruningError(
            f"prune_channels: on check_inputs the pruned model outputs {got}, "
            f"the dense one {dense_out.dtype} {tuple(dense_out.shape)}"
        )
    if not torch.isfinite(out).all():
        raise PruningError("prune_channels: the pruned model outputs NaN/Inf on check_inputs")


def prune_channels(
    model: nn.Module,
    ratio: float,
    importance: str | tp.importance.Importance = "l1",
    example_inputs: torch.Tensor | None = None,
    round_to: int = 8,
    global_pruning: bool = False,
    iterative_steps: int = 1,
    taylor_batches: TaylorBatches | None = None,
    protect: Iterable[str | nn.Module] = (),
    check_inputs: Sequence[Any] | None = None,
) -> nn.Module:
    r"""A copy of ``model`` whose CNN prior(s) have fewer channels; ``model`` itself is not changed.

    Each prior found by :func:`find_priors` (a DEQ's prior, every prior of an untied DeepUnfolding
    or the one of a tied one, every VarNet cascade, every RecursiveUnfolding block, a bare prior,
    any user ``nn.Module``) is pruned separately, with the same ``ratio``; layers carrying image
    channels are protected automatically (module docstring). The returned model has
    ``pruning_record`` (:class:`PruningRecord`): the kept channel indices of every pruned layer,
    protected layers, widths and parameter counts before and after.

    Args:
        model: the dense model (any mode, any dtype/device).
        ratio: fraction :math:`r \in (0, 1)` of channels to remove in each coupled group (uniform), or
            overall in each prior (``global_pruning``); channel counts are then rounded (``round_to``).
        importance: ``"l1"``, ``"l2"`` (group magnitude), ``"taylor"`` (first-order Taylor, needs
            ``taylor_batches``), ``"random"``, or a ``torch_pruning.importance.Importance``.
        example_inputs: a real ``(B, C, H, W)`` input of the prior(s), used to trace them; default
            randn ``(1, C, 32, 32)`` with C the prior's input channels (``2^(P+1)`` pixels for a
            U-Net with P > 4 poolings).
        round_to: kept channels are multiples of this (rounded down from :math:`(1 - r) c`), never
            fewer than ``round_to``; a group with at most ``round_to`` channels is not pruned.
        global_pruning: rank the channels of all groups of a prior together (Torch-Pruning's global
            ranking, normalised importances) instead of removing ``ratio`` of every group. Each prior
            is still ranked on its own.
        iterative_steps: prune in this many steps of growing ratio (:math:`r k / n`), re-ranking
            (and, for Taylor, recomputing gradients) between steps.
        taylor_batches: for ``"taylor"``: an iterable of ``(model input, target)`` pairs, where the
            input is a tensor or a tuple of the model's positional arguments (e.g. ``((y, physics),
            x)`` for a solver, ``(x_noisy, x)`` for a prior); the loss is
            :math:`\mathrm{mean}|f(\text{input}) - \text{target}|^2`, summed over the pairs (materialised
            once: a generator is read one time). Or a callable ``loss(model) -> scalar tensor``. The
            gradients are those of the (partly pruned) copy in eval mode, so that batch-norm statistics
            stay the dense model's; parameters frozen in ``model`` get gradients too.
        protect: more layers (module names in ``model``, or its modules) whose output channels are
            kept, with every channel tied to them. Their input channels still follow the layer that
            feeds them.
        check_inputs: positional arguments of ``model`` (e.g. ``(y, physics)``, a tiny real problem):
            the pruned model must run on them and match the dense output's shape and dtype.

    Returns:
        The pruned copy, in the mode of ``model``, parameters' ``requires_grad`` as in ``model``,
        ``.grad`` cleared. Tracing, importance and checks all run in eval mode; ``model``'s modes
        and batch-norm statistics are left as they were.

    Raises:
        PruningError: nothing was pruned in some prior, or a pruned prior's output shape changed,
            or tied widths differ, or the pruned model fails ``check_inputs``.
        ValueError, TypeError: bad arguments.

    Warns:
        PruningWarning: a registered prior whose config has no per-layer widths (RecursiveUnfolding
            blocks) was pruned: the model works, but ``save_model`` -> ``load_model`` cannot rebuild it.
    """
    importance_name = _check_args(ratio, importance, round_to, iterative_steps, taylor_batches)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    pruned = copy.deepcopy(model)
    user_protected = _protected_modules(model, pruned, protect)
    units = find_priors(pruned)
    batches = list(taylor_batches) if importance_name == "taylor" and not callable(taylor_batches) else taylor_batches
    modes = {m: m.training for m in (*pruned.modules(), *model.modules())}
    try:
        # Everything runs in eval mode: no batch-norm statistics change (in the copy or in the dense
        # model), no dropout, RecursiveUnfolding's recursion counts fixed.
        pruned.eval()
        model.eval()
        with torch.enable_grad():
            # Tracing needs autograd graphs, and Taylor needs gradients, through frozen models too.
            for p in pruned.parameters():
                p.requires_grad_(True)
            pruners = [
                _UnitPruner(
                    name,
                    unit,
                    _example_for(unit, given=example_inputs),
                    importance,
                    user_protected,
                    ratio=float(ratio),
                    round_to=round_to,
                    global_pruning=bool(global_pruning),
                    iterative_steps=iterative_steps,
                )
                for name, unit in units
            ]
            for _ in range(iterative_steps):
                if importance_name == "taylor":
                    _gradients(pruned, batches)
                    _check_gradients(pruners)
                for unit_pruner in pruners:
                    unit_pruner.step()
        for p in pruned.parameters():
            p.grad = None
        records = [unit_pruner.finish() for unit_pruner in pruners]
        if _config_rebuilds(pruned) is False and all(r.config_rebuilds is not False for r in records):
            raise PruningError(f"prune_channels: the config of the pruned {type(pruned).__name__} does not rebuild it")
        if check_inputs is not None:
            _forward_check(model, pruned, check_inputs)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    # Pruned parameters are new tensors: take their flags from the dense model, by name.
    dense_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in pruned.named_parameters():
        p.requires_grad_(dense_flags.get(name, True))
    pruned.pruning_record = PruningRecord(
        ratio=float(ratio),
        importance=importance_name,
        round_to=round_to,
        global_pruning=bool(global_pruning),
        iterative_steps=iterative_steps,
        units=records,
        params_before=_params(model),
        params_after=_params(pruned),
    )
    return pruned


def _check_gradients(pruners: list[_UnitPruner]) -> None:
    for unit_pruner in pruners:
        missing = [
            unit_pruner.names[m] for m in unit_pruner.unit.modules() if isinstance(m, _LAYERS) and m.weight.grad is None
        ]
        if missing:
            raise PruningError(
                f"prune_channels: importance='taylor' needs gradients, but the loss of taylor_batches does not "
                f"reach {missing[:4]} (prior {unit_pruner.name or type(unit_pruner.unit).__name__!r})"
            )
