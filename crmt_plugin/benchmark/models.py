"""The benchmark's models: one encoder per modality chosen by the array's shape, one linear fusion head.

* ``(N, d)`` vectors: an MLP, ``Linear(d, h) -> BN -> ReLU -> Linear(h, f) -> BN -> ReLU``;
* ``(N, C, T)`` sequences: a 1-D CNN, three ``Conv1d(k=3)`` (stride 1, 2, 2) each with BN + ReLU,
  then global average pooling;
* ``(N, C, H, W)`` images: a 2-D CNN, three ``Conv2d(k=3, stride 2)`` each with BN + ReLU, then
  global average pooling.

Every encoder starts with :class:`Standardize` (the train statistics as buffers), so the model takes
the file's **raw** inputs: ``model(**{name: x})`` -> logits (B, K). The fusion head is one
``nn.Linear(sum_m f_m, K)`` at ``model.fusion`` over the concatenated features (what
:class:`~crmt_plugin.CRMTWrapper` replaces with ``head="fusion"``).

Size rule (``N`` = number of training samples, ``K`` classes)::

    base = clip(2 ** round(log2(sqrt(N))), 16, 128)      # N = 1200 -> 32, N = 12000 -> 128
    f    = max(base, 2 ** ceil(log2(K)))                # feature width of every encoder (>= K)
    MLP  : h = clip(2 ** ceil(log2(d)), base, 4 * base)  # hidden width, d = input features
    CNNs : channels (f / 4, f / 2, f)

so small data sets get small models (less over-fitting, fast CPU runs) and the feature width is
never below K (the CRMT head's orthonormal rows need d_m >= K).
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import CRMTError

__all__ = ["Standardize", "MLPEncoder", "Conv1dEncoder", "Conv2dEncoder", "LNMLPEncoder", "LNConvEncoder",
           "FrozenEncoder", "ENCODER_FAMILIES", "BenchmarkNet", "build_model", "encoder_for", "size_rule"]


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed buffers (the train statistics); l2 Lipschitz constant
    ``1 / min(std)``.

    Example:

        >>> import torch
        >>> s = Standardize(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0]))
        >>> s(torch.tensor([[3.0, 6.0]]))
        tensor([[1., 1.]])
    """

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def lipschitz(self) -> float:
        """The exact l2 Lipschitz constant, ``1 / min(std)`` (rounded up)."""
        return float(1.0 / self.std.double().min()) * (1 + 1e-6)


def size_rule(num_train: int, num_classes: int) -> Tuple[int, int]:
    """``(base, f)`` of the module docstring's rule.

    Example:

        >>> size_rule(1200, 10), size_rule(12000, 10), size_rule(100, 200)
        ((32, 32), (128, 128), (16, 256))
    """
    base = int(min(128, max(16, 2 ** round(math.log2(math.sqrt(max(num_train, 1)))))))
    f = max(base, 2 ** math.ceil(math.log2(max(num_classes, 2))))
    return base, f


class MLPEncoder(nn.Sequential):
    """Standardize -> Linear(d, h) -> BN -> ReLU -> Linear(h, f) -> BN -> ReLU; input (B, d), output (B, f)."""

    def __init__(self, standardize: Standardize, d: int, hidden: int, features: int) -> None:
        super().__init__(standardize, nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, features), nn.BatchNorm1d(features), nn.ReLU())
        self.out_features = features


