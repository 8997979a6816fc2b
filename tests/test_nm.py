"""N:M sparsity (mbdl_fast.prune.nm): masks, apply/remove, SLS search with its STE, MAC report."""

import math

import pytest
import torch
from torch import nn

from mbdl_fast.priors import EDSR, DnCNN
from mbdl_fast.prune.nm import (
    NMMask,
    SLSGate,
    SLSSearch,
    apply_nm,
    is_2to4_compatible,
    nm_mask,
    nm_rank,
    nm_report,
    remove_nm,
    select_nm_layers,
)


def groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """Independent grouping: (O, I, kh, kw) -> (O*kh*kw*I/m, m), m consecutive input channels per row."""
    if t.dim() == 2:
        return t.reshape(t.shape[0], -1, m).reshape(-1, m)
    o, i, kh, kw = t.shape
    return t.permute(0, 2, 3, 1).reshape(o * kh * kw * (i // m), m)


def tiny_edsr() -> EDSR:
    torch.manual_seed(0)
    return EDSR(width=8, num_blocks=2)


def tiny_dncnn() -> DnCNN:
    torch.manual_seed(0)
    return DnCNN(depth=5, width=8)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (4, 4), (1, 2), (2, 8)])
def test_mask_keeps_exactly_n_of_every_m_and_the_largest(n, m):
    torch.manual_seed(n * 10 + m)
    w = torch.randn(6, 16, 3, 3)
    mask = nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    g, a = groups(mask, m), groups(w.abs(), m)
    assert (g.sum(-1) == n).all()
    # magnitude-optimal: the smallest kept |w| is at least the largest dropped one, in every group
    kept_min = torch.where(g, a, torch.inf).min(-1).values
    dropped_max = torch.where(g, -torch.inf, a).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_mask_exact_n_with_ties_and_zeros_and_linear():
    w = torch.zeros(4, 8, 3, 3)
    w[:, ::2] = 1.0  # ties everywhere
    assert (groups(nm_mask(w, 2, 4), 4).sum(-1) == 2).all()
    assert (groups(nm_mask(torch.zeros(3, 8), 3, 4), 4).sum(-1) == 3).all()
    ranks = groups(nm_rank(torch.randn(5, 12, 3, 3), 4), 4)
    assert (ranks.sort(-1).values == torch.arange(4)).all()  # a permutation in every group


def test_groups_run_along_input_channels():
    w = torch.zeros(1, 8, 1, 1)
    w[0, :, 0, 0] = torch.tensor([1.0, 5.0, 2.0, 4.0, 9.0, 0.0, 0.0, 3.0])
    assert nm_mask(w, 2, 4)[0, :, 0, 0].tolist() == [False, True, False, True, True, False, False, True]


