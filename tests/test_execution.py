"""Execution modes chosen by option (``mbdl_fast.solvers.execution``): saved in configs, validated, falling back
eagerly with the reason where they cannot run, and the one fixed-point implementation they step."""

import copy

import pytest
import torch
from conftest import rel_err
from test_accelerate import TOL, make_deq, make_du, make_problem

from mbdl_fast.checkpoint import load_model, save_model
from mbdl_fast.priors import EDSR
from mbdl_fast.registry import build, config_of
from mbdl_fast.solvers import DEQ, DeepUnfolding, VarNet, anderson_solve
from mbdl_fast.solvers.fixed_point import solver_state


def test_deq_execution_option_is_saved_and_runs_static_buffers(tmp_path):
    physics, y = make_problem("cpu")
    deq = make_deq("cpu")
    fast = make_deq("cpu", execution="static_buffers", graph_chunk=3)
    with torch.no_grad():
        ref, out = deq(y, physics), fast(y, physics)
    assert rel_err(out, ref) < TOL["static_solver"]
    assert "static buffers" in fast.execution_cache.last_mode and "chunks of 3" in fast.execution_cache.last_mode
    save_model(fast, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert (loaded.solver_options["execution"], loaded.solver_options["graph_chunk"]) == ("static_buffers", 3)
    assert deq.solver_options["execution"] == "eager" and deq.execution_cache.last_mode == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without a CUDA device")
def test_cuda_graph_mode_without_a_gpu_runs_eagerly_and_says_why():
    physics, y = make_problem("cpu")
    deq = make_deq("cpu").configure(execution="cuda_graph")
    with torch.no_grad():
        assert rel_err(deq(y, physics), make_deq("cpu")(y, physics)) < TOL["cpu"]
    assert deq.execution_cache.last_mode == "eager solver: execution='cuda_graph' needs a CUDA device, got cpu"


@pytest.mark.parametrize("kind", ["du", "varnet"])
def test_unrolled_execution_option_is_in_the_config(kind):
    torch.manual_seed(0)
    if kind == "du":
        model = DeepUnfolding(EDSR(2, 2, width=8, num_blocks=1), num_iters=2, execution="static_buffers").eval()
    else:
        model = VarNet(num_cascades=2, chans=8, pools=1, execution="static_buffers").eval()
    config = config_of(model)
    assert config["args"]["execution"] == "static_buffers"
    rebuilt = build(config).eval()
    rebuilt.load_state_dict(model.state_dict())
    physics, y = make_problem("cpu")
    with torch.no_grad():
        assert rel_err(rebuilt(y, physics), model(y, physics)) < TOL["cpu"]
    assert rebuilt.execution_cache.last_mode == "static buffers, eager (no capture)"


def test_unknown_execution_modes_are_refused():
    with pytest.raises(ValueError, match="execution: expected one of"):
        make_deq("cpu", execution="graphs")
    with pytest.raises(ValueError, match="graph_chunk"):
        make_deq("cpu", graph_chunk=0)
    with pytest.raises(ValueError, match="execution: expected one of"):
        make_du("cpu").__class__(EDSR(2, 2, width=8, num_blocks=1), execution="fast")
    du = make_du("cpu").eval()
    du.execution = "fast"
    physics, y = make_problem("cpu")
    with torch.no_grad(), pytest.raises(ValueError, match="execution: expected one of"):
        du(y, physics)


def test_deepcopy_gets_an_empty_execution_cache():
    physics, y = make_problem("cpu")
    deq = make_deq("cpu", execution="static_buffers")
    with torch.no_grad():
        deq(y, physics)
    twin = copy.deepcopy(deq)
    assert len(deq.execution_cache.solves) == 1 and not twin.execution_cache.solves
    assert isinstance(twin, DEQ) and twin.solver_options == deq.solver_options


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_sync_free_coefficients_step_the_same_solver(dtype):
    """The static modes' Anderson step (elimination without pivoting) gives the eager solver's iterates."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 8, 8, generator=gen, dtype=dtype) * 0.1
    b = torch.randn(3, 8, generator=gen, dtype=dtype)

    def f(z):
        return torch.tanh(torch.bmm(a, z.real.to(dtype)[:, :, None])[:, :, 0].real).to(dtype) + b

    z0 = torch.zeros(3, 8, dtype=dtype)
    ref, info = anderson_solve(f, z0, m=4, tol=1e-10, max_iter=40)
    state = solver_state(z0, "anderson", m=4, tol=1e-10, max_iter=40, sync_free=True)
    with torch.no_grad():
        for _ in range(40):
            state.step(f)
            if state.all_stopped():
                break
    out, state_info = state.finish("test")
    assert rel_err(out, ref) < 1e-9
    assert state_info["iterations"] == info["iterations"] == info["evaluations_run"]
