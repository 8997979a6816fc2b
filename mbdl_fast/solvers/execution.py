"""Execution modes of the solvers: how a DEQ's forward solve or an unrolled model's forward runs.

A model chooses one by option (``DEQ(..., execution=...)`` / ``deq.configure(execution=...)``;
``DeepUnfolding(..., execution=...)`` / ``VarNet(..., execution=...)``, or set ``model.execution``), saved in its
config like any other option:

- ``"eager"`` (default): the solver as written, one kernel launch at a time;
- ``"cuda_graph"``: static buffers captured in CUDA graphs and replayed (CUDA devices only; elsewhere the call
  runs eagerly and says why);
- ``"static_buffers"``: the same static-buffer code without capture, on any device (what tests run on a CPU).

In the two static modes:

- DEQ: the forward solve is :class:`~mbdl_fast.solvers.fixed_point.FixedPointState` (the solvers' one
  implementation) stepped ``graph_chunk`` iterations per graph (default: the Anderson history size m), with the
  convergence check between graphs (one host synchronisation per graph) and ``sync_free`` coefficients.
  Per-sample freezing, best-iterate tracking, counts and trace live in the state, so the result is the
  solver's: a sample that converges inside a chunk is frozen there. Near convergence (extrapolated from the
  residual), single-iteration graphs replace whole chunks so that few iterations are wasted. The DEQ's output
  application and its backward (JFB or implicit) run eagerly as before.
- DeepUnfolding (PGD, or HQS with a closed-form prox) and VarNet: the whole K-iteration forward is one graph,
  replayed under ``torch.no_grad()``; with autograd on it runs eagerly.

Set-ups are keyed by shapes, mask structure and solver options, captured on first use (after a warm-up that
compiles kernels and times the conv choices), and fed by copying y, A^H y, the mask and coil maps into their
static buffers. Only ``MultiCoilMRI`` / ``MRI`` (complex layout) have such buffers; other physics run eagerly.
``model.execution_cache.last_mode`` says how the last call ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mbdl_fast._validate import check_choice, run_unchecked
from mbdl_fast.physics.mri import MultiCoilMRI
from mbdl_fast.solvers.fixed_point import FixedPointState, solver_state

__all__ = ["EXECUTION_MODES", "ExecutionCache", "check_execution", "solve_in_static_buffers", "unrolled_in_graph"]

#: The execution modes every solver model accepts (module docstring).
EXECUTION_MODES = ("eager", "static_buffers", "cuda_graph")


def check_execution(value: object) -> str:
    """``value`` if it names an execution mode, else ``ValueError`` listing them."""
    return check_choice("execution", value, EXECUTION_MODES)


class ExecutionCache:
    """A model's static-buffer set-ups (and their graphs), keyed, and how its last call ran.

    Not a module state: it is neither saved nor copied (a deep copy of the model gets an empty cache and
    captures its own graphs on first use).
    """

    def __init__(self) -> None:
        self.solves: dict[tuple, Any] = {}
        self.last_mode = "not called yet"

    def __deepcopy__(self, memo: dict) -> ExecutionCache:
        return ExecutionCache()


# ------------------------------------------------------------------------------------------------
# Static physics: the graph's inputs, refilled per call
# ------------------------------------------------------------------------------------------------
def _static_physics_reason(physics: nn.Module) -> str | None:
    """Why ``physics`` has no static-buffer copy, or None."""
    if not isinstance(physics, MultiCoilMRI):
        return f"physics {type(physics).__name__} has no static buffers (MultiCoilMRI / MRI only)"
    if physics.layout != "complex":
        return f"physics layout {physics.layout!r} (the complex layout only)"
    return None


def _physics_key(physics: MultiCoilMRI) -> tuple:
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


def _eager_reason(mode: str, device: torch.device, physics: nn.Module) -> str | None:
    """Why a call in ``mode`` runs eagerly, or None."""
    if mode == "cuda_graph" and device.type != "cuda":
        return f"execution='cuda_graph' needs a CUDA device, got {device.type}"
    return _static_physics_reason(physics)


class _Graphs:
    """CUDA graphs of a zero-argument body, one per length, sharing one memory pool; or eager runs."""

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.graphs: dict[Any, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def run(self, key: Any, body: Callable[[], None]) -> None:
        if not self.capture:
            body()
            return
        graph = self.graphs.get(key)
        if graph is None:
            raise RuntimeError(f"no graph captured for {key!r}")
        graph.replay()

    def capture_now(self, key: Any, body: Callable[[], None], warmup: int = 2) -> None:
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
#: T(z; physics, A^H y): the DEQ's operator on static inputs.
Operator = Callable[[torch.Tensor, nn.Module, torch.Tensor], torch.Tensor]


class _FixedPointSolve:
    """One static set-up: physics, A^H y, the solver's state and its graphs (``chunk`` and 1 iterations)."""

    def __init__(
        self, operator: Operator, physics: MultiCoilMRI, ahy: torch.Tensor, options: dict, chunk: int, capture: bool
    ) -> None:
        self.operator = operator
        self.physics = _StaticMRI(physics)
        self.ahy = ahy.clone()
        self.state: FixedPointState = solver_state(ahy, sync_free=True, **options)
        self.chunk = chunk
        self.graphs = _Graphs(capture)
        self.captured = False

    def _f(self, z: torch.Tensor) -> torch.Tensor:
        return self.operator(z, self.physics, self.ahy)

    def _body(self, steps: int) -> Callable[[], None]:
        def body() -> None:
            for _ in range(steps):
                self.state.step(self._f)

        return body

    def solve(self, z0: torch.Tensor) -> tuple[torch.Tensor, dict]:
        st = self.state
        if self.graphs.capture and not self.captured:
            st.reset(z0)
            for n in sorted({self.chunk, 1}, reverse=True):
                self.graphs.capture_now(n, self._body(n))
            self.captured = True
        st.reset(z0)
        done, history = 0, []
        while done < st.max_iter:
            n = self._next_length(done, history)
            self.graphs.run(n, self._body(n))
            done += n
            stopped = st.stopped
            all_stopped, worst = torch.stack(
                [stopped.all().to(st.best_res.dtype), torch.where(stopped, 0, st.best_res).max()]
            ).tolist()  # the one host sync per graph
            if all_stopped:
                break
            history.append((done, worst))
        name = "anderson_solve" if st.anderson else "fixed_point_solve"
        return st.finish(f"{name} (static buffers)", stacklevel=5)

    def _next_length(self, done: int, history: list[tuple[int, float]]) -> int:
        """A whole chunk, unless the residual's log-linear trend says the solve ends within it."""
        max_iter, tol = self.state.max_iter, self.state.tol
        if self.chunk == 1 or max_iter - done < self.chunk:
            return 1
        if len(history) >= 2:
            (k0, r0), (k1, r1) = history[-2], history[-1]
            if r0 > 0 and r1 > 0 and math.isfinite(r0) and math.isfinite(r1):
                rate = (math.log(r1) - math.log(r0)) / (k1 - k0)
                if rate < 0 and (math.log(tol) - math.log(r1)) / rate < self.chunk:
                    return 1
        return self.chunk


