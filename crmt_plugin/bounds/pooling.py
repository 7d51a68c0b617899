"""Pooling: average pooling is a linear map (its exact norm), max pooling sqrt(max windows per element).

* AvgPool*, AdaptiveAvgPool*: the same nonnegative linear map P acts on every channel, L = ||P||_2 (e.g.
  1/sqrt(H W) for global average pooling; overlapping windows are not <= 1/k in general).
* MaxPool*, AdaptiveMaxPool*: sqrt(max number of pooling windows that contain one input element)
  (1 for non-overlapping windows, 2 for 3x3 stride-2 2-D windows); tight.

    >>> from torch import nn
    >>> from crmt_plugin.bounds import lipschitz_upper_bound
    >>> round(lipschitz_upper_bound(nn.AdaptiveAvgPool2d(1), (8, 4, 5)), 6) == round(1 / 20 ** 0.5, 6)
    True
    >>> round(lipschitz_upper_bound(nn.MaxPool2d(3, stride=2, padding=1), (1, 9, 9)), 12)    # sqrt(4)
    2.0

``F.avg_pool2d(x, 2)``, ``F.adaptive_max_pool1d(x, 1)``, ... in a traced forward are mapped to these layers.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CRMTError
from .conv import fourier_conv_norm
from .dense import adjoint, dense_norm
from .plan import Context, Fixed, Plan, Shape
from .registry import LayerSite, functional_layer, lipschitz_rule
from .rounding import UNIT_ROUNDOFF, inflate, mul_up, sqrt_up

__all__ = ["AVG_POOL_TYPES", "MAX_POOL_TYPES", "maxpool_bound", "avgpool_bound", "pool_dims"]

AVG_POOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                  nn.AdaptiveAvgPool3d)
MAX_POOL_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                  nn.AdaptiveMaxPool3d)



def window_counts_max(n: int, l_out: int, k: int, s: int, p: int, d: int) -> int:
    """max over positions of one dim of the number of max-pool windows [j s - p + t d] containing it."""
    counts = [0] * n
    for j in range(l_out):
        for t in range(k):
            i = j * s - p + t * d
            if 0 <= i < n:
                counts[i] += 1
    return max(counts) if counts else 0


def adaptive_counts_max(n: int, l_out: int) -> int:
    counts = [0] * n
    for j in range(l_out):
        lo, hi = (j * n) // l_out, -(-((j + 1) * n) // l_out)
        for i in range(lo, hi):
            counts[i] += 1
    return max(counts) if counts else 0


def pool_dims(layer: nn.Module) -> int:
    """Number of pooled (spatial) dims: 1, 2 or 3 from the pooling class (AvgPool2d -> 2)."""
    for cls in type(layer).__mro__:
        if cls.__name__[-2:] in ("1d", "2d", "3d"):
            return int(cls.__name__[-2])
    raise CRMTError(f"unknown pooling layer {type(layer).__name__}")  # pragma: no cover


def maxpool_bound(layer: nn.Module, in_shape: Shape, out_shape: Shape) -> float:
    """Max pooling: |max_W a - max_W b| <= max_{i in W} |a_i - b_i| <= ||(a - b)_W||_2, and summing the
    squares over windows counts each input n_i times: L <= sqrt(max_i n_i). Windows are products of
    per-dim windows, so max n_i is the product of the per-dim maxima."""
    dims = pool_dims(layer)
    in_sp, out_sp = in_shape[-dims:], out_shape[-dims:]

    def tup(v: Any) -> Tuple[int, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims

    total = 1
    if isinstance(layer, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        for i in range(dims):
            total *= adaptive_counts_max(in_sp[i], out_sp[i])
    else:
        k, s = tup(layer.kernel_size), tup(layer.stride if layer.stride is not None else layer.kernel_size)
        p, d = tup(layer.padding), tup(layer.dilation)
        for i in range(dims):
            total *= window_counts_max(in_sp[i], out_sp[i], k[i], s[i], p[i], d[i])
    return sqrt_up(total)


def avgpool_bound(layer: nn.Module, in_shape: Shape, out_shape: Shape, ctx: Context) -> float:
    """Average pooling is the same nonnegative linear map P on every channel: L = ||P||_2, computed
    exactly on one channel (dense Gram matrix) when it has <= ``dense_max`` elements; otherwise
    min(Schur test sqrt(||P||_1 ||P||_inf) -- exact for non-overlapping and global pooling --, and for
    plain AvgPool the Fourier bound of the equivalent depthwise conv with kernel 1 / prod(k))."""
    dims = pool_dims(layer)
    sp_in, sp_out = tuple(in_shape[-dims:]), tuple(out_shape[-dims:])
    one_in = (1, *sp_in)
    lead = in_shape[:-dims]

    def apply(x: Tensor) -> Tensor:
        b = x.shape[0]
        y = layer(x.reshape(b, *([1] * len(lead)), *sp_in))
        return y.reshape(b, 1, *sp_out)

    dtype, device = torch.float64, ctx.spec[1]
    with torch.no_grad():
        ones_in = torch.ones((1, *one_in), dtype=dtype, device=device)
        row = apply(ones_in)                                 # P 1: row sums
    col = adjoint(apply, torch.ones((1, 1, *sp_out), dtype=dtype, device=device), one_in)   # P^T 1
    n = max(math.prod(sp_in), math.prod(sp_out))
    slack = 1 + 4 * (n + 2) * UNIT_ROUNDOFF
    r_max, c_max = float(row.max()) * slack, float(col.max()) * slack
    schur = sqrt_up(mul_up(r_max, c_max) * slack)
    if min(math.prod(sp_in), math.prod(sp_out)) <= ctx.dense_max:
        exact = dense_norm(apply, one_in, (1, *sp_out), max(r_max, c_max), dtype, device)
        return min(exact, schur)
    best = schur
    if isinstance(layer, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) and not layer.ceil_mode and \
            getattr(layer, "divisor_override", None) is None:
        def tup(v: Any) -> Tuple[int, ...]:
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
        k, s, p = tup(layer.kernel_size), tup(layer.stride if layer.stride else layer.kernel_size), tup(layer.padding)
        if layer.count_include_pad or all(x == 0 for x in p):
            weight = torch.full((1, 1, *k), 1.0 / math.prod(k), dtype=torch.float64)
            fourier = fourier_conv_norm(weight, 1, sp_in, sp_out, s, (1,) * dims, [(x, x) for x in p], "zeros")
            best = min(best, inflate(fourier))   # 1/prod(k) itself carries one rounding
    return best


@lipschitz_rule(*AVG_POOL_TYPES)
def avgpool_rule(layer: nn.Module, site: LayerSite) -> Plan:
    in_shape, out_shape, ctx = site.in_shape, site.out_shape, site.ctx
    return Fixed(site.path, lambda: avgpool_bound(layer, in_shape, out_shape, ctx))     # computed with the bound


@lipschitz_rule(*MAX_POOL_TYPES)
def maxpool_rule(layer: nn.Module, site: LayerSite) -> Plan:
    if getattr(layer, "return_indices", False):
        raise site.refuse("returns indices; only return_indices=False is supported")
    in_shape, out_shape = site.in_shape, site.out_shape
    return Fixed(site.path, lambda: maxpool_bound(layer, in_shape, out_shape))


def _pool_factory(cls: type):
    def factory(args: list, kwargs: dict, training: bool) -> nn.Module:
        return cls(*args, **kwargs)
    factory.__name__ = f"{cls.__name__}_from_function"
    return factory


for _cls, _function in [
    (nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d), (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d),
    (nn.AdaptiveMaxPool1d, F.adaptive_max_pool1d), (nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d),
    (nn.AvgPool1d, F.avg_pool1d), (nn.AvgPool2d, F.avg_pool2d), (nn.MaxPool1d, F.max_pool1d),
    (nn.MaxPool2d, F.max_pool2d),
]:
    functional_layer(_function)(_pool_factory(_cls))
del _cls, _function
