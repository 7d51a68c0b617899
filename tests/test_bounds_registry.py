"""The rule registry: one place per layer type, used by the module walk, the fx walk and the unsupported-layer
check alike; user rules for user layers; every unsupported layer refused at once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crmt_plugin import lipschitz_layers as ll
from crmt_plugin.bounds import (
    LayerSite, LipschitzPenalty, Residual, declare_lipschitz, lipschitz_rule, lipschitz_upper_bound,
    remove_lipschitz_rule, unsupported_layers,
)
from crmt_plugin.bounds.plan import Context, Plan
from crmt_plugin.bounds.registry import forward_owner, registered_types, rule_for
from crmt_plugin.bounds.rounding import up
from crmt_plugin.bounds.traced import Tracer
from crmt_plugin.errors import CRMTError
from test_bounds_reference import empirical_lipschitz


class PairSort(nn.Module):
    """Sorts each pair of features (GroupSort with groups of 2): a 1-Lipschitz map that torch.fx cannot
    bound (torch.minimum / torch.maximum), times a constant gain."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x):
        a, b = x[:, 0::2], x[:, 1::2]
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1) * self.gain


@pytest.fixture
def pair_sort_rule():
    @lipschitz_rule(PairSort)
    def pair_sort(layer: PairSort, site: LayerSite) -> float:
        assert site.out_shape == site.in_shape          # the rule sees the layer's shapes
        return abs(layer.gain)                          # |gain| * (sorting pairs is 1-Lipschitz)

    yield pair_sort
    remove_lipschitz_rule(PairSort)


def test_a_user_rule_gives_a_sound_bound_and_without_it_the_layer_is_refused(pair_sort_rule):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), PairSort(gain=-2.5), nn.Tanh()).double()
    bound = lipschitz_upper_bound(net, (6,))
    assert bound == pytest.approx(2.5 * lipschitz_upper_bound(net[0], (6,)), rel=1e-12)
    assert empirical_lipschitz(net, (6,)) <= bound                       # sound against sampled ground truth
    assert unsupported_layers(net) == []

    remove_lipschitz_rule(PairSort)
    assert rule_for(net[1]) is None
    with pytest.raises(CRMTError, match=r"'1' \(PairSort\).*(minimum|maximum).*lipschitz_rule\(PairSort\)"):
        lipschitz_upper_bound(net, (6,))
    assert [row[:2] for row in unsupported_layers(net)] == [("1", "PairSort")]


def test_a_user_rule_is_used_inside_traced_forwards_and_by_subclasses(pair_sort_rule):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.sort = PairSort(gain=0.5)

        def forward(self, x):
            return x + self.sort(self.fc(x))          # traced: PairSort stays one call, bounded by its rule

    class LoudPairSort(PairSort):                     # no forward of its own: the same layer, the same rule
        pass

    torch.manual_seed(0)
    block = Block().double()
    layers = {}
    bound = lipschitz_upper_bound(block, (4,), per_layer=layers)
    assert layers["sort"] == 0.5
    assert bound == pytest.approx(1 + 0.5 * layers["fc"], rel=1e-12)
    assert empirical_lipschitz(block, (4,)) <= bound
    assert Tracer().is_leaf_module(block.sort, "sort")
    assert lipschitz_upper_bound(LoudPairSort(gain=3.0), (4,)) == 3.0


def test_a_rule_returning_a_plan_gives_a_differentiable_penalty():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.tensor(0.0))

        def forward(self, x):
            return torch.nn.functional.softsign(x) * torch.exp(self.g)   # fx: exp(parameter) is not understood

    class GainPlan(Plan):
        def __init__(self, path, layer):
            self.path, self.layer = path, layer

        def bound(self, ctx: Context) -> float:
            return ctx.record(self.path, up(math.exp(float(self.layer.g.detach()))))

        def estimate(self):
            return torch.exp(self.layer.g)

    @lipschitz_rule(Gain)
    def gain_rule(layer, site):
        return GainPlan(site.path, layer)

    try:
        net = nn.Sequential(nn.Linear(3, 3), Gain())
        with torch.no_grad():
            net[1].g.fill_(math.log(2.0))
        assert lipschitz_upper_bound(net, (3,)) == pytest.approx(2 * lipschitz_upper_bound(net[0], (3,)), rel=1e-6)
        value = LipschitzPenalty(net, (3,))()
        value.backward()
        assert net[1].g.grad is not None and net[1].g.grad.item() == pytest.approx(value.item(), rel=1e-6)
    finally:
        remove_lipschitz_rule(Gain)


