"""The benchmark's Lipschitz-bounded models and losses: ``lip-jt`` (the fair baseline) and ``crmt-lip``.

Both methods use the **same** encoders, built from :mod:`crmt_plugin.lipschitz_layers` (each layer
1-Lipschitz by construction, its exact/sound constant in the bounds registry), chosen by the sample's shape:

* ``(d,)`` vectors: ModalityScale -> AOLLinear(d, h) -> MaxMin -> AOLLinear(h, f);
* ``(C, T)`` sequences: ModalityScale -> 3 x (AOLConv1d k=3, strides 1, 2, 2 -> MaxMin) -> Flatten -> AOLLinear(., f);
* ``(C, H, W)`` images: ModalityScale -> 3 x (AOLConv2d k=3, stride 2 -> MaxMin) -> Flatten -> AOLLinear(., f);

with the widths of :func:`~crmt_plugin.benchmark.models.size_rule` (channels f/2, f, 2f). ``ModalityScale``
divides every feature (channel) by max(its std, the RMS of the stds): high-variance features are scaled down,
none is amplified, so the encoder's constant is L^(m) = 1 / RMS std (exact, in the file's raw units).
The fusion head is ``nn.Linear(sum_m f, K)`` at ``model.fusion``, as in
:class:`~crmt_plugin.benchmark.models.BenchmarkNet`.

=========  ==================================================================================================
method     one training step
=========  ==================================================================================================
lip-jt     :func:`~crmt_plugin.certified_loss.lipschitz_margin_loss` on the plain linear head: CE of the worst
           logits in the joint eps-ball, D_k = sqrt(sum_m (L^(m) ||W_y^(m) - W_k^(m)||)^2)
crmt-lip   ``CRMTWrapper`` + :func:`~crmt_plugin.certified_loss.certified_loss` (joint worst-case CE with the tight
           CRMT denominator + rho x the per-modality term at eps / sqrt(M)), then step 2 with the **sound** constants
=========  ==================================================================================================

eps ramps linearly from 0 to ``EPS_FACTOR x TrainConfig.train_eps`` over the first ``WARMUP`` of the steps.

**Model selection** (the epoch kept): the one with the best validation *sound certified accuracy* at the training
radius (:func:`sound_certified_accuracy`; ties: the lower validation loss), not the best clean accuracy: the
certified loss trades clean accuracy for margin as eps ramps up, so the clean-accuracy epoch is the least
certified one (measured on AV digits at r = 2: crmt-lip kept epochs 23, 24 and 46 of 52 by clean accuracy, lip-jt
48 to 51; docs/certification.md).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..certified_loss import certified_loss, lipschitz_margin_loss, pairwise_denominators
from ..certify import radii_from_margins
from ..errors import CRMTError
from ..lipschitz import LipschitzConstants
from ..lipschitz_layers import AOLConv1d, AOLConv2d, AOLLinear, MaxMin, ModalityScale
from .data import BenchmarkData
from .models import BenchmarkNet, size_rule

__all__ = ["LIPSCHITZ_METHODS", "EPS_FACTOR", "WARMUP", "RHO", "WIDTH", "REFRESH", "scale_for", "lipschitz_encoder_for",
           "lipschitz_model", "construction_constants", "sound_constants", "lipschitz_loss", "sound_certified_accuracy"]

LIPSCHITZ_METHODS = ("lip-jt", "crmt-lip")
EPS_FACTOR = 1.0     # training budget / evaluation radius
WARMUP = 0.2         # fraction of the steps over which eps ramps up from 0
RHO = 0.5            # weight of crmt-lip's per-modality term
WIDTH = 1            # feature width (and channels) = WIDTH x the size rule's f
REFRESH = 10         # the loss's L^(m): the encoders' sound bound, recomputed every REFRESH steps (0: by construction)


def scale_for(x: Tensor) -> ModalityScale:
    """``(x - mean) / max(std_c, rms)`` per feature / channel c, rms = sqrt(mean_c std_c^2): constant 1 / rms."""
    x = x.detach().double()
    dims = [0] + list(range(2, x.dim()))
    shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    mean = x.mean(dim=dims).view(shape)
    std = x.std(dim=dims, unbiased=False).view(shape)
    rms = float(std.pow(2).mean().sqrt()) or 1.0
    return ModalityScale(mean.float(), std.clamp_min(rms).float())


class LipschitzEncoder(nn.Sequential):
    """An encoder of :func:`lipschitz_encoder_for`; ``out_features`` is its feature width."""

    def __init__(self, *layers: nn.Module, out_features: int) -> None:
        super().__init__(*layers)
        self.out_features = int(out_features)


def lipschitz_encoder_for(shape: Sequence[int], x_train: Tensor, num_train: int, num_classes: int) -> nn.Module:
    """The Lipschitz encoder for one sample's ``shape`` (see the module docstring); ``x_train`` (N, *shape).

    Example:

        >>> import torch
        >>> enc = lipschitz_encoder_for((13, 32), torch.randn(50, 13, 32), 1800, 10)
        >>> enc(torch.randn(4, 13, 32)).shape
        torch.Size([4, 32])
    """
    base, f = size_rule(num_train, num_classes)
    f *= WIDTH
    shape = tuple(int(s) for s in shape)
    scale = scale_for(x_train)
    c = (max(f // 2, 2), f, 2 * f)
    if len(shape) == 1:
        hidden = int(min(4 * base, max(base, 2 ** math.ceil(math.log2(max(shape[0], 1))))))
        hidden += hidden % 2
        return LipschitzEncoder(scale, AOLLinear(shape[0], hidden), MaxMin(), AOLLinear(hidden, f), out_features=f)
    if len(shape) in (2, 3):
        conv = AOLConv1d if len(shape) == 2 else AOLConv2d
        strides = (1, 2, 2) if len(shape) == 2 else (2, 2, 2)
        layers = [scale]
        channels, spatial = shape[0], list(shape[1:])
        for width, stride in zip(c, strides):
            layers += [conv(channels, width, 3, stride=stride, padding=1), MaxMin()]
            channels = width
            spatial = [(s + 2 - 3) // stride + 1 for s in spatial]
        layers += [nn.Flatten(), AOLLinear(channels * math.prod(spatial), f)]
        return LipschitzEncoder(*layers, out_features=f)
    raise CRMTError(f"no Lipschitz encoder for samples of shape {shape}: expected (d,), (C, T) or (C, H, W)")


def lipschitz_model(data: BenchmarkData) -> BenchmarkNet:
    """A fresh late-fusion model with a Lipschitz encoder per modality (uses the global torch RNG)."""
    train_x, train_y = data.part("train")
    num_train = int(train_y.shape[0])
    encoders = {n: lipschitz_encoder_for(shape, train_x[n], num_train, data.num_classes)
                for n, shape in data.sample_shapes().items()}
    return BenchmarkNet(encoders, data.num_classes)


def construction_constants(model: BenchmarkNet) -> Dict[str, float]:
    """L^(m) by construction: 1 / min(scale) of each encoder's ModalityScale (every other layer is <= 1)."""
    out = {}
    for name, enc in model.encoders.items():
        scales = [m for m in enc.modules() if isinstance(m, ModalityScale)]
        out[name] = float(math.prod(s.lipschitz() for s in scales)) * (1 + 1e-6)
    return out


