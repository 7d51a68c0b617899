"""Shared pieces of the method experiments: data, models, training with a loss variant, evaluation.

Fast on purpose (2 shared CPU cores): full-tensor batching, no DataLoader, MLP encoders with
BatchNorm, Adam 1e-3. Evaluation: clean, l2-PGD (20 steps, CE and CW margin, worst per sample)
jointly and per modality, each modality missing (train-mean fill), mean empirical certified radius.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

import crmt_plugin
import crmt_plugin.attacks as attacks
from crmt_plugin.datasets import load_av_digits, load_mfeat
from crmt_plugin.models import AVDigitsNet, MultiViewMLP

PGD = attacks.PGD
CE_LOSS = attacks.cross_entropy_loss
CW_LOSS = getattr(attacks, "cw_margin_loss", None) or attacks.margin_loss

DATASETS = {
    "mor+fac": ("mfeat", ("mor", "fac")),
    "fou+zer": ("mfeat", ("fou", "zer")),
    "pix+fac": ("mfeat", ("pix", "fac")),
    "av": ("av", None),
}


def load(name: str, seed: int = 0):
    kind, views = DATASETS[name]
    splits = load_mfeat(seed=seed, views=views) if kind == "mfeat" else load_av_digits(seed=seed)
    return splits


def make_model(name: str, splits):
    if DATASETS[name][0] == "av":
        return AVDigitsNet(feature_dim=32, width=16)
    dims = {k: s[0] for k, s in splits.feature_shapes.items()}
    return MultiViewMLP(dims, feature_dim=32, hidden=64, num_classes=10)


def tensors(ds, limit=None):
    if limit is None:
        return dict(ds.tensors), ds.targets
    return {k: v[:limit] for k, v in ds.tensors.items()}, ds.targets[:limit]


TEST_LIMIT = {"av": 300}  # conv encoders on 2 shared cores: the first 300 test pairs


def batches(inputs, y, batch_size, generator):
    n = y.shape[0]
    for idx in torch.randperm(n, generator=generator).split(batch_size):
        if idx.numel() < 2:  # BatchNorm needs 2
            continue
        yield {k: v[idx] for k, v in inputs.items()}, y[idx]


def train(name: str, splits, loss_fn: Optional[Callable], seed: int, epochs: int, lr: float = 1e-3,
          batch_size: int = 64):
    """loss_fn(out, y, epoch_fraction) -> loss for a CRMT model; None = plain JT (CE)."""
    torch.manual_seed(seed)
    model = make_model(name, splits)
    crmt = None if loss_fn is None else crmt_plugin.CRMTWrapper(model, head="fusion.fc", modalities=model.feature_dims)
    net = crmt or model
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    inputs, y = tensors(splits.train)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        for xb, yb in batches(inputs, y, batch_size, gen):
            if crmt is None:
                loss = F.cross_entropy(model(**xb), yb)
            else:
                loss = loss_fn(crmt(xb), yb, epoch / max(epochs, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    return model, crmt


@torch.no_grad()
def accuracy(model, inputs, y):
    model.eval()
    return (model(**inputs).argmax(1) == y).double().mean().item()


def attack_accuracy(model, inputs, y, eps, modalities, bounds, steps=20, seed=0):
    """Accuracy left by the per-sample worst of PGD-CE and PGD-CW (l2, ``steps`` steps)."""
    ok = torch.ones_like(y, dtype=torch.bool)
    for loss in (CE_LOSS, CW_LOSS):
        attack = PGD(eps=eps, norm="l2", modalities=list(modalities), steps=steps, loss=loss,
                     bounds={k: v for k, v in bounds.items() if k in modalities and math.isfinite(v[0])} or None,
                     generator=torch.Generator().manual_seed(seed))
        adv = attack(model, inputs, y)
        with torch.no_grad():
            ok &= model(**adv).argmax(1) == y
    return ok.double().mean().item()


def unimodal_accuracy(crmt, inputs, y) -> Dict[str, float]:
    with torch.no_grad():
        out = crmt(inputs)
    return {n: (out.unimodal[n].argmax(1) == y).double().mean().item() for n in crmt.modalities}


def evaluate(model, splits, eps, crmt=None, steps=20, seed=0, limit=None) -> Dict[str, float]:
    model.eval()
    inputs, y = tensors(splits.test, limit)
    bounds = splits.bounds
    names = list(inputs)
    row = {"clean": accuracy(model, inputs, y)}
    row["pgd_joint"] = attack_accuracy(model, inputs, y, eps, names, bounds, steps, seed)
    for n in names:
        row[f"pgd:{n}"] = attack_accuracy(model, inputs, y, eps, [n], bounds, steps, seed)
    means = {k: v.mean(0) for k, v in splits.train.tensors.items()}
    for n in names:
        row[f"missing:{n}"] = accuracy(model, {**inputs, n: means[n].expand_as(inputs[n])}, y)
    keys = ["pgd_joint"] + [f"pgd:{n}" for n in names] + [f"missing:{n}" for n in names]
    row["robust_mean"] = sum(row[k] for k in keys) / len(keys)
    if crmt is not None:
        tr_in, tr_y = tensors(splits.train)
        lip = crmt.estimate_lipschitz([(tr_in, tr_y)])
        cert = crmt.certify(inputs, y, lipschitz=lip)
        row["radius"] = cert.radius.mean().item()
        for n in names:
            row[f"radius:{n}"] = cert.radius_per_modality[n].mean().item()
        for n, v in unimodal_accuracy(crmt, inputs, y).items():
            row[f"uni_test:{n}"] = v
        for n, v in unimodal_accuracy(crmt, tr_in, tr_y).items():
            row[f"uni_train:{n}"] = v
        row["train_clean"] = accuracy(model, tr_in, tr_y)
    return row


def pick_radius(model, splits, grid=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0), target=0.45, steps=20,
                limit=None):
    """The l2 radius of ``grid`` at which the model's joint PGD accuracy is closest to ``target``."""
    inputs, y = tensors(splits.test, limit)
    best = None
    for r in grid:
        acc = attack_accuracy(model, inputs, y, r, list(inputs), splits.bounds, steps)
        if best is None or abs(acc - target) < abs(best[1] - target):
            best = (r, acc)
        if acc < target - 0.1:
            break
    return best[0]
