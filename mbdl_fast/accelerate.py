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
4. CUDA graphs (CUDA only; ``cuda_graphs="eager"`` runs the same static-buffer code without capture,
   on any device, to test it):
   - DEQ: the forward solve runs in static buffers, ``chunk`` solver iterations (Anderson or plain)
     per captured graph, the convergence check between graphs (one host sync per graph). The
     per-sample freezing, best-iterate tracking, iteration counts and residual trace are kept
     inside the graph, so the result is the solver's: a sample that converges inside a chunk is
     frozen there. Near convergence (extrapolated from the residual), single-iteration graphs
     replace whole chunks so that few iterations are wasted. The DEQ's output application and its
     backward (JFB or implicit) run eagerly as before.
   - DeepUnfolding (PGD, or HQS with a closed-form prox) and VarNet: the whole K-iteration forward
     is one graph, replayed under ``torch.no_grad()``; with autograd on it runs eagerly.
   Graphs are keyed by shapes, mask structure and solver options, captured on first use (after a
   warm-up that compiles kernels and times the conv choices), and fed by copying y, A^H y, the mask
   and coil maps into their static buffers. Only ``MultiCoilMRI`` / ``MRI`` (complex layout)
   physics have such buffers; other physics run the eager solver (``model.acceleration.last_mode``).

