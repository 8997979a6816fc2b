"""Wall-clock timing that is honest on GPUs: wait for queued kernels before reading the clock."""

from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Block until ``device`` has finished its queued work (a no-op on CPUs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
