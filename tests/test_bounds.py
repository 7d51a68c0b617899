"""Sound Lipschitz upper bounds: never below the true constant, exact for single linear layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from crmt_plugin.bounds import LipschitzPenalty, Residual, declare_lipschitz, encoder_bounds, lipschitz_upper_bound
from crmt_plugin.errors import CRMTError

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------

def exact_operator_norm(layer: nn.Module, shape) -> float:
    """||J||_2 of the (affine) layer from its dense Jacobian, float64."""
    layer = layer.double()
    x = torch.randn(shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.unsqueeze(0)), x)
    return torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2).item()


def empirical_lipschitz(f, shape, *, points: int = 6, pairs: int = 6, steps: int = 25, seed: int = 0) -> float:
    """Lower estimate of L(f): max Jacobian norm at random points + gradient ascent on the ratio
    ||f(x) - f(y)|| / ||x - y|| over pairs (x, y)."""
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(points):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
        jac = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0)).reshape(-1), x)
        best = max(best, torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2).item())
    for _ in range(pairs):
        x = (torch.randn((1, *shape), generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
        y = (x.detach() + 0.05 * torch.randn((1, *shape), generator=gen, dtype=torch.float64)).requires_grad_(True)
        opt = torch.optim.Adam([x, y], lr=0.05)
        for _ in range(steps):
            ratio = (f(x) - f(y)).norm() / (x - y).norm().clamp_min(1e-12)
            best = max(best, ratio.item())
            opt.zero_grad()
            (-ratio).backward()
            opt.step()
    return best


def randomise_bn(bn: nn.Module, gen: torch.Generator) -> nn.Module:
    with torch.no_grad():
        bn.weight.copy_(torch.randn(bn.weight.shape, generator=gen) * 1.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 2 + 0.05)
    return bn.eval()


# ---------------------------------------------------------------------------------------------
# single layers: exact within 1e-3, never below
# ---------------------------------------------------------------------------------------------

@FAST
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 10_000))
def test_linear_matches_exact_norm(n_in, n_out, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    bound = lipschitz_upper_bound(layer, (n_in,))
    exact = exact_operator_norm(layer, (n_in,))
    assert exact <= bound <= exact * (1 + 1e-3)


@st.composite
def conv_layers(draw, transposed: bool = False):
    dims = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    size = tuple(draw(st.integers(3, 9)) for _ in range(dims))
    seed = draw(st.integers(0, 10_000))
    torch.manual_seed(seed)
    if transposed:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
        out_pad = tuple(draw(st.integers(0, s - 1)) for s in stride)
        out_pad = tuple(min(o, max(s, d) - 1) for o, s, d in zip(out_pad, stride, dilation))
        cls = nn.ConvTranspose1d if dims == 1 else nn.ConvTranspose2d
        try:
            layer = cls(c_in, c_out, k, stride=stride, padding=padding, output_padding=out_pad,
                        dilation=dilation, groups=groups)
            layer(torch.zeros(1, c_in, *size))
        except (RuntimeError, ValueError):
            layer = cls(c_in, c_out, k, stride=stride, padding=0, dilation=dilation, groups=groups)
        return layer, (c_in, *size)
    mode = draw(st.sampled_from(["zeros", "zeros", "circular", "reflect", "replicate"]))
    padding = draw(st.one_of(st.integers(0, 3), st.sampled_from(["same", "valid"])))
    if padding == "same":
        stride = (1,) * dims
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    try:
        layer = cls(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=mode)
        layer(torch.zeros(1, c_in, *size))
    except (RuntimeError, ValueError, NotImplementedError):
        layer = cls(c_in, c_out, k, stride=stride, padding=0, dilation=dilation, groups=groups)
        size = tuple(max(s, d * (kk - 1) + 1) for s, d, kk in zip(size, dilation, k))
    return layer, (c_in, *size)


@FAST
@given(conv_layers())
def test_conv_matches_exact_operator_norm(case):
    layer, shape = case
    exact = exact_operator_norm(layer, shape)
    bound = lipschitz_upper_bound(layer, shape)                      # small: exact (dense) path
    assert exact <= bound <= exact * (1 + 1e-3) + 1e-12, (layer, shape)
    fourier = lipschitz_upper_bound(layer, shape, conv_method="fourier")
    assert fourier >= exact, (layer, shape)                          # the large-input path is sound


@FAST
@given(conv_layers(transposed=True))
def test_conv_transpose_matches_exact_operator_norm(case):
    layer, shape = case
    exact = exact_operator_norm(layer, shape)
    assert exact <= lipschitz_upper_bound(layer, shape) <= exact * (1 + 1e-3) + 1e-12
    assert lipschitz_upper_bound(layer, shape, conv_method="fourier") >= exact


def test_conv_is_not_the_reshaped_kernel_norm():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 3, padding=1)
    exact = exact_operator_norm(layer, (3, 10, 10))
    kernel = torch.linalg.matrix_norm(layer.weight.detach().double().reshape(8, -1), ord=2).item()
    assert kernel < 0.6 * exact                     # the classic mistake under-estimates ~3x here
    assert exact <= lipschitz_upper_bound(layer, (3, 10, 10)) <= exact * (1 + 1e-3)


def test_fourier_is_exact_for_circular_same_convolutions_and_close_for_zero_padding():
    torch.manual_seed(0)
    circ = nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular")
    exact = exact_operator_norm(circ, (4, 8, 8))
    assert exact <= lipschitz_upper_bound(circ, (4, 8, 8), conv_method="fourier") <= exact * (1 + 1e-3)
    strided = nn.Conv2d(4, 6, 4, stride=2, padding=1, padding_mode="circular")
    exact = exact_operator_norm(strided, (4, 8, 8))
    assert exact <= lipschitz_upper_bound(strided, (4, 8, 8), conv_method="fourier") <= exact * (1 + 1e-3)
    zeros = nn.Conv2d(4, 6, 3, padding=1)
    exact = exact_operator_norm(zeros, (4, 16, 16))
    assert exact <= lipschitz_upper_bound(zeros, (4, 16, 16), conv_method="fourier") <= exact * 1.1


def test_large_conv_uses_fourier_and_stays_sound():
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    exact = exact_operator_norm(layer, (2, 12, 12))
    auto = lipschitz_upper_bound(layer, (2, 12, 12), dense_max=10)   # forces the Fourier path
    assert auto == lipschitz_upper_bound(layer, (2, 12, 12), conv_method="fourier")
    assert exact <= auto <= 1.2 * exact


# ---------------------------------------------------------------------------------------------
# activations, normalisation, pooling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer, expected", [
    (nn.ReLU(), 1.0), (nn.LeakyReLU(0.2), 1.0), (nn.LeakyReLU(-3.0), 3.0), (nn.Tanh(), 1.0),
    (nn.Sigmoid(), 0.25), (nn.GELU(), 1.1289), (nn.GELU(approximate="tanh"), 1.1289), (nn.SiLU(), 1.0998),
    (nn.ELU(2.0), 2.0), (nn.Softplus(), 1.0), (nn.Hardswish(), 1.5), (nn.Mish(), 1.0885), (nn.SELU(), 1.7581),
    (nn.Hardsigmoid(), 1 / 6), (nn.CELU(0.5), 1.0), (nn.Softsign(), 1.0),
])
def test_activation_bounds_are_sup_of_derivative(layer, expected):
    x = torch.linspace(-12, 12, 480_001, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    sup = grad.abs().max().item()
    bound = lipschitz_upper_bound(layer, (5,))
    assert sup <= bound <= sup * (1 + 1e-4) + 1e-9
    assert bound == pytest.approx(expected, abs=1e-4)


def test_batchnorm_eval_bound_and_train_mode_refused():
    gen = torch.Generator().manual_seed(0)
    bn = randomise_bn(nn.BatchNorm2d(5), gen)
    expected = (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).max().item()
    assert lipschitz_upper_bound(bn, (5, 3, 3)) == pytest.approx(expected, rel=1e-5)
    assert lipschitz_upper_bound(bn, (5, 3, 3)) >= exact_operator_norm(bn, (5, 3, 3))
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)).train()
    with pytest.raises(CRMTError, match=r"'1' \(BatchNorm1d\) is in training mode.*\.eval\(\)"):
        lipschitz_upper_bound(net, (4,))
    assert net.training and net[1].training                           # flags untouched
    no_stats = nn.Sequential(nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(CRMTError, match="track_running_stats=False"):
        lipschitz_upper_bound(no_stats, (4,))


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(2, 5, 3, stride=2, padding=1), (2, 7, 7)), (nn.Conv1d(3, 4, 3, padding=1), (3, 9)),
    (nn.Linear(6, 4), (6,)),
])
def test_batchnorm_after_conv_or_linear_is_folded_exactly(conv, shape):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    bn = randomise_bn((nn.BatchNorm1d if conv.weight.dim() <= 3 else nn.BatchNorm2d)(conv.weight.shape[0]), gen)
    pair = nn.Sequential(conv, bn).double().eval()
    layers = {}
    bound = lipschitz_upper_bound(pair, shape, per_layer=layers)
    exact = exact_operator_norm(pair, shape)
    assert list(layers) == ["0+1"]
    assert exact <= bound <= exact * (1 + 1e-3)
    out_shape = tuple(conv(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    assert bound <= lipschitz_upper_bound(conv, shape) * lipschitz_upper_bound(bn, out_shape)
    with pytest.raises(CRMTError, match=r"'1' \(BatchNorm"):
        lipschitz_upper_bound(nn.Sequential(conv, type(bn)(7)).eval(), shape)     # wrong channel count


@pytest.mark.parametrize("pool, shape", [
    (nn.AvgPool2d(3, stride=1), (2, 7, 7)), (nn.AvgPool2d(3, stride=2, padding=1), (1, 9, 9)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True), (1, 8, 9)),
    (nn.AvgPool1d(4, stride=3), (2, 11)), (nn.AdaptiveAvgPool2d((2, 3)), (2, 7, 5)),
    (nn.AdaptiveAvgPool1d(1), (3, 10)), (nn.AvgPool2d(2), (1, 8, 8)),
])
def test_average_pooling_matches_exact_norm(pool, shape):
    exact = exact_operator_norm(pool, shape)
    bound = lipschitz_upper_bound(pool, shape)
    assert exact <= bound <= exact * (1 + 1e-3)
    assert lipschitz_upper_bound(pool, shape, dense_max=1) >= exact     # large-input path (Schur / Fourier)


def test_global_average_pooling_is_one_over_sqrt_hw():
    assert lipschitz_upper_bound(nn.AdaptiveAvgPool2d(1), (8, 4, 5)) == pytest.approx(1 / math.sqrt(20), rel=1e-5)


@pytest.mark.parametrize("pool, shape, expected", [
    (nn.MaxPool2d(2), (3, 8, 8), 1.0), (nn.MaxPool1d(3, stride=1), (1, 7), math.sqrt(3)),
    (nn.MaxPool2d(3, stride=2, padding=1), (1, 9, 9), 2.0), (nn.AdaptiveMaxPool2d(1), (2, 5, 5), 1.0),
    (nn.MaxPool1d(2, stride=1, dilation=2), (1, 8), math.sqrt(2)),
])
def test_max_pooling_bound_is_tight(pool, shape, expected):
    bound = lipschitz_upper_bound(pool, shape)
    assert bound == pytest.approx(expected, rel=1e-9)
    # attained: bump the element that is the max of the most windows
    x = torch.zeros((1, *shape), dtype=torch.float64)
    flat = x.view(-1)
    best = 0.0
    for i in range(flat.numel()):
        y = x.clone()
        y.view(-1)[i] = 1.0
        best = max(best, (pool(y) - pool(x)).norm().item())
    assert best == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# random networks: never below the empirical Lipschitz constant
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# composition: Residual, fx-traced custom modules, declarations, refusals
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# state, dtype, reference models, LipschitzConstants, penalty
# ---------------------------------------------------------------------------------------------

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


def test_reference_models_and_encoder_bounds():
    from crmt_plugin import models
    from crmt_plugin import lipschitz
    torch.manual_seed(0)
    model = models.AVDigitsNet(feature_dim=16, num_classes=10, width=8).eval()
    shapes = {"audio": (13, 32), "image": (1, 28, 28)}
    lip = encoder_bounds(model.encoders, shapes)
    assert isinstance(lip, lipschitz.LipschitzConstants)
    assert lip.sound and lip.source == "bound" and lip.modalities == ("audio", "image")
    assert lip.values.shape == (2,) and lip.values.dtype == torch.float64
    for i, name in enumerate(lip.modalities):
        enc = model.encoders[name].double()
        found = empirical_lipschitz(enc, shapes[name], points=2, pairs=2, steps=10)
        assert 0 < found <= lip.values[i].item()
    with pytest.raises(CRMTError, match="same modalities"):
        encoder_bounds(model.encoders, {"audio": (13, 32)})


def test_penalty_is_a_lower_estimate_and_training_on_it_reduces_the_bound():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        Residual(nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())),
                        nn.Flatten(), nn.Linear(6 * 4 * 4, 10))
    net.train()
    penalty = LipschitzPenalty(net, (1, 8, 8))
    net.eval()
    before = lipschitz_upper_bound(net, (1, 8, 8))
    net.train()
    value = penalty()
    assert value.requires_grad and 0.5 * before <= value.item() <= before * (1 + 1e-4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(16, 1, 8, 8)
    for _ in range(40):
        opt.zero_grad()
        net(x)                                   # updates BatchNorm statistics, as real training does
        penalty().log().backward()
        opt.step()
    net.eval()
    after = lipschitz_upper_bound(net, (1, 8, 8))
    assert after < 0.5 * before
    assert penalty().item() <= after * (1 + 1e-4)
