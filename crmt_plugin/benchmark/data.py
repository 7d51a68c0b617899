"""The benchmark's input file: load, validate, split and standardise a multi-modal ``.npz``.

File format (fixed: other tools write it)::

    x_<name>   float array (N, ...) per modality, at least two modalities:
               (N, d) vectors, (N, C, T) sequences, (N, C, H, W) images
    y          (N,) integer labels 0..K-1 (K = max(y) + 1, every class present)
    split      optional (N,) 0 = train, 1 = validation, 2 = test; absent: a stratified
               60/20/20 split drawn with ``data_seed``

Every problem is a :class:`~crmt_plugin.errors.CRMTError` with one line naming it (the CLI prints
that line and exits with status 2 before writing anything).

Standardisation statistics come from the train split only: per feature for vectors (mean/std over
samples), per channel for arrays (mean/std over samples and positions). A constant feature or
channel keeps std 1. The statistics go *into* the model (:class:`~crmt_plugin.benchmark.models.Standardize`),
so a saved model takes the file's raw inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .._optional import require
from ..errors import CRMTError

__all__ = ["BenchmarkData", "load_npz", "save_npz", "from_splits", "batches", "batch_list", "stratified_split",
           "standardization", "MIN_CLASS_SIZE"]

SPLIT_NAMES = ("train", "validation", "test")
# A drawn 60/20/20 split needs this many samples per class to put at least one in every part.
MIN_CLASS_SIZE = 5


@dataclass
class BenchmarkData:
    """A validated data set: raw float32 tensors per modality, labels, split.

    Attributes:
        x: modality name -> (N, ...) float32 tensor, in the file's order (sorted by key name in the
            file is not assumed: the order of ``x_*`` keys as stored).
        y: (N,) int64 labels 0..K-1.
        split: (N,) int64, 0 train / 1 validation / 2 test.
        num_classes: K.
        split_given: whether the file carried ``split``.
        path: where it was read from.
    """

    x: Dict[str, Tensor]
    y: Tensor
    split: Tensor
    num_classes: int
    split_given: bool = False
    path: str = ""
    _cache: Dict[str, Tuple[Dict[str, Tensor], Tensor]] = field(default_factory=dict, repr=False)

    @property
    def modalities(self) -> Tuple[str, ...]:
        return tuple(self.x)

    @property
    def num_samples(self) -> int:
        return int(self.y.shape[0])

    def sample_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """name -> one sample's shape (without N)."""
        return {n: tuple(t.shape[1:]) for n, t in self.x.items()}

    def part(self, which: str) -> Tuple[Dict[str, Tensor], Tensor]:
        """``("train" | "validation" | "test")`` -> (inputs dict, y) of that split."""
        if which not in self._cache:
            code = SPLIT_NAMES.index(which)
            index = torch.nonzero(self.split == code).flatten()
            self._cache[which] = ({n: t[index] for n, t in self.x.items()}, self.y[index])
        return self._cache[which]

    def sizes(self) -> Dict[str, int]:
        return {s: int((self.split == i).sum()) for i, s in enumerate(SPLIT_NAMES)}

    def train_mean(self) -> Dict[str, Tensor]:
        """name -> the train mean of one sample (per feature / per channel, broadcastable), the
        missing-modality fill, in raw units."""
        return {n: standardization(t)[0] for n, t in self.part("train")[0].items()}


def batches(inputs: Mapping[str, Tensor], y: Tensor, batch_size: int, *, shuffle: bool = False,
            generator: Optional[torch.Generator] = None) -> Iterator[Tuple[Dict[str, Tensor], Tensor]]:
    """In-memory mini-batches ``({name: (B, ...)}, y)`` (faster than a DataLoader for tensors)."""
    n = int(y.shape[0])
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        index = order[start:start + batch_size]
        yield {k: v[index] for k, v in inputs.items()}, y[index]


def batch_list(inputs: Mapping[str, Tensor], y: Tensor,
               batch_size: int = 256) -> List[Tuple[Dict[str, Tensor], Tensor]]:
    """The batches of :func:`batches` as a list (a re-iterable loader for the library's functions)."""
    return list(batches(inputs, y, batch_size))


