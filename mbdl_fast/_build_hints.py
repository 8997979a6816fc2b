"""What to install for each part of the CUDA extension a build can leave out.

Plain data, no imports: setup.py reads this file directly (torch is absent from pip's isolated build), and
``mbdl-fast info`` prints the same lines through :func:`mbdl_fast.cuda_extension.build_report`.
"""

EXTENSION = "install the CUDA toolkit (nvcc) and cmake, then reinstall: MBDL_FAST_CUDA=1 pip install ."
LEVEL1 = "pip install 'nvidia-cufft>=12,<13' (the cuFFT headers), then reinstall: pip install ."
LEVEL2 = "pip install 'nvidia-mathdx>=25.6,<26' (the cuFFTDx headers), then reinstall: pip install ."


def hint(part: str, detail: str) -> str:
    """The install hint for ``part`` ("level1" | "level2") when ``detail`` (CMake's reason) says headers were
    missing; "" when the reason is something a package cannot fix (an old nvcc, a switch turned off)."""
    missing = "were found in none of" in detail or "not found in" in detail
    return {"level1": LEVEL1, "level2": LEVEL2}[part] if missing else ""
