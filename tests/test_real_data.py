"""Training on the real audio-visual digits: no a^(m) collapse, no feature inflation, JT-level accuracy.

Plus: on an imbalanced mfeat pair the default step 1 stays within a point of plain joint training
(three seeds), where the paper's raw margin does not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import crmt_plugin
from crmt_plugin.datasets import load_av_digits
from crmt_plugin.models import AVDigitsNet

EPOCHS = 6


@pytest.fixture(scope="module")
def splits():
    return load_av_digits(seed=0)


def train(splits, mode: str, seed: int = 0):
    """mode: "jt" (plain CE) or "crmt" (the library defaults)."""
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    model = AVDigitsNet(feature_dim=32, width=16)
    crmt = None if mode == "jt" else crmt_plugin.CRMTWrapper(model, head="fusion.fc", modalities=model.feature_dims)
    net = crmt or model
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-4)
    a_history = []
    for _ in range(EPOCHS):
        net.train()
        for inputs, y in loader:
            if crmt is None:
                loss = F.cross_entropy(model(**inputs), y)
            else:
                out = crmt(inputs)
                loss = crmt_plugin.crmt_loss(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if crmt is not None:
            a_history.append(crmt.head.integration_weights().detach().clone())
    model.eval()
    inputs, y = next(iter(torch.utils.data.DataLoader(splits.test, batch_size=len(splits.test))))
    with torch.no_grad():
        accuracy = (model(**inputs).argmax(1) == y).double().mean().item()
        features = {n: model.encoders[n](inputs[n]).norm(dim=1).mean().item() for n in model.feature_dims}
    return accuracy, features, a_history


@pytest.fixture(scope="module")
def runs(splits):
    return {mode: train(splits, mode) for mode in ("jt", "crmt")}


def test_crmt_keeps_joint_training_accuracy(runs):
    jt_acc, crmt_acc = runs["jt"][0], runs["crmt"][0]
    assert jt_acc > 0.9
    assert crmt_acc >= jt_acc - 0.02, (jt_acc, crmt_acc)


def test_integration_weights_do_not_collapse(runs):
    a_history = runs["crmt"][2]
    a0 = a_history[0]
    for a in a_history:
        assert a.min() > 0.05, a
        assert (a / a0).min() > 0.2 and (a / a0).max() < 5.0


def test_feature_norms_stay_bounded(runs):
    """The relative margin is scale-free (tests/test_loss.py::test_relative_margin_is_scale_free), so
    nothing rewards inflating the features. (The paper's raw margin does reward it; on this 6-epoch
    run with weight decay its features stayed at 1.1x JT's, so no inflation is asserted here.)"""
    jt_features, crmt_features = runs["jt"][1], runs["crmt"][1]
    for name in jt_features:
        assert crmt_features[name] <= 2.0 * jt_features[name], (crmt_features, jt_features)


# -- step 1 on an imbalanced pair: the default keeps joint training's clean accuracy ----------------

MFEAT_EPOCHS = 30
MFEAT_SEEDS = (0, 1, 2)
# Measured (docs/method.md, "Step 1 on imbalanced data"): mfeat mor + fac, MultiViewMLP, Adam 1e-3,
# 30 epochs, seeds 0-2, the 400 test digits, the wrapper's shared scale: JT 0.9875; the default crmt_loss
# (rho 0.5, target 3) 0.9825; the previous default (rho 0.1, target 1) 0.985; the paper's raw margin (rho 2)
# 0.954. (Without the shared scale: rho 0.1 0.985, 0.25 0.985, 0.5 at target 1 0.983.)
CLEAN_TOLERANCE = 0.01


def train_mfeat(splits, loss, seed):
    """loss(out, y) for a CRMT model, None for plain JT; returns the test accuracy."""
    from crmt_plugin.models import MultiViewMLP

    torch.manual_seed(seed)
    dims = {k: s[0] for k, s in splits.feature_shapes.items()}
    model = MultiViewMLP(dims, feature_dim=32, hidden=64, num_classes=10)
    crmt = None if loss is None else crmt_plugin.CRMTWrapper(model, head="fusion.fc", modalities=model.feature_dims)
    net = crmt or model
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    inputs, y = dict(splits.train.tensors), splits.train.targets
    gen = torch.Generator().manual_seed(seed)
    for _ in range(MFEAT_EPOCHS):
        net.train()
        for idx in torch.randperm(len(y), generator=gen).split(64):
            if idx.numel() < 2:
                continue
            xb, yb = {k: v[idx] for k, v in inputs.items()}, y[idx]
            value = F.cross_entropy(model(**xb), yb) if crmt is None else loss(crmt(xb), yb)
            opt.zero_grad()
            value.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(**splits.test.tensors).argmax(1) == splits.test.targets).double().mean().item()


@pytest.fixture(scope="module")
def mor_fac():
    from crmt_plugin.datasets import load_mfeat

    splits = load_mfeat(seed=0, views=("mor", "fac"))
    runs = {"jt": None, "default": lambda out, y: crmt_plugin.crmt_loss(out, y),
            "raw": lambda out, y: crmt_plugin.crmt_loss(out, y, rho=2.0, margin="raw")}
    return {name: [train_mfeat(splits, loss, s) for s in MFEAT_SEEDS] for name, loss in runs.items()}


def test_default_step_one_keeps_clean_accuracy_on_an_imbalanced_pair(mor_fac):
    """mfeat mor (6 morphological features, weak alone) + fac (216, strong): the default regulariser
    stays within a point of plain joint training, mean of three seeds, where the paper's raw margin
    does not (the same test, the same tolerance, would fail on it)."""
    mean = {k: sum(v) / len(v) for k, v in mor_fac.items()}
    assert mean["jt"] > 0.97, mean
    assert mean["default"] >= mean["jt"] - CLEAN_TOLERANCE, mean
    assert mean["raw"] < mean["jt"] - CLEAN_TOLERANCE, mean