The Anderson step inside a graph solves its (m x m) system by unpivoted elimination (the Gram
matrix plus a Tikhonov term is positive definite), with no host synchronisation, instead of
``torch.linalg.solve`` on the bordered system: the same coefficients up to rounding, so the
iterates match the eager solver to rounding and the fixed point to the tolerance (tests/test_accelerate.py).
"""

from __future__ import annotations

import copy
import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mbdl_fast.backends import resolve_backend
from mbdl_fast.physics.mri import MultiCoilMRI

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
    last_mode: str = "not called yet"

    def add(self, name: str, status: str, detail: str) -> None:
        self.steps.append(AccelerationStep(name, status, detail))

    def status(self, name: str) -> str:
        return next(s.status for s in self.steps if s.name == name)

    def __str__(self) -> str:
        lines = [f"accelerate on {self.device}:"]
        lines += [f"  {s.name:<14}{s.status:<9}{s.detail}" for s in self.steps]
        lines.append(f"  last call: {self.last_mode}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Static physics: the graph's inputs, refilled per call
# ------------------------------------------------------------------------------------------------
def _graphable_physics(physics: nn.Module) -> str | None:
    """Why ``physics`` has no static-buffer copy, or None."""
    if not isinstance(physics, MultiCoilMRI):
        return f"physics {type(physics).__name__} has no static buffers (MultiCoilMRI / MRI only)"
    if physics.layout != "complex":
        return f"physics layout {physics.layout!r} (the complex layout only)"
    return None


def _physics_key(physics: nn.Module) -> tuple:
    maps = physics.coil_maps
    return (
        tuple(physics.mask.shape),
        tuple(physics._mask_axes),
        physics.mask_is_binary(),  # one host sync per call: it picks M or M² in the normal operator
        None if maps is None else (tuple(maps.shape), maps.dtype),
    )


class _StaticMRI(MultiCoilMRI):
    """MultiCoilMRI whose mask and coil maps are buffers of fixed address (graph inputs), refilled by ``load``."""

    def __init__(self, physics: MultiCoilMRI) -> None:
        maps = None if physics.coil_maps is None else physics.coil_maps.clone()
        super().__init__(physics.mask.clone(), maps, layout=physics.layout, cg_tol=physics.cg_tol,
                         cg_max_iter=physics.cg_max_iter)  # fmt: skip
        self._binary = physics.mask_is_binary()

    def mask_is_binary(self) -> bool:  # fixed per graph key: no host sync inside a capture
        return self._binary

    def load(self, source: MultiCoilMRI) -> None:
        self.mask.copy_(source.mask)
        if self.coil_maps is not None:
            self.coil_maps.copy_(source.coil_maps)


# ------------------------------------------------------------------------------------------------
# A fixed-point solver in static buffers, without host synchronisation inside an iteration
# ------------------------------------------------------------------------------------------------
def _spd_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """a^{-1} rhs for a batch of (m, m) Hermitian positive definite a, by elimination without pivoting."""
    a = a.clone()
    r = rhs.clone()
    m = a.shape[-1]
    for i in range(m - 1):
        factor = a[:, i + 1 :, i] / a[:, i : i + 1, i]
        a[:, i + 1 :, :] -= factor[:, :, None] * a[:, i : i + 1, :]
        r[:, i + 1 :] -= factor * r[:, i : i + 1]
    x = torch.zeros_like(r)
    for i in reversed(range(m)):
        x[:, i] = (r[:, i] - (a[:, i, i + 1 :] * x[:, i + 1 :]).sum(dim=1)) / a[:, i, i]
    return x


class _StaticSolver:
    """The state of ``anderson_solve`` / ``fixed_point_solve`` (fixed_point.py) in fixed buffers.

    ``step`` is one iteration of either solver, written with device tensors only (iteration index,
    history count, history slot), so that any number of them can be captured in one CUDA graph.
    """

    def __init__(self, z0: torch.Tensor, options: dict[str, Any]) -> None:
        self.shape = z0.shape
        self.o = options
        b = z0.shape[0]
        x = z0.reshape(b, -1)
        real = x.real.dtype if x.is_complex() else x.dtype
        dev = x.device
        self.x = x.clone()
        self.best = x.clone()
        self.best_res = torch.empty(b, dtype=real, device=dev)
        self.converged = torch.empty(b, dtype=torch.bool, device=dev)
        self.iters = torch.empty(b, dtype=torch.int64, device=dev)
        self.k = torch.empty((), dtype=torch.int64, device=dev)
        self.trace = torch.zeros(options["max_iter"] + 1, b, dtype=real, device=dev)
        self.anderson = options["solver"] == "anderson"
        if self.anderson:
            m = options["m"]
            self.X = torch.zeros(b, m, x.shape[1], dtype=x.dtype, device=dev)
            self.F = torch.zeros_like(self.X)
            self.count = torch.empty((), dtype=torch.int64, device=dev)
            real_coef = not x.is_complex() or options["coefficients"] == "real"
            self.coef_dtype = real if real_coef else x.dtype
            self.eye = torch.eye(m, dtype=self.coef_dtype, device=dev)
            self.slots = torch.arange(m, device=dev)

    def reset(self, z0: torch.Tensor) -> None:
        flat = z0.reshape(self.x.shape)
        self.x.copy_(flat)
        self.best.copy_(flat)
        self.best_res.fill_(math.inf)
        self.converged.zero_()
        self.iters.zero_()
        self.k.zero_()
        if self.anderson:
            self.X.zero_()
            self.F.zero_()
            self.count.zero_()

    def step(self, f) -> None:
        from mbdl_fast.solvers.fixed_point import _residual

        o = self.o
        x = self.x
        fx = f(x.view(self.shape)).reshape(x.shape)
        res = _residual(fx, x, o["stop_mode"])
        active = ~self.converged & (self.k < o["max_iter"])
        better = active & (res < self.best_res)
        self.best.copy_(torch.where(better[:, None], x, self.best))
        self.best_res.copy_(torch.where(better, res, self.best_res))
        self.iters.copy_(torch.where(active, self.k + 1, self.iters))
        row = torch.where(active, res, self.best_res).unsqueeze(0)
        self.trace.index_copy_(0, self.k.clamp(max=o["max_iter"]).view(1), row)
        self.converged.copy_(self.converged | (active & (res <= o["tol"])))
        new = self._anderson(x, fx) if self.anderson else fx
        self.x.copy_(torch.where(self.converged[:, None], self.best, new))
        self.k.add_(1)

    def _anderson(self, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        o = self.o
        slot = (self.k % o["m"]).view(1)
        self.X.index_copy_(1, slot, x[:, None])
        self.F.index_copy_(1, slot, fx[:, None])
        self.count.copy_(torch.clamp(self.count + 1, max=o["m"]))
        G = self.F - self.X  # slots not filled yet are zero: their rows and columns of the Gram matrix vanish
        gram = torch.bmm(G.conj(), G.transpose(1, 2))
        if self.coef_dtype != gram.dtype:
            gram = gram.real
        scale = torch.diagonal(gram, dim1=1, dim2=2).real.sum(dim=1) / self.count
        solvable = ~self.converged & (scale > 0)
        mu = torch.where(solvable, o["lam"] * scale, 1.0).to(self.coef_dtype)
        gram = torch.where(solvable[:, None, None], gram, self.eye) + mu[:, None, None] * self.eye
        # a = H^{-1} 1 / (1^T H^{-1} 1) over the filled slots: the bordered system's solution.
        ones = (self.slots < self.count).to(self.coef_dtype).expand(gram.shape[0], -1)
        a = _spd_solve(gram, ones)
        a = (a / a.sum(dim=1, keepdim=True)).to(x.dtype)
        mixed = torch.bmm(a[:, None, :], self.F)[:, 0]
        if o["beta"] != 1.0:
            mixed = o["beta"] * mixed + (1 - o["beta"]) * torch.bmm(a[:, None, :], self.X)[:, 0]
        return mixed

    def finish(self, name: str) -> tuple[torch.Tensor, dict]:
        from mbdl_fast.solvers.fixed_point import ConvergenceWarning

        iterations = int(self.iters.max())
        info = {
            "iterations": iterations,
            "iterations_per_sample": self.iters.clone(),
            "residual": self.best_res.clone(),
            "trace": list(self.trace[:iterations].clone().unbind(0)),
            "converged": self.converged.clone(),
            "evaluations_run": int(self.k),
        }
        failed = int((~self.converged).sum())
        if failed:
            worst = float(self.best_res[~self.converged].max())
            warnings.warn(
                f"{name}: {failed} of {self.shape[0]} samples did not converge to tol={self.o['tol']:g} in "
                f"max_iter={self.o['max_iter']} iterations (largest final residual {worst:.3e}); see info['converged']",
                ConvergenceWarning,
                stacklevel=4,
            )
        return self.best.view(self.shape).clone(), info


class _Graphs:
    """CUDA graphs of a zero-argument body, one per length, sharing one memory pool; or eager runs."""

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.graphs: dict[Any, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def run(self, key: Any, body) -> None:
        if not self.capture:
            body()
            return
        graph = self.graphs.get(key)
        if graph is None:
            raise RuntimeError(f"no graph captured for {key!r}")
        graph.replay()

    def capture_now(self, key: Any, body, warmup: int = 2) -> None:
        """Run ``body`` ``warmup`` times on a side stream (compiles kernels, fills plan and choice caches), then capture it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                body()
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            body()
        self.graphs[key] = graph