def sound_constants(model: BenchmarkNet, data: BenchmarkData) -> LipschitzConstants:
    """The bounds registry's constants of the trained encoders (<= :func:`construction_constants`), sound."""
    from ..bounds import encoder_bounds

    return encoder_bounds(model.encoders, data.sample_shapes())


def lipschitz_loss(method: str, model: BenchmarkNet, crmt: Optional[nn.Module], eps: float, total_steps: int,
                   rho: Optional[float] = None, eps_factor: Optional[float] = None, warmup: Optional[float] = None
                   ) -> Callable[[Mapping[str, Tensor], Tensor], Tensor]:
    """The training loss of ``lip-jt`` / ``crmt-lip``: ``loss(inputs, y)``, eps ramped over the steps
    (``rho``, ``eps_factor``, ``warmup``: None for the module's ``RHO``, ``EPS_FACTOR``, ``WARMUP``)."""
    rho = RHO if rho is None else rho
    eps_factor = EPS_FACTOR if eps_factor is None else eps_factor
    warmup = WARMUP if warmup is None else warmup
    if method not in LIPSCHITZ_METHODS:
        raise CRMTError(f"not a Lipschitz method: {method!r}; known: {LIPSCHITZ_METHODS}")
    target = float(eps) * float(eps_factor)
    ramp = max(1, int(warmup * total_steps))
    state: Dict[str, Any] = {"step": 0, "lipschitz": construction_constants(model)}

    def loss(inputs: Mapping[str, Tensor], y: Tensor) -> Tensor:
        if REFRESH and state["step"] % REFRESH == 0:   # the sound bound of the current weights (Fourier: fast)
            from ..bounds import encoder_bounds

            shapes = {n: tuple(x.shape[1:]) for n, x in inputs.items()}
            bounds = encoder_bounds(model.encoders, shapes, conv_method="fourier")
            state["lipschitz"] = {n: float(v) for n, v in zip(bounds.modalities, bounds.values.tolist())}
        lipschitz = state["lipschitz"]
        state["step"] += 1
        now = target * min(1.0, state["step"] / ramp)
        if method == "lip-jt":
            return lipschitz_margin_loss(model(**inputs), y, head=model.fusion, widths=model.feature_dims,
                                         lipschitz=lipschitz, eps=now)
        # the per-modality term at certified_loss's default budget, eps / sqrt(M)
        return certified_loss(crmt(inputs), y, crmt=crmt, lipschitz=lipschitz, eps=now, rho=rho)

    return loss


