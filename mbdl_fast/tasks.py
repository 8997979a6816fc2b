"""Tasks: what a run trains on and what it trains, apart from the loop that trains it (``mbdl_fast.train``).

A task fixes the data (a dataset of dicts per split, each split with its own seed), the physics that
measured a batch, and what the model reads and is compared with:

- ``mri``: simulated multi-coil brain slices (``MultiCoilBrainDataset``), ``MultiCoilMRI``;
- ``sr``: crops of the shipped natural images, ``SuperResolution``;
- ``block-cs``: brain-slice crops of a multiple of 33, ``BlockCS``;
- ``denoise``: AWGN denoising of complex brain images (prior pre-training, as SPADE does).

Models: ``deq`` (SPADE's DEQ), ``du`` (deep unfolding, PGD/HQS), ``varnet``, ``recursion``
(Alhejaili et al. on block CS), or a bare prior (``edsr``, ``dncnn``, ``unet``) for ``denoise``.

:class:`TrainConfig` is everything a run depends on (task, model, optimisation); the training loop,
evaluation, fine-tuning, pruning and the demos build their data, physics and models from it here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from mbdl_fast._validate import check_choice, check_device, check_int, check_number
from mbdl_fast.checkpoint import load_model
from mbdl_fast.data import MultiCoilBrainDataset, load_brain_slices, load_natural_images
from mbdl_fast.data.simulate import MASK_TYPES
from mbdl_fast.physics import BlockCS, MultiCoilMRI, SuperResolution
from mbdl_fast.physics.superres import KERNELS as SR_KERNELS
from mbdl_fast.priors import EDSR, DnCNN, UNet, denoise
from mbdl_fast.solvers import DEQ, COASTBlock, DeepUnfolding, ISTANetPlusBlock, RecursiveUnfolding, VarNet

__all__ = [
    "MODELS",
    "TASKS",
    "TASK_MODELS",
    "TEST_DRAWS",
    "TrainConfig",
    "compared_images",
    "make_dataset",
    "make_model",
    "make_physics",
    "make_prior",
    "prepare_batch",
    "reconstruct",
    "unwrap",
]

TASKS = ("mri", "sr", "block-cs", "denoise")
#: The MRI test split repeats each of the 7 test slices under this many independent mask / coil / phase draws
#: (42 images), enough for a paired 95 % confidence interval of a 0.1 dB difference (mbdl_fast.evaluate).
TEST_DRAWS = 6
# the DEQ regularisers' per-epoch means as the training log prints them: (record key, label, format)
#: Crops per split for the image tasks (SR, block CS): 40 test crops for the same reason.
_CROPS = {"train": 64, "val": 8, "test": 40}
MODELS = ("deq", "du", "varnet", "recursion", "edsr", "dncnn", "unet")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as JSON beside every checkpoint."""

    task: str = "mri"
    model: str = "deq"
    prior: str = "edsr"
    model_args: dict[str, Any] = field(default_factory=dict)
    prior_args: dict[str, Any] = field(default_factory=dict)
    init_prior: str | None = None  # checkpoint path (without suffix) of a pre-trained prior
    init_model: str | None = None  # checkpoint of the same architecture whose weights start this run (fine-tuning)
    # data
    size: int = 128
    coils: int = 8
    acceleration: float = 4
    mask_type: str = "random"
    center_fraction: float = 0.08
    noise_std: float = 0.0
    sr_factor: int = 2
    sr_kernel: str = "gaussian"
    cs_ratio: float = 0.25
    denoise_sigma: float = 0.05
    max_train_items: int | None = None
    max_val_items: int | None = None
    # optimisation
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    loss: str = "l1"
    grad_clip: float | None = 1.0
    # DEQ only: weight of the Jacobian regulariser ||dT/dz (z*)||_F^2 / n (Hutchinson, one probe) in the loss
    jac_reg: float = 0.0
    # DEQ only: weight of the hinge mean(relu(g - slow_target)) on T's gain g along the solver's slowest mode
    # (DEQ slow_gain): gains above slow_target are pushed down, so no image is left at the iteration cap
    slow_reg: float = 0.0
    slow_target: float = 0.9
    seed: int = 0
    out: str = "runs/train"
    # also keep every epoch's weights (model_epoch<N>), to choose an epoch afterwards on another criterion than
    # the val PSNR that picks model_best (e.g. convergence under more mask draws)
    keep_epochs: bool = False
    resume: bool = False
    device: str | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"config: unknown keys {unknown}; known: {sorted(known)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {TASKS}, got {self.task!r}")
        if self.model not in MODELS:
            raise ValueError(f"model: expected one of {MODELS}, got {self.model!r}")
        if self.loss not in ("l1", "mse", "smooth_l1"):
            raise ValueError(f"loss: expected l1, mse or smooth_l1, got {self.loss!r}")
        _check_values(self)