# ------------------------------------------------------------------------------------------------
# DEQ: the forward solve in chunks of captured iterations
# ------------------------------------------------------------------------------------------------
class _DEQSolve:
    """One captured solve set-up: static physics, A^H y, solver state and its graphs (chunk and 1 iterations)."""

    def __init__(self, deq: nn.Module, physics: nn.Module, ahy: torch.Tensor, options: dict, chunk: int, capture: bool):
        self.deq = deq
        self.physics = _StaticMRI(physics)
        self.ahy = ahy.clone()
        self.state = _StaticSolver(ahy, options)
        self.chunk = chunk
        self.graphs = _Graphs(capture)
        self.captured = False

    def _f(self, z: torch.Tensor) -> torch.Tensor:
        deq = self.deq
        return deq._operator(z, self.physics, self.ahy, deq.alpha, deq.gamma)

    def _body(self, steps: int):
        def body() -> None:
            for _ in range(steps):
                self.state.step(self._f)

        return body

    def solve(self, z0: torch.Tensor) -> tuple[torch.Tensor, dict]:
        st, o = self.state, self.state.o
        lengths = sorted({self.chunk, 1}, reverse=True)
        if self.graphs.capture and not self.captured:
            st.reset(z0)
            for n in lengths:
                self.graphs.capture_now(n, self._body(n))
            self.captured = True
        st.reset(z0)
        done, history = 0, []
        while done < o["max_iter"]:
            n = self._next_length(done, history)
            self.graphs.run(n, self._body(n))
            done += n
            all_converged, worst = torch.stack(
                [st.converged.all().to(st.best_res.dtype), torch.where(st.converged, 0, st.best_res).max()]
            ).tolist()  # the one host sync per graph
            if all_converged:
                break
            history.append((done, worst))
        return st.finish("anderson_solve (static buffers)" if st.anderson else "fixed_point_solve (static buffers)")

    def _next_length(self, done: int, history: list[tuple[int, float]]) -> int:
        """A whole chunk, unless the residual's log-linear trend says the solve ends within it."""
        o = self.state.o
        if self.chunk == 1 or o["max_iter"] - done < self.chunk:
            return 1
        if len(history) >= 2:
            (k0, r0), (k1, r1) = history[-2], history[-1]
            if r0 > 0 and r1 > 0 and math.isfinite(r0) and math.isfinite(r1):
                rate = (math.log(r1) - math.log(r0)) / (k1 - k0)
                if rate < 0 and (math.log(o["tol"]) - math.log(r1)) / rate < self.chunk:
                    return 1
        return self.chunk


