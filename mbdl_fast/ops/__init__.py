"""The fused ops, one module each: the custom op (``torch.library``), its fake, its autograd, its plain-PyTorch
``*_ref`` and its implementations, registered per backend in the table of ``mbdl_fast.backends``.

- :mod:`~mbdl_fast.ops.mri_forward`: A x = M ⊙ F_c(S ⊙ x), Cartesian MRI;
- :mod:`~mbdl_fast.ops.dc_step`: x - gamma (A^H A x - A^H y), Cartesian MRI, single and multi-coil;
- :mod:`~mbdl_fast.ops.mri_prox`: the single-coil MRI prox in closed form;
- :mod:`~mbdl_fast.ops.conv2d`: conv2d + bias + activation + scale + residual (pruned priors).

The ops take plain tensors; ``mbdl_fast.physics`` calls them (its classes override ``dc_step`` / ``prox_l2``), and
``mbdl_fast.layers`` wraps the convolution. Triton kernels live in the top-level ``kernels/`` (installed as
``mbdl_fast.kernels``), CUDA sources in ``csrc/<op>/``.
"""

from mbdl_fast.ops.conv2d import conv2d_fused, conv2d_fused_op, conv2d_fused_ref
from mbdl_fast.ops.dc_step import mri_dc_step_op, mri_dc_step_ref
from mbdl_fast.ops.mri_forward import mri_forward_op, mri_forward_ref
from mbdl_fast.ops.mri_prox import mri_prox_l2_op, mri_prox_l2_ref

__all__ = [
    "conv2d_fused",
    "conv2d_fused_op",
    "conv2d_fused_ref",
    "mri_dc_step_op",
    "mri_dc_step_ref",
    "mri_forward_op",
    "mri_forward_ref",
    "mri_prox_l2_op",
    "mri_prox_l2_ref",
]
