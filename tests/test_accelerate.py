"""accelerate(): every step reported, outputs equal to the reference model within the tolerance table.

On a CPU the fast layers fall back to F.conv2d, channels_last applies, the fused DC and CUDA graphs
are skipped with their reason; ``cuda_graphs="eager"`` runs the graphs' static-buffer solver
(``execution="static_buffers"``) without capture, so its logic (chunking, per-sample freezing, counts, trace)
is tested here too.
"""

import copy
import warnings

import pytest
import torch
from conftest import rel_err

from mbdl_fast.accelerate import accelerate
from mbdl_fast.physics.masks import random_mask
from mbdl_fast.physics.mri import MRI, MultiCoilMRI
from mbdl_fast.physics.superres import SuperResolution
from mbdl_fast.priors import EDSR
from mbdl_fast.solvers import DEQ, DeepUnfolding, VarNet
from mbdl_fast.solvers.fixed_point import ConvergenceWarning, _spd_solve

CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Relative error of the accelerated model's output against the same model un-accelerated.
TOL = {
    "cpu": 1e-5,  # fallback layers and channels_last: the same ops in another memory order
    "static_solver": 1e-4,  # DEQ at f_tol 1e-5: the same iterates to rounding (other linear solve)
    "cuda_fp32": 1e-4,  # graphs + fused layers (allow_tf32=False) + fused DC
    "cuda_tf32": 5e-3,  # TF32 convolutions move the fixed point by about their rounding
}


def make_problem(device, batch=2, coils=3, size=(16, 12), seed=0, single_coil=False):
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    mask = random_mask(w, 2, 0.25, seed=seed).to(device)
    if single_coil:
        physics = MRI(mask)
    else:
        maps = torch.randn(batch, coils, h, w, dtype=torch.complex64, generator=gen)
        maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
        physics = MultiCoilMRI(mask, maps.to(device))
    x = torch.randn(batch, h, w, dtype=torch.complex64, generator=gen).to(device)
    return physics, physics.A(x)


def make_deq(device, **options):
    torch.manual_seed(0)
    prior = EDSR(2, 2, width=8, num_blocks=2, res_scale=0.1)
    options = {"f_tol": 1e-5, "f_max_iter": 60, **options}
    return DEQ(prior, alpha=0.3, gamma=1.0, **options).to(device).eval()


def make_du(device, algorithm="pgd"):
    torch.manual_seed(0)
    return DeepUnfolding(EDSR(2, 2, width=8, num_blocks=1, res_scale=0.1), num_iters=3, algorithm=algorithm).to(device)


def test_cpu_applies_what_applies_and_says_what_it_skipped():
    physics, y = make_problem("cpu")
    deq = make_deq("cpu")
    with torch.no_grad():
        ref = deq(y, physics)
    fast = accelerate(copy.deepcopy(deq), example_inputs=(y, physics))
    report = fast.acceleration
    assert report.status("fast layers") == "fallback" and "needs a CUDA device" in str(report)
    assert report.status("channels_last") == "applied"
    assert report.status("fused DC") == "skipped" and fast.solver_options["dc_backend"] == "torch"
    assert report.status("CUDA graphs") == "skipped"
    assert "CUDA graphs   skipped  needs a CUDA device" in str(report)
    with torch.no_grad():
        assert rel_err(fast(y, physics), ref) < TOL["cpu"]
    with pytest.raises(ValueError, match="already accelerated"):
        accelerate(fast)


@pytest.mark.parametrize(
    "options",
    [{}, {"f_solver": "fixed_point_iter"}, {"anderson_coefficients": "complex"}, {"anderson_beta": 0.8}],
    ids=["anderson", "fixed_point_iter", "complex_coefficients", "damped"],
)
def test_static_buffer_solver_matches_the_eager_solver(options):
    physics, y = make_problem("cpu")
    deq = make_deq("cpu", **options)
    with torch.no_grad():
        ref, info = deq(y, physics, return_info=True)
        fast = accelerate(copy.deepcopy(deq), cuda_graphs="eager", chunk=4)
        out, fast_info = fast(y, physics, return_info=True)
    assert fast.acceleration.status("CUDA graphs") == "fallback"
    assert rel_err(out, ref) < TOL["static_solver"]
    assert (fast_info["iterations_per_sample"] - info["iterations_per_sample"]).abs().max() <= 1
    assert abs(fast_info["iterations"] - info["iterations"]) <= 1
    assert len(fast_info["trace"]) == fast_info["iterations"] and bool(fast_info["converged"].all())
    assert fast_info["evaluations_run"] >= fast_info["iterations"]
    assert "static buffers" in fast.acceleration.last_mode