class _DEQRunner:
    """Bound as ``deq.fixed_point``: the static-buffer solve where it applies, the DEQ's own elsewhere."""

    def __init__(self, deq: nn.Module, report: AccelerationReport, chunk: int, capture: bool) -> None:
        self.deq = deq
        self.report = report
        self.chunk = chunk
        self.capture = capture
        self.solves: dict[tuple, _DEQSolve] = {}

    def __deepcopy__(self, memo):  # a copied model gets its own graphs, captured on its first call
        new = _DEQRunner.__new__(_DEQRunner)
        new.deq = copy.deepcopy(self.deq, memo)
        new.report = copy.deepcopy(self.report, memo)
        new.chunk, new.capture, new.solves = self.chunk, self.capture, {}
        return new

    def options(self) -> dict[str, Any]:
        s = self.deq.solver_options
        return {
            "solver": "anderson" if s["f_solver"] == "anderson" else "fixed_point_iter",
            "tol": s["f_tol"],
            "max_iter": s["f_max_iter"],
            "stop_mode": s["f_stop_mode"],
            "m": s["anderson_m"],
            "lam": s["anderson_lam"],
            "beta": s["anderson_beta"],
            "coefficients": s["anderson_coefficients"],
            "dc_backend": s["dc_backend"],
        }

    def fixed_point(self, y, physics, x0=None, AHy=None):
        deq = self.deq
        reason = _graphable_physics(physics)
        if reason is not None:
            self.report.last_mode = f"eager solver: {reason}"
            return type(deq).fixed_point(deq, y, physics, x0=x0, AHy=AHy)
        with torch.no_grad():
            if AHy is None:
                AHy = physics.A_adjoint(y)
            z0 = AHy if x0 is None else x0
            options = self.options()
            key = (tuple(AHy.shape), AHy.dtype, str(AHy.device), _physics_key(physics), tuple(sorted(options.items())))
            solve = self.solves.get(key)
            if solve is None:
                solve = self.solves[key] = _DEQSolve(deq, physics, AHy, options, self.chunk, self.capture)
            solve.physics.load(physics)
            solve.ahy.copy_(AHy)
            z, info = solve.solve(z0.detach())
        kind = "CUDA graphs" if self.capture else "static buffers, eager (no capture)"
        self.report.last_mode = (f"{kind}: {info['evaluations_run']} iterations run for {info['iterations']} needed "
                                 f"(chunks of {self.chunk})")  # fmt: skip
        return z, info


# ------------------------------------------------------------------------------------------------
# Deep unfolding and VarNet: the whole forward in one graph
# ------------------------------------------------------------------------------------------------
class _UnrolledSolve:
    def __init__(self, model: nn.Module, y: torch.Tensor, physics: nn.Module, capture: bool) -> None:
        self.model = model
        self.physics = _StaticMRI(physics)
        self.y = y.clone()
        self.graphs = _Graphs(capture)
        self.out: torch.Tensor | None = None

    def _body(self) -> None:
        from mbdl_fast.solvers.unfolding import _adjoint_measurements
        from mbdl_fast.solvers.varnet import VarNet

        model, physics, y = self.model, self.physics, self.y
        if isinstance(model, VarNet):
            self.out = model.reconstruct(model.measured_kspace(y, physics), physics)
            return
        ahy = _adjoint_measurements(physics, y, None)
        x = ahy
        for k in range(model.num_iters):
            x = model._iteration(k, x, y, ahy, physics)
        self.out = x

    def run(self) -> torch.Tensor:
        if self.graphs.capture and not self.graphs.graphs:
            self.graphs.capture_now("forward", self._body)
        self.graphs.run("forward", self._body)
        return self.out.clone()


