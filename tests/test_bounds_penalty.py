"""encoder_bounds on the reference models, and LipschitzPenalty (a lower estimate that training can shrink)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from crmt_plugin.bounds import LipschitzPenalty, Residual, encoder_bounds, lipschitz_upper_bound
from crmt_plugin.errors import CRMTError
from test_bounds_reference import empirical_lipschitz

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
