"""Finding the CNN priors inside a model: what pruning, counting and ``accelerate`` act on.

A prior is the learned denoiser a solver applies (anything with ``width_layers()``, or the modules a
solver holds as ``prior`` / ``priors``); ``find_priors`` lists each one once, by module path.
"""

from __future__ import annotations

from torch import nn

from mbdl_fast.solvers.deq import DEQ
from mbdl_fast.solvers.recursion import RecursiveUnfolding
from mbdl_fast.solvers.unfolding import DeepUnfolding
from mbdl_fast.solvers.varnet import VarNet

__all__ = ["find_priors", "is_solver"]


def is_solver(model: nn.Module) -> bool:
    """Whether ``model`` holds priors (a DEQ, DU, VarNet, RecursiveUnfolding, or ``.prior`` / ``.priors``)."""
    if isinstance(model, (DEQ, DeepUnfolding, VarNet, RecursiveUnfolding)):
        return True
    if hasattr(model, "width_layers"):
        return False
    return isinstance(getattr(model, "prior", None), nn.Module) or isinstance(
        getattr(model, "priors", None), nn.ModuleList
    )


def find_priors(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The CNN priors of ``model``, as ``(module path, module)``, each module once.

    - ``DEQ`` and any module with a ``.prior``: ``[("prior", model.prior)]``;
    - ``DeepUnfolding`` (one prior when tied, K untied), any module with a ``.priors`` ModuleList:
      ``[("priors.k", ...)]``;
    - ``VarNet``: its T cascade priors ``[("cascades.t.model", ...)]``, then its sensitivity network's
      NormUNet ``("sens_net.norm_unet", ...)`` where it has one;
    - ``RecursiveUnfolding``: its recovery blocks ``[("blocks.i", ...)]``;
    - a prior (anything with ``width_layers()``) or any other module: ``[("", model)]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, RecursiveUnfolding):
        found = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    elif isinstance(model, VarNet):
        found = [(f"cascades.{t}.model", c.model) for t, c in enumerate(model.cascades)]
        norm_unet = getattr(model.sens_net, "norm_unet", None)
        if isinstance(norm_unet, nn.Module):
            found.append(("sens_net.norm_unet", norm_unet))
    elif is_solver(model):
        prior = getattr(model, "prior", None)
        if isinstance(prior, nn.Module):
            found = [("prior", prior)]
        else:
            found = [(f"priors.{i}", p) for i, p in enumerate(model.priors)]
    else:
        found = [("", model)]
    seen: set[int] = set()
    unique = []
    for name, module in found:
        if id(module) not in seen:
            seen.add(id(module))
            unique.append((name, module))
    return unique
