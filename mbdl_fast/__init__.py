"""mbdl_fast: fast model-based deep learning (DEQ, deep unfolding) for imaging inverse problems.

The pieces users drop into their own code:

- ``mbdl_fast.physics``: operators with deepinv's interface (``MRI``, ``MultiCoilMRI``, ...);
- ``mbdl_fast.dc_step(physics, x, y, gamma, backend="auto")``: the fused data-consistency step;
- ``mbdl_fast.prox_l2(physics, z, y, gamma, backend="auto")``: the data-consistency prox (fused for MRI);
- ``mbdl_fast.backends()``: which backends run here, and why not (per op: ``mbdl_fast.backends.op_backends``);
- ``mbdl_fast.ops``: the fused ops on plain tensors, each beside its plain-PyTorch ``*_ref``;
- ``mbdl_fast.skip_value_checks()``: a block without the per-call NaN/Inf scans (one GPU sync each), for loops
  that check their inputs once, as the package's solvers do;
- ``mbdl_fast.metrics``, ``mbdl_fast.data``: metrics and shipped data.
"""

from mbdl_fast import ops  # noqa: F401  (each op registers its implementations in the backend table)
from mbdl_fast._validate import skip_value_checks
from mbdl_fast.backends import backends
from mbdl_fast.dc import dc_step
from mbdl_fast.prox import prox_l2

__version__ = "0.1.0"

__all__ = ["__version__", "backends", "dc_step", "prox_l2", "skip_value_checks"]
