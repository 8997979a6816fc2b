"""mbdl_fast: fast model-based deep learning for imaging inverse problems."""

__version__ = "0.1.0"
