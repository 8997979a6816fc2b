"""Pruning: structured channel pruning of the CNN priors inside MBDL models, and parameter/MAC counts.

- :func:`prune_channels`: a copy of a model (DEQ, DeepUnfolding, VarNet, RecursiveUnfolding, a bare
  prior, any ``nn.Module``) whose priors have fewer channels, built on Torch-Pruning's dependency
  graph; image channels protected automatically; checked; rebuildable from its JSON config.
- :func:`count_params_and_macs`: parameters and conv/linear MACs per image, before and after.

N:M sparsity lives in ``mbdl_fast.prune.nm``.
"""

from mbdl_fast.prune.channels import (
    PruningError,
    PruningRecord,
    PruningWarning,
    UnitRecord,
    find_priors,
    prune_channels,
)
from mbdl_fast.prune.counting import count_params_and_macs

__all__ = [
    "PruningError",
    "PruningRecord",
    "PruningWarning",
    "UnitRecord",
    "count_params_and_macs",
    "find_priors",
    "prune_channels",
]