class Conv1dEncoder(nn.Sequential):
    """Standardize -> 3 x (Conv1d k=3, strides 1, 2, 2 -> BN -> ReLU) -> global average pool;
    input (B, C, T), output (B, f)."""

    def __init__(self, standardize: Standardize, channels: int, features: int) -> None:
        c1, c2, c3 = max(features // 4, 4), max(features // 2, 4), features
        super().__init__(standardize,
                         nn.Conv1d(channels, c1, 3, padding=1), nn.BatchNorm1d(c1), nn.ReLU(),
                         nn.Conv1d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm1d(c2), nn.ReLU(),
                         nn.Conv1d(c2, c3, 3, stride=2, padding=1), nn.BatchNorm1d(c3), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.out_features = features


class Conv2dEncoder(nn.Sequential):
    """Standardize -> 3 x (Conv2d k=3 stride 2 -> BN -> ReLU) -> global average pool;
    input (B, C, H, W), output (B, f)."""

    def __init__(self, standardize: Standardize, channels: int, features: int) -> None:
        c1, c2, c3 = max(features // 4, 4), max(features // 2, 4), features
        super().__init__(standardize,
                         nn.Conv2d(channels, c1, 3, stride=2, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
                         nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
                         nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = features


class LNMLPEncoder(nn.Sequential):
    """The MLP as users often write it: Standardize -> Linear(d, h) -> LayerNorm -> GELU -> Dropout(p) ->
    Linear(h, f) -> LayerNorm -> GELU; input (B, d), output (B, f). No BatchNorm."""

    def __init__(self, standardize: Standardize, d: int, hidden: int, features: int, dropout: float = 0.1) -> None:
        super().__init__(standardize, nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, features), nn.LayerNorm(features), nn.GELU())
        self.out_features = features


class LNConvEncoder(nn.Sequential):
    """The 1-D / 2-D CNN of the BatchNorm family with GroupNorm(1, c) (LayerNorm over channels and positions),
    GELU and Dropout(p) after the first two blocks instead of BatchNorm and ReLU; output (B, f)."""

    def __init__(self, standardize: Standardize, channels: int, features: int, dims: int, dropout: float = 0.1) -> None:
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        c1, c2, c3 = max(features // 4, 4), max(features // 2, 4), features
        first_stride = 1 if dims == 1 else 2
        super().__init__(standardize,
                         conv(channels, c1, 3, stride=first_stride, padding=1), nn.GroupNorm(1, c1), nn.GELU(),
                         nn.Dropout(dropout),
                         conv(c1, c2, 3, stride=2, padding=1), nn.GroupNorm(1, c2), nn.GELU(), nn.Dropout(dropout),
                         conv(c2, c3, 3, stride=2, padding=1), nn.GroupNorm(1, c3), nn.GELU(),
                         pool, nn.Flatten())
        self.out_features = features


class FrozenEncoder(nn.Module):
    """A frozen feature extractor with a trainable projection, as a user with a pretrained encoder writes it:
    ``ReLU(Linear(f, f)(body(x)))`` where ``body`` (pretrained elsewhere) never trains and stays in eval mode
    (its BatchNorm statistics are frozen too: ``train()`` leaves it in eval mode); output (B, f)."""

    def __init__(self, body: nn.Module, features: int) -> None:
        super().__init__()
        self.body = body
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.body.eval()
        self.projection = nn.Linear(features, features)
        self.activation = nn.ReLU()
        self.out_features = features

    def train(self, mode: bool = True) -> "FrozenEncoder":
        super().train(mode)
        self.body.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.projection(self.body(x)))


ENCODER_FAMILIES = ("bn", "ln", "frozen")


def encoder_for(shape: Sequence[int], mean: Tensor, std: Tensor, num_train: int, num_classes: int,
                family: str = "bn") -> nn.Module:
    """The encoder for one sample's ``shape``: (d,) MLP, (C, T) 1-D CNN, (C, H, W) 2-D CNN.

    ``family``: ``"bn"`` (BatchNorm + ReLU, the default), ``"ln"`` (LayerNorm/GroupNorm + GELU + dropout 0.1,
    :class:`LNMLPEncoder` / :class:`LNConvEncoder`); ``"frozen"`` is built by
    :func:`crmt_plugin.benchmark.recipes.new_model` (a pretrained ``"bn"`` body in :class:`FrozenEncoder`).

    Example:

        >>> import torch
        >>> enc = encoder_for((13, 32), torch.zeros(13, 1), torch.ones(13, 1), 1200, 10)
        >>> type(enc).__name__, enc(torch.randn(4, 13, 32)).shape
        ('Conv1dEncoder', torch.Size([4, 32]))
    """
    if family not in ("bn", "ln"):
        raise CRMTError(f"encoder family must be one of ('bn', 'ln') here, found {family!r} ('frozen' is built by "
                        "recipes.new_model)")
    base, f = size_rule(num_train, num_classes)
    standardize = Standardize(mean, std)
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        hidden = int(min(4 * base, max(base, 2 ** math.ceil(math.log2(max(shape[0], 1))))))
        return (MLPEncoder if family == "bn" else LNMLPEncoder)(standardize, shape[0], hidden, f)
    if len(shape) in (2, 3):
        if family == "ln":
            return LNConvEncoder(standardize, shape[0], f, dims=len(shape) - 1)
        return (Conv1dEncoder if len(shape) == 2 else Conv2dEncoder)(standardize, shape[0], f)
    raise CRMTError(f"no encoder for samples of shape {shape}: expected (d,), (C, T) or (C, H, W)")


class BenchmarkNet(nn.Module):
    """Late fusion: ``fusion(concat_m encoders[m](x_m))``; ``forward(**inputs)`` -> logits (B, K).

    ``feature_dims`` (name -> f_m) and ``fusion`` (the ``nn.Linear``) are what
    ``CRMTWrapper(model, head="fusion", modalities=model.feature_dims)`` needs.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], num_classes: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.modalities = tuple(encoders)
        self.feature_dims: Dict[str, int] = {n: int(e.out_features) for n, e in encoders.items()}
        self.fusion = nn.Linear(sum(self.feature_dims.values()), num_classes)

    def forward(self, **inputs: Tensor) -> Tensor:
        missing = [n for n in self.modalities if n not in inputs]
        if missing:
            raise CRMTError(f"the model needs the inputs {list(self.modalities)}; missing {missing}")
        return self.fusion(torch.cat([self.encoders[n](inputs[n]) for n in self.modalities], dim=1))


def build_model(sample_shapes: Mapping[str, Sequence[int]], stats: Mapping[str, Tuple[Tensor, Tensor]],
                num_train: int, num_classes: int, family: str = "bn") -> BenchmarkNet:
    """A fresh :class:`BenchmarkNet` for these shapes and train statistics ``{name: (mean, std)}``.

    Example:

        >>> import torch
        >>> net = build_model({"a": (6,), "b": (1, 8, 8)}, {"a": (torch.zeros(6), torch.ones(6)),
        ...                   "b": (torch.zeros(1, 1, 1), torch.ones(1, 1, 1))}, 1200, 10)
        >>> net(a=torch.randn(2, 6), b=torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    encoders = {n: encoder_for(shape, *stats[n], num_train, num_classes, family)
                for n, shape in sample_shapes.items()}
    return BenchmarkNet(encoders, num_classes)
