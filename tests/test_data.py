"""Shipped data, simulated acquisitions and the fastMRI loader (all offline, CPU, fast)."""

from __future__ import annotations

import socket

import h5py
import numpy as np
import pytest
import torch

from mbdl_fast.data import (
    NATURAL_IMAGES,
    FastMRISliceDataset,
    MultiCoilBrainDataset,
    birdcage_coil_maps,
    load_brain_slices,
    load_natural_images,
    load_real_brain,
    root_sum_of_squares,
    simulate_multicoil,
    smooth_phase,
)
from mbdl_fast.data._resources import load_npz
from mbdl_fast.fft import fft2c, ifft2c
from mbdl_fast.physics.masks import random_mask, variable_density_mask


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test; the shipped files are re-read from disk."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    load_npz.cache_clear()
    yield
    load_npz.cache_clear()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().norm() / b.abs().norm())


# --------------------------------------------------------------------------- brain slices


def test_brain_slices_shape_range_dtype(no_network):
    counts = {"train": 44, "val": 7, "test": 7, "all": 58}
    for split, n in counts.items():
        x = load_brain_slices(split)
        assert x.dtype == torch.float32 and x.shape == (n, 256, 256)
        assert float(x.min()) == 0.0 and float(x.max()) <= 1.0
        # every slice holds brain (the selection skips the small top and bottom caps)
        assert bool(((x > 0.05).float().mean((1, 2)) > 0.05).all())


def test_brain_splits_disjoint_and_cover():
    npz = load_npz("brain_slices.npz")
    train, val, test = (set(npz[k].tolist()) for k in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(npz["images"].shape[0]))
    everything = load_brain_slices("all")
    for split in ("train", "val", "test"):
        assert torch.equal(load_brain_slices(split), everything[npz[split].tolist()])


