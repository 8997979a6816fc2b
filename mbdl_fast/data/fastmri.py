"""A slice dataset over users' own fastMRI ``.h5`` files (nothing is downloaded).

The fastMRI schema (https://github.com/facebookresearch/fastMRI), per file (one volume):

- ``"kspace"``: complex64 ``(slices, coils, H, W)`` for the multicoil challenge, ``(slices, H, W)``
  for singlecoil, stored in the same centred convention ``mbdl_fast.fft.ifft2c`` inverts;
- optional targets, float32 ``(slices, h, w)`` (cropped, e.g. 320 x 320): ``"reconstruction_rss"``
  (multicoil, root-sum-of-squares) or ``"reconstruction_esc"`` (singlecoil, emulated single coil);
  absent from the test and challenge sets;
- optional ``"mask"`` ``(W,)`` (test and challenge sets: the columns that were acquired);
- attributes such as ``"acquisition"``, ``"max"``, ``"norm"``, ``"patient_id"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

CHALLENGES = ("multicoil", "singlecoil")
TARGET_KEYS = {"multicoil": "reconstruction_rss", "singlecoil": "reconstruction_esc"}
_KSPACE_LAYOUT = {"multicoil": "(slices, coils, H, W)", "singlecoil": "(slices, H, W)"}


def _attr_value(v: Any) -> Any:
    """h5py attributes as plain Python values (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _list_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if not isinstance(paths, (str, os.PathLike, list, tuple)) or (
        isinstance(paths, (list, tuple)) and not all(isinstance(p, (str, os.PathLike)) for p in paths)
    ):
        raise TypeError(f"paths: expected a directory, an .h5 file or a list of them, got {paths!r}")
    if isinstance(paths, (str, os.PathLike)):
        root = Path(paths)
        if root.is_dir():
            files = sorted(root.glob("*.h5"))
            if not files:
                raise FileNotFoundError(f"paths: no .h5 files in directory {root}")
            return files
        paths = [root]
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("paths: expected a directory, an .h5 file or a list of them, got an empty list")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"paths: no such file(s): {missing}")
    return files


class FastMRISliceDataset(Dataset):
    """All slices of all given fastMRI files, read lazily (each access opens the file, reads one slice).

    Only shapes are read when the dataset is built; it holds no open file handle, so it works
    with ``DataLoader(num_workers > 0)``.

    Args:
        paths: a directory (its ``*.h5`` files, sorted), one ``.h5`` file, or a list of files.
        challenge: ``"multicoil"`` (kspace ``(slices, coils, H, W)``) or ``"singlecoil"``
            (kspace ``(slices, H, W)``).
        transform: optional callable applied to each sample dict; its result is returned instead.
        target_key: dataset holding the target; default ``"reconstruction_rss"`` for multicoil,
            ``"reconstruction_esc"`` for singlecoil. A file without it gives ``target=None``.

    Each sample is a dict:

    - ``"kspace"``: complex64 ``(C, H, W)`` (``C = 1`` for singlecoil);
    - ``"target"``: float32 ``(h, w)`` or ``None``;
    - ``"mask"``: float32 ``(1, W)`` if the file has a ``"mask"`` dataset, else ``None``;
    - ``"attrs"``: the file's attributes as a dict;
    - ``"fname"``: the file name (``str``, no directory), ``"slice"``: the slice index (``int``).

    ``None`` values do not collate: use a ``transform`` (e.g. crop and drop) or a custom
    ``collate_fn`` to batch.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        challenge: str = "multicoil",
        transform: Callable[[dict[str, Any]], Any] | None = None,
        target_key: str | None = None,
    ) -> None:
        if challenge not in CHALLENGES:
            raise ValueError(f"challenge: expected one of {CHALLENGES}, got {challenge!r}")
        self.challenge = challenge
        self.transform = transform
        self.target_key = target_key if target_key is not None else TARGET_KEYS[challenge]
        self.files = _list_files(paths)
        self.examples: list[tuple[Path, int]] = []
        for path in self.files:
            num_slices = self._inspect(path)
            self.examples.extend((path, i) for i in range(num_slices))

    def _inspect(self, path: Path) -> int:
        """Check the file's schema; return its number of slices."""
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise OSError(f"{path}: cannot be opened as an HDF5 file ({e})") from e
        with f:
            if "kspace" not in f or not isinstance(f["kspace"], h5py.Dataset):
                raise ValueError(f"{path}: no 'kspace' dataset (found {sorted(f.keys())}); not a fastMRI file")
            ks = f["kspace"]
            ndim = 4 if self.challenge == "multicoil" else 3
            if ks.ndim != ndim or ks.dtype.kind != "c":
                raise ValueError(
                    f"{path}: 'kspace' expected complex {_KSPACE_LAYOUT[self.challenge]} for challenge "
                    f"{self.challenge!r}, got {ks.dtype} {ks.shape}"
                )
            if self.target_key in f:
                tg = f[self.target_key]
                if tg.ndim != 3 or tg.shape[0] != ks.shape[0]:
                    raise ValueError(
                        f"{path}: {self.target_key!r} expected (slices={ks.shape[0]}, h, w), got {tg.dtype} {tg.shape}"
                    )
            return ks.shape[0]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Any:
        path, i = self.examples[index]
        with h5py.File(path, "r") as f:
            kspace = torch.from_numpy(np.asarray(f["kspace"][i], dtype=np.complex64))
            target = None
            if self.target_key in f:
                target = torch.from_numpy(np.asarray(f[self.target_key][i], dtype=np.float32))
            mask = None
            if "mask" in f:
                mask = torch.from_numpy(np.asarray(f["mask"][()], dtype=np.float32)).reshape(1, -1)
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
        if self.challenge == "singlecoil":
            kspace = kspace[None]
        sample = {"kspace": kspace, "target": target, "mask": mask, "attrs": attrs, "fname": path.name, "slice": i}
        return self.transform(sample) if self.transform is not None else sample
