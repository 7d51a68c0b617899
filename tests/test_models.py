"""Reference late-fusion models: shapes, the fusion head, and bound-friendly encoders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crmt_plugin.errors import CRMTError
from crmt_plugin.models import AVDigitsNet, LateFusionNet, MultiViewMLP

# layers a sound Lipschitz upper bound supports (crmt_plugin.bounds walks these)
SUPPORTED = (
    nn.Sequential,
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
)

MFEAT_DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}


def _av_inputs(b=5, frames=32):
    return {"audio": torch.randn(b, 13, frames), "image": torch.randn(b, 1, 28, 28)}


def _models():
    torch.manual_seed(0)
    av = AVDigitsNet(feature_dim=64, num_classes=10)
    mv = MultiViewMLP(MFEAT_DIMS, feature_dim=32, num_classes=10)
    return [(av, _av_inputs()), (mv, {k: torch.randn(5, d) for k, d in MFEAT_DIMS.items()})]


@pytest.mark.parametrize("index", [0, 1])
def test_forward_shapes_keyword_and_mapping(index):
    model, inputs = _models()[index]
    model.eval()
    out = model(**inputs)
    assert out.shape == (5, 10) and out.dtype == torch.float32
    torch.testing.assert_close(model(inputs), out)
    feats = model.features(inputs)
    assert list(feats) == list(model.feature_dims)
    for name, f in feats.items():
        assert f.shape == (5, model.feature_dims[name])
        torch.testing.assert_close(model.encoders[name](inputs[name]), f)


@pytest.mark.parametrize("index", [0, 1])
def test_one_linear_fusion_head_on_concatenation_in_feature_dims_order(index):
    model, inputs = _models()[index]
    model.eval()
    fc = model.get_submodule("fusion.fc")
    assert type(fc) is nn.Linear
    assert fc.in_features == sum(model.feature_dims.values()) and fc.out_features == 10
    feats = model.features(inputs)
    # h(x) = sum_m W^(m) phi^(m)(x^(m)) + b, blocks of W in feature_dims order
    expected, start = fc.bias.expand(5, -1).clone(), 0
    for name, d in model.feature_dims.items():
        expected = expected + feats[name] @ fc.weight[:, start : start + d].T
        start += d
    torch.testing.assert_close(model(**inputs), expected)
    # the only Linear outside the encoders is the head
    outside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("encoders.")]
    assert outside == ["fusion.fc"]


@pytest.mark.parametrize("index", [0, 1])
def test_encoders_are_sequentials_of_supported_layers(index):
    model, _ = _models()[index]
    assert isinstance(model.encoders, nn.ModuleDict)
    assert list(model.encoders) == list(model.feature_dims)
    for name, enc in model.encoders.items():
        assert type(enc) is nn.Sequential, name
        bad = [f"{n}: {type(m).__name__}" for n, m in enc.named_modules() if type(m) not in SUPPORTED]
        assert not bad, f"encoder {name!r} has layers without a sound bound: {bad}"


def test_av_digits_net_any_frame_count_and_width():
    model = AVDigitsNet(feature_dim=16, num_classes=10, width=8).eval()
    assert model(**_av_inputs(3, frames=20)).shape == (3, 10)
    assert model.feature_dims == {"audio": 16, "image": 16}


def test_inputs_must_match_modalities():
    model = AVDigitsNet()
    with pytest.raises(CRMTError, match=r"expected modalities \['audio', 'image'\], found \['audio'\]"):
        model(audio=torch.randn(2, 13, 32))
    with pytest.raises(CRMTError, match="found"):
        model(**_av_inputs(2), video=torch.randn(2, 3))


def test_late_fusion_net_checks_names():
    with pytest.raises(CRMTError, match="same modality names"):
        LateFusionNet({"a": nn.Linear(3, 4)}, {"b": 4}, 10)


def test_gradients_reach_every_encoder():
    model, inputs = _models()[0]
    model.train()
    F.cross_entropy(model(**inputs), torch.arange(5)).backward()
    for name, enc in model.encoders.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters()), name


def test_mfeat_mlp_learns_quickly():
    from crmt_plugin.datasets import load_mfeat

    torch.manual_seed(0)
    s = load_mfeat(seed=0)
    model = MultiViewMLP({k: v[0] for k, v in s.feature_shapes.items()}, feature_dim=32, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(s.train, batch_size=64, shuffle=True)
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(**x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(**s.test.tensors).argmax(1) == s.test.targets).float().mean().item()
    assert acc > 0.9
