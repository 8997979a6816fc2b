"""Masks against fastMRI's formulas, written out here independently of the package."""

import numpy as np
import pytest
import torch

from mbdl_fast.physics.masks import equispaced_mask, mask_axes, random_mask, uniform_acs_mask, variable_density_mask


def fastmri_center(num_cols, center_fraction):
    num_low = round(num_cols * center_fraction)
    mask = np.zeros(num_cols, dtype=bool)
    pad = (num_cols - num_low + 1) // 2
    mask[pad : pad + num_low] = True
    return mask, num_low


def fastmri_random(num_cols, acceleration, center_fraction, seed):
    rng = np.random.RandomState(seed)
    rng.randint(1)  # MaskFunc.choose_acceleration
    center, num_low = fastmri_center(num_cols, center_fraction)
    prob = (num_cols / acceleration - num_low) / (num_cols - num_low)
    return center | (rng.uniform(size=num_cols) < prob)


def fastmri_equispaced_fraction(num_cols, acceleration, center_fraction, seed):
    rng = np.random.RandomState(seed)
    rng.randint(1)
    center, num_low = fastmri_center(num_cols, center_fraction)
    adjusted = (acceleration * (num_low - num_cols)) / (num_low * acceleration - num_cols)
    offset = rng.randint(0, high=round(adjusted))
    accel = np.zeros(num_cols, dtype=bool)
    accel[np.around(np.arange(offset, num_cols - 1, adjusted)).astype(np.uint)] = True
    return center | accel


@pytest.mark.parametrize("num_cols", [320, 368, 321, 640])
@pytest.mark.parametrize(("acceleration", "center_fraction"), [(4, 0.08), (8, 0.04)])
@pytest.mark.parametrize("seed", [0, 3, 1234])
def test_column_masks_equal_fastmri(num_cols, acceleration, center_fraction, seed):
    got = random_mask(num_cols, acceleration, center_fraction, seed=seed)
    assert got.shape == (1, num_cols) and got.dtype == torch.float32
    assert np.array_equal(got[0].numpy().astype(bool), fastmri_random(num_cols, acceleration, center_fraction, seed))
    got = equispaced_mask(num_cols, acceleration, center_fraction, seed=seed)
    want = fastmri_equispaced_fraction(num_cols, acceleration, center_fraction, seed)
    assert np.array_equal(got[0].numpy().astype(bool), want)


def test_equispaced_exact_fraction_keeps_one_in_r():
    mask = equispaced_mask(368, 4, 0.08, seed=0)
    assert abs(float(mask.mean()) - 0.25) < 0.01


def test_plain_equispaced_is_every_rth_column_plus_centre():
    mask = equispaced_mask(320, 4, 0.08, seed=5, exact_fraction=False)[0].numpy().astype(bool)
    center, _ = fastmri_center(320, 0.08)
    outer = mask & ~center
    cols = np.flatnonzero(outer)
    assert len(set(cols % 4)) == 1


def test_random_mask_is_seeded():
    a = random_mask(320, 4, 0.08, seed=1)
    assert torch.equal(a, random_mask(320, 4, 0.08, seed=1))
    assert not torch.equal(a, random_mask(320, 4, 0.08, seed=2))


@pytest.mark.parametrize(("num_cols", "r"), [(256, 6), (320, 4), (368, 8)])
def test_spade_uniform_mask(num_cols, r):
    mask = uniform_acs_mask(num_cols, r)[0].numpy().astype(bool)
    num_acs = int(num_cols * 0.2 * 2 / r)
    start = (num_cols - num_acs + 1) // 2
    want = np.zeros(num_cols, dtype=bool)
    want[::r] = True
    want[start : start + num_acs] = True
    assert np.array_equal(mask, want)


def test_variable_density_mask_hits_its_budget_and_is_2d():
    mask = variable_density_mask((128, 96), 5, seed=0)
    assert mask.shape == (128, 96)
    assert abs(float(mask.mean()) - 1 / 5) < 0.02
    assert float(mask[64, 48]) == 1.0  # the centre is always sampled
    assert mask_axes(mask, 128, 96) == (-2, -1)


def test_mask_axes_detects_lines():
    col = random_mask(40, 4, 0.1, seed=0)
    assert mask_axes(col, 32, 40) == (-1,)
    assert mask_axes(col.expand(32, 40), 32, 40) == (-1,)
    assert mask_axes(col.reshape(40, 1), 40, 32) == (-2,)
    assert mask_axes(torch.ones(32, 40), 32, 40) == ()
    per_sample = torch.stack([random_mask(40, 4, 0.1, seed=s) for s in range(3)])[:, None]  # (3, 1, 1, 40)
    assert mask_axes(per_sample, 32, 40) == (-1,)


def test_mask_errors_name_the_argument():
    with pytest.raises(ValueError, match="acceleration"):
        random_mask(320, 0.5, 0.08)
    with pytest.raises(ValueError, match="center_fraction"):
        random_mask(320, 4, 1.5)
    with pytest.raises(ValueError, match="num_cols"):
        uniform_acs_mask(1, 4)
