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

One commit point. A save writes the new weights beside the old pair under a name derived from
their hash (``.<name>.safetensors.<sha256[:16]>.pending``), then replaces the JSON (one atomic
rename: the commit), then renames the weights into place. An interruption before the commit leaves
the old pair intact; one after it leaves the new JSON and its pending weights, which every reader
finds by the recorded hash and moves into place. The pair is never seen half replaced.

Nothing is built from an unchecked file: the JSON's format, version and tensor table, and the
weights' hash are checked first; the architecture is then built on the ``meta`` device (no memory)
with at most as many parameters and buffers as the file holds, and compared with the file's tensor
shapes, before the real model is built. Shipped model names (``mbdl_fast.weights.SHIPPED``) are
accepted wherever a path is, unless a checkpoint exists at that path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.modules import module as module_hooks

from mbdl_fast import __version__
from mbdl_fast.registry import build, config_of
from mbdl_fast.shipped import SHIPPED, weights_path

MODEL_FORMAT = "mbdl_fast-checkpoint"
TRAINING_FORMAT = "mbdl_fast-training-state"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: corrupt, mismatched, or of the wrong format."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """One of the two checkpoint files is missing."""


# --------------------------------------------------------------------------- files


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(<path>.safetensors, <path>.json)``; a trailing ``.safetensors`` or ``.json`` on ``path`` is dropped.

    A shipped model name (``deq_mri_4x``, see ``mbdl_fast.weights``) stands for the shipped files when no
    checkpoint exists at that path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a checkpoint path (str or os.PathLike) or a shipped model name, got {path!r}")
    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    weights, config = base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")
    if not config.exists() and not weights.exists() and isinstance(path, str):
        if path in SHIPPED:
            shipped = weights_path(path)
            return shipped.with_name(shipped.name + ".safetensors"), shipped.with_name(shipped.name + ".json")
    return weights, config


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint path (without suffix) that ``path`` names: itself, or a shipped model's files."""
    weights, _ = _paths(path)
    return weights.with_name(weights.name[: -len(".safetensors")])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(target: Path, write: Any) -> Path:
    """``write(tmp)`` to a fresh temporary file beside ``target``, flushed to disk; returns its path."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _atomic_write(target: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = _temporary(target, write)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _pending(weights: Path, digest: str) -> Path:
    """Where the weights with sha256 ``digest`` wait between the JSON commit and their final rename."""
    return weights.with_name(f".{weights.name}.{digest[:16]}.pending")


def _committed_weights(weights: Path, header: dict[str, Any]) -> Path:
    """The weights file the committed JSON refers to: finishes a save interrupted after its commit point."""
    digest = header.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        return weights
    pending = _pending(weights, digest)
    if not pending.is_file():
        return weights
    try:
        os.replace(pending, weights)  # roll forward: the JSON already names these weights
    except OSError:
        return pending  # a read-only folder: read them where they are
    return weights


def _library() -> dict[str, str]:
    return {"mbdl_fast": __version__, "torch": torch.__version__}


def _check_json(name: str, value: object) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected plain JSON (dict, list, str, int, float, bool, None), {err}") from None


def _write(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> tuple[Path, Path]:
    """Write the pair with the JSON as the one commit point (module docstring): pending weights, JSON, rename."""
    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    weights, config = base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")
    tmp = _temporary(weights, lambda t: save_file(tensors, t))
    digest = _sha256(tmp)
    pending = _pending(weights, digest)
    os.replace(tmp, pending)
    header["sha256"] = digest
    header["library"] = _library()
    text = json.dumps(header, indent=1)
    _atomic_write(config, lambda t: Path(t).write_text(text))  # the commit point
    os.replace(pending, weights)
    _fsync_dir(weights.parent)
    for stale in weights.parent.glob(f".{weights.name}.*"):  # leftovers of saves interrupted before their commit
        stale.unlink(missing_ok=True)
    return weights, config


def _read(path: str | os.PathLike[str], fmt: str, verify: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """Read and check both files: format tag, version, hash, and that the JSON lists what the weights hold."""
    weights, config = _paths(path)
    if not config.is_file():
        raise CheckpointNotFoundError(
            f"{config}: checkpoint file not found (a checkpoint is {config.name} + {weights.name}; "
            "shipped models can be named: see mbdl_fast.weights.SHIPPED)"
        )
    header = _read_header(config, fmt)
    weights = _committed_weights(weights, header)
    if not weights.is_file():
        raise CheckpointNotFoundError(
            f"{weights}: checkpoint file not found (a checkpoint is {config.name} + {weights.name})"
        )
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
    aliases = header.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{config}: expected 'aliases' as {{name: saved_name}}, got {str(aliases)[:80]}")
    return header, tensors, weights


def _read_header(config: Path, fmt: str) -> dict[str, Any]:
    """The JSON header, with its format tag and version checked."""
    try:
        header = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config}: not a valid JSON checkpoint header ({err})") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise CheckpointError(f"{config}: expected format {fmt!r}, got {got!r}")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{config}: expected version {VERSION}, got {header.get('version')!r}")
    return header


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
    _check_fit(model.state_dict(), tensors, aliases, weights, what)
    state = {**tensors, **{name: tensors[target] for name, target in aliases.items()}}
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
    config = header.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("class"), str):
        raise CheckpointError(f"{config_file}: expected 'config' as {{'class': NAME, 'args': {{...}}}}, got "
                              f"{str(config)[:120]}")  # fmt: skip
    aliases = header.get("aliases", {})
    what = f"the config's {config['class']}"
    # The architecture is first built on the meta device (no memory), its size bounded by the file: a hostile
    # config (a huge width or depth) is refused before anything real is allocated.
    skeleton = _build(config, config_file, len(tensors) + len(aliases), meta=True)
    _check_fit(skeleton.state_dict(), tensors, aliases, weights, what)
    model = _build(config, config_file, len(tensors) + len(aliases), meta=False)
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:
        model = model.to(float_dtypes.pop())
    _load_into(model, tensors, aliases, weights, what)
    return model.to(map_location).eval()


def _build(config: dict[str, Any], config_file: Path, saved: int, meta: bool) -> torch.nn.Module:
    """``build(config)``, refused once it registers far more parameters, buffers or modules than the ``saved``
    tensors could fill."""
    counts = {"tensors": 0, "modules": 0}
    # Generous bounds: a near miss gets _check_fit's precise message; a hostile config stops early.
    limits = {"tensors": 4 * saved + 64, "modules": 16 * saved + 256}

    def count(kind: str, value: object) -> None:
        if value is None:
            return
        counts[kind] += 1
        if counts[kind] > limits[kind]:
            raise _TooLargeError(f"builds more than {limits[kind]} {kind} while the weights hold {saved} tensors")

    hooks = [
        module_hooks.register_module_parameter_registration_hook(lambda m, n, p: count("tensors", p)),
        module_hooks.register_module_buffer_registration_hook(lambda m, n, b: count("tensors", b)),
        module_hooks.register_module_module_registration_hook(lambda m, n, s: count("modules", s)),
    ]
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return build(config)
    except _TooLargeError as err:
        raise CheckpointError(f"{config_file}: the config does not fit its weights: it {err}") from None
    except (KeyError, TypeError, ValueError, NotImplementedError, RuntimeError) as err:
        raise CheckpointError(f"{config_file}: cannot rebuild the model from its config ({err})") from err
    finally:
        for hook in hooks:
            hook.remove()


class _TooLargeError(Exception):
    """A config that builds more than its weights hold (raised inside the registration hooks)."""


def _check_fit(
    expected: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    aliases: dict[str, str],
    weights: Path,
    what: str,
) -> None:
    """The names and shapes ``expected`` (a state dict, meta tensors will do) against the saved tensors."""
    state = {**tensors, **{name: tensors[target] for name, target in aliases.items() if target in tensors}}
    for name, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{weights}: alias {name!r} points to {target!r}, which the weights lack")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{weights}: weights do not match {what}: " + "; ".join(parts))
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{weights}: tensor {k!r} has shape {tuple(state[k].shape)}, but {what} expects {tuple(t.shape)}"
            )


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` dict saved with a model (training config, metrics), without loading weights."""
    config_file = _paths(path)[1]
    if not config_file.is_file():
        raise CheckpointNotFoundError(
            f"{config_file}: no such checkpoint config (shipped models can be named: see mbdl_fast.weights.SHIPPED)"
        )
    metadata = _read_header(config_file, MODEL_FORMAT).get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{config_file}: expected 'metadata' as a JSON object, got {type(metadata).__name__}")
    return metadata


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
    generators: dict[str, torch.Generator | torch.Tensor] | None = None,
) -> tuple[Path, Path]:
    """Write everything needed to resume training to ``<path>.safetensors`` + ``<path>.json``.

    Stores the model's weights (and its config when it is a registered model, else ``null``), the
    optimizer's state dict (tensors such as Adam's moments and step counts in the safetensors file;
    hyper-parameters and structure in the JSON), ``scheduler.state_dict()`` when given, ``epoch``,
    ``extra`` (plain JSON: best metric, global step, ...) and, with ``rng``, every random state a
    resumed run draws from: PyTorch's CPU and CUDA generators, Python's ``random``, NumPy's global
    generator, and the caller's own ``generators`` by name (e.g. the noise of a denoising task; a generator or
    its ``get_state()``, such as another rank's).
    Resume with :func:`load_training_state`.
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
    if generators is not None and (
        not isinstance(generators, dict)
        or not all(isinstance(k, str) and isinstance(g, (torch.Generator, torch.Tensor)) for k, g in generators.items())
    ):
        raise TypeError(
            f"generators: expected a dict of name -> torch.Generator (or its get_state()), got {generators!r}"
        )
    if rng:
        header["rng"] = _encode(_rng_states(generators or {}), "rng", tensors, "rng")
    elif generators:
        raise ValueError("generators: given with rng=False; pass rng=True to save them")
    header["tensors"] = _tensor_table(tensors)
    return _write(path, tensors, header)


def read_training_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``extra`` dict saved with a training state (history, settings), without loading its tensors."""
    config_file = _paths(path)[1]
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"{config_file}: no such training state")
    extra = _read_header(config_file, TRAINING_FORMAT).get("extra", {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"{config_file}: expected 'extra' as a JSON object, got {type(extra).__name__}")
    return extra


def load_training_state(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any = None,
    restore_rng: bool = False,
    generators: dict[str, torch.Generator] | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a state written by :func:`save_training_state` into ``model`` (strictly), ``optimizer`` and ``scheduler``.

    ``model`` and ``optimizer`` must be built as when saving (same architecture and parameter
    groups); tensors go to the devices of the model's parameters. With ``restore_rng`` the saved
    random states are restored (PyTorch's CPU and, where CUDA is available, CUDA ones; Python's and
    NumPy's), and each of ``generators`` from the state saved under its name (a name that was not
    saved is an error). Returns ``{"epoch", "extra", "config"}``. Raises :class:`CheckpointError`
    naming the file on any mismatch.
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
    if generators and not restore_rng:
        raise ValueError("generators: given with restore_rng=False; pass restore_rng=True to restore them")
    if restore_rng:
        if header.get("rng") is None:
            if generators:
                raise CheckpointError(f"{weights}: no random states were saved (rng=False), but generators were given")
        else:
            _restore_rng_states(_decode(header["rng"], tensors, weights), generators or {}, weights)
    return {"epoch": header["epoch"], "extra": header.get("extra", {}), "config": header.get("config")}


def _rng_states(generators: dict[str, torch.Generator | torch.Tensor]) -> dict[str, Any]:
    """Every random state a training run draws from, encodable by ``_encode`` (tensors, tuples, numbers)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "python": (version, list(mt_state), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "generators": {name: g if isinstance(g, torch.Tensor) else g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any], generators: dict[str, torch.Generator], weights: Path) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "python" in states:  # absent from states saved before these were added
        version, mt_state, gauss = states["python"]
        random.setstate((version, tuple(mt_state), gauss))
    if "numpy" in states:
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    saved = states.get("generators", {})
    missing = sorted(set(generators) - set(saved))
    if missing:
        raise CheckpointError(f"{weights}: no state saved for generator(s) {missing}; saved: {sorted(saved)}")
    for name, g in generators.items():
        g.set_state(saved[name])