def test_rule_registration_is_checked():
    with pytest.raises(CRMTError, match=r"already registered: ReLU \(one_lipschitz_rule\).*replace=True"):
        lipschitz_rule(PairSort, nn.ReLU)(lambda layer, site: 1.0)
    assert rule_for(PairSort()) is None                  # nothing registered when one type is taken
    with pytest.raises(CRMTError, match="not an nn.Module subclass"):
        lipschitz_rule(int)
    with pytest.raises(CRMTError, match="at least one"):
        lipschitz_rule()

    for bad, message in [(-1.0, "expected a finite float >= 0"), (float("nan"), "finite"),
                         ("big", "returned str"), (ValueError("boom"), "raised: boom")]:
        def rule(layer, site, bad=bad):
            if isinstance(bad, Exception):
                raise bad
            return bad

        lipschitz_rule(PairSort)(rule)
        try:
            with pytest.raises(CRMTError, match=message):
                lipschitz_upper_bound(PairSort(), (4,))
        finally:
            remove_lipschitz_rule(PairSort)


def test_replace_overrides_a_built_in_rule_and_declarations_win_over_rules():
    original = rule_for(nn.Tanh())
    try:
        lipschitz_rule(nn.Tanh, replace=True)(lambda layer, site: 7.0)
        assert lipschitz_upper_bound(nn.Tanh(), (3,)) == 7.0
    finally:
        lipschitz_rule(*original.types, replace=True)(original.fn)
    assert lipschitz_upper_bound(nn.Tanh(), (3,)) == 1.0
    layer = nn.Tanh()
    declare_lipschitz(layer, 0.5)
    try:
        assert lipschitz_upper_bound(layer, (3,)) == 0.5
    finally:
        declare_lipschitz(layer, None)


# ---------------------------------------------------------------------------------------------
# every unsupported layer at once
# ---------------------------------------------------------------------------------------------

class Square(nn.Module):
    def forward(self, x):
        return x * x


def test_the_refusal_lists_every_unsupported_layer_at_once():
    net = nn.Sequential(
        nn.Linear(4, 4),
        nn.Sequential(nn.ReLU(), nn.LayerNorm(4)),           # unsupported, nested
        Residual(nn.Sequential(nn.Linear(4, 4), PairSort())),  # unsupported inside a Residual (no rule registered)
        nn.Tanh(),
    )
    with pytest.raises(CRMTError) as info:
        lipschitz_upper_bound(net, (4,), name="audio")
    message = str(info.value)
    assert "2 layers" in message
    assert "'audio.1.1' (LayerNorm)" in message and "'audio.2.branch.1' (PairSort)" in message
    assert "declare_lipschitz" in message and "lipschitz_rule" in message
    assert [row[:2] for row in unsupported_layers(net, name="audio")] == [
        ("audio.1.1", "LayerNorm"), ("audio.2.branch.1", "PairSort")]


def test_the_refusal_also_lists_traced_modules_and_stays_one_line():
    net = nn.Sequential(nn.GroupNorm(1, 4), nn.Linear(4, 4), Square(), nn.LayerNorm(4))
    expected = (r"3 layers: \(1\) '0' \(GroupNorm\).*\(2\) '2' \(Square\): the operation `mul = mul\(x, x\)`"
                r".*multiplies two input-dependent.*\(3\) '3' \(LayerNorm\)")
    with pytest.raises(CRMTError, match=expected):
        lipschitz_upper_bound(net, (4,))
    net.train()
    with pytest.raises(CRMTError, match="3 layers"):
        LipschitzPenalty(net, (4,))                       # the penalty runs the same check
    assert net.training                                   # flags restored after the refusal


# ---------------------------------------------------------------------------------------------
# one place: the module walk, the fx walk and the check ask the same rules
# ---------------------------------------------------------------------------------------------

