"""crmt_plugin.attacks.worst: WorstCase is the per-sample worst case; the presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crmt_plugin.attacks import FGM, PGD, Attack, Square, WorstCase, fast_attack, strong_attack
from crmt_plugin.errors import CRMTError

from test_attacks import TwoModalMLP, batch, joint_l2


class Shift(Attack):
    """A deterministic planted attack: x -> x + c * v for a fixed direction v (inside a large budget)."""

    name = "Shift"

    def __init__(self, eps=100.0, *, c=1.0, seed=0, **kw):
        super().__init__(eps, **kw)
        self.c, self.seed = c, seed
        self._config.update(c=c, seed=seed)

    def run(self, batch):
        g = torch.Generator().manual_seed(self.seed)
        return {n: self.c * torch.randn(batch.xs[n].shape[1:], generator=g).expand_as(batch.xs[n])
                for n in batch.names}


def margins(model, x, y):
    with torch.no_grad():
        z = model(x)
    z_y = z.gather(1, y[:, None])[:, 0]
    return z_y - z.scatter(1, y[:, None], float("-inf")).amax(1), z.argmax(1) != y


def test_worst_case_is_the_per_sample_worst():
    model = TwoModalMLP(hidden=16, seed=2)
    x = batch(200, seed=4)
    with torch.no_grad():
        y = model(x).argmax(1)
    members = [Shift(c=0.8, seed=1), Shift(c=1.2, seed=2), Shift(c=1.0, seed=3), Shift(c=1.5, seed=4)]
    outputs = [m(model, x, y) for m in members]
    stats = [margins(model, o, y) for o in outputs]
    got = WorstCase(members)(model, x, y)
    for i in range(200):
        first = next((k for k, (_, w) in enumerate(stats) if w[i]), None)
        k = first if first is not None else min(range(len(members)), key=lambda j: stats[j][0][i].item())
        for n in x:
            assert torch.equal(got[n][i], outputs[k][n][i]), (i, k)
    wrong = margins(model, got, y)[1]
    assert wrong.double().mean() >= max(w.double().mean() for _, w in stats)
    assert any(not w.all() for _, w in stats) and wrong.any()  # planted case is informative


def test_worst_case_untouched_modalities_budgets_and_replace():
    model = TwoModalMLP(seed=1)
    x = batch(64, seed=2)
    y = torch.randint(0, 4, (64,))
    attack = WorstCase([FGM(0.5, modalities="audio"), PGD(0.5, modalities="audio", steps=3),
                        Square(0.5, queries=20, modalities="audio")], name="mine")
    attack = attack.replace(generator=torch.Generator().manual_seed(0))
    adv = attack(model, x, y)
    assert adv["image"] is x["image"] and attack.label == "mine-l2"
    assert (joint_l2(adv, x, ["audio"]) <= 0.5 * (1 + 1e-6)).all()
    wider = attack.replace(eps=1.0, modalities=("audio", "image"))
    assert all(a.eps == 1.0 and a.modalities == ("audio", "image") for a in wider.attacks)
    adv = wider(model, x, y)
    assert (joint_l2(adv, x, ["audio", "image"]) <= 1.0 * (1 + 1e-6)).all()
    per_sample = attack.replace(eps=torch.linspace(0, 1, 64))
    adv = per_sample(model, x, y)
    assert (joint_l2(adv, x, ["audio"]) <= torch.linspace(0, 1, 64).double() * (1 + 1e-6) + 1e-12).all()
    with pytest.raises(CRMTError, match="unknown settings"):
        attack.replace(steps=3)
    with pytest.raises(CRMTError, match="at least one"):
        WorstCase([])
    with pytest.raises(CRMTError, match="class labels"):
        attack(model, x, model(x).detach())


def test_presets():
    full = strong_attack(1.0, bounds={"image": (0.0, 1.0)}, generator=torch.Generator().manual_seed(0), preset="full")
    assert isinstance(full, WorstCase) and full.label == "strong-l2"
    assert [a.schedule for a in full.attacks] == ["apgd"] * 4 and all(a.steps >= 50 for a in full.attacks)
    assert full.cost == {"forward_backward": 459, "forward": 5}  # the clean forward ranks the targets
    strong = strong_attack(1.0, bounds={"image": (0.0, 1.0)}, generator=torch.Generator().manual_seed(0))
    runs = [getattr(a, "attack", a) for a in strong.attacks]
    assert [a.schedule for a in runs] == ["apgd"] * 4 and [a.steps for a in runs] == [20, 20, 50, 50]
    assert strong.cost == {"forward_backward": 84 + 612, "forward": 5}
    fast = fast_attack(1.0)
    assert isinstance(fast, PGD) and fast.steps == 10 and fast.label == "PGD-l2"
    assert "weaker" in fast_attack.__doc__.lower()
    model = TwoModalMLP(hidden=32, seed=3)
    x = batch(64, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    adv = strong.replace(eps=0.4)(model, x, y)
    assert (joint_l2(adv, x, ["audio", "image"]) <= 0.4 * (1 + 1e-6)).all()
    assert adv["image"].min() >= 0 and adv["image"].max() <= 1
    fast_adv = fast_attack(0.4, bounds={"image": (0.0, 1.0)}, generator=torch.Generator().manual_seed(0))(model, x, y)
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).sum() >= (model(fast_adv).argmax(1) != y).sum()


def test_mode_restored_by_worst_case():
    model = TwoModalMLP(norm=True).train()
    model.image[2].eval()
    flags = [m.training for m in model.modules()]
    WorstCase([PGD(0.3, steps=2), Square(0.3, queries=3)])(model, batch(8), torch.randint(0, 4, (8,)))
    assert [m.training for m in model.modules()] == flags
    assert isinstance(model, nn.Module)
