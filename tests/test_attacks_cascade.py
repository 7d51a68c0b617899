"""The cascade (attack only what still stands): the same per-sample outcome as attacking every sample
with every run, sub-batches that see the whole batch's random numbers, Square on the survivors only,
close calls, the presets of strong_attack."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crmt_plugin.attacks import PGD, Square, WorstCase, strong_attack
from crmt_plugin.attacks.base import AttackBatch
from crmt_plugin.attacks.worst import PRESETS, CloseCalls
from crmt_plugin.errors import CRMTError

from test_attacks import TwoModalMLP, batch, joint_l2

FEW = settings(max_examples=6, deadline=None, derandomize=True)


def model64(seed: int, classes: int = 5):
    return TwoModalMLP(num_classes=classes, hidden=12, seed=seed).double().eval()


def fooled(model, adv, y):
    with torch.no_grad():
        return model(adv).argmax(1) != y


def members(eps: float, seed: int, cascade: bool):
    """Runs of every kind: untargeted with restarts, targeted, constant schedule, close calls."""
    def g(k):
        return torch.Generator().manual_seed(seed + k)

    return [
        PGD(eps, loss="ce", schedule="apgd", steps=8, generator=g(0), cascade=cascade),
        PGD(eps, loss="dlr", schedule="apgd", steps=6, restarts=2, generator=g(1), cascade=cascade),
        PGD(eps, steps=5, restarts=2, generator=g(2), cascade=cascade),
        PGD(eps, loss="cw", schedule="apgd", steps=6, targets=2, generator=g(3), cascade=cascade),
        CloseCalls(PGD(eps, loss="dlr", schedule="apgd", steps=6, targets=3, generator=g(4), cascade=cascade),
                   within=0.3),
    ]


@FEW
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.3, 0.8, 1.5]))
def test_cascade_gives_the_robust_mask_of_attacking_everything(seed, eps):
    model = model64(seed % 5)
    x = {n: t.double() for n, t in batch(40, seed).items()}
    y = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(seed))
    cascaded = WorstCase(members(eps, seed, True), cascade=True)(model, x, y)
    everything = WorstCase(members(eps, seed, False), cascade=False)(model, x, y)
    a, b = fooled(model, cascaded, y), fooled(model, everything, y)
    assert torch.equal(a, b)
    assert 0 < int(a.sum()) < 40 or eps != 0.8  # informative at the middle radius
    for adv in (cascaded, everything):
        assert float(joint_l2(adv, x, ["audio", "image"]).max()) <= eps * (1 + 1e-9)


@FEW
@given(seed=st.integers(0, 10_000), targets=st.sampled_from([0, 2]), schedule=st.sampled_from(["apgd", "constant"]))
def test_pgd_cascade_same_fooled_samples(seed, targets, schedule):
    model = model64(seed % 5)
    x = {n: t.double() for n, t in batch(30, seed).items()}
    y = torch.randint(0, 5, (30,), generator=torch.Generator().manual_seed(seed + 1))

    def run(cascade):
        attack = PGD(0.8, loss="dlr" if targets else "ce", schedule=schedule, steps=7, restarts=2, targets=targets,
                     generator=torch.Generator().manual_seed(seed), cascade=cascade)
        return fooled(model, attack(model, x, y), y)

    assert torch.equal(run(True), run(False))


def test_cascade_attacks_only_what_stands():
    """Every run sees fewer samples once some are fooled: the model is called on smaller batches."""
    model = model64(1)
    x = {n: t.double() for n, t in batch(64, 3).items()}
    y = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(0))
    sizes = []

    class Count(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, inputs):
            sizes.append(inputs["audio"].shape[0])
            return self.inner(inputs)

    counted = Count().eval()
    adv = strong_attack(0.8, generator=torch.Generator().manual_seed(0))(counted, x, y)
    wrong = fooled(model, adv, y)
    assert 0 < int(wrong.sum()) < 64
    robust = 64 - int(wrong.sum())
    assert sum(sizes) < 0.6 * 64 * strong_attack(0.8).cost["forward_backward"]
    assert min(sizes) >= 1 and sizes[0] == 64 and min(sizes) <= robust


def test_sub_batches_see_the_whole_batch_noise():
    model = model64(0)
    x = {n: t.double() for n, t in batch(10, 1).items()}
    y = torch.zeros(10, dtype=torch.long)
    attack = PGD(1.0)
    whole = AttackBatch(attack, model, x, y)
    rows = torch.tensor([7, 2, 5])
    sub = whole.subset(rows).subset(torch.tensor([0, 2]))  # rows 7 and 5 of the whole batch
    assert sub.rows.tolist() == [7, 5] and sub.batch == 2
    full = whole.random_start(torch.Generator().manual_seed(3))
    part = sub.random_start(torch.Generator().manual_seed(3))
    for n in x:
        assert torch.equal(part[n], full[n][[7, 5]])
        assert torch.equal(sub.xs[n], x[n][[7, 5]])
    clean = whole.clean_logits()  # computed once for the whole batch, then shared by its sub-batches
    assert torch.equal(sub.clean_logits(), clean[[7, 5]]) and sub.clean_logits().shape == (2, 5)


def square_on_whole_batch(attack: Square, model, x, y):
    """Square as it was before the cascade: every query evaluates the whole batch."""
    b = AttackBatch(attack, model, x, y)
    best = attack._init(b)
    wrong, margin = b.wrong_and_margin(b.logits(best))
    for i in range(attack.queries):
        if bool(wrong.all()):
            break
        cand = attack._propose(b, best, i)
        new_wrong, new_margin = b.wrong_and_margin(b.logits(cand))
        accept = ~wrong & (new_wrong | (new_margin > margin))
        best = {n: torch.where(accept.view(-1, *[1] * (best[n].dim() - 1)), cand[n], best[n]) for n in best}
        margin = torch.where(accept, new_margin, margin)
        wrong = wrong | (accept & new_wrong)
    return b.finish(best)


@FEW
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["l2", "linf"]), per_modality=st.booleans())
def test_square_on_survivors_equals_square_on_everything(seed, norm, per_modality):
    model = model64(seed % 5)
    x = {n: t.double() for n, t in batch(24, seed).items()}
    y = torch.randint(0, 5, (24,), generator=torch.Generator().manual_seed(seed))
    eps = ({"audio": 0.6, "image": 0.4} if per_modality else 0.8) if norm == "l2" else 0.2
    bounds = {"image": (0.0, 1.0)}

    def make():
        return Square(eps, norm=norm, queries=60, bounds=bounds, generator=torch.Generator().manual_seed(seed))

    survivors = make()(model, x, y)
    everything = square_on_whole_batch(make(), model, x, y)
    for n in x:
        assert torch.equal(survivors[n], everything[n])


def test_square_queries_only_the_standing():
    model = model64(2)
    x = {n: t.double() for n, t in batch(32, 5).items()}
    y = torch.randint(0, 5, (32,), generator=torch.Generator().manual_seed(1))
    rows = []
    model.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    adv = Square(1.5, queries=40, generator=torch.Generator().manual_seed(0))(model, x, y)
    wrong = fooled(model, adv, y)
    assert 0 < int(wrong.sum()) < 32
    assert rows[0] == 32 and rows[-2] == 32 - int(wrong.sum())  # the last call is `fooled` above
    assert sum(rows[:-1]) < 32 * 41


def test_clean_errors_are_done_after_the_clean_forward():
    model = model64(3)
    x = {n: t.double() for n, t in batch(20, 2).items()}
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[:5] = (pred[:5] + 1) % 5  # five samples the model gets wrong
    adv = strong_attack(0.5, generator=torch.Generator().manual_seed(0))(model, x, y)
    for n in x:
        assert torch.equal(adv[n][:5], x[n][:5])


def test_close_calls_see_only_close_samples():
    model = model64(4)
    x = {n: t.double() for n, t in batch(48, 7).items()}
    y = torch.randint(0, 5, (48,), generator=torch.Generator().manual_seed(2))
    seen = []

    class Spy(PGD):
        def run(self, b):
            seen.append(b.rows.clone())
            return super().run(b)

    first = PGD(0.3, schedule="apgd", steps=5, generator=torch.Generator().manual_seed(0), cascade=True)
    spy = Spy(0.3, schedule="apgd", steps=5, generator=torch.Generator().manual_seed(1), cascade=True)
    attack = WorstCase([first, CloseCalls(spy, within=0.2)])
    attack(model, x, y)
    after = first(model, x, y)
    with torch.no_grad():
        z = model(after)
    z_y = z.gather(1, y[:, None])[:, 0]
    top = z.topk(3, dim=1).values
    relative = (z_y - z.scatter(1, y[:, None], float("-inf")).amax(1)) / (top[:, 0] - top[:, 2])
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    expected = ((relative < 0.2) & (relative >= 0) & clean_ok).nonzero().squeeze(1)
    assert len(seen) == 1 and seen[0].tolist() == expected.tolist() and 0 < len(expected) < 48


def test_presets_and_their_cost():
    assert set(PRESETS) == {"standard", "full", "quick"}
    full = strong_attack(1.0, preset="full")
    assert [a.steps for a in full.attacks] == [50] * 4 and full.attacks[1].restarts == 2
    assert full.cost["forward_backward"] == 459
    assert strong_attack(1.0, preset="quick").cost["forward_backward"] == 42
    assert all(a.cascade for a in strong_attack(1.0).attacks if isinstance(a, PGD))
    # explicit settings override the preset's first stage; targets=0 drops the targeted runs
    mine = strong_attack(1.0, preset="full", steps=10, restarts=1, targets=0)
    assert [a.label for a in mine.attacks] == ["APGD-l2", "APGD-dlr-l2"] and mine.attacks[0].steps == 10
    # settings without a preset keep their meaning from before the presets: the members of "full"
    old_style = strong_attack(1.0, steps=20, restarts=1, targets=1)
    assert [a.label for a in old_style.attacks] == ["APGD-l2", "APGD-dlr-l2", "APGD-T-dlr-l2", "APGD-T-cw-l2"]
    assert [a.steps for a in old_style.attacks] == [20] * 4
    with pytest.raises(CRMTError, match="unknown preset"):
        strong_attack(1.0, preset="fastest")
    with pytest.raises(CRMTError, match="within"):
        CloseCalls(PGD(1.0), within=0)
    replaced = strong_attack(1.0).replace(eps=0.5)
    assert all(a.eps == 0.5 for a in replaced.attacks)
    assert isinstance(replaced.attacks[-1], CloseCalls) and replaced.attacks[-1].attack.eps == 0.5
