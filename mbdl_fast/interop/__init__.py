"""Bridges to the ecosystem: ``mbdl_fast.interop.fastmri`` and ``mbdl_fast.interop.deepinv``.

Each submodule is imported on its own (``from mbdl_fast.interop.fastmri import load_varnet``); none of
them imports its library until a function that needs it is called, so ``import mbdl_fast`` never
requires deepinv or fastmri.
"""
