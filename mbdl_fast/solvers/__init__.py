"""Solvers: fixed-point solvers (Anderson, plain iteration), the DEQ and unrolled models, and ``find_priors``.

One import line per module and one ``__all__`` entry per line, so that solvers added in parallel merge
cleanly (ruff's isort rule merges names from the same module onto one line).
"""

from mbdl_fast.solvers.deq import DEQ
from mbdl_fast.solvers.discovery import find_priors, is_solver
from mbdl_fast.solvers.fixed_point import ConvergenceWarning, anderson_solve, fixed_point_solve
from mbdl_fast.solvers.recursion import COASTBlock, ISTANetPlusBlock, RecursiveUnfolding
from mbdl_fast.solvers.unfolding import DeepUnfolding
from mbdl_fast.solvers.varnet import SensitivityModel, VarNet

__all__ = [
    "ConvergenceWarning",
    "DEQ",
    "anderson_solve",
    "fixed_point_solve",
    "DeepUnfolding",
    "VarNet",
    "find_priors",
    "is_solver",
    "SensitivityModel",
    "RecursiveUnfolding",
    "ISTANetPlusBlock",
    "COASTBlock",
]
