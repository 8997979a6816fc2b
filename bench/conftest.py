"""Benchmarks of mbdl_fast: run with ``pytest bench/ --benchmark-json=bench/results/<name>.json``.

Every row records the device, versions and sizes in ``extra_info``; ratios are only compared
within one run (``bench/report.py`` makes the table).
"""

import platform

import pytest
import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def record_floor_gbps(benchmark, floor: int) -> None:
    """GB/s of the minimum bytes an operation must move (``floor``) at the measured median time."""
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["floor_gbps"] = floor / stats.stats.median / 1e9


def checked_timer(step, reference: torch.Tensor, device: torch.device, label: str, tol: float = 1e-4):
    """Run ``step`` once (warm-up: compilation, plans) and check it against ``reference`` (relative L2 error below
    ``tol``) before anything is timed; returns (the error, a callable that runs ``step`` and synchronises)."""
    out = step()
    err = float((out - reference).abs().pow(2).sum().sqrt() / reference.abs().pow(2).sum().sqrt())
    assert err < tol, f"{label}: relative error {err:.2e} against the reference"

    def timed():
        out = step()
        sync(device)
        return out

    return err, timed


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_benchmark_update_machine_info(config, machine_info):
    import numpy

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine_info["device"] = device_name(dev)
    machine_info["torch"] = torch.__version__
    machine_info["numpy"] = numpy.__version__
    machine_info["cuda"] = torch.version.cuda
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
