"""Composition: random networks never below the sampled Lipschitz constant, Residual, fx-traced custom
modules, in-place layers, declarations, refusals, state and dtype."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from crmt_plugin.bounds import Residual, declare_lipschitz, lipschitz_upper_bound
from crmt_plugin.errors import CRMTError
from test_bounds_reference import empirical_lipschitz, randomise_bn

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


ACTIVATIONS = [nn.ReLU, lambda: nn.LeakyReLU(1.7), nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Hardswish,
               nn.Softplus, nn.Mish]


@st.composite
def networks(draw):
    family = draw(st.sampled_from(["mlp", "conv1d", "conv2d"]))
    seed = draw(st.integers(0, 10_000))
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if family == "mlp":
        shape = (draw(st.integers(1, 8)),)
    elif family == "conv1d":
        shape = (draw(st.integers(1, 3)), draw(st.integers(4, 12)))
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(4, 7)), draw(st.integers(4, 7)))
    dims = len(shape) - 1
    layers = []
    current = shape
    for _ in range(draw(st.integers(1, 5))):
        c = current[0]
        kind = draw(st.sampled_from(["lin", "act", "bn", "residual", "dropout"] if dims == 0 else
                                    ["conv", "conv", "act", "bn", "maxpool", "avgpool", "adaptive", "residual"]))
        if kind == "lin":
            layer = nn.Linear(c, draw(st.integers(1, 8)))
        elif kind == "act":
            layer = draw(st.sampled_from(ACTIVATIONS))()
        elif kind == "dropout":
            layer = nn.Dropout(0.3)
        elif kind == "bn":
            layer = randomise_bn([nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d][dims](c), gen)
        elif kind == "conv":
            conv = [None, nn.Conv1d, nn.Conv2d][dims]
            layer = conv(c, draw(st.integers(1, 4)), draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)),
                         padding=draw(st.integers(0, 1)), dilation=draw(st.integers(1, 2)),
                         padding_mode=draw(st.sampled_from(["zeros", "zeros", "circular", "reflect"])))
        elif kind == "maxpool":
            k = draw(st.integers(1, 3))
            layer = [None, nn.MaxPool1d, nn.MaxPool2d][dims](k, stride=draw(st.integers(1, 3)),
                                                               padding=draw(st.integers(0, k // 2)),
                                                               ceil_mode=draw(st.booleans()))
        elif kind == "avgpool":
            k = draw(st.integers(1, 3))
            layer = [None, nn.AvgPool1d, nn.AvgPool2d][dims](k, stride=draw(st.integers(1, 3)),
                                                               padding=draw(st.integers(0, k // 2)),
                                                               count_include_pad=draw(st.booleans()))
        elif kind == "adaptive":
            size = draw(st.integers(1, 3))
            layer = draw(st.sampled_from([[None, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d][dims],
                                          [None, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d][dims]]))(size)
        else:  # residual
            if dims == 0:
                branch = nn.Sequential(nn.Linear(c, c), draw(st.sampled_from(ACTIVATIONS))())
            else:
                conv = [None, nn.Conv1d, nn.Conv2d][dims]
                branch = nn.Sequential(conv(c, c, 3, padding=1), draw(st.sampled_from(ACTIVATIONS))())
            layer = Residual(branch)
        try:
            with torch.no_grad():
                out = layer.eval()(torch.zeros((2, *current)))
        except (RuntimeError, ValueError):
            continue
        if out.numel() == 0:
            continue
        layers.append(layer)
        current = tuple(out.shape[1:])
    if dims:
        layers += [nn.Flatten(), nn.Linear(math.prod(current), draw(st.integers(1, 4)))]
    return nn.Sequential(*layers).double().eval(), shape


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_random_networks_bound_is_never_below_empirical_lipschitz(case):
    net, shape = case
    bound = lipschitz_upper_bound(net, shape)
    found = empirical_lipschitz(net, shape)
    assert found <= bound * (1 + 1e-9), (net, shape, found, bound)


def test_residual_is_one_plus_branch():
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Conv1d(3, 3, 3, padding=1), nn.ReLU())
    assert lipschitz_upper_bound(Residual(branch), (3, 9)) == pytest.approx(
        1 + lipschitz_upper_bound(branch, (3, 9)), rel=1e-12)
    short = nn.Conv1d(3, 3, 1)
    assert lipschitz_upper_bound(Residual(branch, short), (3, 9)) == pytest.approx(
        lipschitz_upper_bound(short, (3, 9)) + lipschitz_upper_bound(branch, (3, 9)), rel=1e-12)


class BasicBlock(nn.Module):
    """A ResNet-style block written the usual way (no nn.Sequential): traced with torch.fx."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride), nn.BatchNorm2d(c_out)) \
            if stride != 1 or c_in != c_out else None
        self.gain = nn.Parameter(torch.full((1, c_out, 1, 1), 0.7))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) * self.gain
        identity = x if self.down is None else self.down(x)
        out += identity
        return F.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.Sequential(BasicBlock(4, 4, 1), BasicBlock(4, 6, 2))
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = torch.cat([F.adaptive_avg_pool2d(x, 1).flatten(1), x.amax(dim=(2, 3)) * 0], dim=1)[:, :6]
        return self.head(x)