#: Which models each task trains: a bare prior denoises; VarNet needs coil maps; recursion needs a ratio.
TASK_MODELS = {
    "mri": ("deq", "du", "varnet", "recursion"),
    "sr": ("deq", "du"),
    "block-cs": ("deq", "du", "recursion"),
    "denoise": ("edsr", "dncnn", "unet"),
}
#: Settings a resumed run may change: they do not alter what it computes.


def _check_values(cfg: TrainConfig) -> None:
    """Types and ranges of every field, and whether the task trains that model (``TrainConfig.validate``)."""
    if cfg.model not in TASK_MODELS[cfg.task]:
        raise ValueError(f"model: task {cfg.task!r} trains one of {TASK_MODELS[cfg.task]}, got {cfg.model!r}")
    check_choice("prior", cfg.prior, ("edsr", "dncnn", "unet"))
    check_choice("mask_type", cfg.mask_type, MASK_TYPES)
    check_choice("sr_kernel", cfg.sr_kernel, SR_KERNELS)
    for name in ("model_args", "prior_args"):
        if not isinstance(getattr(cfg, name), dict):
            raise TypeError(f"{name}: expected a JSON object (dict) of arguments, got {getattr(cfg, name)!r}")
    for name in ("init_prior", "init_model"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise TypeError(f"{name}: expected a checkpoint path or shipped model name, got {value!r}")
    size = check_int("size", cfg.size, 2)
    if cfg.task in ("mri", "denoise") and size % 2:
        raise ValueError(f"size: expected an even int (brain slices are resized to size x size), got {size}")
    if cfg.task == "block-cs" and size % 33:
        raise ValueError(f"size: block CS needs a multiple of 33, got {size}")
    check_int("coils", cfg.coils, 1)
    check_number("acceleration", cfg.acceleration, 1.0)
    check_number("center_fraction", cfg.center_fraction, 0.0, 1.0)
    check_number("noise_std", cfg.noise_std, 0.0)
    factor = check_int("sr_factor", cfg.sr_factor, 1)
    if cfg.task == "sr" and size % factor:
        raise ValueError(f"size: super-resolution crops must be divisible by sr_factor={factor}, got {size}")
    check_number("cs_ratio", cfg.cs_ratio, 0.0, 1.0, open_min=True)
    check_number("denoise_sigma", cfg.denoise_sigma, 0.0)
    for name in ("max_train_items", "max_val_items"):
        if getattr(cfg, name) is not None:
            check_int(name, getattr(cfg, name), 1)
    check_int("epochs", cfg.epochs, 1)
    check_int("batch_size", cfg.batch_size, 1)
    check_number("lr", cfg.lr, 0.0, open_min=True)
    if cfg.grad_clip is not None:
        # A negative clip norm would flip the gradient: ascent. 0 means no clipping.
        check_number("grad_clip", cfg.grad_clip, 0.0, meaning="a gradient norm; 0 or None: no clipping")
    check_int("seed", cfg.seed, 0, 2**63 - 1)
    check_number("jac_reg", cfg.jac_reg, 0.0)
    check_number("slow_reg", cfg.slow_reg, 0.0)
    check_number("slow_target", cfg.slow_target, 0.0, 1.0, open_min=True, open_max=True, meaning="a gain")
    if (cfg.jac_reg > 0 or cfg.slow_reg > 0) and cfg.model != "deq":
        raise ValueError(f"jac_reg: the Jacobian regulariser is for DEQ models, got model {cfg.model!r}")
    if not isinstance(cfg.out, str) or not cfg.out:
        raise TypeError(f"out: expected an output directory, got {cfg.out!r}")
    for flag in ("resume", "keep_epochs"):
        if not isinstance(getattr(cfg, flag), bool):
            raise TypeError(f"{flag}: expected true or false, got {getattr(cfg, flag)!r}")
    if cfg.device is not None:
        check_device("device", cfg.device)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
class _Subset(Dataset):
    def __init__(self, base: Dataset, limit: int | None) -> None:
        self.base = base
        self.length = len(base) if limit is None else min(limit, len(base))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.base[index]


class _ImageCrops(Dataset):
    """Fixed, seeded crops (size x size) of real images (N, H, W) -> {"target": (1, size, size)}."""

    def __init__(self, images: list[torch.Tensor], size: int, count: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.crops = []
        for k in range(count):
            img = images[k % len(images)]
            img = img[0] if img.dim() == 3 else img
            h, w = img.shape
            i = int(torch.randint(0, h - size + 1, (1,), generator=gen))
            j = int(torch.randint(0, w - size + 1, (1,), generator=gen))
            self.crops.append(img[i : i + size, j : j + size].unsqueeze(0).contiguous())

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"target": self.crops[index]}


def make_dataset(cfg: TrainConfig, split: str) -> Dataset:
    """The ``split`` ("train", "val", "test") dataset of dicts for ``cfg.task``; each split has its own seed."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split: expected train, val or test, got {split!r}")
    offset = {"train": 0, "val": 1, "test": 2}[split]
    limit = cfg.max_train_items if split == "train" else cfg.max_val_items
    if cfg.task in ("mri", "denoise"):
        data: Dataset = MultiCoilBrainDataset(
            split,
            num_coils=cfg.coils,
            acceleration=cfg.acceleration,
            mask_type=cfg.mask_type,
            center_fraction=cfg.center_fraction,
            size=cfg.size,
            noise_std=cfg.noise_std,
            seed=cfg.seed + offset,
            draws=TEST_DRAWS if split == "test" and cfg.task == "mri" else 1,
        )
    elif cfg.task == "sr":
        images = load_natural_images(gray=True)
        # the first six images train; the last two give the validation and test crops
        data = _ImageCrops(images[:-2] if split == "train" else images[-2:], cfg.size, _CROPS[split], cfg.seed + offset)
    else:
        if cfg.size % 33:
            raise ValueError(f"size: block CS needs a multiple of 33, got {cfg.size}")
        data = _ImageCrops(list(load_brain_slices(split)), cfg.size, _CROPS[split], cfg.seed + offset)
    return _Subset(data, limit)


def make_physics(cfg: TrainConfig, batch: dict[str, torch.Tensor], device: torch.device):
    """The operator that measured ``batch``; for ``denoise`` None."""
    if cfg.task == "mri":
        return MultiCoilMRI(batch["mask"].to(device), batch["coil_maps"].to(device))
    if cfg.task == "sr":
        return SuperResolution(cfg.sr_kernel, cfg.sr_factor)
    if cfg.task == "block-cs":
        return BlockCS(cfg.cs_ratio, img_size=(cfg.size, cfg.size))
    return None


def prepare_batch(cfg: TrainConfig, batch: dict[str, torch.Tensor], device: torch.device, generator=None):
    """(physics, model input, target) for a batch: measurements y for physics tasks, a noisy image for denoise."""
    physics = make_physics(cfg, batch, device)
    target = batch["target"].to(device)
    if cfg.task == "mri":
        return physics, batch["kspace"].to(device), target
    if cfg.task == "denoise":
        noise = torch.randn(target.shape, dtype=target.dtype, generator=generator).to(device)
        return None, target + cfg.denoise_sigma * noise, target
    return physics, physics.A(target), target


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def _channels(cfg: TrainConfig) -> int:
    return 2 if cfg.task in ("mri", "denoise") else 1


def make_prior(cfg: TrainConfig) -> torch.nn.Module:
    name = cfg.prior if cfg.model in ("deq", "du") else cfg.model
    c = _channels(cfg)
    args = {"in_channels": c, "out_channels": c, **cfg.prior_args}
    prior = {"edsr": EDSR, "dncnn": DnCNN, "unet": UNet}[name](**args)
    if cfg.init_prior:
        pretrained = load_model(cfg.init_prior)
        prior.load_state_dict(pretrained.state_dict())
    return prior


def make_model(cfg: TrainConfig) -> torch.nn.Module:
    """The model named by ``cfg.model``, built from registered classes (so it saves as a JSON config)."""
    if cfg.model in ("edsr", "dncnn", "unet"):
        return make_prior(cfg)
    if cfg.model == "deq":
        model = DEQ(make_prior(cfg), **cfg.model_args)
        return _init_from(model, cfg.init_model)
    if cfg.model == "du":
        return DeepUnfolding(make_prior(cfg), **cfg.model_args)
    if cfg.model == "varnet":
        return VarNet(**cfg.model_args)
    args = dict(cfg.model_args)
    block_cls = {"istanet": ISTANetPlusBlock, "coast": COASTBlock}[args.pop("block", "coast")]
    channels = args.pop("channels", 32)
    blocks = [block_cls(channels=channels, image_channels=_channels(cfg)) for _ in range(args.pop("num_blocks", 3))]
    return RecursiveUnfolding(blocks, modulation_features=channels, **args)


def _init_from(model: torch.nn.Module, path: str | None) -> torch.nn.Module:
    """Copy the weights of the checkpoint ``path`` (same architecture) into ``model``; solver options stay ``model``'s."""
    if path:
        model.load_state_dict(load_model(path).state_dict())
    return model


def reconstruct(model: torch.nn.Module, physics, model_input: torch.Tensor) -> torch.Tensor:
    """Run a model on its input: measurements and physics for solvers, a noisy image for a bare prior."""
    if physics is None:
        return denoise(model, model_input)
    return model(model_input, physics)


def compared_images(
    model: torch.nn.Module, out: torch.Tensor, reference: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, reference)`` as a loss compares them: magnitudes ``(|out|, |reference|)`` for a model that estimates
    its own coil maps (``estimates_coil_maps``: E2E-VarNet, whose image phase is its maps' convention, not the
    reference's), else both unchanged."""
    if getattr(unwrap(model), "estimates_coil_maps", False):
        return out.abs(), reference.abs()
    return out, reference


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper, or ``model`` itself."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
