"""Small reference late-fusion ("JT") models for the bundled data sets — copy them for your own.

Every model here has the same shape::

    model.encoders       nn.ModuleDict   name -> encoder phi^(m) (nn.Sequential): x^(m) -> (B, d_m)
    model.feature_dims   dict            name -> d_m, in the order the features are concatenated
    model.fusion.fc      nn.Linear       the ONE fusion layer, (sum d_m) -> K, on the concatenation
    model(**inputs)      (B, K)          fused logits; model(inputs_dict) works too

so wrapping one with CRMT is one line::

    >>> from crmt_plugin import CRMTWrapper
    >>> model = AVDigitsNet(feature_dim=64, num_classes=10)
    >>> crmt = CRMTWrapper(model, head="fusion.fc", modalities=model.feature_dims)

Encoders use only layers with a known (sound) Lipschitz bound: Linear, Conv1d/Conv2d, BatchNorm,
ReLU, average / max / adaptive-average pooling, Flatten, Dropout.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from torch import nn

from .errors import CRMTError

__all__ = ["LateFusionNet", "AVDigitsNet", "MultiViewMLP"]


class ConcatFusion(nn.Module):
    """``fc(cat([phi^(1), ..., phi^(M)], dim=-1))``: ``M x (B, d_m) -> (B, K)``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat(features, dim=-1))


class LateFusionNet(nn.Module):
    """Late fusion of any per-modality encoders through one ``nn.Linear`` at ``fusion.fc``.

    Example::

        >>> enc = {"a": nn.Sequential(nn.Linear(5, 8), nn.ReLU()), "b": nn.Linear(3, 4)}
        >>> model = LateFusionNet(enc, feature_dims={"a": 8, "b": 4}, num_classes=10)
        >>> model(a=torch.randn(2, 5), b=torch.randn(2, 3)).shape         # (B, K)
        torch.Size([2, 10])
        >>> model.fusion.fc                                                # the head to wrap
        Linear(in_features=12, out_features=10, bias=True)

    ``encoders[m]`` maps ``x^(m)`` to ``(B, feature_dims[m])``; features are concatenated in the
    order of ``feature_dims``. ``forward`` takes the modality tensors by keyword (or one mapping
    positionally) and needs exactly the modalities in ``feature_dims``; a missing modality is fed
    as zeros by the caller (zeros = the train mean for the bundled data sets).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        feature_dims: Mapping[str, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        if set(encoders) != set(feature_dims) or len(feature_dims) < 1:
            raise CRMTError(
                f"encoders and feature_dims: expected the same modality names, found "
                f"{sorted(encoders)} and {sorted(feature_dims)}"
            )
        self.feature_dims: Dict[str, int] = {k: int(v) for k, v in feature_dims.items()}
        self.encoders = nn.ModuleDict({k: encoders[k] for k in self.feature_dims})
        self.fusion = ConcatFusion(sum(self.feature_dims.values()), int(num_classes))

    @property
    def modalities(self) -> tuple:
        return tuple(self.feature_dims)

    def features(self, inputs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``{name: phi^(m)(x^(m))}``, each ``(B, d_m)``, in ``feature_dims`` order."""
        found = set(inputs)
        expected = set(self.feature_dims)
        if found != expected:
            raise CRMTError(
                f"{type(self).__name__} inputs: expected modalities {sorted(expected)}, found "
                f"{sorted(found)} (feed a missing modality as zeros)"
            )
        return {name: self.encoders[name](inputs[name]) for name in self.feature_dims}

    def forward(
        self, inputs: Optional[Mapping[str, torch.Tensor]] = None, /, **kwargs: torch.Tensor
    ) -> torch.Tensor:
        if inputs is not None:
            kwargs = {**inputs, **kwargs}
        return self.fusion(*self.features(kwargs).values())


def _conv_bn_relu(conv: type, bn: type, cin: int, cout: int) -> list:
    return [conv(cin, cout, kernel_size=3, padding=1, bias=False), bn(cout), nn.ReLU()]


class AVDigitsNet(LateFusionNet):
    """Audio-visual digits JT model: audio ``(B, 13, T)`` MFCC + image ``(B, 1, 28, 28)``.

    Example::

        >>> model = AVDigitsNet(feature_dim=64, num_classes=10)
        >>> model(audio=torch.randn(8, 13, 32), image=torch.randn(8, 1, 28, 28)).shape
        torch.Size([8, 10])
        >>> model.feature_dims, model.fusion.fc
        ({'audio': 64, 'image': 64}, Linear(in_features=128, out_features=10, bias=True))

    * audio: Conv1d over time with the 13 coefficients as channels,
      ``[Conv1d-BN-ReLU] x2 -> MaxPool1d(2) -> Conv1d-BN-ReLU -> AdaptiveAvgPool1d(1) -> Flatten ->
      Linear -> ReLU``; any number of frames ``T >= 2``.
    * image: ``[Conv2d-BN-ReLU -> MaxPool2d(2)] x2 -> Conv2d-BN-ReLU -> AdaptiveAvgPool2d(1) ->
      Flatten -> Linear -> ReLU``.

    ``width`` scales the channel counts (default 32: about 44k parameters; an epoch over 1800
    pairs takes about 1 s on one idle CPU core).
    """

    def __init__(
        self,
        feature_dim: int = 64,
        num_classes: int = 10,
        width: int = 32,
        audio_coefficients: int = 13,
    ) -> None:
        w = int(width)
        audio = nn.Sequential(
            *_conv_bn_relu(nn.Conv1d, nn.BatchNorm1d, audio_coefficients, w),
            *_conv_bn_relu(nn.Conv1d, nn.BatchNorm1d, w, w),
            nn.MaxPool1d(2),
            *_conv_bn_relu(nn.Conv1d, nn.BatchNorm1d, w, 2 * w),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(2 * w, feature_dim),
            nn.ReLU(),
        )
        image = nn.Sequential(
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, 1, w // 2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, w // 2, w),
            nn.MaxPool2d(2),
            *_conv_bn_relu(nn.Conv2d, nn.BatchNorm2d, w, 2 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * w, feature_dim),
            nn.ReLU(),
        )
        super().__init__(
            {"audio": audio, "image": image},
            {"audio": feature_dim, "image": feature_dim},
            num_classes,
        )


class MultiViewMLP(LateFusionNet):
    """One MLP encoder per view (e.g. the six mfeat views), late fusion through ``fusion.fc``.

    Example::

        >>> dims = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
        >>> model = MultiViewMLP(dims, feature_dim=32, num_classes=10)
        >>> model(**{k: torch.randn(4, d) for k, d in dims.items()}).shape
        torch.Size([4, 10])
        >>> model.feature_dims
        {'fou': 32, 'fac': 32, 'kar': 32, 'pix': 32, 'zer': 32, 'mor': 32}

    Each encoder: ``Linear(d, hidden) -> BatchNorm1d -> ReLU -> Dropout -> Linear(hidden,
    feature_dim) -> ReLU``. ``view_dims`` may come straight from ``{k: s[0] for k, s in
    splits.feature_shapes.items()}``.
    """

    def __init__(
        self,
        view_dims: Mapping[str, int],
        feature_dim: int = 32,
        num_classes: int = 10,
        hidden: int = 64,
        dropout: float = 0.1,
    ) -> None:
        encoders = {
            name: nn.Sequential(
                nn.Linear(int(d), hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, feature_dim),
                nn.ReLU(),
            )
            for name, d in view_dims.items()
        }
        super().__init__(encoders, {name: feature_dim for name in view_dims}, num_classes)
