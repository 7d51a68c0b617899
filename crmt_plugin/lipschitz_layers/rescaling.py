"""AOL rescaling (Prach & Lampert, ECCV 2022): the diagonal that makes a matrix or a convolution 1-Lipschitz.

For any matrix P, ||P||_2^2 <= max_i sum_j |P^T P|_ij (Schur / Gershgorin on the Gram matrix), and for
W (out, in) with

    d_i = ( sum_j |W^T W|_ij )^(-1/2)

the rescaled ``W diag(d)`` has ||W diag(d)||_2 <= 1. For a convolution the Gram matrix of the *full*
convolution (every output position the kernel touches) has the entries of the kernel's autocorrelation
G[c, c', s] = sum_o sum_t K[o, c, t] K[o, c', t + s], so scaling input channel c by

    d_c = ( sum_{c', s} |G[c, c', s]| )^(-1/2)

makes it 1-Lipschitz; a zero-padded or strided convolution keeps a subset of the full convolution's
rows, so it is 1-Lipschitz too (any dilation: the set of Gram entries is the same).

    >>> import torch
    >>> w = torch.randn(5, 7, dtype=torch.float64)
    >>> bool(torch.linalg.matrix_norm(w * aol_dense_scale(w), ord=2) <= 1 + 1e-12)
    True
    >>> k = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    >>> aol_conv_scale(k).shape                         # one factor per input channel
    torch.Size([3])
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import CRMTError

__all__ = ["aol_dense_scale", "aol_conv_scale", "kernel_autocorrelation", "aol_dense_certificate",
           "aol_conv_certificate"]

_TINY = 1e-12


def aol_dense_scale(weight: Tensor) -> Tensor:
    """d (in,) for ``weight`` (out, in): d_i = (sum_j |W^T W|_ij)^(-1/2); ``weight * d`` is 1-Lipschitz."""
    gram = weight.transpose(0, 1) @ weight
    return gram.abs().sum(dim=1).clamp_min(_TINY).rsqrt()


def kernel_autocorrelation(kernel: Tensor) -> Tensor:
    """G (c_in, c_in, 2k_1 - 1, ...) of a kernel (c_out, c_in, k_1, ...): the Gram entries of the full convolution.

    G[c, c', s] = sum_o sum_t K[o, c, t] K[o, c', t + s] (a cross-correlation of the kernel with itself).
    """
    dims = kernel.dim() - 2
    if dims not in (1, 2, 3):
        raise CRMTError(f"kernel must have 1 to 3 spatial dims (shape (c_out, c_in, k...)), found "
                        f"{tuple(kernel.shape)}")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    k = kernel.transpose(0, 1)                      # (c_in, c_out, k...): c_in "images" of c_out channels
    pad = tuple(s - 1 for s in kernel.shape[2:])
    return conv(k, k, padding=pad)                  # (c_in, c_in, 2k - 1, ...)


def aol_conv_scale(kernel: Tensor) -> Tensor:
    """d (c_in,) for a kernel (c_out, c_in, k...): ``kernel * d[:, None, ...]`` per input channel is 1-Lipschitz
    as a zero-padded convolution of any stride and dilation."""
    gram = kernel_autocorrelation(kernel)
    return gram.abs().flatten(1).sum(dim=1).clamp_min(_TINY).rsqrt()


def aol_dense_certificate(weight: Tensor) -> float:
    """sqrt(max_i sum_j |W^T W|_ij) in float64: an upper bound of ||W||_2 (before rounding margins)."""
    w = weight.detach().double()
    return float((w.transpose(0, 1) @ w).abs().sum(dim=1).max().sqrt())


def aol_conv_certificate(kernel: Tensor) -> float:
    """sqrt(max_c sum_{c', s} |G[c, c', s]|) in float64: an upper bound of the operator norm of the zero-padded
    convolution with this kernel (any stride, dilation, input size), before rounding margins."""
    g = kernel_autocorrelation(kernel.detach().double())
    return float(g.abs().flatten(1).sum(dim=1).max().sqrt())
