"""``accelerate(model)``: fast layers, channels_last, fused DC and CUDA graphs for a trained or pruned model, in place.

    model = accelerate(load_pretrained("deq_mri_4x").cuda(), example_inputs=(y, physics))
    print(model.acceleration)          # what was applied, what fell back, what was skipped and why
    x = model(y, physics)              # the same call, the same result within the tolerance table

Steps, each applied where it can run and otherwise reported as skipped with the reason:

1. fast layers: ``mbdl_fast.layers.to_fast`` (fused conv + bias + ReLU + residual; on a CPU every
   layer runs F.conv2d with the same semantics: reported as a fallback).
2. channels_last: the priors' weights and inputs in NHWC (the Triton kernel's layout and cuDNN's
   fastest; oneDNN's too on a CPU).
3. fused DC: the solver's ``dc_backend`` set to the fused Triton step (CUDA only).
4. CUDA graphs (CUDA only): the solver's ``execution`` option set to ``"cuda_graph"`` (DEQ, DeepUnfolding,
   VarNet; ``mbdl_fast.solvers.execution`` says what runs in the graphs). ``cuda_graphs="eager"`` sets
   ``"static_buffers"`` instead: the same static-buffer code without capture, on any device, to test it.

Nothing here patches the model: each step sets an option or converts layers, so an accelerated model saves,
copies and runs like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mbdl_fast.backends import resolve_backend
from mbdl_fast.layers import fast_layers as list_fast_layers
from mbdl_fast.layers import to_fast
from mbdl_fast.solvers import DEQ, DeepUnfolding, VarNet, find_priors
from mbdl_fast.solvers.execution import ExecutionCache

__all__ = ["AccelerationReport", "accelerate"]

GRAPH_MODES = ("auto", "off", "eager")


@dataclass
class AccelerationStep:
    name: str
    status: str  # "applied" | "fallback" | "skipped"
    detail: str


@dataclass
class AccelerationReport:
    """What ``accelerate`` did to a model: one row per step, and how the last call ran."""

    device: str
    steps: list[AccelerationStep] = field(default_factory=list)
    cache: ExecutionCache | None = field(default=None, repr=False)

    @property
    def last_mode(self) -> str:
        """How the model's last call ran (its ``execution_cache``), e.g. "CUDA graphs: 24 iterations run for 22 needed"."""
        return "not called yet" if self.cache is None else self.cache.last_mode

    def add(self, name: str, status: str, detail: str) -> None:
        self.steps.append(AccelerationStep(name, status, detail))

    def status(self, name: str) -> str:
        return next(s.status for s in self.steps if s.name == name)

    def __str__(self) -> str:
        lines = [f"accelerate on {self.device}:"]
        lines += [f"  {s.name:<14}{s.status:<9}{s.detail}" for s in self.steps]
        lines.append(f"  last call: {self.last_mode}")
        return "\n".join(lines)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _channels_last_hook(module, args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        args = (_to_channels_last(args[0]), *args[1:])
    return args, kwargs


def accelerate(
    model: nn.Module,
    example_inputs: tuple | None = None,
    *,
    fast_layers: bool = True,
    channels_last: bool = True,
    fused_dc: bool = True,
    cuda_graphs: str = "auto",
    chunk: int | None = None,
    conv_backend: str = "auto",
    dc_backend: str = "auto",
    allow_tf32: bool = True,
) -> nn.Module:
    """Turn on every fast path that runs here for ``model`` (a DEQ, DeepUnfolding, VarNet or bare prior), in place.

    Args:
        model: the trained (or pruned) model, on its device; parameters are shared, not copied.
        example_inputs: ``(y, physics)`` to warm up and capture the graphs now (else on the first call).
        fast_layers: convert the priors with ``to_fast`` (``conv_backend``, ``allow_tf32``).
        channels_last: priors' weights and inputs in NHWC.
        fused_dc: set the solver's DC backend to ``dc_backend`` resolved on the model's device
            ("auto": the fused Triton step on a GPU).
        cuda_graphs: "auto" (capture on a GPU, skipped on a CPU), "off", or "eager" (the static-buffer
            code path without capture, on any device: for tests).
        chunk: DEQ iterations per captured graph (default: the Anderson history size m).
        allow_tf32: TF32 tensor cores in the fast layers (False: exact fp32, tighter equivalence).

    Returns:
        ``model``, its options set (``dc_backend``, ``execution``, ``graph_chunk``: saved with it), with
        ``model.acceleration`` (an :class:`AccelerationReport`: each step applied, fallen back or skipped, with the
        reason). Call it as before: ``model(y, physics)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if cuda_graphs not in GRAPH_MODES:
        raise ValueError(f"cuda_graphs: expected one of {GRAPH_MODES}, got {cuda_graphs!r}")
    if getattr(model, "acceleration", None) is not None:
        raise ValueError("model: already accelerated; accelerate a fresh model (or a deepcopy of the original)")
    device = _device_of(model)
    on_gpu = device.type == "cuda"
    report = AccelerationReport(device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if on_gpu else ""))
    priors = [p for _, p in find_priors(model)]

    # 1. fast layers
    if fast_layers:
        for prior in priors:
            to_fast(prior, backend=conv_backend, allow_tf32=allow_tf32)
        layers = list_fast_layers(model)
        fused = sum("fused []" not in line for line in layers)
        if on_gpu:
            report.add("fast layers", "applied", f"{len(layers)} FastConv2d ({fused} with a fused epilogue), "
                       f"backend {conv_backend!r}, TF32 {'on' if allow_tf32 else 'off'}")  # fmt: skip
        else:
            report.add("fast layers", "fallback", f"{len(layers)} FastConv2d ({fused} fused patterns) run F.conv2d "
                       "and a PyTorch epilogue on a CPU: the fused Triton kernel needs a CUDA device")  # fmt: skip
    else:
        report.add("fast layers", "skipped", "fast_layers=False")

    # 2. channels_last
    if channels_last:
        for prior in priors:
            prior.to(memory_format=torch.channels_last)
            prior.register_forward_pre_hook(_channels_last_hook, with_kwargs=True)
        report.add("channels_last", "applied", f"{len(priors)} prior(s): NHWC weights and inputs")
    else:
        report.add("channels_last", "skipped", "channels_last=False")

    # 3. fused DC
    if not isinstance(model, (DEQ, DeepUnfolding)):
        report.add("fused DC", "skipped", f"{type(model).__name__} takes no dc_step")
    elif not fused_dc:
        report.add("fused DC", "skipped", "fused_dc=False")
    else:
        name = resolve_backend(dc_backend, device, ("torch", "triton"))
        if isinstance(model, DEQ):
            model.configure(dc_backend=name)
        else:
            model.dc_backend = name
        if name == "torch":
            report.add("fused DC", "skipped", f"no fused DC backend on {device.type} (the Triton step needs a CUDA "
                       "device); the torch reference runs")  # fmt: skip
        else:
            report.add("fused DC", "applied", f"dc_backend={name!r}")

    # 4. CUDA graphs
    capture = cuda_graphs == "auto"
    graphable = isinstance(model, (DEQ, DeepUnfolding, VarNet))
    if cuda_graphs == "off":
        report.add("CUDA graphs", "skipped", "cuda_graphs='off'")
    elif not graphable:
        report.add("CUDA graphs", "skipped", f"graphs capture solver iterations (DEQ, DeepUnfolding, VarNet); "
                   f"got {type(model).__name__}")  # fmt: skip
    elif capture and not on_gpu:
        report.add("CUDA graphs", "skipped", "needs a CUDA device")
    else:
        mode = "cuda_graph" if capture else "static_buffers"
        if isinstance(model, DEQ):
            m = model.solver_options["anderson_m"]
            n = chunk if chunk is not None else m
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
            model.configure(execution=mode, graph_chunk=chunk)
            what = f"DEQ forward solve in chunks of {n} iterations, convergence checked between chunks"
        else:
            model.execution = mode
            what = f"{type(model).__name__} forward (fixed K) in one graph under torch.no_grad()"
        what += f" (execution={mode!r})"
        if capture:
            report.add("CUDA graphs", "applied", what)
        else:
            report.add("CUDA graphs", "fallback", what + "; static buffers run eagerly (cuda_graphs='eager')")
    report.cache = getattr(model, "execution_cache", None)
    model.acceleration = report
    if example_inputs is not None:
        with torch.no_grad():
            model(*example_inputs)
    return model