class _UnrolledRunner:
    """Bound as ``model.forward`` of a DeepUnfolding / VarNet: the captured forward where it applies."""

    def __init__(self, model: nn.Module, report: AccelerationReport, capture: bool) -> None:
        self.model = model
        self.report = report
        self.capture = capture
        self.solves: dict[tuple, _UnrolledSolve] = {}

    def __deepcopy__(self, memo):
        new = _UnrolledRunner.__new__(_UnrolledRunner)
        new.model = copy.deepcopy(self.model, memo)
        new.report = copy.deepcopy(self.report, memo)
        new.capture, new.solves = self.capture, {}
        return new

    def _eager_reason(self, y, physics, x0) -> str | None:
        from mbdl_fast.solvers.unfolding import DeepUnfolding

        model = self.model
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            return "autograd is on (graphs replay under torch.no_grad())"
        if x0 is not None:
            return "x0 given (graphs start from A^H y)"
        reason = _graphable_physics(physics)
        if (
            reason is None
            and isinstance(model, DeepUnfolding)
            and model.algorithm == "hqs"
            and physics.coil_maps is not None
        ):
            reason = "HQS with coil maps: its prox runs CG, which checks convergence on the host"
        return reason

    def forward(self, y, physics, x0=None):
        from mbdl_fast._validate import run_unchecked
        from mbdl_fast.solvers.unfolding import _check_solver_inputs

        model = self.model
        reason = self._eager_reason(y, physics, x0)
        if reason is not None:
            self.report.last_mode = f"eager forward: {reason}"
            return type(model).forward(model, y, physics, x0)
        _check_solver_inputs(y, None, physics)
        key = (tuple(y.shape), y.dtype, str(y.device), _physics_key(physics))
        solve = self.solves.get(key)
        if solve is None:
            solve = self.solves[key] = _UnrolledSolve(model, y, physics, self.capture)
        solve.physics.load(physics)
        solve.y.copy_(y)
        with torch.no_grad():
            out = run_unchecked(solve.run)  # inputs checked once above
        self.report.last_mode = "CUDA graph" if self.capture else "static buffers, eager (no capture)"
        return out


# ------------------------------------------------------------------------------------------------
# accelerate
# ------------------------------------------------------------------------------------------------
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
        ``model``, with ``model.acceleration`` (an :class:`AccelerationReport`: each step applied,
        fallen back or skipped, with the reason). Call it as before: ``model(y, physics)``.
    """
    from mbdl_fast.layers import fast_layers as list_fast_layers
    from mbdl_fast.layers import to_fast
    from mbdl_fast.prune.channels import find_priors
    from mbdl_fast.solvers.deq import DEQ
    from mbdl_fast.solvers.unfolding import DeepUnfolding
    from mbdl_fast.solvers.varnet import VarNet

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
        if isinstance(model, DEQ):
            m = model.solver_options["anderson_m"]
            n = chunk if chunk is not None else m
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"chunk: expected an int >= 1, got {chunk!r}")
            runner = _DEQRunner(model, report, n, capture)
            model.fixed_point = types.MethodType(_bound_fixed_point, runner)
            what = f"DEQ forward solve in chunks of {n} iterations, convergence checked between chunks"
        else:
            runner = _UnrolledRunner(model, report, capture)
            model.forward = types.MethodType(_bound_forward, runner)
            what = f"{type(model).__name__} forward (fixed K) in one graph under torch.no_grad()"
        if capture:
            report.add("CUDA graphs", "applied", what)
        else:
            report.add("CUDA graphs", "fallback", what + "; static buffers run eagerly (cuda_graphs='eager')")
    model.acceleration = report
    if example_inputs is not None:
        with torch.no_grad():
            model(*example_inputs)
    return model


def _bound_fixed_point(runner: _DEQRunner, y, physics, x0=None, AHy=None):
    return runner.fixed_point(y, physics, x0=x0, AHy=AHy)


def _bound_forward(runner: _UnrolledRunner, y, physics, x0=None):
    return runner.forward(y, physics, x0)
