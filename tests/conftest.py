"""Test set-up: Triton runs in its CPU interpreter wherever no GPU is visible.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests use tiny tensors: on a 2-core machine intra-op threads cost more in synchronisation than
# they gain (tiny convolutions ran up to 60x slower with 2 threads under load).
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device fast paths are tested on: the GPU when one is visible, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, refusing NaN (a NaN output never passes a tolerance check)."""
    assert torch.isfinite(a).all(), "output contains NaN/Inf"
    assert torch.isfinite(b).all(), "reference contains NaN/Inf"
    return float((a - b).abs().pow(2).sum().sqrt() / b.abs().pow(2).sum().sqrt().clamp_min(1e-30))


def require_backend(op: str, backend: str, device: torch.device) -> None:
    """Skip, with the backend table's reason, where ``backend`` cannot run ``op`` on ``device`` (no GPU for cuda;
    triton runs everywhere here: in its CPU interpreter where no GPU is visible)."""
    from mbdl_fast.backends import op_backends

    status = op_backends(op, device)[backend]
    if not status.available:
        pytest.skip(f"{backend} cannot run {op} on {device}: {status.reason}")


def load_extension():
    """mbdl_fast._C; skipped only where it was not built and could not have been (no nvcc)."""
    import importlib
    import shutil

    try:
        return importlib.import_module("mbdl_fast._C")
    except ModuleNotFoundError as exc:
        if exc.name != "mbdl_fast._C":
            raise
        if shutil.which("nvcc") is None:
            pytest.skip("mbdl_fast._C was not built and no nvcc is on PATH")
        pytest.fail(
            f"nvcc is at {shutil.which('nvcc')} but mbdl_fast._C was not built: reinstall with MBDL_FAST_CUDA=1"
        )


_torchvision_op_schemas = None  # keeps the torch.library.Library below alive


def import_deepinv():
    """deepinv, or a skip where the optional package is not installed.

    deepinv imports torchvision. PyPI's torchvision wheels are CUDA builds: on a CPU-only torch (CI's) their C
    extension does not load, and torchvision's import then fails registering fake kernels for its ops
    ``torchvision::nms`` / ``qnms`` ("operator ... does not exist"). deepinv's code used here never calls those ops,
    so their schemas are declared (no kernel) and the pure-Python rest of torchvision imports.
    """
    import importlib.util
    import sys

    global _torchvision_op_schemas
    if importlib.util.find_spec("deepinv") is None:
        pytest.skip("deepinv (the [deepinv] extra) is not installed")
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _torchvision_op_schemas = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _torchvision_op_schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import deepinv

    return deepinv