def test_brain_resize_and_copy():
    x = load_brain_slices("test", size=64)
    assert x.shape == (7, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert load_brain_slices("val", size=(32, 48)).shape == (7, 32, 48)
    x.fill_(-1)  # the caller owns the tensor: the cache is untouched
    assert float(load_brain_slices("test", size=64).min()) == 0.0
    with pytest.raises(ValueError, match="size"):
        load_brain_slices("test", size=63)
    with pytest.raises(ValueError, match="split"):
        load_brain_slices("training")


# --------------------------------------------------------------------------- coil maps and phase


def sigpy_birdcage(nc: int, ny: int, nx: int, r: float = 1.5) -> np.ndarray:
    """sigpy.mri.birdcage_maps for a 2-D shape, written out in NumPy as the reference."""
    c, y, x = np.mgrid[:nc, :ny, :nx]
    coilx, coily = r * np.cos(c * (2 * np.pi / nc)), r * np.sin(c * (2 * np.pi / nc))
    x_co = (x - nx / 2.0) / (nx / 2.0) - coilx
    y_co = (y - ny / 2.0) / (ny / 2.0) - coily
    out = np.exp(1j * (np.arctan2(x_co, -y_co) - c * (2 * np.pi / nc))) / np.sqrt(x_co**2 + y_co**2)
    return out / np.sqrt((np.abs(out) ** 2).sum(0))


def test_birdcage_matches_sigpy_and_is_normalised():
    maps = birdcage_coil_maps(8, (48, 40))
    assert maps.dtype == torch.complex64 and maps.shape == (8, 48, 40)
    np.testing.assert_allclose(maps.numpy(), sigpy_birdcage(8, 48, 40), atol=1e-6)
    for seed in (None, 0, 7):
        rss2 = (birdcage_coil_maps(6, (32, 32), radius=1.2, seed=seed).abs() ** 2).sum(0)
        assert float((rss2 - 1).abs().max()) < 1e-5


def test_birdcage_seeded_reproducible():
    a, b = birdcage_coil_maps(8, (32, 32), seed=3), birdcage_coil_maps(8, (32, 32), seed=3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, birdcage_coil_maps(8, (32, 32), seed=4))
    assert not torch.allclose(a, birdcage_coil_maps(8, (32, 32)))
    with pytest.raises(ValueError, match="num_coils"):
        birdcage_coil_maps(0, (32, 32))
    with pytest.raises(ValueError, match="shape"):
        birdcage_coil_maps(4, (32,))


def test_smooth_phase():
    phi = smooth_phase((64, 48), seed=1, max_phase=1.0)
    assert phi.dtype == torch.float32 and phi.shape == (64, 48)
    assert abs(float(phi.abs().max()) - 1.0) < 1e-6
    assert torch.equal(phi, smooth_phase((64, 48), seed=1, max_phase=1.0))
    assert not torch.allclose(phi, smooth_phase((64, 48), seed=2, max_phase=1.0))
    # smooth: a cubic on [-1, 1) with max |φ| = 1 changes by a few hundredths per pixel at most
    assert float(phi.diff(dim=0).abs().max()) < 0.3 and float(phi.diff(dim=1).abs().max()) < 0.3
    assert float(smooth_phase((8, 8), seed=0, max_phase=0.0).abs().max()) == 0.0


# --------------------------------------------------------------------------- simulated acquisitions


@pytest.fixture(scope="module")
def images():
    return load_brain_slices("test", size=64)[:3]


def test_simulate_no_noise_matches_forward_model(images):
    mask = random_mask(64, 4, 0.08, seed=0)
    out = simulate_multicoil(images, num_coils=4, mask=mask, seed=1)
    n, c = images.shape[0], 4
    assert out["target"].shape == (n, 64, 64) and out["target"].dtype == torch.complex64
    assert out["coil_maps"].shape == (n, c, 64, 64) and out["coil_maps"].dtype == torch.complex64
    assert out["kspace"].shape == (n, c, 64, 64) and out["kspace"].dtype == torch.complex64
    assert out["mask"].shape == (1, 1, 1, 64) and out["mask"].dtype == torch.float32
    assert torch.allclose(out["target"].abs(), images, atol=1e-6)  # the phase changes only the phase

    unsampled = (out["mask"] == 0).expand_as(out["kspace"])
    assert bool((out["kspace"][unsampled] == 0).all())
    expected = out["mask"] * fft2c(out["coil_maps"] * out["target"][:, None])
    assert rel_err(out["kspace"], expected) < 1e-6
    zero_filled = (out["coil_maps"].conj() * ifft2c(out["kspace"])).sum(1)
    assert rel_err(out["zero_filled"], zero_filled) < 1e-6
    assert float((out["coil_maps"].abs() ** 2).sum(1).sub(1).abs().max()) < 1e-5


def test_simulate_full_mask_recovers_target(images):
    out = simulate_multicoil(images, num_coils=6, seed=0)
    assert rel_err(out["zero_filled"], out["target"]) < 1e-5
    real = simulate_multicoil(images, num_coils=2, phase=False, seed=0)
    assert float(real["target"].imag.abs().max()) == 0.0


def test_simulate_seeded_and_2d_mask(images):
    mask = variable_density_mask((64, 64), 4, seed=0)
    a = simulate_multicoil(images, 4, mask=mask, noise_std=0.01, seed=5)
    b = simulate_multicoil(images, 4, mask=mask, noise_std=0.01, seed=5)
    c = simulate_multicoil(images, 4, mask=mask, noise_std=0.01, seed=6)
    assert a["mask"].shape == (1, 1, 64, 64)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.allclose(a["kspace"], c["kspace"])
    assert not torch.allclose(a["coil_maps"], c["coil_maps"])
    assert bool((a["kspace"][(a["mask"] == 0).expand_as(a["kspace"])] == 0).all())
    with pytest.raises(ValueError, match="mask"):
        simulate_multicoil(images, 4, mask=torch.ones(1, 63))
    with pytest.raises(TypeError, match="images"):
        simulate_multicoil(images.to(torch.complex64), 4)


def test_simulate_noise_std(images):
    std = 0.05
    clean = simulate_multicoil(images, 4, seed=2)
    noisy = simulate_multicoil(images, 4, noise_std=std, seed=2)
    noise = noisy["kspace"] - clean["kspace"]  # same seed: same maps and phase, only the noise added
    for part in (noise.real, noise.imag):
        assert abs(float(part.std()) / std - 1) < 0.03  # 49k samples per part: ~0.3% standard error
        assert abs(float(part.mean())) < 0.02 * std


def test_multicoil_brain_dataset():
    ds = MultiCoilBrainDataset("val", num_coils=4, acceleration=4, size=32, noise_std=0.01, seed=3)
    assert len(ds) == 7
    item = ds[2]
    assert item["target"].shape == (32, 32) and item["zero_filled"].shape == (32, 32)
    assert item["kspace"].shape == (4, 32, 32) and item["coil_maps"].shape == (4, 32, 32)
    assert item["mask"].shape == (1, 1, 32) and item["index"] == 2
    again = MultiCoilBrainDataset("val", num_coils=4, acceleration=4, size=32, noise_std=0.01, seed=3)[2]
    for k in ("target", "kspace", "mask", "coil_maps"):
        assert torch.equal(item[k], again[k])
    masks = [ds.mask(i) for i in range(len(ds))]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # random masks differ per item

    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["mask"].shape == (2, 1, 1, 32)
    assert bool((batch["kspace"][(batch["mask"] == 0).expand_as(batch["kspace"])] == 0).all())

    for mask_type, shape in (("equispaced", (1, 1, 32)), ("uniform", (1, 1, 32)), ("variable_density", (1, 32, 32))):
        assert MultiCoilBrainDataset("test", 2, 4, mask_type=mask_type, size=32)[0]["mask"].shape == shape
    with pytest.raises(ValueError, match="mask_type"):
        MultiCoilBrainDataset("test", 2, 4, mask_type="radial")


# --------------------------------------------------------------------------- real scanner data


def test_real_brain_layout_scale_and_copy(no_network):
    from importlib import resources

    from mbdl_fast.finetune import rotate

    kspace = load_real_brain()
    assert kspace.dtype == torch.complex64 and kspace.shape == (1, 16, 128, 128)
    image = root_sum_of_squares(kspace)
    assert abs(float(image.max()) - 1.0) < 1e-6
    # the stored scan (phase encoding along H), turned a quarter turn and scaled, nothing else
    stored = torch.from_numpy(np.array(load_npz("brain_invivo_16ch_gre.npz")["kspace"]))[None]
    assert rel_err(kspace, rotate(stored, 1) / root_sum_of_squares(stored).max()) < 1e-6
    # a brain: signal in the middle, little in the corners (noise only), and scanner noise present
    assert float(image[0, 48:80, 48:80].mean()) > 0.3 and float(image[0, :12, :12].mean()) < 0.1
    assert float(image[0, :12, :12].mean()) > 0
    # the head's long axis (anterior-posterior) now runs along W, the phase-encode axis
    head = image[0] > 0.2
    assert int(head.any(0).sum()) > int(head.any(1).sum())
    kspace.zero_()
    assert float(load_real_brain().abs().max()) > 0  # a fresh copy each call
    body = load_real_brain(body_coil=True)
    assert body.shape == (1, 2, 128, 128) and abs(float(root_sum_of_squares(body).max()) - 1.0) < 1e-6
    notice = resources.files("mbdl_fast.data").joinpath("files", "LICENSE_pulseq_MR-Physics-with-Pulseq.txt")
    text = notice.read_text()
    assert "MIT License" in text and "446ac401ff5b2e1ab4ca5a6d36fc7434a83afd99" in text
    with pytest.raises(TypeError, match="body_coil: expected a bool"):
        load_real_brain("yes")


# --------------------------------------------------------------------------- natural images


def test_natural_images_offline(no_network):
    imgs = load_natural_images()
    assert len(imgs) == len(NATURAL_IMAGES) == 8
    for img in imgs:
        assert img.dtype == torch.float32 and img.dim() == 3 and img.shape[0] == 1
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert imgs[0].shape == (1, 512, 512)  # camera
    colour = load_natural_images(["astronaut", "camera"], gray=False)
    assert colour[0].shape == (3, 512, 512) and colour[1].shape == (3, 512, 512)
    small = load_natural_images(size=(32, 48))
    assert all(img.shape == (1, 32, 48) for img in small)
    with pytest.raises(ValueError, match="names"):
        load_natural_images(["lena"])


def test_natural_images_exact_against_skimage():
    data = pytest.importorskip("skimage.data")
    np.testing.assert_array_equal((load_natural_images("camera")[0][0] * 255).round().numpy(), data.camera())
    astronaut = load_natural_images("astronaut", gray=False)[0]
    np.testing.assert_array_equal((astronaut.permute(1, 2, 0) * 255).round().numpy(), data.astronaut())


# --------------------------------------------------------------------------- fastMRI files


def write_fastmri(path, kspace, target_key=None, target=None, mask=None):
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        if target is not None:
            f.create_dataset(target_key, data=target)
        if mask is not None:
            f.create_dataset("mask", data=mask)
        f.attrs["acquisition"] = "CORPD_FBK"
        f.attrs["max"] = 0.5
        f.attrs["norm"] = 0.25
        f.attrs["patient_id"] = "abc123"


def random_complex(rng, shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def test_fastmri_multicoil_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    k1, k2 = random_complex(rng, (3, 4, 16, 12)), random_complex(rng, (2, 4, 16, 12))
    t1 = rng.random((3, 8, 8)).astype(np.float32)
    write_fastmri(tmp_path / "b.h5", k1, "reconstruction_rss", t1)
    write_fastmri(tmp_path / "a.h5", k2, mask=np.array([1, 0] * 6, dtype=bool))  # test-set style: no target
    ds = FastMRISliceDataset(tmp_path, challenge="multicoil")
    assert len(ds) == 5
    first = ds[0]  # files are sorted: a.h5 first
    assert first["fname"] == "a.h5" and first["slice"] == 0 and first["target"] is None
    assert torch.equal(first["kspace"], torch.from_numpy(k2[0]))
    assert torch.equal(first["mask"], torch.tensor([[1.0, 0.0] * 6]))
    s = ds[4]
    assert s["fname"] == "b.h5" and s["slice"] == 2 and s["mask"] is None
    assert s["kspace"].dtype == torch.complex64 and torch.equal(s["kspace"], torch.from_numpy(k1[2]))
    assert s["target"].dtype == torch.float32 and torch.equal(s["target"], torch.from_numpy(t1[2]))
    assert s["attrs"] == {"acquisition": "CORPD_FBK", "max": 0.5, "norm": 0.25, "patient_id": "abc123"}
    one = FastMRISliceDataset(tmp_path / "b.h5", transform=lambda d: d["kspace"].shape)
    assert len(one) == 3 and one[1] == (4, 16, 12)


def test_fastmri_singlecoil_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    k, t = random_complex(rng, (2, 16, 12)), rng.random((2, 8, 8)).astype(np.float32)
    write_fastmri(tmp_path / "s.h5", k, "reconstruction_esc", t)
    ds = FastMRISliceDataset([tmp_path / "s.h5"], challenge="singlecoil")
    s = ds[1]
    assert s["kspace"].shape == (1, 16, 12) and torch.equal(s["kspace"][0], torch.from_numpy(k[1]))
    assert torch.equal(s["target"], torch.from_numpy(t[1]))


def test_fastmri_errors_name_the_file(tmp_path):
    bad = tmp_path / "no_kspace.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("image", data=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="no_kspace.h5.*'kspace'"):
        FastMRISliceDataset(bad)
    single = tmp_path / "single.h5"
    write_fastmri(single, np.zeros((2, 8, 8), np.complex64))
    with pytest.raises(ValueError, match=r"single.h5.*\(slices, coils, H, W\)"):
        FastMRISliceDataset(single, challenge="multicoil")
    real = tmp_path / "real.h5"
    write_fastmri(real, np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="real.h5.*complex"):
        FastMRISliceDataset(real, challenge="singlecoil")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(OSError, match="notes.h5"):
        FastMRISliceDataset(text)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        FastMRISliceDataset([tmp_path / "missing.h5"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        FastMRISliceDataset(empty)
    with pytest.raises(ValueError, match="challenge"):
        FastMRISliceDataset(single, challenge="knee")
