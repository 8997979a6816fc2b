"""Small pre-trained models shipped with the package (safetensors + JSON config, no pickle).

Trained on the shipped data by ``scripts/train_shipped.sh`` (brain MRI at 128 x 128, 8 coils;
natural-image crops for super-resolution). ``load_pretrained(name)`` returns the model in eval mode.
"""

from __future__ import annotations

import torch

from mbdl_fast.checkpoint import load_model
from mbdl_fast.shipped import SHIPPED, weights_path

__all__ = ["SHIPPED", "load_pretrained", "weights_path"]


def load_pretrained(name: str, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The shipped model ``name`` (see ``SHIPPED``), rebuilt from its JSON config, in eval mode."""
    return load_model(weights_path(name), map_location=map_location)