@torch.no_grad()
def sound_certified_accuracy(model: BenchmarkNet, inputs: Mapping[str, Tensor], y: Tensor, radius: float,
                             batch_size: int = 1000) -> float:
    """Fraction of ``(inputs, y)`` whose sound joint certified radius is >= ``radius`` (eval mode; modes restored).

    Radius of a sample: min_{k != y} (f_y - f_k) / sqrt(sum_m (L^(m) ||W_y^(m) - W_k^(m)||)^2), 0 where the
    prediction is wrong, with L^(m) the bounds registry's sound constants of the current encoders (Fourier bound
    for convolutions) and W the fusion head's weight (a CRMT head's ``fused_weight()``, concat_m a^(m) W~^(m)):
    the joint certificate ``certify`` computes for either head, in one pass. Used to select the epoch of
    ``lip-jt`` and ``crmt-lip``.

    Example:

        >>> from crmt_plugin.benchmark.data import BenchmarkData
        >>> split = torch.tensor([0] * 30 + [1] * 10)                 # 30 training, 10 validation samples
        >>> data = BenchmarkData({"a": torch.randn(40, 3), "b": torch.randn(40, 2)}, torch.arange(40) % 2, split, 2)
        >>> model = lipschitz_model(data)
        >>> x, y = data.part("validation")
        >>> 0.0 <= sound_certified_accuracy(model, x, y, radius=0.1) <= 1.0
        True
        >>> sound_certified_accuracy(model, x, y, radius=1e9)          # nothing is certified that far
        0.0
    """
    from ..bounds import encoder_bounds

    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        shapes = {n: tuple(x.shape[1:]) for n, x in inputs.items()}
        bounds = encoder_bounds(model.encoders, shapes, conv_method="fourier")
        lipschitz = {n: float(v) for n, v in zip(bounds.modalities, bounds.values.tolist())}
        head = model.fusion
        weight = head.fused_weight() if hasattr(head, "fused_weight") else head.weight
        pair = pairwise_denominators(weight, model.feature_dims, lipschitz)            # (M, K, K)
        certified, total = 0, int(y.shape[0])
        for start in range(0, total, batch_size):
            xb = {n: t[start:start + batch_size] for n, t in inputs.items()}
            yb = y[start:start + batch_size]
            logits = model(**xb)
            margins = logits.gather(1, yb.unsqueeze(1)) - logits                       # (B, K)
            correct = (margins > 0).logical_or(torch.nn.functional.one_hot(yb, logits.shape[1]).bool()).all(dim=1)
            joint, _ = radii_from_margins(margins, pair[:, yb].transpose(0, 1), correct, yb)   # (B,), 0 where wrong
            certified += int((correct & (joint >= radius)).sum())
    finally:
        for m, t in saved:
            m.training = t
    return certified / max(total, 1)

