"""``conv2d_fused``: convolution with bias, activation, scale and residual add as one fused op, two backends.

    out = scale * act(conv2d(x, weight, padding=k//2) + bias) + residual,   act in {none, relu, leaky_relu}

- ``torch``: ``conv2d_fused_ref``, plain PyTorch (F.conv2d and elementwise ops; cuDNN on a GPU,
  oneDNN on a CPU); the readable definition, and the fallback everywhere;
- ``triton``: kernels/conv2d.py (``mbdl_fast.kernels.conv2d``), channels_last implicit GEMM with the epilogue fused;
  CUDA tensors, or CPU tensors in the interpreter (``TRITON_INTERPRET=1``, tests only);
- ``auto`` (CUDA only): whichever of the two is faster for this shape on this GPU, timed once and
  cached (``mbdl_fast.ops.choice``; ``mbdl_fast.layers.conv_choices()`` shows the choices).

The fused implementations run as torch custom ops (``mbdl_fast::conv2d_fused``,
``mbdl_fast::conv2d_weight_grad``) with fake implementations and autograd, so ``torch.compile``
and CUDA-graph capture see one opaque op per layer. Backward, with g = dL/dout:

    grad_z = scale * g * act'(z)     act'(z) read from the saved output when it determines sign(z)
                                     (no residual, ReLU or LeakyReLU with slope > 0); else z is recomputed
    grad_x = conv2d(grad_z, flip(weight).transpose(0, 1), padding=k//2)   (the forward op again)
    grad_w = Σ_pixels grad_z ⊗ shifted x                                   (``conv2d_weight_grad``)
    grad_b = Σ_pixels grad_z,   grad_residual = g

Supported geometry (else ``torch``): k in {1, 3}, stride 1, dilation 1, groups 1, zero padding k//2,
at most 128 input and output channels, float32 / bfloat16 / float16.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from mbdl_fast._validate import describe
from mbdl_fast.backends import implementation, register, resolve_op, supported_backends
from mbdl_fast.ops.choice import choose

OP = "conv2d_fused"
WEIGHT_GRAD_OP = "conv2d_weight_grad"
ACTIVATIONS = ("none", "relu", "leaky_relu")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_CHANNELS = 128  # kernels/conv2d.py: one output tile then covers every channel of a pruned prior layer


# ------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------
def apply_epilogue(
    z: torch.Tensor, activation: str, negative_slope: float, scale: float, residual: torch.Tensor | None
) -> torch.Tensor:
    """scale * act(z) + residual, in this order (``scale`` 1 and no residual skip their ops)."""
    if activation == "relu":
        z = torch.relu(z)
    elif activation == "leaky_relu":
        z = F.leaky_relu(z, negative_slope)
    elif activation != "none":
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if scale != 1.0:
        z = z * scale
    return z if residual is None else residual + z


def conv2d_fused_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "none",
    residual: torch.Tensor | None = None,
    negative_slope: float = 0.01,
    scale: float = 1.0,
) -> torch.Tensor:
    """scale * act(conv2d(x, w, b, padding=k//2)) + residual: the definition every fast path is checked against.

    x (N, C_in, H, W); w (C_out, C_in, k, k), k odd; b (C_out,) or None; residual (N, C_out, H, W) or None.
    """
    return apply_epilogue(F.conv2d(x, w, b, padding=w.shape[-1] // 2), act, negative_slope, scale, residual)


# ------------------------------------------------------------------------------------------------
# Which shapes the fused kernel takes
# ------------------------------------------------------------------------------------------------
def unsupported_reason(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] | str = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    padding_mode: str = "zeros",
    dtype: torch.dtype | None = None,
) -> str | None:
    """Why the fused kernel cannot run this convolution, or None when it can."""
    kh, kw = kernel_size
    if kh != kw or kh not in (1, 3):
        return f"kernel_size {kernel_size}: the fused kernel takes 1x1 and 3x3"
    same = (kh // 2, kw // 2)
    if (padding != "same" and tuple(padding) != same) or padding_mode != "zeros":
        return f"padding {padding!r} ({padding_mode}): the fused kernel takes zero padding {same} ('same')"
    if tuple(stride) != (1, 1) or tuple(dilation) != (1, 1) or groups != 1:
        return f"stride {tuple(stride)}, dilation {tuple(dilation)}, groups {groups}: the fused kernel takes 1, 1, 1"
    if in_channels > MAX_CHANNELS or out_channels > MAX_CHANNELS:
        return f"channels {in_channels} -> {out_channels}: the fused kernel takes at most {MAX_CHANNELS}"
    if dtype is not None and dtype not in FUSED_DTYPES:
        return f"dtype {dtype}: the fused kernel takes float32, bfloat16 and float16"
    return None


def _check_args(x, weight, bias, residual, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a real (N, C_in, H, W) tensor, got {got}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight: expected (C_out, {x.shape[1]}, k, k) for x {describe(x)}, got {describe(weight)}")
    n, _, h, w = x.shape
    out_shape = (n, weight.shape[0], h, w)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual: expected {out_shape} like the output, got {describe(residual)}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: expected {x.dtype} on {x.device} like x, got {describe(t)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected ({weight.shape[0]},), got {describe(bias)}")


# ------------------------------------------------------------------------------------------------
# Implementations behind the custom ops
# ------------------------------------------------------------------------------------------------
@contextmanager
def _cudnn_tf32(allow: bool):
    """cuDNN's TF32 switch for the duration of a call, so ``allow_tf32=False`` means exact fp32 on both paths."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _forward_torch(x, weight, bias, residual, activation, slope, scale, allow_tf32):
    with _cudnn_tf32(allow_tf32):
        return conv2d_fused_ref(x, weight, bias, activation, residual, slope, scale)


def _weight_grad_torch(x, grad_z, kernel_size, allow_tf32):
    shape = (grad_z.shape[1], x.shape[1], kernel_size, kernel_size)
    with _cudnn_tf32(allow_tf32):
        return torch.nn.grad.conv2d_weight(x, shape, grad_z, padding=kernel_size // 2)


_CHOICE_NAMES = {OP: "conv2d", WEIGHT_GRAD_OP: "conv2d_weight_grad"}  # the names conv_choices() shows


def _run(op: str, impl: str, key: tuple, args: tuple) -> torch.Tensor:
    """``op``'s ``impl`` on ``args``; ``impl="auto"`` runs the implementation timed fastest for ``key`` (once)."""
    if impl == "auto":
        candidates = {name: functools.partial(implementation(op, name), *args) for name in supported_backends(op)}
        impl = choose(_CHOICE_NAMES[op], key, candidates)
    return implementation(op, impl)(*args)


def _shape_key(x: torch.Tensor, *rest) -> tuple:
    return (tuple(x.shape), str(x.dtype).replace("torch.", ""), _memory_format(x) == torch.channels_last, *rest)


@torch.library.custom_op("mbdl_fast::conv2d_fused", mutates_args=())
def conv2d_fused_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    negative_slope: float,
    scale: float,
    allow_tf32: bool,
    impl: str,
) -> torch.Tensor:
    """scale * act(conv2d(x, weight) + bias) + residual by ``impl`` ("torch", "triton", "auto": timed once per shape).

    x (N, C_in, H, W); weight (C_out, C_in, k, k); bias (C_out,) or None; residual (N, C_out, H, W) or None. Every
    implementation takes ``(x, weight, bias, residual, activation, negative_slope, scale, allow_tf32)``. The output
    has x's memory format (channels_last in, channels_last out).
    """
    args = (x, weight, bias, residual, activation, negative_slope, scale, allow_tf32)
    key = _shape_key(x, tuple(weight.shape), bias is not None, activation, residual is not None, allow_tf32)
    return _run(OP, impl, key, args).contiguous(memory_format=_memory_format(x))


@conv2d_fused_op.register_fake
def _(x, weight, bias, residual, activation, negative_slope, scale, allow_tf32, impl):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    return x.new_empty(shape).contiguous(memory_format=_memory_format(x))


@torch.library.custom_op("mbdl_fast::conv2d_weight_grad", mutates_args=())
def conv2d_weight_grad_op(
    x: torch.Tensor, grad_z: torch.Tensor, kernel_size: int, allow_tf32: bool, impl: str
) -> torch.Tensor:
    """dL/dweight (C_out, C_in, k, k) of conv2d(x, weight, padding=k//2) for output gradient ``grad_z``; every
    implementation takes ``(x, grad_z, kernel_size, allow_tf32)``."""
    args = (x, grad_z, kernel_size, allow_tf32)
    key = _shape_key(x, grad_z.shape[1], kernel_size, allow_tf32)
    return _run(WEIGHT_GRAD_OP, impl, key, args).to(x.dtype).contiguous()


@conv2d_weight_grad_op.register_fake
def _(x, grad_z, kernel_size, allow_tf32, impl):
    return x.new_empty((grad_z.shape[1], x.shape[1], kernel_size, kernel_size))


def _activation_from_output(activation: str, slope: float, has_residual: bool) -> bool:
    """True when sign(z) can be read from the output: no residual, and act preserves the sign of z."""
    return activation != "none" and not has_residual and (activation == "relu" or slope > 0)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, residual, activation, slope, scale, allow_tf32, impl = inputs
    from_output = _activation_from_output(activation, slope, residual is not None)
    recompute = activation != "none" and not from_output
    ctx.save_for_backward(x, weight, output if from_output else None, bias if recompute else None)
    ctx.flags = (activation, slope, scale, allow_tf32, impl, from_output, bias is not None)


def _conv_backward(ctx, grad):
    x, weight, out, bias = ctx.saved_tensors
    activation, slope, scale, allow_tf32, impl, from_output, has_bias = ctx.flags
    needs = ctx.needs_input_grad
    gz = grad.float() * scale
    if activation != "none":
        if from_output:
            positive = out > 0 if scale > 0 else out < 0
        else:
            z = conv2d_fused_op(x, weight, bias, None, "none", 0.0, 1.0, allow_tf32, impl)
            positive = z > 0
        gz = gz * (positive if activation == "relu" else torch.where(positive, 1.0, slope))
    gz = gz.to(x.dtype)
    gx = gw = gb = gr = None
    if needs[0]:
        flipped = weight.flip(2, 3).transpose(0, 1)
        gx = conv2d_fused_op(gz, flipped, None, None, "none", 0.0, 1.0, allow_tf32, impl)
    if needs[1]:
        gw = conv2d_weight_grad_op(x, gz, weight.shape[-1], allow_tf32, impl).to(weight.dtype)
    if needs[2] and has_bias:
        gb = gz.float().sum(dim=(0, 2, 3)).to(weight.dtype)
    if needs[3]:
        gr = grad
    return gx, gw, gb, gr, None, None, None, None, None


conv2d_fused_op.register_autograd(_conv_backward, setup_context=_conv_setup)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def resolve_conv_backend(backend: str, x: torch.Tensor, reason: str | None) -> str:
    """``backend`` for this call: "torch", "triton" or "auto" (the timed choice; CUDA tensors only).

    ``auto`` gives "torch" on a CPU (the interpreter is for tests) and where ``reason`` says the
    geometry is unsupported; an explicit "triton" that cannot run is an error with the reason.
    """
    if backend == "auto":
        if reason is not None or x.device.type != "cuda":
            return "torch"
        return "auto" if resolve_op(OP, "auto", x.device) == "triton" else "torch"
    name = resolve_op(OP, backend, x.device)
    if name == "triton" and reason is not None:
        raise ValueError(f"backend: 'triton' cannot run this convolution: {reason}")
    return name


def conv2d_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "none",
    negative_slope: float = 0.01,
    scale: float = 1.0,
    allow_tf32: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """scale * act(conv2d(x, weight, bias, padding=k//2)) + residual, by ``backend`` ("auto", "torch", "triton").

    Args:
        x: (N, C_in, H, W) float32 / bfloat16 / float16; channels_last avoids a copy on the fused path.
        weight: (C_out, C_in, k, k), k in {1, 3} for the fused path; bias (C_out,) or None.
        residual: (N, C_out, H, W) added last, or None.
        activation: "none", "relu" or "leaky_relu" (``negative_slope``).
        scale: multiplies act(z) before the residual add (EDSR's res_scale; -1 for DnCNN's x - n).
        allow_tf32: TF32 tensor cores for float32 (both paths); False computes in exact fp32.
    """
    _check_args(x, weight, bias, residual, activation)
    k = weight.shape[-1]
    reason = unsupported_reason(x.shape[1], weight.shape[0], tuple(weight.shape[-2:]), padding=(k // 2, k // 2),
                                dtype=x.dtype)  # fmt: skip
    impl = resolve_conv_backend(backend, x, reason)
    if impl == "torch" and x.device.type != "cuda":
        return conv2d_fused_ref(x, weight, bias, activation, residual, negative_slope, scale)
    return conv2d_fused_op(x, weight, bias, residual, activation, float(negative_slope), float(scale),
                           bool(allow_tf32), impl)  # fmt: skip


register(OP, "torch", _forward_torch)
register(OP, "triton", "mbdl_fast.kernels.conv2d:conv2d_fused_triton")
register(WEIGHT_GRAD_OP, "torch", _weight_grad_torch)
register(WEIGHT_GRAD_OP, "triton", "mbdl_fast.kernels.conv2d:conv2d_weight_grad_triton")