def test_indivisible_layer_is_named_or_left_dense():
    model = nn.Sequential(nn.Conv2d(8, 6, 3), nn.Conv2d(6, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match="'1'.*6 input channels"):
        apply_nm(model, 2, 4, layers=["1"])
    with pytest.raises(ValueError, match="conv7: 6 input channels"):
        nm_mask(model[1].weight, 2, 4, name="conv7")
    selected, dense = select_nm_layers(model, 4)
    assert selected == ["0", "2"] and "not a multiple" in dense["1"]
    with pytest.raises(ValueError, match="n: expected"):
        nm_mask(model[0].weight, 5, 4)


def test_image_layers_protected_by_default():
    model = tiny_edsr()
    names = apply_nm(model, 2, 4)
    assert "head" not in names and "tail" not in names  # 2 -> 8 and 8 -> 2: the image-side convs
    assert set(names) == {"blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2", "body_end"}
    assert not hasattr(model.head, "parametrizations")
    with pytest.raises(ValueError, match="already has a parametrization"):
        apply_nm(model, 1, 4)


def test_apply_remove_keep_the_pattern_through_an_optimizer_step():
    model = tiny_dncnn()
    names = apply_nm(model, 2, 4)
    assert names == ["convs.1", "convs.2", "convs.3"]
    params_before = {id(p) for p in model.parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x = torch.randn(2, 2, 12, 12)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for name in names:
        conv = model.get_submodule(name)
        assert (groups(conv.weight != 0, 4).sum(-1) == 2).all()
        assert torch.equal(conv.weight != 0, conv.parametrizations.weight[0].mask)
    out = model(x)
    assert remove_nm(model) == names
    assert {id(p) for p in model.parameters()} == params_before  # same parameters: the optimizer still holds them
    for name in names:
        w = model.get_submodule(name).weight
        assert isinstance(w, nn.Parameter) and (groups(w != 0, 4).sum(-1) == 2).all()
    torch.testing.assert_close(model(x), out)


def test_ste_gradients_match_a_hand_computed_case():
    conv = nn.Conv2d(4, 1, 1, bias=False)
    w = torch.tensor([4.0, -3.0, 2.0, 1.0])  # ranks 0, 1, 2, 3
    with torch.no_grad():
        conv.weight.copy_(w.view(1, 4, 1, 1))
    search = SLSSearch(nn.Sequential(conv), m=4, budget=0.5, layers=["0"])
    gate = search.gates["0"]
    s = [2.0, 0.5, -1.0]
    with torch.no_grad():
        gate.scores.copy_(torch.tensor(s))
    q = [1 / (1 + math.exp(-v)) for v in s]
    P = [1.0, q[0], q[0] * q[1], q[0] * q[1] * q[2]]  # 1, .881, .549, .149: hard N = 3
    assert gate.hard_n() == 3
    c = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w_eff = conv.weight.view(4)
    torch.testing.assert_close(w_eff.detach(), torch.tensor([4.0, -3.0, 2.0, 0.0]))  # forward: hard mask
    (w_eff * c).sum().backward()
    # weights: G * hard mask; levels: g_k = <G, D_k * W> = c_k w_k (entry k has rank k here)
    torch.testing.assert_close(conv.parametrizations.weight.original.grad.view(4), torch.tensor([1.0, 2.0, 3.0, 0.0]))
    g = [1 * 4.0, 2 * -3.0, 3 * 2.0, 4 * 1.0]
    expected = [(1 - q[j]) * sum(P[k] * g[k] for k in range(j + 1, 4)) for j in range(3)]
    torch.testing.assert_close(gate.scores.grad, torch.tensor(expected))


def test_search_mode_gives_nonzero_gradients_to_scores_and_kept_weights():
    model = tiny_dncnn()
    search = SLSSearch(model, m=4, budget=0.5, input_shape=(1, 2, 16, 16))
    assert set(search.gates) == {"convs.1", "convs.2", "convs.3"}
    for gate in search.gates.values():
        with torch.no_grad():
            gate.scores.copy_(torch.tensor([3.0, -3.0, -3.0]))  # hard N = 2: levels 3 and 4 pruned
    x = torch.randn(2, 2, 16, 16)
    loss = (model(x) - x.roll(1, -1)).square().mean() + search.regularizer()
    loss.backward()
    for name, gate in search.gates.items():
        assert gate.hard_n() == 2
        # every score moves, the pruned levels' ones too: that is what lets a level come back
        assert gate.scores.grad is not None and (gate.scores.grad != 0).all(), name
        orig = search.modules[name].parametrizations.weight.original
        kept = gate.rank < 2
        assert (orig.grad[kept] != 0).any() and (orig.grad[~kept] == 0).all()


@pytest.mark.parametrize("make,budget", [(tiny_dncnn, 0.5), (tiny_edsr, 0.25)])
def test_search_stops_at_its_budget_then_fine_tunes_with_fixed_masks(make, budget):
    model = make()
    search = SLSSearch(model, m=4, budget=budget, input_shape=(1, 2, 16, 16), lam=0.1, anneal_every=10)
    assert search.mac_ratio() == 1.0 and not search.frozen  # starts dense
    scores = {id(p) for p in search.score_parameters()}
    opt = torch.optim.Adam(
        [
            {"params": [p for p in model.parameters() if id(p) not in scores], "lr": 1e-3},
            {"params": search.score_parameters(), "lr": 0.1, "weight_decay": 0.0},
        ]
    )
    torch.manual_seed(1)
    x = torch.randn(4, 2, 16, 16)
    target = x.flip(-1)
    step = 0
    for step in range(200):  # noqa: B007
        loss = (model(x) - target).square().mean() + search.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if search.step_schedule(step):
            break
    assert search.frozen, f"not frozen after {step + 1} steps, ratio {search.mac_ratio():.3f}"
    assert search.mac_ratio() <= budget + 1e-9
    assert float(search.expected_mac_ratio()) <= budget + 1e-6  # frozen: expected = deployed
    chosen = search.chosen_n()
    assert all(1 <= n <= 4 for n in chosen.values())
    assert float(search.regularizer()) == 0.0
    # frozen: fine-tuning keeps N and masks fixed
    before = {name: (search.modules[name].weight != 0) for name in chosen}
    for _ in range(2):
        opt.zero_grad()
        (model(x) - target).square().mean().backward()
        opt.step()
        assert search.step_schedule(step) and search.chosen_n() == chosen
    for name, n in chosen.items():
        w = search.modules[name].weight
        assert torch.equal(w != 0, before[name]) and (groups(w != 0, 4).sum(-1) == n).all()
    out = model(x)
    assert search.finalize() == chosen
    torch.testing.assert_close(model(x), out)
    for name, n in chosen.items():
        p = search.modules[name].parametrizations.weight[0]
        assert isinstance(p, NMMask) and (p.n, p.m) == (n, 4)
    rows = {r.layer: r for r in nm_report(model, (1, 2, 16, 16)).rows}
    assert all(rows[name].pattern == f"{n}:4" for name, n in chosen.items())


def test_budget_below_one_over_m_refused():
    with pytest.raises(ValueError, match="budget"):
        SLSSearch(tiny_dncnn(), m=4, budget=0.2)


def test_finalize_before_budget_warns_and_keeps_forward():
    model = tiny_dncnn()
    search = SLSSearch(model, m=4, budget=0.25)
    x = torch.randn(1, 2, 8, 8)
    out = model(x)
    with pytest.warns(UserWarning, match="above the budget"):
        assert search.finalize() == {"convs.1": 4, "convs.2": 4, "convs.3": 4}
    torch.testing.assert_close(model(x), out)


def test_report_macs_exact_for_hand_computed_convs():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 3, stride=2, padding=1))
    apply_nm(model, 2, 4, layers=["0"])
    report = nm_report(model, (2, 8, 10, 12))
    r0, r2 = report.rows
    assert (r0.layer, r0.pattern, r0.dense_macs, r0.effective_macs) == ("0", "2:4", 2 * 10 * 12 * 16 * 8 * 9, 138240)
    assert r0.accelerated and r0.hardware_macs == 138240
    assert (r2.layer, r2.pattern, r2.dense_macs, r2.effective_macs) == ("2", "dense", 2 * 5 * 6 * 4 * 16 * 9, 34560)
    assert report.dense_macs == 276480 + 34560 and report.effective_macs == 138240 + 34560
    text = str(report)
    assert "Only 2:4 has a hardware speed-up" in text and "2:4" in text

    remove_nm(model)
    nm_report_plain = nm_report(model, (2, 8, 10, 12))
    assert nm_report_plain.rows[0].pattern == "dense"
    assert nm_report(model, (2, 8, 10, 12), m=4).rows[0].pattern == "2:4"  # read back from the zeros

    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    apply_nm(model, 3, 4, layers=["0"])
    row = nm_report(model, (1, 8, 4, 4)).rows[0]
    assert (row.effective_macs, row.hardware_macs, row.accelerated) == (
        16 * 16 * 8 * 9 * 3 // 4,
        16 * 16 * 8 * 9,
        False,
    )
    assert "no hardware speed-up" in row.note


def test_report_counts_a_shared_layer_per_call_and_runs_on_meta():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(conv, conv)  # named_modules lists it once; it runs twice
    report = nm_report(model, (1, 8, 5, 5))
    assert [r.layer for r in report.rows] == ["0"] and report.rows[0].dense_macs == 2 * 25 * 8 * 8 * 9
    assert conv.weight.device.type == "cpu"  # the meta copy left the model alone


def test_two_four_compatibility():
    assert is_2to4_compatible(2, 4) and is_2to4_compatible(1, 4) and is_2to4_compatible(1, 2)
    assert is_2to4_compatible(2, 8) and not is_2to4_compatible(3, 4) and not is_2to4_compatible(4, 8)
    assert not is_2to4_compatible(3, 8) and not is_2to4_compatible(4, 4)


def test_gate_starts_dense_and_n_in_range():
    gate = SLSGate(torch.randn(8, 8, 3, 3), m=8)
    assert gate.hard_n() == 8 and abs(float(gate.keep_probs()[-1].detach()) - 0.9) < 1e-5
    with torch.no_grad():
        gate.scores.fill_(-10.0)
    assert gate.hard_n() == 1
