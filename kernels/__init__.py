"""Triton kernels of mbdl_fast, installed as the subpackage ``mbdl_fast.kernels``.

Importing this package needs ``triton``; ``mbdl_fast.backends`` reports when it is missing.
"""
