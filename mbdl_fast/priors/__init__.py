"""CNN priors (denoisers) for model-based deep learning, each width-configurable per layer.

- :class:`EDSR`: SPADE's DEQ prior (residual blocks, no normalisation);
- :class:`DnCNN`: Zhang et al.'s residual denoiser;
- :class:`UNet`, :class:`NormUNet`: fastMRI's U-Net and VarNet's normalised U-Net.

All map real ``(B, C, H, W)`` to real ``(B, C', H, W)`` and are called deepinv-style as
``prior(x, sigma=None)`` (none is noise-conditional: ``sigma`` is ignored). Complex images reach
them through :func:`denoise`. Each has ``to_config()`` / ``from_config()`` (plain JSON, every width
explicit) and is registered for :func:`mbdl_fast.registry.build`; ``widths``,
``width_layers()`` and ``tied_widths()`` describe its per-layer widths for channel pruning.
"""

from mbdl_fast.priors.base import denoise
from mbdl_fast.priors.dncnn import DnCNN
from mbdl_fast.priors.edsr import EDSR
from mbdl_fast.priors.unet import NormUNet, UNet

__all__ = ["DnCNN", "EDSR", "NormUNet", "UNet", "denoise"]