def test_static_buffer_solver_caps_iterations_and_warns_like_the_solver():
    physics, y = make_problem("cpu")
    deq = make_deq("cpu", f_tol=1e-12, f_max_iter=7)
    fast = accelerate(copy.deepcopy(deq), cuda_graphs="eager", chunk=5)
    with torch.no_grad(), pytest.warns(ConvergenceWarning, match="did not converge"):
        out, info = fast(y, physics, return_info=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref, ref_info = deq(y, physics, return_info=True)
    assert info["iterations"] == 7 and info["evaluations_run"] == 7
    assert rel_err(out, ref) < TOL["static_solver"]
    assert rel_err(info["residual"], ref_info["residual"]) < 1e-3


def test_static_buffers_are_refilled_for_new_data_of_the_same_shape():
    deq = make_deq("cpu")
    fast = accelerate(copy.deepcopy(deq), cuda_graphs="eager")
    for seed in (1, 2):
        physics, y = make_problem("cpu", seed=seed)
        with torch.no_grad():
            assert rel_err(fast(y, physics), deq(y, physics)) < TOL["static_solver"]
    assert len(fast.execution_cache.solves) == 1  # same shapes and mask structure: one set-up


def test_other_physics_run_the_eager_solver_and_say_so():
    torch.manual_seed(0)
    deq = DEQ(EDSR(1, 1, width=8, num_blocks=1), alpha=0.3, f_tol=1e-4, f_max_iter=20).eval()
    physics = SuperResolution("gaussian", 2)
    y = physics.A(torch.rand(1, 1, 8, 8))
    fast = accelerate(copy.deepcopy(deq), cuda_graphs="eager")
    with torch.no_grad():
        assert rel_err(fast(y, physics), deq(y, physics)) < TOL["cpu"]
    assert "eager solver: physics SuperResolution has no static buffers" in fast.acceleration.last_mode


def test_accelerated_deq_trains_like_the_original():
    physics, y = make_problem("cpu")
    deq = make_deq("cpu").train()
    fast = accelerate(copy.deepcopy(deq), cuda_graphs="eager")
    deq(y, physics).abs().sum().backward()
    fast(y, physics).abs().sum().backward()
    for (name, p), q in zip(deq.named_parameters(), fast.parameters(), strict=True):
        assert rel_err(q.grad, p.grad) < TOL["static_solver"], name


@pytest.mark.parametrize("single_coil", [False, True])
@pytest.mark.parametrize("kind", ["pgd", "hqs", "varnet"])
def test_unrolled_forward_in_static_buffers(kind, single_coil):
    physics, y = make_problem("cpu", single_coil=single_coil)
    if kind == "varnet":
        torch.manual_seed(0)
        model = VarNet(num_cascades=2, chans=8, pools=1).eval()
    else:
        model = make_du("cpu", kind).eval()
    fast = accelerate(copy.deepcopy(model), cuda_graphs="eager")
    with torch.no_grad():
        ref = model(y, physics)
        out = fast(y, physics)
    assert rel_err(out, ref) < TOL["cpu"]
    eager = kind == "hqs" and not single_coil  # CG checks convergence on the host
    assert ("eager forward" in fast.acceleration.last_mode) == eager


def test_unrolled_forward_with_autograd_runs_eagerly():
    physics, y = make_problem("cpu")
    du = make_du("cpu")
    fast = accelerate(copy.deepcopy(du), cuda_graphs="eager")
    fast(y, physics).abs().sum().backward()
    assert "autograd is on" in fast.acceleration.last_mode
    assert fast.priors[0].head.weight.grad is not None


def test_deepcopy_of_an_accelerated_model_is_independent():
    physics, y = make_problem("cpu")
    fast = accelerate(make_deq("cpu"), cuda_graphs="eager")
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        a = fast(y, physics)
        twin.prior.head.weight.mul_(0.5)
        b = twin(y, physics)
    assert twin.execution_cache is not fast.execution_cache and twin.acceleration.cache is twin.execution_cache
    assert rel_err(a, b) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_spd_solve_matches_linalg_solve(dtype):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 5, 9, generator=gen, dtype=dtype)
    a = g @ g.mH + 1e-2 * torch.eye(5)
    rhs = torch.randn(3, 5, generator=gen, dtype=dtype)
    assert rel_err(_spd_solve(a, rhs), torch.linalg.solve(a, rhs)) < 1e-4


# ------------------------------------------------------------------------------------------------
# On a GPU: captured graphs, fused layers, fused DC
# ------------------------------------------------------------------------------------------------
@NEEDS_CUDA
@pytest.mark.parametrize("allow_tf32", [False, True], ids=["fp32", "tf32"])
def test_cuda_graphs_deq_matches_reference(allow_tf32):
    physics, y = make_problem("cuda", batch=2, coils=4, size=(32, 32))
    deq = make_deq("cuda")
    with torch.no_grad():
        ref, info = deq(y, physics, return_info=True)
    fast = accelerate(copy.deepcopy(deq), example_inputs=(y, physics), allow_tf32=allow_tf32)
    assert [s.status for s in fast.acceleration.steps] == ["applied"] * 4
    with torch.no_grad():
        out, fast_info = fast(y, physics, return_info=True)
    assert "CUDA graphs" in fast.acceleration.last_mode
    assert rel_err(out, ref) < TOL["cuda_tf32" if allow_tf32 else "cuda_fp32"]
    assert abs(fast_info["iterations"] - info["iterations"]) <= (3 if allow_tf32 else 1)
    physics2, y2 = make_problem("cuda", batch=2, coils=4, size=(32, 32), seed=5)  # refilled buffers, replayed
    with torch.no_grad():
        assert rel_err(fast(y2, physics2), deq(y2, physics2)) < TOL["cuda_tf32" if allow_tf32 else "cuda_fp32"]


@NEEDS_CUDA
@pytest.mark.parametrize("kind", ["pgd", "varnet"])
def test_cuda_graphs_unrolled_matches_reference(kind):
    physics, y = make_problem("cuda", batch=2, coils=4, size=(32, 32))
    if kind == "varnet":
        torch.manual_seed(0)
        model = VarNet(num_cascades=2, chans=8, pools=2).cuda().eval()
    else:
        model = make_du("cuda").eval()
    with torch.no_grad():
        ref = model(y, physics)
        fast = accelerate(copy.deepcopy(model), example_inputs=(y, physics), allow_tf32=False)
        out = fast(y, physics)
        y2 = y * 0.5
        ref2, out2 = model(y2, physics), fast(y2, physics)
    assert fast.acceleration.last_mode == "CUDA graph"
    assert rel_err(out, ref) < TOL["cuda_fp32"]
    assert rel_err(out2, ref2) < TOL["cuda_fp32"]
