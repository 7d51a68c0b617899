"""Shared fixtures: small late-fusion models built the way users build theirs."""

from __future__ import annotations

import os
from typing import Dict, Mapping

import pytest
import torch
from hypothesis import settings
from torch import nn

torch.set_num_threads(int(os.environ.get("CRMT_TEST_THREADS", "1")))
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


class LateFusion(nn.Module):
    """encoders[name](x^(m)) concatenated, then one fusion nn.Linear at ``fusion.fc``."""

    def __init__(self, encoders: Mapping[str, nn.Module], widths: Mapping[str, int], num_classes: int,
                 bias: bool = True):
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.widths = dict(widths)
        self.fusion = nn.Module()
        self.fusion.fc = nn.Linear(sum(widths.values()), num_classes, bias=bias)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.fusion.fc(torch.cat([self.encoders[n](inputs[n]) for n in self.widths], dim=1))


def linear_model(in_dims: Dict[str, int], widths: Dict[str, int], num_classes: int, seed: int = 0,
                 dtype=torch.float64) -> LateFusion:
    """Linear encoders phi^(m)(x) = A_m x + c_m (exact Lipschitz constant: ||A_m||_2)."""
    gen = torch.Generator().manual_seed(seed)
    encoders = {}
    for name in in_dims:
        layer = nn.Linear(in_dims[name], widths[name]).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(widths[name], in_dims[name], generator=gen, dtype=dtype))
            layer.bias.copy_(torch.randn(widths[name], generator=gen, dtype=dtype) * 0.1)
        encoders[name] = layer
    model = LateFusion(encoders, widths, num_classes).to(dtype)
    with torch.no_grad():
        model.fusion.fc.weight.copy_(torch.randn(num_classes, sum(widths.values()), generator=gen, dtype=dtype))
        model.fusion.fc.bias.copy_(torch.randn(num_classes, generator=gen, dtype=dtype) * 0.1)
    return model


def cnn_model(num_classes: int = 5, seed: int = 0) -> LateFusion:
    """Two small encoders with BatchNorm and Dropout (train/eval matters)."""
    torch.manual_seed(seed)
    audio = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU())
    image = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * 4 * 4, 12), nn.ReLU())
    return LateFusion({"audio": audio, "image": image}, {"audio": 16, "image": 12}, num_classes)


def cnn_batch(batch: int = 8, num_classes: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    inputs = {"audio": torch.randn(batch, 3, 10, generator=gen), "image": torch.randn(batch, 1, 8, 8, generator=gen)}
    return inputs, torch.randint(0, num_classes, (batch,), generator=gen)


@pytest.fixture
def cnn():
    return cnn_model()
