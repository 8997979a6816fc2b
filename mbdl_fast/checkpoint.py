"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A model checkpoint is two files side by side:

- ``<path>.safetensors``: the state dict (one copy of each shared tensor);
- ``<path>.json``::

      {"format": "mbdl_fast-checkpoint", "version": 1,
       "config": {"class": NAME, "args": {...}},      # mbdl_fast.registry.config_of(model)
       "metadata": {...},                              # the caller's, plain JSON
       "tensors": {name: [shape, dtype]},              # what the safetensors file holds
       "aliases": {name: saved_name},                  # state-dict entries sharing a saved tensor
       "sha256": "...", "library": {...}}

``load_model`` rebuilds the architecture from the config (so a pruned model comes back with its
pruned widths), then loads the weights with ``strict=True``. A training state (``save_training_state``)
adds the optimizer's (and optionally a scheduler's) state: tensors in the safetensors file, the
rest in JSON. Every refusal is a :class:`CheckpointError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mbdl_fast.registry import build, config_of

MODEL_FORMAT = "mbdl_fast-checkpoint"
TRAINING_FORMAT = "mbdl_fast-training-state"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: corrupt, mismatched, or of the wrong format."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """One of the two checkpoint files is missing."""


# --------------------------------------------------------------------------- files


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(<path>.safetensors, <path>.json)``; a trailing ``.safetensors`` or ``.json`` on ``path`` is dropped."""
    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(target: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _library() -> dict[str, str]:
    from mbdl_fast import __version__

    return {"mbdl_fast": __version__, "torch": torch.__version__}


def _check_json(name: str, value: object) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected plain JSON (dict, list, str, int, float, bool, None), {err}") from None


def _write(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> tuple[Path, Path]:
    """Write the safetensors file, then the JSON (with the weights' hash): the JSON is the commit point."""
    weights, config = _paths(path)
    _atomic_write(weights, lambda tmp: save_file(tensors, tmp))
    header["sha256"] = _sha256(weights)
    header["library"] = _library()
    text = json.dumps(header, indent=1)
    _atomic_write(config, lambda tmp: Path(tmp).write_text(text))
    return weights, config


def _read(path: str | os.PathLike[str], fmt: str, verify: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """Read and check both files: format tag, version, hash, and that the JSON lists what the weights hold."""
    weights, config = _paths(path)
    for f in (config, weights):
        if not f.is_file():
            raise CheckpointNotFoundError(
                f"{f}: checkpoint file not found (a checkpoint is {config.name} + {weights.name})"
            )
    try:
        header = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config}: not a valid JSON checkpoint header ({err})") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise CheckpointError(f"{config}: expected format {fmt!r}, got {got!r}")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{config}: expected version {VERSION}, got {header.get('version')!r}")
    if verify and header.get("sha256") != (digest := _sha256(weights)):
        raise CheckpointError(
            f"{weights}: contents do not match the sha256 recorded in {config.name} "
            f"(file {digest[:12]}..., recorded {str(header.get('sha256'))[:12]}...): corrupt or replaced weights "
            "(load with verify=False to skip this check)"
        )
    try:
        tensors = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err})") from None
    listed = header.get("tensors")
    if not isinstance(listed, dict) or not all(isinstance(v, list) and len(v) == 2 for v in listed.values()):
        raise CheckpointError(f"{config}: expected 'tensors' as {{name: [shape, dtype]}}, got {str(listed)[:80]}")
    for name in sorted(set(listed) | set(tensors)):
        if name not in tensors:
            raise CheckpointError(f"{weights}: tensor {name!r} listed in {config.name} is missing from the weights")
        if name not in listed:
            raise CheckpointError(f"{weights}: tensor {name!r} is not listed in {config.name}")
        shape, dtype = listed[name]
        t = tensors[name]
        if list(t.shape) != list(shape) or _dtype_name(t.dtype) != dtype:
            raise CheckpointError(
                f"{weights}: tensor {name!r} is {_dtype_name(t.dtype)} {tuple(t.shape)}, "
                f"but {config.name} lists {dtype} {tuple(shape)}"
            )
    return header, tensors, weights


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- state dicts


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to save (each shared tensor once, as a contiguous CPU copy) and the aliases of the others.

    safetensors refuses tensors sharing memory; tied weights (one module used twice, or parameters
    assigned to two modules) appear under several state-dict names. The first name keeps the tensor,
    later ones become aliases, restored on load.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in state.items():
        t = t.detach()
        key = (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.to("cpu", copy=True).contiguous()
    return tensors, aliases


def _tensor_table(tensors: dict[str, torch.Tensor]) -> dict[str, list[Any]]:
    return {name: [list(t.shape), _dtype_name(t.dtype)] for name, t in tensors.items()}


def _load_into(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    aliases: dict[str, str],
    weights: Path,
    what: str,
) -> None:
    """``model.load_state_dict(..., strict=True)`` after checking keys and shapes with messages naming the file."""
    state = dict(tensors)
    for name, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{weights}: alias {name!r} points to {target!r}, which the weights lack")
        state[name] = tensors[target]
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: weights do not match {what}: "
            + "; ".join(
                part
                for part in (
                    f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "",
                    f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else "",
                )
                if part
            )
        )
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{weights}: tensor {k!r} has shape {tuple(state[k].shape)}, but {what} expects {tuple(t.shape)}"
            )
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- models


def save_model(
    model: torch.nn.Module, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (weights) and ``<path>.json`` (config, metadata); return both paths.

    ``model`` must be a registered mbdl_fast model (``registry.config_of``); wrappers (DDP,
    DataParallel, torch.compile) are looked through. ``metadata`` is any plain-JSON dict (training
    settings, metrics, seeds). Files are written atomically, the JSON last.
    """
    model = _unwrap(model)
    config = config_of(model)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata: expected a dict of plain JSON values, got {type(metadata).__name__}")
    _check_json("metadata", metadata)
    tensors, aliases = _split_state(model.state_dict())
    header = {
        "format": MODEL_FORMAT,
        "version": VERSION,
        "config": config,
        "metadata": metadata,
        "tensors": _tensor_table(tensors),
        "aliases": aliases,
    }
    return _write(path, tensors, header)


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu", *, verify: bool = True
) -> torch.nn.Module:
    """Rebuild a model saved by :func:`save_model`: architecture from the JSON config, weights strictly.

    Returns the model on ``map_location`` in eval mode, its floating-point dtype that of the saved
    weights. Raises :class:`CheckpointError` (a ``ValueError``) naming the file for a missing file,
    a wrong format tag or version, weights that do not match the recorded sha256 (``verify``) or are
    not a readable safetensors file, and weights that do not fit the config (missing or unexpected
    keys, shapes: e.g. a config saying 48 channels with 64-channel weights).
    """
    header, tensors, weights = _read(path, MODEL_FORMAT, verify)
    config_file = _paths(path)[1]
    try:
        model = build(header["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: cannot rebuild the model from its config ({err})") from err
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:
        model = model.to(float_dtypes.pop())
    _load_into(model, tensors, header.get("aliases", {}), weights, f"the config's {header['config']['class']}")
    return model.to(map_location).eval()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` dict saved with a model (training config, metrics), without loading weights."""
    config_file = _paths(path)[1]
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"{config_file}: no such checkpoint config")
    try:
        header = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file}: not a readable JSON checkpoint config ({err})") from err
    if header.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{config_file}: expected format {MODEL_FORMAT!r}, got {header.get('format')!r}")
    return header.get("metadata", {})


# --------------------------------------------------------------------------- training state


def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """Nested state (dicts with int or str keys, lists, tuples, tensors, scalars) as JSON + named tensors.

    Tensors go to ``tensors`` under their path (``prefix/key/key``) and become ``{"__tensor__": name}``;
    dicts become ``{"__dict__": [[key, value], ...]}`` and tuples ``{"__tuple__": [...]}``, so key types,
    order and tuples survive the round trip exactly.
    """
    if isinstance(obj, torch.Tensor):
        key, n = name, 1
        while key in tensors:  # keys containing "/" could collide; keep every tensor
            key, n = f"{name}#{n}", n + 1
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise TypeError(f"{where}: cannot store a key of type {type(k).__name__} at {name}")
            items.append([k, _encode(v, f"{name}/{k}", tensors, where)])
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}/{i}", tensors, where) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}/{i}", tensors, where) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"{where}: cannot store a value of type {type(obj).__name__} at {name}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], weights: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, weights) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            if obj["__tensor__"] not in tensors:
                raise CheckpointError(f"{weights}: tensor {obj['__tensor__']!r} is missing from the weights")
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors, weights) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _decode(v, tensors, weights) for k, v in obj["__dict__"]}
        raise CheckpointError(f"{weights}: unknown encoded value {str(obj)[:80]}")
    return obj


def save_training_state(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    extra: dict[str, Any] | None = None,
    *,
    scheduler: Any = None,
    rng: bool = True,
) -> tuple[Path, Path]:
    """Write everything needed to resume training to ``<path>.safetensors`` + ``<path>.json``.

    Stores the model's weights (and its config when it is a registered model, else ``null``), the
    optimizer's state dict (tensors such as Adam's moments and step counts in the safetensors file;
    hyper-parameters and structure in the JSON), ``scheduler.state_dict()`` when given, ``epoch``,
    ``extra`` (plain JSON: best metric, global step, ...) and, with ``rng``, PyTorch's CPU and CUDA
    random states. Resume with :func:`load_training_state`.
    """
    model = _unwrap(model)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"epoch: expected an int, got {type(epoch).__name__}")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra: expected a dict of plain JSON values, got {type(extra).__name__}")
    _check_json("extra", extra)
    try:
        config = config_of(model)
    except TypeError:
        config = None  # any nn.Module can be trained and resumed; only registered ones rebuild alone

    model_tensors, aliases = _split_state(model.state_dict())
    tensors = {f"model/{k}": t for k, t in model_tensors.items()}
    header: dict[str, Any] = {
        "format": TRAINING_FORMAT,
        "version": VERSION,
        "config": config,
        "epoch": epoch,
        "extra": extra,
        "aliases": aliases,
        "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors, "optimizer"),
        "scheduler": None if scheduler is None else _encode(scheduler.state_dict(), "scheduler", tensors, "scheduler"),
        "rng": None,
    }
    if rng:
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
        header["rng"] = _encode(states, "rng", tensors, "rng")
    header["tensors"] = _tensor_table(tensors)
    return _write(path, tensors, header)


def load_training_state(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any = None,
    restore_rng: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a state written by :func:`save_training_state` into ``model`` (strictly), ``optimizer`` and ``scheduler``.

    ``model`` and ``optimizer`` must be built as when saving (same architecture and parameter
    groups); tensors go to the devices of the model's parameters. With ``restore_rng`` the saved
    PyTorch random states are restored (the CUDA ones where CUDA is available). Returns
    ``{"epoch", "extra", "config"}``. Raises :class:`CheckpointError` naming the file on any mismatch.
    """
    header, tensors, weights = _read(path, TRAINING_FORMAT, verify)
    model = _unwrap(model)
    model_tensors = {k[len("model/") :]: t for k, t in tensors.items() if k.startswith("model/")}
    _load_into(model, model_tensors, header.get("aliases", {}), weights, f"the given {type(model).__name__}")
    if optimizer is not None:
        try:
            optimizer.load_state_dict(_decode(header["optimizer"], tensors, weights))
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{weights}: optimizer state does not fit the given optimizer ({err})") from err
    if scheduler is not None:
        if header.get("scheduler") is None:
            raise CheckpointError(f"{weights}: no scheduler state was saved, but a scheduler was given")
        scheduler.load_state_dict(_decode(header["scheduler"], tensors, weights))
    if restore_rng and header.get("rng") is not None:
        states = _decode(header["rng"], tensors, weights)
        torch.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
    return {"epoch": header["epoch"], "extra": header.get("extra", {}), "config": header.get("config")}