def test_traced_custom_modules_are_bounded_soundly():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    block = BasicBlock(3, 3, 1)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomise_bn(m, gen)
    block = block.double().eval()
    layers = {}
    bound = lipschitz_upper_bound(block, (3, 6, 6), per_layer=layers)
    assert {"conv1+bn1", "conv2+bn2", "gain"} <= set(layers)          # BatchNorm folded into the conv
    expected = 1 + math.prod(layers[k] for k in ("conv1+bn1", "conv2+bn2", "gain"))
    assert bound == pytest.approx(expected, rel=1e-9)
    assert empirical_lipschitz(block, (3, 6, 6)) <= bound


def test_traced_model_refuses_what_it_cannot_bound():
    model = TinyResNet().eval()   # amax over space is not understood
    with pytest.raises(CRMTError, match=r"'<root>' \(TinyResNet\).*amax.*declare_lipschitz"):
        lipschitz_upper_bound(model, (1, 8, 8))


def test_unsupported_layers_are_refused_with_their_path():
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(CRMTError, match=r"'enc\.1\.1' \(LayerNorm\).*declare_lipschitz"):
        lipschitz_upper_bound(net, (4,), name="enc")

    class Square(nn.Module):
        def forward(self, x):
            return x * x

    with pytest.raises(CRMTError, match=r"'1' \(Square\).*mul.*declare_lipschitz"):
        lipschitz_upper_bound(nn.Sequential(nn.Linear(3, 3), Square()), (3,))
    with pytest.raises(CRMTError, match="one sample's shape"):
        lipschitz_upper_bound(nn.Linear(3, 3), (2, 4))
    with pytest.raises(CRMTError, match="batch"):
        lipschitz_upper_bound(nn.Flatten(0), (3,))


def test_in_place_layers_that_overwrite_a_shared_tensor():
    torch.manual_seed(0)
    relu_first = Residual(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 3)))       # L(relu) <= 1: sound
    net = relu_first.double()
    assert lipschitz_upper_bound(relu_first, (3,)) >= empirical_lipschitz(lambda v: net(v.clone()), (3,))
    with pytest.raises(CRMTError, match=r"SELU\(inplace=True\).*inplace=False"):
        lipschitz_upper_bound(Residual(nn.Sequential(nn.SELU(inplace=True), nn.Linear(3, 3))), (3,))

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            y = self.fc(x)
            return y + y.mul_(3)           # y itself is overwritten: 6 fc(x), not 4 fc(x)

    with pytest.raises(CRMTError, match="in place a tensor that is used elsewhere"):
        lipschitz_upper_bound(Scaled(), (3,))


def test_declarations_for_instances_types_and_callables():
    class Sorter(nn.Module):   # GroupSort-like, 1-Lipschitz but opaque
        def forward(self, x):
            return x.sort(dim=-1).values

    layer = nn.Linear(5, 5)
    net = nn.Sequential(layer, Sorter())
    with pytest.raises(CRMTError, match="Sorter"):
        lipschitz_upper_bound(net, (5,))
    try:
        declare_lipschitz(Sorter, 1.0)
        assert lipschitz_upper_bound(net, (5,)) == pytest.approx(lipschitz_upper_bound(layer, (5,)))
        declare_lipschitz(net[1], lambda m, shape: 2.0 * shape[0])       # instance wins over type
        assert lipschitz_upper_bound(net, (5,)) == pytest.approx(10 * lipschitz_upper_bound(layer, (5,)))
        declare_lipschitz(net[1], None)
        assert lipschitz_upper_bound(net, (5,)) == pytest.approx(lipschitz_upper_bound(layer, (5,)))
    finally:
        declare_lipschitz(Sorter, None)
    with pytest.raises(CRMTError, match=">= 0"):
        declare_lipschitz(Sorter, -1.0)
    with pytest.raises(CRMTError, match="nn.Module"):
        declare_lipschitz("Sorter", 1.0)


def test_state_and_flags_are_left_untouched():
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), randomise_bn(nn.BatchNorm2d(3), gen), nn.ReLU(), nn.Dropout(0.5),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 2))
    net.eval()
    net[3].train()                                       # dropout left in train mode: 1 / (1 - p)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [m.training for m in net.modules()]
    layers = {}
    lipschitz_upper_bound(net, (1, 6, 6), per_layer=layers)
    assert layers["3"] == pytest.approx(2.0)
    assert [m.training for m in net.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_float32_and_float64_modules_agree():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(32, 3))
    b32 = lipschitz_upper_bound(net, (2, 8))
    b64 = lipschitz_upper_bound(net.double(), (2, 8))
    assert b32 == pytest.approx(b64, rel=1e-12)          # computed in float64 from the same weights
