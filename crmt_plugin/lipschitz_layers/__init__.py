"""Lipschitz-bounded building blocks for encoders whose constant is known by construction (torch only).

=====================  =======================================================  ==========================
layer                  map                                                      constant (bounds rule)
=====================  =======================================================  ==========================
AOLLinear              W diag(d) x + b, AOL rescaling                           exact ||W diag(d)||_2 <= 1
AOLConv1d, AOLConv2d   zero-padded conv with AOL-rescaled kernel, any stride    min(AOL certificate, exact
                                                                                operator norm) <= 1
MaxMin                 GroupSort of pairs                                       1 (exact)
L2NormPool             per-channel l2 norm over positions                       1 (exact)
ConvexResidual         (1 - a) x + a f(x), a in (0, 1)                          (1 - a) + a L(f)
ModalityScale          (x - mean) / s, one s per modality (or floored per       1 / min(s) (exact)
                       channel)
=====================  =======================================================  ==========================

Every layer has a rule in the bounds registry (:mod:`crmt_plugin.bounds.lipschitz_layers`), so
``crmt_plugin.bounds.encoder_bounds`` returns a sound constant and ``cert.sound`` is True with no extra step:

    >>> import torch
    >>> from torch import nn
    >>> from crmt_plugin.bounds import lipschitz_upper_bound
    >>> enc = nn.Sequential(ModalityScale(torch.tensor(0.0), torch.tensor(0.5)), AOLConv2d(1, 8, 3, padding=1),
    ...                     MaxMin(), AOLConv2d(8, 8, 3, stride=2, padding=1), MaxMin(), L2NormPool(), AOLLinear(8, 16))
    >>> L = lipschitz_upper_bound(enc, (1, 8, 8))
    >>> L <= 2.0 * (1 + 1e-5)                              # 1 / 0.5 times layers that are each <= 1
    True

AOL: Prach & Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks", ECCV 2022.
MaxMin / GroupSort: Anil, Lucas & Grosse, "Sorting out Lipschitz function approximation", ICML 2019.
"""

from __future__ import annotations

from .activations import MaxMin
from .conv import AOLConv1d, AOLConv2d, AOLConvNd
from .dense import AOLLinear
from .pooling import L2NormPool
from .residual import ConvexResidual
from .scaling import ModalityScale

__all__ = ["AOLLinear", "AOLConvNd", "AOLConv1d", "AOLConv2d", "MaxMin", "L2NormPool", "ConvexResidual",
           "ModalityScale"]