CATALOGUE = [
    (nn.ReLU(), (3,)), (nn.ReLU6(), (3,)), (nn.Tanh(), (3,)), (nn.Softsign(), (3,)), (nn.Tanhshrink(), (3,)),
    (nn.LogSigmoid(), (3,)), (nn.Hardtanh(), (3,)), (nn.Softshrink(), (3,)), (nn.Softplus(), (3,)),
    (nn.LeakyReLU(), (3,)), (nn.ELU(), (3,)), (nn.CELU(), (3,)), (nn.SELU(), (3,)), (nn.Sigmoid(), (3,)),
    (nn.Hardsigmoid(), (3,)), (nn.Hardswish(), (3,)), (nn.GELU(), (3,)), (nn.SiLU(), (3,)), (nn.Mish(), (3,)),
    (nn.Softmax(dim=1), (3,)), (nn.Softmin(dim=1), (3,)), (nn.PReLU(), (3,)), (nn.Linear(3, 2), (3,)),
    (nn.Conv1d(1, 2, 2), (1, 4)), (nn.Conv2d(1, 2, 2), (1, 3, 3)), (nn.Conv3d(1, 1, 2), (1, 3, 3, 3)),
    (nn.ConvTranspose1d(1, 2, 2), (1, 3)), (nn.ConvTranspose2d(1, 1, 2), (1, 2, 2)),
    (nn.ConvTranspose3d(1, 1, 2), (1, 2, 2, 2)), (nn.BatchNorm1d(3).eval(), (3,)),
    (nn.AvgPool1d(2), (1, 4)), (nn.AvgPool2d(2), (1, 4, 4)), (nn.AvgPool3d(2), (1, 2, 2, 2)),
    (nn.AdaptiveAvgPool1d(1), (1, 4)), (nn.AdaptiveAvgPool2d(1), (1, 4, 4)), (nn.AdaptiveAvgPool3d(1), (1, 2, 2, 2)),
    (nn.MaxPool1d(2), (1, 4)), (nn.MaxPool2d(2), (1, 4, 4)), (nn.MaxPool3d(2), (1, 2, 2, 2)),
    (nn.AdaptiveMaxPool1d(1), (1, 4)), (nn.AdaptiveMaxPool2d(1), (1, 4, 4)), (nn.AdaptiveMaxPool3d(1), (1, 2, 2, 2)),
    (nn.Dropout(), (3,)), (nn.Dropout1d(), (2, 3)), (nn.Dropout2d(), (2, 3, 3)), (nn.Dropout3d(), (2, 2, 2, 2)),
    (nn.AlphaDropout(), (3,)), (nn.FeatureAlphaDropout(), (2, 3)), (nn.Flatten(), (2, 3)),
    (nn.Unflatten(1, (2, 3)), (6,)), (nn.Identity(), (3,)), (nn.Sequential(nn.ReLU()), (3,)),
    (Residual(nn.Linear(3, 3)), (3,)),
    (ll.AOLLinear(3, 2), (3,)), (ll.AOLConv1d(1, 2, 2), (1, 4)), (ll.AOLConv2d(1, 2, 2), (1, 3, 3)),
    (ll.MaxMin(), (2,)), (ll.L2NormPool(), (2, 3)), (ll.ModalityScale(torch.tensor(0.0), torch.tensor(2.0)), (3,)),
    (ll.ConvexResidual(ll.AOLLinear(3, 3)), (3,)),
]


def test_every_registered_layer_type_is_bounded_traced_as_one_call_and_passes_the_check():
    covered = {forward_owner(layer) for layer, _ in CATALOGUE}
    missing = [t.__name__ for t in registered_types() if t not in covered]
    assert not missing, f"registered rules without a case here: {missing}"
    for layer, shape in CATALOGUE:
        layer.eval()
        assert unsupported_layers(layer) == [], layer
        assert Tracer().is_leaf_module(layer, "x"), layer
        bound = lipschitz_upper_bound(layer, shape)
        assert math.isfinite(bound) and bound >= 0, layer


class Functional(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("fn, layer, shape", [
    (lambda x: F.leaky_relu(x, -3.0), nn.LeakyReLU(-3.0), (4,)), (lambda x: F.elu(x, 2.0), nn.ELU(2.0), (4,)),
    (lambda x: F.gelu(x, approximate="tanh"), nn.GELU(approximate="tanh"), (4,)), (torch.sigmoid, nn.Sigmoid(), (4,)),
    (lambda x: x.relu(), nn.ReLU(), (4,)), (F.selu, nn.SELU(), (4,)), (F.hardswish, nn.Hardswish(), (4,)),
    (lambda x: F.avg_pool1d(x, 3, 1), nn.AvgPool1d(3, 1), (2, 7)),
    (lambda x: F.max_pool2d(x, 3, 1), nn.MaxPool2d(3, 1), (1, 5, 5)),
    (lambda x: F.dropout(x, 0.5, training=True), nn.Dropout(0.5).train(), (4,)),
])
def test_functions_in_a_traced_forward_get_the_bound_of_their_layer(fn, layer, shape):
    # the function's bound comes from the layer's rule: each activation's bound is written once
    assert lipschitz_upper_bound(Functional(fn), shape) == lipschitz_upper_bound(layer, shape)
