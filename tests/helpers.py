"""Shared test models and helpers: small late-fusion models built the way users build theirs.

Imported by the test modules (``from helpers import ...``); ``tests/conftest.py`` re-exports the
models for the modules that import them from there.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from crmt_plugin import CRMTWrapper, crmt_loss


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


def tanh_model(num_classes=4, dtype=torch.float32, seed=0):
    """Encoders that squash +-Inf inputs into finite features (tanh(+-inf) = +-1)."""
    torch.manual_seed(seed)
    enc = {"a": nn.Sequential(nn.Linear(6, 8), nn.Tanh()), "b": nn.Sequential(nn.Linear(5, 8), nn.Tanh())}
    return LateFusion(enc, {"a": 8, "b": 8}, num_classes).to(dtype)


def tanh_batch(batch=16, num_classes=4, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    inputs = {"a": torch.randn(batch, 6, generator=gen).to(dtype), "b": torch.randn(batch, 5, generator=gen).to(dtype)}
    return inputs, torch.randint(0, num_classes, (batch,), generator=gen)


def wrap(model, **kw) -> CRMTWrapper:
    """CRMTWrapper of a LateFusion model (head at ``fusion.fc``, widths from the model)."""
    return CRMTWrapper(model, head="fusion.fc", modalities=model.widths, **kw)


def state_of(crmt):
    return {k: v.detach().clone() for k, v in crmt.state_dict().items()}


def assert_states_equal(got, expected):
    """Same keys, bitwise equal tensors (NaN equal to NaN)."""
    assert list(got) == list(expected)
    different = [k for k in expected if not torch.equal(got[k], expected[k])
                 and not (got[k].isnan().any() and torch.equal(got[k].nan_to_num(), expected[k].nan_to_num()))]
    assert not different, different


def train_steps(crmt, optimizer, steps, start=0):
    """``steps`` CRMT training steps on cnn_batch(seed=step) (for cnn_model)."""
    for step in range(start, start + steps):
        inputs, y = cnn_batch(batch=8, seed=step)
        loss = crmt_loss(crmt(inputs), y, rho=2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def exact_distance(crmt, model, x, y):
    """Linear encoders: the minimal joint l2 perturbation that changes the prediction, in float64."""
    head = crmt.head
    a = head.integration_weights().detach().double()
    jac = torch.cat([a[i, :, None] * head.unimodal_weight(n).detach().double()
                     @ model.encoders[n].weight.detach().double()
                     for i, n in enumerate(crmt.modalities)], dim=1)  # (K, sum n_m)
    with torch.no_grad():
        logits = crmt(x).logits.double()
    margins = logits.gather(1, y[:, None]) - logits
    norms = (jac[y][:, None, :] - jac[None]).norm(dim=-1)
    is_label = F.one_hot(y, logits.shape[1]).bool()
    return torch.where(is_label, torch.tensor(math.inf, dtype=torch.float64), margins / norms).amin(1).clamp_min(0)


def trained_cnn(steps: int = 15, seed: int = 0, lr: float = 1e-2, **wrapper_kwargs):
    """A CRMT-wrapped :func:`cnn_model` (K = 5) trained ``steps`` Adam steps (learning rate ``lr``) on
    three fixed batches; returns ``(crmt, batches)``. ``wrapper_kwargs`` go to :class:`CRMTWrapper`."""
    torch.manual_seed(seed)
    model = cnn_model(num_classes=5, seed=seed)
    crmt = CRMTWrapper(model, head="fusion.fc", modalities=model.widths, **wrapper_kwargs)
    opt = torch.optim.Adam(crmt.parameters(), lr=lr)
    data = [cnn_batch(batch=32, seed=s) for s in range(3)]
    for step in range(steps):
        inputs, y = data[step % 3]
        loss = crmt_loss(crmt(inputs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return crmt, data