def solve_in_static_buffers(
    cache: ExecutionCache,
    mode: str,
    operator: Operator,
    physics: nn.Module,
    ahy: torch.Tensor,
    z0: torch.Tensor,
    options: dict[str, Any],
    chunk: int,
    key: tuple,
) -> tuple[torch.Tensor, dict] | None:
    """The fixed point of ``operator`` from ``z0`` in static buffers (``mode`` "static_buffers" or "cuda_graph"),
    or None (with the reason in ``cache.last_mode``) where the eager solver must run.

    ``options``: ``solver_state``'s (``solver``, ``tol``, ``max_iter``, ...); ``key``: what else distinguishes
    one set-up from another (the caller's solver options). Runs under ``torch.no_grad()``.
    """
    reason = _eager_reason(mode, ahy.device, physics)
    if reason is not None:
        cache.last_mode = f"eager solver: {reason}"
        return None
    capture = mode == "cuda_graph"
    full_key = ("fixed_point", tuple(ahy.shape), ahy.dtype, str(ahy.device), _physics_key(physics), chunk, key)
    solve = cache.solves.get(full_key)
    if solve is None:
        solve = cache.solves[full_key] = _FixedPointSolve(operator, physics, ahy, options, chunk, capture)
    solve.physics.load(physics)
    solve.ahy.copy_(ahy)
    z, info = solve.solve(z0.detach())
    kind = "CUDA graphs" if capture else "static buffers, eager (no capture)"
    cache.last_mode = (f"{kind}: {info['evaluations_run']} iterations run for {info['iterations']} needed "
                       f"(chunks of {chunk})")  # fmt: skip
    return z, info


# ------------------------------------------------------------------------------------------------
# Deep unfolding and VarNet: the whole forward in one graph
# ------------------------------------------------------------------------------------------------
#: The model's forward from measurements y of static physics, without input checks.
Forward = Callable[[torch.Tensor, nn.Module], torch.Tensor]


class _UnrolledSolve:
    def __init__(self, forward: Forward, y: torch.Tensor, physics: MultiCoilMRI, capture: bool) -> None:
        self.forward = forward
        self.physics = _StaticMRI(physics)
        self.y = y.clone()
        self.graphs = _Graphs(capture)
        self.out: torch.Tensor | None = None

    def _body(self) -> None:
        self.out = self.forward(self.y, self.physics)

    def run(self) -> torch.Tensor:
        if self.graphs.capture and not self.graphs.graphs:
            self.graphs.capture_now("forward", self._body)
        self.graphs.run("forward", self._body)
        return self.out.clone()


def unrolled_in_graph(
    cache: ExecutionCache,
    mode: str,
    model: nn.Module,
    forward: Forward,
    y: torch.Tensor,
    physics: nn.Module,
    model_reason: str | None = None,
) -> torch.Tensor | None:
    """``forward(y, physics)`` of an unrolled ``model`` replayed from static buffers (one graph, no autograd), or
    None (with the reason in ``cache.last_mode``) where the eager forward must run: autograd on, the model's own
    ``model_reason`` (an ``x0``, an iteration that synchronises with the host), or physics without static buffers.
    The caller checks y and physics first."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        reason = "autograd is on (graphs replay under torch.no_grad())"
    else:
        reason = model_reason or _eager_reason(mode, y.device, physics)
    if reason is not None:
        cache.last_mode = f"eager forward: {reason}"
        return None
    capture = mode == "cuda_graph"
    key = ("unrolled", tuple(y.shape), y.dtype, str(y.device), _physics_key(physics))
    solve = cache.solves.get(key)
    if solve is None:
        solve = cache.solves[key] = _UnrolledSolve(forward, y, physics, capture)
    solve.physics.load(physics)
    solve.y.copy_(y)
    with torch.no_grad():
        out = run_unchecked(solve.run)  # inputs checked once by the caller
    cache.last_mode = "CUDA graph" if capture else "static buffers, eager (no capture)"
    return out
