"""N:M sparsity: a 3x3 convolution of a pruned prior, dense vs 2:4 semi-structured sparse, in one run.

Only 2:4 has a hardware speed-up (NVIDIA sparse tensor cores, sm_80+, fp16/bf16/int8), and PyTorch
reaches it for matrix products only (``torch.sparse.to_sparse_semi_structured``). So the conv is
lowered to a GEMM: ``out (B*H*W, C_out) = cols (B*H*W, 9*C_in) @ W2^T`` with ``cols`` im2col'd
tap-major (K = (tap, channel), channels innermost) and ``W2 = W.permute(0, 2, 3, 1)``: the N:M groups
of :mod:`mbdl_fast.prune.nm` (4 consecutive input channels at one tap) are then 4 consecutive
entries along K, as the hardware wants.

Variants (GPU, per size, fp16, weights 2:4-masked by magnitude):
- ``cudnn_conv``: ``torch.nn.functional.conv2d`` channels_last, dense kernel on the masked weight (what a model runs today);
- ``dense_gemm``: the lowered GEMM on pre-built ``cols`` (cuBLAS);
- ``sparse24_gemm``: the same GEMM with ``W2`` semi-structured 2:4 (cuSPARSELt, else CUTLASS);
- ``sparse24_im2col``: im2col plus the sparse GEMM: the whole layer the 2:4 way.
Each row checks its output against the fp32 conv of the masked weight first, then records, measured in
the same test with CUDA events, the median of every variant and the speed-ups of its own variant
against ``dense_gemm`` and ``cudnn_conv``.

On a CPU (or a GPU below sm_80) these rows are skipped: PyTorch has no semi-structured sparse
kernel there, and no speed is claimed. The ``macs`` rows run everywhere: they report the MACs of
SPADE's EDSR prior at the same widths, dense and 2:4, and time only the one-shot mask computation.
"""

import statistics

import pytest
import torch
import torch.nn.functional as functional
from conftest import device_name, sync

from mbdl_fast.priors import EDSR
from mbdl_fast.prune.nm import apply_nm, nm_mask, nm_report

SIZES = {"64ch_8x256x256": (8, 64, 256, 256), "32ch_8x256x256": (8, 32, 256, 256)}
VARIANTS = ["cudnn_conv", "dense_gemm", "sparse24_gemm", "sparse24_im2col"]


def sparse_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return (
            "no CUDA GPU: PyTorch has no semi-structured (2:4) sparse kernel on the CPU, so there is no 2:4 speed "
            "to measure here (MACs only: see the macs rows)"
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        return f"{torch.cuda.get_device_name()} is sm_{major}{minor}: 2:4 sparse tensor cores need sm_80 or newer"
    return None


def im2col_tap_major(x_nhwc: torch.Tensor, k_pad: int = 0) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B*H*W, 9*C + k_pad)``, column ``(3*i + j)*C + c`` = x[b, h+i-1, w+j-1, c] (zero padded)."""
    b, h, w, c = x_nhwc.shape
    xp = functional.pad(x_nhwc, (0, 0, 1, 1, 1, 1))
    taps = [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
    if k_pad:
        taps.append(x_nhwc.new_zeros(b, h, w, k_pad))
    return torch.cat(taps, dim=-1).reshape(b * h * w, 9 * c + k_pad)


def to_2to4(w2: torch.Tensor) -> tuple[torch.Tensor, str, int]:
    """The semi-structured weight, its backend and the K padding that backend needed."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    cutlass = not torch.backends.cusparselt.is_available()
    k_pad = (-w2.shape[1]) % 64 if cutlass else 0  # CUTLASS fp16 wants K % 64 == 0; cuSPARSELt K % 16
    if k_pad:
        w2 = functional.pad(w2, (0, k_pad))
    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        sparse = to_sparse_semi_structured(w2)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return sparse, "cutlass" if cutlass else "cusparselt", k_pad


