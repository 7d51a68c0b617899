"""crmt_plugin.selection (rho chosen on validation data) and the benchmark's training budget and encoder families."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from crmt_plugin import CRMTError, CRMTWrapper, crmt_loss
from crmt_plugin.benchmark import models as bench_models
from crmt_plugin.benchmark import recipes
from crmt_plugin.selection import select_rho, validation_scores


class TwoTower(nn.Module):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        self.fusion = nn.Linear(16, k)

    def forward(self, a, b):
        return self.fusion(torch.cat([self.a(a), self.b(b)], 1))


def toy_data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    a = torch.randn(n, 4, generator=g) + nn.functional.one_hot(y, 4).float() * 2
    b = torch.randn(n, 3, generator=g) + nn.functional.one_hot(y, 3).float() * 0.5
    return [({"a": a[i:i + 32], "b": b[i:i + 32]}, y[i:i + 32]) for i in range(0, n, 32)]


def fit_factory(loader, calls):
    def fit(rho: float):
        calls.append(rho)
        torch.manual_seed(0)
        crmt = CRMTWrapper(TwoTower(), head="fusion", modalities={"a": 8, "b": 8})
        opt = torch.optim.Adam(crmt.parameters(), lr=1e-2)
        for _ in range(15):
            for x, y in loader:
                loss = crmt_loss(crmt(x), y, rho=rho)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return crmt.export().eval()
    return fit


def test_select_rho_trains_every_candidate_and_keeps_the_rule():
    loader = toy_data()
    calls = []
    chosen = select_rho(fit_factory(loader, calls), loader, radius=0.5, candidates=(0.0, 0.5), steps=3,
                        missing_fill={"a": torch.zeros(4), "b": torch.zeros(3)})
    assert calls == [0.0, 0.5]
    assert [row["rho"] for row in chosen.table] == [0.0, 0.5]
    reference = chosen.table[0]["clean"]
    assert chosen.reference_clean == reference
    eligible = [r for r in chosen.table if r["clean"] >= reference - 0.005 - 1e-12]
    assert chosen.rho == max(eligible, key=lambda r: (r["mean_robust"], -r["rho"]))["rho"]
    for row in chosen.table:
        assert {"clean", "joint", "attack:a", "attack:b", "missing:a", "missing:b", "mean_robust"} <= set(row)
        parts = [row["joint"], row["attack:a"], row["attack:b"], row["missing:a"], row["missing:b"]]
        assert row["mean_robust"] == pytest.approx(sum(parts) / 5)
        assert row["joint"] <= row["clean"] and row["attack:a"] <= row["clean"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=5),
       st.floats(0, 0.05))
def test_select_rho_rule_property(scores, tolerance):
    """The chosen candidate is eligible (clean within the tolerance of rho = 0) and no eligible one is more robust."""
    rhos = [float(i) / 10 for i in range(len(scores))]  # rho = 0 first
    table = {r: {"clean": c, "mean_robust": m} for r, (c, m) in zip(rhos, scores)}
    chosen = select_rho(lambda r: r, [], radius=1.0, candidates=rhos, clean_tolerance=tolerance, score=table.get)
    reference = table[0.0]["clean"]
    assert table[chosen.rho]["clean"] >= reference - tolerance - 1e-12
    for r, s in table.items():
        if s["clean"] >= reference - tolerance - 1e-12:
            assert s["mean_robust"] <= table[chosen.rho]["mean_robust"]


def test_select_rho_falls_back_to_the_baseline_when_the_term_costs_accuracy():
    table = {0.0: {"clean": 0.9, "mean_robust": 0.3}, 0.5: {"clean": 0.85, "mean_robust": 0.9}}
    assert select_rho(lambda r: r, [], radius=1.0, candidates=(0.0, 0.5), score=table.get).rho == 0.0


@settings(max_examples=60, deadline=None)
@given(st.tuples(st.floats(0, 1), st.floats(0, 1)),
       st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=4), st.floats(0, 0.05))
def test_select_rho_with_a_baseline_rule_property(base, scores, tolerance):
    """With a baseline: the reference is the baseline's clean accuracy, the baseline is always eligible, the
    chosen one is eligible and no eligible one is more robust; ties go to the baseline."""
    rhos = [float(i) / 10 for i in range(len(scores))]
    table = {"base": {"clean": base[0], "mean_robust": base[1]},
             **{r: {"clean": c, "mean_robust": m} for r, (c, m) in zip(rhos, scores)}}
    chosen = select_rho(lambda r: r, [], radius=1.0, candidates=rhos, clean_tolerance=tolerance, score=table.get,
                        baseline=lambda: "base")
    assert chosen.reference_clean == base[0] and chosen.table[0]["rho"] is None and chosen.table[0]["eligible"]
    picked = table["base" if chosen.rho is None else chosen.rho]
    assert chosen.model == ("base" if chosen.rho is None else chosen.rho)
    assert chosen.rho is None or picked["clean"] >= base[0] - tolerance - 1e-12
    for r in rhos:
        if table[r]["clean"] >= base[0] - tolerance - 1e-12:
            assert table[r]["mean_robust"] <= picked["mean_robust"]
    assert base[1] <= picked["mean_robust"]
    if chosen.rho is not None:
        assert picked["mean_robust"] > base[1]  # strictly: a tie keeps the baseline


def test_select_rho_baseline_is_trained_first_and_once():
    calls = []
    scores = {"base": {"clean": 0.9, "mean_robust": 0.3}, 0.0: {"clean": 0.897, "mean_robust": 0.6},
              0.5: {"clean": 0.85, "mean_robust": 0.9}}

    def fit(rho):
        calls.append(rho)
        return rho

    chosen = select_rho(fit, [], radius=1.0, candidates=(0.0, 0.5), score=scores.get,
                        baseline=lambda: calls.append("base") or "base")
    assert calls == ["base", 0.0, 0.5]
    assert chosen.rho == 0.0 and not chosen.baseline_chosen  # 0.5 is 5 points below the baseline: not eligible


@pytest.mark.parametrize("bad", [(), (0.0, 0.0), (-1.0,), (math.nan,)])
def test_select_rho_rejects_bad_candidates(bad):
    with pytest.raises(CRMTError, match="candidates"):
        select_rho(lambda r: r, [], radius=1.0, candidates=bad, score=lambda m: {"clean": 1, "mean_robust": 1})


def test_validation_scores_restores_modes_and_rejects_bad_radius():
    loader = toy_data()
    model = TwoTower()
    model.a[0].eval()  # a frozen submodule stays frozen
    validation_scores(model, loader, radius=0.2, steps=2)
    assert model.training and not model.a[0].training
    with pytest.raises(CRMTError, match="radius"):
        validation_scores(model, loader, radius=0.0)


def test_validation_scores_zero_radius_limit_equals_clean():
    """At a tiny radius nothing flips: every attacked accuracy equals the clean one."""
    loader = toy_data()
    s = validation_scores(TwoTower(), loader, radius=1e-7, steps=2)
    assert s["joint"] == s["clean"] == s["attack:a"] == s["attack:b"]


# ---- the training budget


@given(st.integers(1, 20000), st.integers(0, 5000), st.integers(1, 50))
def test_training_schedule_rule(n, min_steps, epochs):
    cfg = recipes.TrainConfig(min_steps=min_steps, epochs=epochs)
    s = recipes.training_schedule(n, cfg)
    assert 8 <= s.batch_size <= 64 or (n < 8 and s.batch_size == 8)
    assert s.epochs >= min(epochs, cfg.max_epochs)
    if s.epochs < cfg.max_epochs:
        assert s.steps >= min_steps
        assert (s.epochs - 1) * s.steps_per_epoch < max(min_steps, 1) or s.epochs == epochs


def test_small_data_trains_enough_steps():
    s = recipes.training_schedule(32, recipes.TrainConfig())
    assert s.batch_size == 8 and s.steps >= recipes.DEFAULT_MIN_STEPS


def test_best_on_validation_breaks_ties_by_loss():
    net, best = nn.Linear(2, 2), recipes.BestOnValidation()
    best.update(net, 1.0, 0.5)
    with torch.no_grad():
        net.weight.fill_(3.0)
    assert best.update(net, 1.0, 0.1)  # same accuracy, lower loss: the later epoch
    assert not best.update(net, 1.0, 0.2)
    fresh = nn.Linear(2, 2)
    best.restore(fresh)
    assert torch.equal(fresh.weight, torch.full((2, 2), 3.0))


# ---- encoder families


@pytest.mark.parametrize("shape", [(6,), (3, 16), (1, 12, 12)])
def test_ln_family_has_no_batchnorm(shape):
    mean, std = torch.zeros(*shape[:1], *([1] * (len(shape) - 1))), torch.ones(*shape[:1], *([1] * (len(shape) - 1)))
    enc = bench_models.encoder_for(shape, mean, std, 500, 5, family="ln")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    assert any(isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for m in enc.modules())
    assert enc(torch.randn(4, *shape)).shape == (4, enc.out_features)


def test_frozen_encoder_never_trains():
    body = bench_models.encoder_for((6,), torch.zeros(6), torch.ones(6), 500, 5, family="bn")
    enc = bench_models.FrozenEncoder(body, body.out_features)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    enc.train()
    assert not body.training and enc.projection.training
    opt = torch.optim.Adam(enc.parameters(), lr=0.1)
    enc(torch.randn(16, 6)).sum().backward()
    opt.step()
    for k, v in body.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BatchNorm statistics alike
    assert all(p.grad is None for p in body.parameters())


def test_unknown_family_is_a_clear_error():
    with pytest.raises(CRMTError, match="encoder family"):
        bench_models.encoder_for((6,), torch.zeros(6), torch.ones(6), 500, 5, family="xx")


def test_pretrained_bodies_are_cached_and_leave_the_global_rng_alone(tmp_path):
    import numpy as np

    from crmt_plugin.benchmark.data import load_npz

    g = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    np.savez(tmp_path / "t.npz", x_a=(g.normal(size=(60, 4)) + y[:, None]).astype(np.float32),
             x_b=(g.normal(size=(60, 3)) + y[:, None]).astype(np.float32), y=y)
    data = load_npz(str(tmp_path / "t.npz"))
    cfg = recipes.TrainConfig(epochs=2, min_steps=0)
    torch.manual_seed(5)
    first = recipes.pretrained_bodies(data, cfg, seed=1)
    after_first = torch.rand(1)
    torch.manual_seed(5)
    again = recipes.pretrained_bodies(data, cfg, seed=1)  # from the cache
    assert torch.equal(torch.rand(1), after_first)
    for name in first:
        for (k, v), (k2, v2) in zip(first[name].state_dict().items(), again[name].state_dict().items()):
            assert k == k2 and torch.equal(v, v2), (name, k)
    other = recipes.pretrained_bodies(data, cfg, seed=2)
    assert not torch.equal(next(iter(other["a"].parameters())), next(iter(first["a"].parameters())))
