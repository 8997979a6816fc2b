"""Fused 2-D convolution for pruned priors: channels_last implicit GEMM on tensor cores, fused epilogue.

One layer computes, for x (N, C_in, H, W) stored NHWC (channels_last), weight (C_out, C_in, k, k)
with k in {1, 3}, stride 1 and "same" zero padding (k // 2):

    z   = conv2d(x, weight) + bias                         (bias optional)
    out = scale * act(z) + residual                        (residual optional, (N, C_out, H, W))
    act = identity | ReLU | LeakyReLU(slope)

as an implicit GEMM: M = N·H·W pixels, N_gemm = C_out, K = k·k·C_in. A program owns BLOCK_M
pixels and BLOCK_N output channels; it walks the k·k taps and the C_in chunks of each tap (one
``tl.dot`` each, fp32 accumulation; TF32 or exact fp32 for float32 inputs by ``PRECISION``;
bf16/fp16 inputs natively), then applies bias, activation, scale and residual before its one store.
``conv2d_fused_ref`` (``mbdl_fast.ops.conv2d``, plain PyTorch) is what it computes.

Backward (``mbdl_fast.ops.conv2d`` ties it together):

    grad_z = scale · g · act'(z)
    grad_x = conv2d(grad_z, flip(weight)ᵀ)                  (this forward kernel again: padding k//2 is "same")
    grad_w[co, ci, kh, kw] = Σ_p grad_z[p, co] · x[p + (kh, kw) - k//2, ci]   (``_conv2d_wgrad_kernel``)

The weight-gradient kernel splits the pixel reduction into chunks (one partial per chunk and tap,
summed after), so every loop bound is a constexpr: the interpreter (numpy 2) refuses loops over
runtime integers, and constexpr trip counts let the GPU compiler pipeline the loads.

Channel counts up to 128 (``mbdl_fast.ops.conv2d.MAX_CHANNELS``) are supported, any value (masked); multiples of 8 (what
``mbdl_fast.prune.prune_channels`` produces) fill tensor-core tiles without waste.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATION_CODES = {"none": 0, "relu": 1, "leaky_relu": 2}  # the kernel's ACT constexpr


@triton.jit
def _pixel_coords(p, H, W):
    """Batch, row and column of flat NHW pixel indices ``p``."""
    hw = H * W
    n = p // hw
    rem = p % hw
    return n, rem // W, rem % W


@triton.jit
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, P, H, W, w_sco, w_sci, w_skh, w_skw, slope, scale,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, KSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_RES: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[p, co] = scale * act(Σ_{tap, ci} x[p + tap, ci] w[co, ci, tap] + b[co]) + r[p, co]  (NHWC)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p_valid = p < P
    n, h, w = _pixel_coords(p, H, W)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_valid = co < C_OUT
    rk = tl.arange(0, BLOCK_K)
    PAD: tl.constexpr = KSIZE // 2
    CHUNKS: tl.constexpr = (C_IN + BLOCK_K - 1) // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, channel chunk) with a constexpr trip count: pipelined on the GPU.
    for step in tl.range(0, KSIZE * KSIZE * CHUNKS):
        tap = step // CHUNKS
        kh = tap // KSIZE
        kw = tap % KSIZE
        ci = (step % CHUNKS) * BLOCK_K + rk
        ci_valid = ci < C_IN
        hs = h + kh - PAD
        ws = w + kw - PAD
        inside = p_valid & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        src = ((n * H + hs) * W + ws).to(tl.int64) * C_IN
        a = tl.load(x_ptr + src[:, None] + ci[None, :], mask=inside[:, None] & ci_valid[None, :], other=0.0)
        b_off = co[None, :] * w_sco + ci[:, None] * w_sci + kh * w_skh + kw * w_skw
        b = tl.load(w_ptr + b_off, mask=ci_valid[:, None] & co_valid[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 dot is wrong: products of upcast values are exact
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_valid, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = tl.where(acc > 0, acc, acc * slope)
    acc = acc * scale
    out_off = p.to(tl.int64)[:, None] * C_OUT + co[None, :]
    out_mask = p_valid[:, None] & co_valid[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _conv2d_wgrad_kernel(
    x_ptr, g_ptr, part_ptr, P, H, W,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, KSIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    STEPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):  # fmt: skip
    """part[chunk, tap, co, ci] = Σ_{p in chunk} g[p, co] x[p + tap, ci]  (NHWC x and g)."""
    chunk = tl.program_id(0)
    tap = tl.program_id(1)
    pid_c = tl.program_id(2)
    CI_BLOCKS: tl.constexpr = (C_IN + BLOCK_CI - 1) // BLOCK_CI
    PAD: tl.constexpr = KSIZE // 2
    co = (pid_c // CI_BLOCKS) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci = (pid_c % CI_BLOCKS) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_valid = co < C_OUT
    ci_valid = ci < C_IN
    kh = tap // KSIZE
    kw = tap % KSIZE
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for s in tl.range(0, STEPS):
        p = (chunk * STEPS + s) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_valid = p < P
        n, h, w = _pixel_coords(p, H, W)
        hs = h + kh - PAD
        ws = w + kw - PAD
        inside = p_valid & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        g = tl.load(
            g_ptr + p.to(tl.int64)[:, None] * C_OUT + co[None, :], mask=p_valid[:, None] & co_valid[None, :], other=0.0
        )
        src = ((n * H + hs) * W + ws).to(tl.int64) * C_IN
        xv = tl.load(x_ptr + src[:, None] + ci[None, :], mask=inside[:, None] & ci_valid[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            xv = xv.to(tl.float32)
        acc = tl.dot(tl.trans(g), xv, acc, input_precision=PRECISION)
    base = (chunk * KSIZE * KSIZE + tap).to(tl.int64) * C_OUT * C_IN
    tl.store(
        part_ptr + base + co[:, None] * C_IN + ci[None, :], acc, mask=co_valid[:, None] & ci_valid[None, :]
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Launchers. Shapes and dtypes are checked by the caller (mbdl_fast.ops.conv2d).
# ------------------------------------------------------------------------------------------------
def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda"


def _pow2_tile(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(n)))


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    # Only float32 operands have a choice; half-precision dots take Triton's default ("tf32", ignored for them).
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def conv2d_fused_triton(
    x, weight, bias, residual, activation, slope, scale, allow_tf32, out: torch.Tensor | None = None, block_m=None
) -> torch.Tensor:
    """scale * act(conv2d(x, weight, padding=k//2) + bias) + residual, returned channels_last.

    x (N, C_in, H, W) and residual (N, C_out, H, W) in any memory format (copied to channels_last
    when not already); weight (C_out, C_in, k, k) in any strides; bias (C_out,) or None; ``out``
    (N, C_out, H, W) channels_last to write into (tests poison it), else a new tensor; ``block_m``
    overrides the pixel tile (tests use small tiles to cover several programs in the interpreter).
    """
    n, c_in, h, w = x.shape
    c_out, _, k, _ = weight.shape
    x = x.contiguous(memory_format=torch.channels_last)
    if out is None:
        out = torch.empty((n, c_out, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    elif out.shape != (n, c_out, h, w) or not out.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"out: expected channels_last {(n, c_out, h, w)}, got {tuple(out.shape)} {out.stride()}")
    res = residual.contiguous(memory_format=torch.channels_last) if residual is not None else out
    pixels = n * h * w
    interpreted = _interpreted(x.device)
    block_n = max(16, triton.next_power_of_2(c_out))  # C_out <= 128 (the caller's check): one tile, every channel
    block_k = _pow2_tile(c_in, 16, 64)
    # The interpreter runs one Python call per program: one big tile keeps it quick.
    if block_m is None:
        block_m = _pow2_tile(pixels, 16, 256) if interpreted else (64 if block_n == 128 else 128)
    grid = (triton.cdiv(pixels, block_m), triton.cdiv(c_out, block_n))
    _conv2d_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, res, out, pixels, h, w, *weight.stride(),
        float(slope), float(scale),
        C_IN=c_in, C_OUT=c_out, KSIZE=k, HAS_BIAS=bias is not None, ACT=ACTIVATION_CODES[activation],
        HAS_RES=residual is not None, PRECISION=_precision(x.dtype, allow_tf32),
        UPCAST=interpreted and x.dtype != torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4 if block_m * block_n <= 64 * 64 else 8, num_stages=3,
    )  # fmt: skip
    return out


def conv2d_weight_grad_triton(
    x: torch.Tensor,
    grad_z: torch.Tensor,
    kernel_size: int,
    allow_tf32: bool,
    block_p: int | None = None,
    chunks: int | None = None,
) -> torch.Tensor:
    """Σ_p grad_z[p, co] x[p + tap, ci]: the weight gradient (C_out, C_in, k, k) in float32.

    ``block_p`` (pixels per step) and ``chunks`` (partial sums) override the tiling (tests).
    """
    n, c_in, h, w = x.shape
    c_out = grad_z.shape[1]
    x = x.contiguous(memory_format=torch.channels_last)
    grad_z = grad_z.contiguous(memory_format=torch.channels_last)
    pixels = n * h * w
    interpreted = _interpreted(x.device)
    if block_p is None:
        block_p = _pow2_tile(pixels, 16, 256) if interpreted else 64
    blocks = triton.cdiv(pixels, block_p)
    # Enough chunks to fill the GPU (x taps x channel tiles); one chunk in the interpreter.
    if chunks is None:
        chunks = 1 if interpreted else 128
    chunks = min(chunks, blocks)
    steps = triton.cdiv(blocks, chunks)
    chunks = triton.cdiv(blocks, steps)
    block_co = _pow2_tile(c_out, 16, 64)
    block_ci = _pow2_tile(c_in, 16, 64)
    taps = kernel_size * kernel_size
    partial = torch.empty((chunks, taps, c_out, c_in), dtype=torch.float32, device=x.device)
    grid = (chunks, taps, triton.cdiv(c_out, block_co) * triton.cdiv(c_in, block_ci))
    _conv2d_wgrad_kernel[grid](
        x, grad_z, partial, pixels, h, w,
        C_IN=c_in, C_OUT=c_out, KSIZE=kernel_size, PRECISION=_precision(x.dtype, allow_tf32),
        UPCAST=interpreted and x.dtype != torch.float32, STEPS=steps, BLOCK_P=block_p, BLOCK_CO=block_co,
        BLOCK_CI=block_ci, num_warps=4, num_stages=3,
    )  # fmt: skip
    grad = partial.sum(dim=0) if chunks > 1 else partial[0]
    return grad.reshape(kernel_size, kernel_size, c_out, c_in).permute(2, 3, 0, 1)