def median_ms(fn, reps: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


_problems: dict[str, dict] = {}


def problem(size_name: str) -> dict:
    """Input, 2:4-masked weight, lowered operands and every variant's callable, built once per size."""
    if size_name in _problems:
        return _problems[size_name]
    _problems.clear()  # one size on the GPU at a time
    b, c, h, w = SIZES[size_name]
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, generator=gen).to(dev, torch.float16)
    weight = torch.randn(c, c, 3, 3, generator=gen) / (3 * c**0.5)
    weight = (weight * nm_mask(weight, 2, 4)).to(dev, torch.float16)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    w2 = weight.permute(0, 2, 3, 1).reshape(c, 9 * c).contiguous()
    w2_sparse, backend, k_pad = to_2to4(w2)
    cols = im2col_tap_major(x_nhwc)
    cols_sparse = im2col_tap_major(x_nhwc, k_pad) if k_pad else cols
    fns = {
        "cudnn_conv": lambda: functional.conv2d(x_cl, weight, padding=1),
        "dense_gemm": lambda: functional.linear(cols, w2),
        "sparse24_gemm": lambda: functional.linear(cols_sparse, w2_sparse),
        "sparse24_im2col": lambda: functional.linear(im2col_tap_major(x_nhwc, k_pad), w2_sparse),
    }
    with torch.no_grad():
        ref = functional.conv2d(x.float(), weight.float(), padding=1).permute(0, 2, 3, 1).reshape(b * h * w, c)
    errors = {}
    for name, fn in fns.items():
        out = fn()
        out = out.permute(0, 2, 3, 1).reshape(b * h * w, c) if name == "cudnn_conv" else out
        errors[name] = rel_err(out, ref)
    del ref, out
    times = {name: median_ms(fn) for name, fn in fns.items()}
    gemm = {"M": b * h * w, "K": 9 * c, "N": c}
    _problems[size_name] = {"fns": fns, "errors": errors, "times": times, "backend": backend, "k_pad": k_pad, **gemm}
    return _problems[size_name]


@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_conv3x3_dense_vs_2to4(benchmark, variant, size_name):
    reason = sparse_skip_reason()
    if reason:
        pytest.skip(f"{variant}: {reason}")
    p = problem(size_name)
    err = p["errors"][variant]  # correctness first: against the fp32 conv of the same masked weight
    assert err < 1e-2, f"{variant}: relative error {err:.2e} against the fp32 conv of the 2:4-masked weight"
    times = p["times"]
    benchmark.extra_info.update(
        {
            "variant": variant,
            "size": size_name,
            "device": device_name(torch.device("cuda")),
            "dtype": "float16",
            "gemm_MKN": [p["M"], p["K"], p["N"]],
            "sparse_backend": p["backend"],
            "k_padded_by": p["k_pad"],
            "rel_err": err,
            "in_run_median_ms": times,
            "speedup_vs_dense_gemm": times["dense_gemm"] / times[variant],
            "speedup_vs_cudnn_conv": times["cudnn_conv"] / times[variant],
        }
    )
    fn = p["fns"][variant]

    def timed():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(timed, rounds=50, warmup_rounds=2)


@pytest.mark.parametrize("size_name", list(SIZES))
def test_macs(benchmark, size_name, bench_device):
    """MACs of SPADE's EDSR prior (13 blocks) at this width, dense vs 2:4; times the one-shot masking only."""
    b, c, h, w = SIZES[size_name]
    torch.manual_seed(0)
    dense = EDSR(width=c, num_blocks=13)
    shape = (b, 2, h, w)
    dense_report = nm_report(dense, shape)  # meta device: nothing computed

    def setup():
        torch.manual_seed(0)
        return (EDSR(width=c, num_blocks=13).to(bench_device),), {}

    def mask_and_sync(model):
        apply_nm(model, 2, 4)
        sync(bench_device)
        return model

    masked = mask_and_sync(setup()[0][0])
    report = nm_report(masked, shape)
    assert report.dense_macs == dense_report.dense_macs
    assert all(r.pattern in ("2:4", "dense") for r in report.rows)
    benchmark.extra_info.update(
        {
            "variant": "macs",
            "size": size_name,
            "device": device_name(bench_device),
            "timed": "apply_nm(model, 2, 4): one-shot magnitude masks of the whole prior; no inference is timed",
            "dense_macs": report.dense_macs,
            "nm_2to4_macs": report.effective_macs,
            "mac_ratio": report.mac_ratio,
            "speed": "none claimed: MACs only (2:4 speed is real only on sm_80+ GPUs, see the conv3x3 rows)",
            "report": report.table(),
        }
    )
    benchmark.pedantic(mask_and_sync, setup=setup, rounds=3)