def standardization(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, std) of (N, ...) data, shaped like one sample for broadcasting.

    Vectors (N, d): per feature, shapes (d,). Arrays (N, C, ...): per channel, shapes (C, 1, ...).
    A zero (or non-finite) std becomes 1.

    Example::

        >>> mean, std = standardization(torch.randn(100, 3, 8))
        >>> mean.shape, std.shape
        (torch.Size([3, 1]), torch.Size([3, 1]))
    """
    x = x.double()
    if x.dim() == 2:
        mean, std = x.mean(0), x.std(0, unbiased=False)
    else:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)[0]
        std = x.std(dim=dims, keepdim=True, unbiased=False)[0]
    std = torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))
    return mean.float(), std.float()


def stratified_split(y: Tensor, seed: int = 0, fractions: Tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Tensor:
    """(N,) split codes 0/1/2: per class, a random ``fractions`` share (rounded) in each part,
    drawn with ``seed``; classes need :data:`MIN_CLASS_SIZE` samples (checked by :func:`load_npz`).

    Example::

        >>> s = stratified_split(torch.arange(20) % 2, seed=0)
        >>> [int((s == k).sum()) for k in (0, 1, 2)]
        [12, 4, 4]
    """
    g = torch.Generator().manual_seed(int(seed))
    split = torch.empty_like(y)
    for c in torch.unique(y).tolist():
        index = torch.nonzero(y == c).flatten()
        index = index[torch.randperm(index.numel(), generator=g)]
        n = index.numel()
        n_val = max(1, int(round(fractions[1] * n)))
        n_test = max(1, int(round(fractions[2] * n)))
        n_train = n - n_val - n_test
        split[index[:n_train]] = 0
        split[index[n_train:n_train + n_val]] = 1
        split[index[n_train + n_val:]] = 2
    return split


def _fail(path: str, message: str) -> CRMTError:
    return CRMTError(f"{path}: {message}")


def load_npz(path: str, data_seed: int = 0) -> BenchmarkData:
    """Read and validate a benchmark ``.npz`` (see the module docstring); raises
    :class:`CRMTError` naming the first problem found.

    Example::

        data = load_npz("av.npz")
        data.modalities, data.num_classes, data.sizes()
        # (('audio', 'image'), 10, {'train': 1800, 'validation': 600, 'test': 600})
    """
    np = require("numpy", "reading benchmark .npz files")
    if not os.path.isfile(path):
        raise CRMTError(f"{path}: no such file (expected an .npz with x_<name> arrays and y)")
    try:
        archive = np.load(path, allow_pickle=False)
        files = dict((k, archive[k]) for k in archive.files)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing line
        raise _fail(path, f"not a readable .npz file ({type(exc).__name__}: {exc})") from None
    names = [k for k in files if k.startswith("x_")]
    if "y" not in files:
        raise _fail(path, f"no 'y' array of labels; found keys {sorted(files)} (save with np.savez(path, x_a=..., "
                          "x_b=..., y=...))")
    if len(names) < 2:
        raise _fail(path, f"needs at least 2 modalities (x_<name> arrays), found {len(names)}: {names}")
    if any(not n[2:] for n in names):
        raise _fail(path, "a modality array is called 'x_' with an empty name; use x_<name>")
    y_np = files["y"]
    n = int(y_np.shape[0]) if y_np.ndim >= 1 else -1
    if y_np.ndim != 1:
        raise _fail(path, f"y must have shape (N,), found {tuple(y_np.shape)}")
    sizes = {k: (int(files[k].shape[0]) if files[k].ndim else None) for k in names}
    if any(s != n for s in sizes.values()):
        raise _fail(path, f"arrays have different numbers of samples: y {n}, "
                          + ", ".join(f"{k} {s}" for k, s in sizes.items()))
    x: Dict[str, Tensor] = {}
    for k in names:
        arr = files[k]
        if arr.ndim not in (2, 3, 4):
            raise _fail(path, f"{k} has shape {tuple(arr.shape)}: expected (N, d), (N, C, T) or (N, C, H, W)")
        if arr.dtype.kind not in "fiub" or arr.dtype.kind == "b":
            raise _fail(path, f"{k} must be a float (or integer) array, found dtype {arr.dtype}")
        if min(arr.shape[1:]) < 1:
            raise _fail(path, f"{k} has an empty sample shape {tuple(arr.shape[1:])}")
        t = torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32))
        finite = torch.isfinite(t).flatten(1).all(1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten()
            raise _fail(path, f"{k} has NaN/Inf values in {bad.numel()} of {n} samples (first: "
                              f"{bad[:5].tolist()}); remove or impute them")
        x[k[2:]] = t
    if y_np.dtype.kind not in "iu":
        if y_np.dtype.kind == "f" and np.all(np.isfinite(y_np)) and np.all(y_np == np.round(y_np)):
            y_np = y_np.astype(np.int64)
        else:
            raise _fail(path, f"y must hold integer labels 0..K-1, found dtype {y_np.dtype}")
    y = torch.from_numpy(y_np.astype(np.int64))
    if n == 0:
        raise _fail(path, "the file holds no samples (N = 0)")
    if int(y.min()) < 0:
        raise _fail(path, f"labels must lie in 0..K-1, found negative labels {torch.unique(y[y < 0])[:5].tolist()}")
    k = int(y.max()) + 1
    counts = torch.bincount(y, minlength=k)
    if k < 2:
        raise _fail(path, "y holds a single class; classification needs at least 2")
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        raise _fail(path, f"labels must be 0..K-1 with every class present (K = {k} from max(y)), but classes "
                          f"{missing[:10]} have no sample; relabel to consecutive integers")
    if "split" in files:
        s_np = files["split"]
        if s_np.shape != (n,) or s_np.dtype.kind not in "iuf":
            raise _fail(path, f"split must be (N,) = ({n},) integers 0/1/2, found {s_np.dtype} {tuple(s_np.shape)}")
        split = torch.from_numpy(s_np.astype(np.int64))
        bad = ~((split == 0) | (split == 1) | (split == 2))
        if bool(bad.any()) or (s_np.dtype.kind == "f" and not np.all(s_np == np.round(s_np))):
            raise _fail(path, f"split must hold 0 (train), 1 (validation), 2 (test); found values "
                              f"{sorted(set(s_np.tolist()) - {0, 1, 2})[:5]}")
        for code, part in enumerate(SPLIT_NAMES):
            if not bool((split == code).any()):
                raise _fail(path, f"split has no {part} sample (code {code})")
        train_counts = torch.bincount(y[split == 0], minlength=k)
        empty = torch.nonzero(train_counts == 0).flatten().tolist()
        if empty:
            raise _fail(path, f"classes {empty[:10]} have no train sample in the given split; every class needs one")
        given = True
    else:
        small = torch.nonzero(counts < MIN_CLASS_SIZE).flatten().tolist()
        if small:
            raise _fail(path, f"classes {small[:10]} have fewer than {MIN_CLASS_SIZE} samples "
                              f"({counts[small[:10]].tolist()}): too few for the 60/20/20 split; add samples, merge "
                              "classes or give a split array")
        split = stratified_split(y, data_seed)
        given = False
    return BenchmarkData(x=x, y=y, split=split, num_classes=k, split_given=given, path=path)


def save_npz(path: str, x: Mapping[str, "object"], y: "object", split: Optional["object"] = None) -> str:
    """Write a benchmark file: ``x`` maps modality name -> (N, ...) array, ``y`` (N,) labels,
    ``split`` optional (N,) 0/1/2. Arrays may be numpy arrays or tensors. Returns ``path``.

    Example::

        save_npz("my.npz", {"audio": a, "image": v}, y)      # a (N, 13, 32), v (N, 1, 28, 28), y (N,)
    """
    np = require("numpy", "writing benchmark .npz files")

    def arr(v):
        return v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)

    payload = {f"x_{k}": arr(v).astype(np.float32) for k, v in x.items()}
    payload["y"] = arr(y).astype(np.int64)
    if split is not None:
        payload["split"] = arr(split).astype(np.int64)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **payload)
    return path


def from_splits(splits: Any, limit: Optional[int] = None) -> BenchmarkData:
    """A :class:`BenchmarkData` from a :class:`~crmt_plugin.datasets.MultiModalSplits` (the library's
    AV digits / mfeat loaders), keeping its train / validation / test split; ``limit`` keeps only the
    first ``limit`` samples of each split (smoke tests).

    Example::

        data = from_splits(crmt_plugin.datasets.load_av_digits(seed=0))
        data.sizes()        # {'train': 1800, 'validation': 600, 'test': 600}
    """
    xs: Dict[str, List[Tensor]] = {n: [] for n in splits.modalities}
    ys: List[Tensor] = []
    codes: List[Tensor] = []
    for code, part in enumerate((splits.train, splits.val, splits.test)):
        n = len(part.targets) if limit is None else min(limit, len(part.targets))
        for name in splits.modalities:
            xs[name].append(part.tensors[name][:n].float())
        ys.append(part.targets[:n].long())
        codes.append(torch.full((n,), code, dtype=torch.long))
    return BenchmarkData(x={n: torch.cat(v) for n, v in xs.items()}, y=torch.cat(ys), split=torch.cat(codes),
                         num_classes=int(splits.num_classes), split_given=True, path=type(splits).__name__)
