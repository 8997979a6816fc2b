import json
import os

import pytest
import torch
from torch import nn

from mbdl_fast.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    load_model,
    load_training_state,
    save_model,
    save_training_state,
)
from mbdl_fast.priors import EDSR, DnCNN, NormUNet, UNet
from mbdl_fast.registry import register

MODELS = {
    "EDSR": lambda: EDSR(width=4, num_blocks=2),
    "pruned EDSR": lambda: EDSR(num_blocks=2, widths=[8, 3, 8, 5, 8, 8]),
    "DnCNN": lambda: DnCNN(depth=4, widths=[3, 5, 7], batch_norm=True),
    "UNet": lambda: UNet(chans=4, num_pool_layers=2),
    "NormUNet": lambda: NormUNet(num_pool_layers=2, widths=[3, 4, 5, 6, 7, 8, 2, 9, 10, 11, 3, 4]),
}


@register("_TiedTestModel")
class TiedModel(nn.Module):
    """A registered model whose state dict names one conv twice (weights shared across iterations)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.width = width
        self.first = nn.Conv2d(2, 2, 3, padding=1)
        self.second = self.first
        self.register_buffer("scale", torch.full((width,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x)) * self.scale[0]

    def to_config(self) -> dict:
        return {"width": self.width}

    @classmethod
    def from_config(cls, config: dict) -> "TiedModel":
        return cls(**config)


def saved(tmp_path, model=None, name="ckpt"):
    torch.manual_seed(0)
    model = model if model is not None else EDSR(width=4, num_blocks=2)
    save_model(model, tmp_path / name, metadata={"epochs": 3})
    return model, tmp_path / f"{name}.safetensors", tmp_path / f"{name}.json"


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    weights, config = save_model(model, tmp_path / "m", metadata={"psnr": 31.5})
    assert weights.name == "m.safetensors" and config.name == "m.json"
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.to_config() == model.to_config()
    x = torch.randn(2, 2, 17, 16)
    assert torch.equal(loaded(x), model(x))
    header = json.loads(config.read_text())
    assert header["format"] == "mbdl_fast-checkpoint" and header["version"] == 1
    assert header["metadata"] == {"psnr": 31.5}
    assert header["config"]["class"] == type(model).config_name
    assert header["tensors"]["unet.conv.layers.0.weight" if name == "NormUNet" else next(iter(header["tensors"]))]


def test_path_suffixes_and_dtype(tmp_path):
    torch.manual_seed(0)
    model = DnCNN(depth=3, width=4).double()
    save_model(model, tmp_path / "d.safetensors")
    loaded = load_model(tmp_path / "d.json")
    assert next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    assert torch.equal(loaded(x), model.eval()(x))


def test_shared_tensors_saved_once_and_stay_tied(tmp_path):
    model = TiedModel()
    save_model(model, tmp_path / "t")
    header = json.loads((tmp_path / "t.json").read_text())
    assert header["aliases"] == {"second.weight": "first.weight", "second.bias": "first.bias"}
    assert set(header["tensors"]) == {"first.weight", "first.bias", "scale"}
    loaded = load_model(tmp_path / "t")
    assert loaded.first is loaded.second
    x = torch.randn(1, 2, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_no_pickle(tmp_path, monkeypatch):
    model, _, _ = saved(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle-based loading used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    load_model(tmp_path / "ckpt")


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="metadata: expected plain JSON"):
        save_model(EDSR(width=2, num_blocks=0), tmp_path / "m", metadata={"t": torch.zeros(1)})
    with pytest.raises(TypeError, match="model: expected a registered"):
        save_model(nn.Conv2d(2, 2, 3), tmp_path / "m")


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"nothing\.json: checkpoint file not found"):
        load_model(tmp_path / "nothing")
    _, weights, _ = saved(tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match=r"ckpt\.safetensors: checkpoint file not found"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "ckpt")


def test_truncated_weights_refused(tmp_path):
    _, weights, _ = saved(tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors: contents do not match the sha256"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"ckpt\.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "ckpt", verify=False)


def test_garbage_bytes_refused(tmp_path):
    _, weights, _ = saved(tmp_path)
    data = bytearray(weights.read_bytes())
    data[-40:-8] = b"\xff" * 32  # inside the tensor data: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(tmp_path / "ckpt")
    weights.write_bytes(b"not a safetensors file at all" * 4)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "ckpt", verify=False)


def edit_json(path, change):
    header = json.loads(path.read_text())
    change(header)
    path.write_text(json.dumps(header))


def test_wrong_format_and_bad_json(tmp_path):
    _, _, config = saved(tmp_path)
    edit_json(config, lambda h: h.update(format="something-else"))
    with pytest.raises(
        CheckpointError, match=r"ckpt\.json: expected format 'mbdl_fast-checkpoint', got 'something-else'"
    ):
        load_model(tmp_path / "ckpt")
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"ckpt\.json: not a valid JSON"):
        load_model(tmp_path / "ckpt")


def test_pruned_config_with_unpruned_weights_refused(tmp_path):
    # The config says block 0's inner width is 48, the weights hold 64 channels.
    _, _, config = saved(tmp_path, EDSR(width=64, num_blocks=1))

    def prune(header):
        header["config"]["args"]["widths"][1] = 48

    edit_json(config, prune)
    with pytest.raises(
        CheckpointError,
        match=r"ckpt\.safetensors: tensor 'blocks\.0\.conv1\.weight' has shape \(64, 64, 3, 3\), "
        r"but the config's EDSR expects \(48, 64, 3, 3\)",
    ):
        load_model(tmp_path / "ckpt")


def test_missing_and_unexpected_keys_refused(tmp_path):
    _, _, config = saved(tmp_path)

    def more_blocks(header):
        header["config"]["args"].update(num_blocks=3, widths=[4] * 8)

    edit_json(config, more_blocks)
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks\.2\.conv1\.weight'"):
        load_model(tmp_path / "ckpt")

    _, _, config = saved(tmp_path)
    edit_json(config, lambda h: h["config"]["args"].update(num_blocks=1, widths=[4] * 4))
    with pytest.raises(CheckpointError, match=r"unexpected keys \[.*'blocks\.1\.conv1\.weight'"):
        load_model(tmp_path / "ckpt")


def test_json_listing_must_match_weights(tmp_path):
    _, _, config = saved(tmp_path)
    edit_json(config, lambda h: h["tensors"].update({"head.weight": [[4, 2, 3, 1], "float32"]}))
    with pytest.raises(CheckpointError, match=r"tensor 'head\.weight' is float32 \(4, 2, 3, 3\), but ckpt\.json lists"):
        load_model(tmp_path / "ckpt")
    _, _, config = saved(tmp_path)
    edit_json(config, lambda h: h["tensors"].pop("tail.bias"))
    with pytest.raises(CheckpointError, match=r"tensor 'tail\.bias' is not listed in ckpt\.json"):
        load_model(tmp_path / "ckpt")


def test_unknown_class_refused(tmp_path):
    _, _, config = saved(tmp_path)
    edit_json(config, lambda h: h["config"].update({"class": "NoSuchNet"}))
    with pytest.raises(CheckpointError, match=r"ckpt\.json: cannot rebuild the model .*NoSuchNet"):
        load_model(tmp_path / "ckpt")


def train_steps(model, optimizer, scheduler, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 2, 16, 16, generator=gen)
        loss = (model(x) - 0.5 * x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def make_training(seed):
    torch.manual_seed(seed)
    model = DnCNN(depth=3, width=4, batch_norm=True)
    optimizer = torch.optim.Adam(
        [{"params": model.convs.parameters()}, {"params": model.norms.parameters(), "lr": 3e-3}],
        lr=1e-2,
        betas=(0.8, 0.99),
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def test_training_state_resumes_identically(tmp_path):
    model, optimizer, scheduler = make_training(0)
    train_steps(model, optimizer, scheduler, 3, seed=1)
    save_training_state(tmp_path / "state", model, optimizer, epoch=7, extra={"best_psnr": 30.25}, scheduler=scheduler)

    train_steps(model, optimizer, scheduler, 1, seed=2)  # the run that never stopped

    resumed, resumed_opt, resumed_sched = make_training(123)  # different initial weights
    info = load_training_state(tmp_path / "state", resumed, resumed_opt, scheduler=resumed_sched)
    assert info["epoch"] == 7 and info["extra"] == {"best_psnr": 30.25}
    assert info["config"]["class"] == "DnCNN"
    assert resumed_opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert resumed_sched.last_epoch == 3
    train_steps(resumed, resumed_opt, resumed_sched, 1, seed=2)

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert optimizer.param_groups[0]["lr"] == resumed_opt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        sa, sb = optimizer.state[p], resumed_opt.state[q]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_state_rng_and_mismatch(tmp_path):
    model, optimizer, _ = make_training(0)
    torch.manual_seed(5)
    save_training_state(tmp_path / "state", model, optimizer, epoch=0)
    expected = torch.rand(3)
    torch.rand(10)
    load_training_state(tmp_path / "state", model, restore_rng=True)
    assert torch.equal(torch.rand(3), expected)

    other = DnCNN(depth=3, width=8, batch_norm=True)
    with pytest.raises(CheckpointError, match=r"state\.safetensors: tensor 'convs\.0\.weight' has shape"):
        load_training_state(tmp_path / "state", other)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        load_training_state(tmp_path / "state", model, sgd)
    with pytest.raises(CheckpointError, match="expected format 'mbdl_fast-checkpoint'"):
        load_model(tmp_path / "state")


# --------------------------------------------------------------------------- one commit point


class CrashError(Exception):
    """Stands for a crash at a chosen step of a save."""


def interrupt_rename(monkeypatch, which: int) -> None:
    """Make the ``which``-th os.replace of the next save raise, as a crash at that point would."""
    import mbdl_fast.checkpoint as ckpt

    real = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == which:
            raise CrashError(f"crash before rename {which}: {src} -> {dst}")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)


@pytest.mark.parametrize(("which", "survivor"), [(1, "old"), (2, "old"), (3, "new")])
def test_an_interrupted_save_leaves_one_complete_checkpoint(tmp_path, monkeypatch, which, survivor):
    """Renames of a save: 1 weights -> pending name, 2 the JSON (the commit), 3 pending -> final name."""
    torch.manual_seed(0)
    old, new = EDSR(width=4, num_blocks=1), EDSR(width=4, num_blocks=1)
    save_model(old, tmp_path / "m")
    interrupt_rename(monkeypatch, which)
    with pytest.raises(CrashError):
        save_model(new, tmp_path / "m")
    monkeypatch.undo()
    loaded = load_model(tmp_path / "m")  # verifies the sha256 of the weights it reads
    want = {"old": old, "new": new}[survivor]
    for a, b in zip(loaded.state_dict().values(), want.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a read rolls an interrupted commit forward; the next save clears leftovers of the others
    save_model(new, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_hostile_config_refused_before_anything_is_built(tmp_path):
    import resource
    import time

    torch.manual_seed(0)
    save_model(EDSR(width=4, num_blocks=1), tmp_path / "m")
    header = json.loads((tmp_path / "m.json").read_text())
    for args in ({"width": 60000}, {"num_blocks": 1000, "width": 4}):
        edited = dict(header, config={"class": "EDSR", "args": {"in_channels": 2, "out_channels": 2, **args}})
        (tmp_path / "m.json").write_text(json.dumps(edited))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        with pytest.raises(CheckpointError, match=r"m\.(json|safetensors): "):
            load_model(tmp_path / "m")
        assert time.perf_counter() - started < 2.0
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mb < 100, f"refusing {args} took {grown_mb:.0f} MB"  # EDSR(width=60000) would take ~4 GB


def test_solver_options_from_a_checkpoint_are_bounded(tmp_path):
    from mbdl_fast.solvers import DEQ

    save_model(DEQ(EDSR(width=4, num_blocks=1)), tmp_path / "deq")
    header = json.loads((tmp_path / "deq.json").read_text())
    header["config"]["args"]["f_max_iter"] = 10**9
    (tmp_path / "deq.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=r"f_max_iter: expected an int >= 1 and <= 10000, got 1000000000"):
        load_model(tmp_path / "deq")


def test_shipped_names_are_paths_unless_a_checkpoint_is_there(tmp_path, monkeypatch):
    from mbdl_fast.checkpoint import read_metadata, resolve_checkpoint
    from mbdl_fast.weights import weights_path

    assert resolve_checkpoint("deq_mri_4x") == weights_path("deq_mri_4x")
    assert read_metadata("varnet_mri_4x")["config"]["model"] == "varnet"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    mine = EDSR(width=4, num_blocks=1)
    save_model(mine, "deq_mri_4x")  # a local checkpoint of that name wins
    assert isinstance(load_model("deq_mri_4x"), EDSR)
    with pytest.raises(CheckpointError, match="shipped models can be named"):
        load_model("no_such_model")


def test_training_state_saves_every_random_state(tmp_path):
    import random

    import numpy as np

    model, optimizer, _ = make_training(0)
    noise = torch.Generator().manual_seed(11)
    torch.randn(4, generator=noise)
    random.seed(3)
    np.random.seed(4)
    save_training_state(tmp_path / "state", model, optimizer, epoch=0, generators={"noise": noise})
    expected = (torch.rand(2), random.random(), np.random.rand(), torch.randn(2, generator=noise))
    torch.rand(5), random.random(), np.random.rand(), torch.randn(5, generator=noise)  # the run goes on
    fresh = torch.Generator().manual_seed(0)
    load_training_state(tmp_path / "state", model, restore_rng=True, generators={"noise": fresh})
    got = (torch.rand(2), random.random(), np.random.rand(), torch.randn(2, generator=fresh))
    assert torch.equal(got[0], expected[0]) and got[1:3] == expected[1:3] and torch.equal(got[3], expected[3])
    with pytest.raises(CheckpointError, match=r"no state saved for generator\(s\) \['other'\]"):
        load_training_state(tmp_path / "state", model, restore_rng=True, generators={"other": fresh})
    with pytest.raises(ValueError, match="generators: given with restore_rng=False"):
        load_training_state(tmp_path / "state", model, generators={"noise": fresh})
