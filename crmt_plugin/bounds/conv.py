"""Convolutions: the operator norm of Conv{1,2,3}d / ConvTranspose{1,2,3}d *on the given input shape*.

With its stride, padding (any mode), dilation and groups: exact (Gram matrix of the operator + float64
eigensolver, :func:`~crmt_plugin.bounds.dense.dense_norm`) when the smaller side has <= ``dense_max``
entries, else the Fourier bound of a circulant embedding (:func:`fourier_conv_norm`: sound, slightly
larger). Never the spectral norm of the reshaped kernel, which under-estimates it.

    >>> import torch
    >>> from torch import nn
    >>> from crmt_plugin.bounds import lipschitz_upper_bound
    >>> conv = nn.Conv1d(1, 1, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = conv.weight.copy_(torch.tensor([[[1.0, 1.0]]]))
    >>> import math
    >>> exact = 2 * math.cos(math.pi / 10)      # ||A|| of the 4 x 5 matrix with rows [.. 1 1 ..]
    >>> exact <= lipschitz_upper_bound(conv, (1, 5)) <= exact * (1 + 1e-5)
    True
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CRMTError
from .dense import adjoint, dense_norm
from .norm import FoldsBatchNorm
from .plan import Context, Shape
from .registry import LayerSite, lipschitz_rule
from .rounding import INF, UNIT_ROUNDOFF, inflate, mul_up, sqrt_up

__all__ = ["CONV_TYPES", "CONV_TRANSPOSE_TYPES", "ConvPlan", "fourier_conv_norm", "conv_pads", "pad_multiplicity",
           "embeddings"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_pads(layer: nn.Module, dims: int) -> List[Tuple[int, int]]:
    """(left, right) padding per spatial dim, exactly as the layer's forward applies it."""
    k, d = layer.kernel_size, layer.dilation
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return [(0, 0)] * dims
        pads = []
        for i in range(dims):
            total = d[i] * (k[i] - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(int(p), int(p)) for p in layer.padding]


def pad_source(q: int, n: int, mode: str) -> int:
    """Index of the input element copied into padded position ``q`` (q in [-pl, n + pr))."""
    if 0 <= q < n:
        return q
    if mode == "reflect":
        return -q if q < 0 else 2 * (n - 1) - q
    if mode == "replicate":
        return min(max(q, 0), n - 1)
    if mode == "circular":
        return q % n
    raise CRMTError(f"unknown padding mode {mode!r}")


def pad_multiplicity(n: int, pl: int, pr: int, mode: str) -> int:
    """max over input elements of how many padded positions copy it (1 for zero padding)."""
    if mode == "zeros" or (pl == 0 and pr == 0):
        return 1
    counts = [0] * n
    for q in range(-pl, n + pr):
        counts[pad_source(q, n, mode)] += 1
    return max(counts)


def embeddings(n: int, l_out: int, k: int, s: int, d: int, pl: int, pr: int, mode: str) -> List[Tuple[int, int]]:
    """Circulant embeddings of one spatial dim of a strided conv: [(m, mult)], any one is sound.

    The conv is y = R C Q x with C the circular stride-s convolution on n' = s m points (an offset is a
    circular shift: orthogonal), Q an index map of x into those points and R a row selection; then
    ||A|| <= ||R|| ||C|| ||Q|| and ``mult`` bounds ||R||^2 ||Q||^2:
    * zeros: Q embeds x at [0, n), R keeps rows [0, l_out). Padded taps at index -pl..-1 wrap to
      [n' - pl, n') and taps at n..n'-1 stay there: both read zeros iff n' >= n + pl and
      n' > s (l_out - 1) + d (k - 1) - pl; rows are distinct iff l_out <= m. mult = 1.
    * circular with s | n: C on n' = n itself (the input is periodic); rows j and j + m coincide,
      so ||R||^2 <= ceil(l_out / m).
    * any mode: Q = pad (a 0/1 matrix, one 1 per padded position: ||Q||^2 = max copies of one input
      element), then a valid conv on n + pl + pr points embedded as above. mult = max copies.
    """
    ext = d * (k - 1)
    if mode == "zeros":
        m = max(l_out, -(-(n + pl) // s), -(-(s * (l_out - 1) + ext - pl + 1) // s))
        return [(m, 1)]
    options = []
    if mode == "circular" and n % s == 0:
        m = n // s
        options.append((m, -(-l_out // m)))
    n_pad = n + pl + pr
    m = max(l_out, -(-n_pad // s))
    options.append((m, pad_multiplicity(n, pl, pr, mode)))
    return options


def fourier_conv_norm(weight: Tensor, groups: int, in_spatial: Shape, out_spatial: Shape, stride: Shape,
                       dilation: Shape, pads: List[Tuple[int, int]], mode: str) -> float:
    """Sound upper bound of the operator norm of a strided, padded, dilated, grouped convolution.

    The circular stride-s convolution on n' = s m points (per dim) is, after the polyphase split
    z_r[u] = z[s u + r] (channels c_in * s) and writing d t = s q_t + r_t, a stride-1 circular
    convolution on m points; the unitary DFT block-diagonalises it, so its norm is exactly
    max_nu ||K(nu)||_2 with K(nu)[o, (c, r)] = sum_{t: r_t = r} w[o, c, t] exp(2 pi i nu q_t / m)
    (and the max over groups, which are diagonal blocks). See :func:`embeddings` for why the
    actual layer's norm is at most sqrt(mult) times that. Float64 SVD + 1e-6 relative margin, plus
    an absolute margin 8 (k + 4) u sqrt(k) ||W||_F for the rounding in forming K(nu).
    """
    dims = len(in_spatial)
    c_out = weight.shape[0]
    w = weight.reshape(groups, c_out // groups, weight.shape[1], *weight.shape[2:]).to(torch.complex128)
    k = weight.shape[2:]
    k_total = math.prod(k)
    per_dim = [
        embeddings(in_spatial[i], out_spatial[i], k[i], stride[i], dilation[i], pads[i][0], pads[i][1], mode)
        for i in range(dims)
    ]
    w_fro = float(torch.linalg.vector_norm(weight))
    abs_err = mul_up(mul_up(8.0 * (k_total + 4) * UNIT_ROUNDOFF, math.sqrt(k_total) * (1 + 1e-9)), w_fro)
    best = INF
    letters = "xyz"
    for choice in itertools.product(*per_dim):
        phases = []
        for i, (m, _) in enumerate(choice):
            s, dl = stride[i], dilation[i]
            taps = torch.arange(k[i], dtype=torch.int64)
            q, r = (dl * taps) // s, (dl * taps) % s
            nu = torch.arange(m, dtype=torch.float64)
            ang = 2 * math.pi * torch.outer(nu, q.to(torch.float64)) / m            # (m, k)
            phase = torch.zeros(m, k[i], s, dtype=torch.complex128)
            phase[:, torch.arange(k[i]), r] = torch.polar(torch.ones_like(ang), ang)
            phases.append(phase.to(weight.device))
        # einsum: w[g, o, c, t1..tD] * phase_i[nu_i, t_i, r_i] -> K[nu_1..nu_D, g, o, c, r_1..r_D]
        taps_l, nus_l, rs_l = "abe"[:dims], letters[:dims], "rsv"[:dims]
        spec = f"goc{taps_l}," + ",".join(f"{nus_l[i]}{taps_l[i]}{rs_l[i]}" for i in range(dims))
        spec += f"->{nus_l}goc{rs_l}"
        first = choice[0][0]
        rest = math.prod(c[0] for c in choice[1:])
        per_row = max(1, rest * w.numel() * math.prod(stride))
        chunk = max(1, min(first, (1 << 22) // per_row))
        norm = 0.0
        for start in range(0, first, chunk):
            ops = [phases[0][start:start + chunk]] + phases[1:]
            kern = torch.einsum(spec, w, *ops)
            kern = kern.reshape(-1, c_out // groups, weight.shape[1] * math.prod(stride))
            norm = max(norm, float(torch.linalg.matrix_norm(kern, ord=2).max()))
        mult = math.prod(c[1] for c in choice)
        bound = mul_up(inflate(norm, abs_err), sqrt_up(mult))
        best = min(best, bound)
    return best



class ConvPlan(FoldsBatchNorm):
    """Conv{1,2,3}d / ConvTranspose{1,2,3}d: the operator norm of the linear part on this input shape."""

    def __init__(self, path: str, layer: nn.Module, in_shape: Shape, out_shape: Shape, transposed: bool) -> None:
        self.path, self.layer, self.in_shape, self.out_shape = path, layer, in_shape, out_shape
        self.transposed = transposed
        self.bn = None                           # an eval-mode BatchNorm folded after the conv (see norm.py)
        self._v: Optional[Tensor] = None

    def _apply(self, weight: Tensor) -> Callable[[Tensor], Tensor]:
        layer = self.layer
        if self.transposed:
            fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[weight.dim() - 2]
            return lambda x: fn(x, weight, None, layer.stride, layer.padding, layer.output_padding,
                                layer.groups, layer.dilation)
        return lambda x: layer._conv_forward(x, weight, None)

    def _adjoint_fn(self, weight: Tensor) -> Optional[Callable[[Tensor], Tensor]]:
        """A^T as an explicit (transposed) convolution when expressible, else None (autograd)."""
        layer, dims = self.layer, weight.dim() - 2
        if self.transposed:
            fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
            return lambda y: fn(y, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return None
        n_in, n_out = self.in_shape[1:], self.out_shape[1:]
        out_pad = []
        for i in range(dims):
            s, p, d, k = layer.stride[i], layer.padding[i], layer.dilation[i], layer.kernel_size[i]
            op = n_in[i] - ((n_out[i] - 1) * s - 2 * p + d * (k - 1) + 1)
            if not 0 <= op < max(s, d):
                return None
            out_pad.append(op)
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
        return lambda y: fn(y, weight, None, layer.stride, layer.padding, tuple(out_pad), layer.groups,
                            layer.dilation)

    def bound(self, ctx: Context) -> float:
        layer = self.layer
        weight = self.weight(float64=True)
        dims = weight.dim() - 2
        n_small = min(math.prod(self.in_shape), math.prod(self.out_shape))
        method = ctx.conv_method
        if method == "auto":
            method = "dense" if n_small <= ctx.dense_max else "fourier"
        if self.transposed:
            # ConvTranspose(y) = A^T y with A the conv of the same weight, stride, padding, dilation and
            # groups on the transpose's *output* shape (output_padding only lengthens that shape): same norm.
            conv_in, conv_out = self.out_shape[1:], self.in_shape[1:]
            pads = [(int(p), int(p)) for p in layer.padding]
            mode = "zeros"
            mult = 1
        else:
            conv_in, conv_out = self.in_shape[1:], self.out_shape[1:]
            pads = conv_pads(layer, dims)
            mode = layer.padding_mode
            mult = math.prod(pad_multiplicity(conv_in[i], *pads[i], mode) for i in range(dims))
            for i in range(dims):   # consistency with the forward pass we ran
                expect = (conv_in[i] + pads[i][0] + pads[i][1] - layer.dilation[i] * (layer.kernel_size[i] - 1)
                          - 1) // layer.stride[i] + 1
                if expect != conv_out[i]:
                    method = "dense"
        if method == "dense":
            with torch.backends.cudnn.flags(enabled=False):   # no FFT/Winograd algorithms: exact entries
                abs_sum = mul_up(float(weight.abs().sum()) * (1 + 1e-9), float(mult))
                value = dense_norm(self._apply(weight), self.in_shape, self.out_shape, abs_sum,
                                    torch.float64, weight.device, self._adjoint_fn(weight))
        elif method == "fourier":
            value = fourier_conv_norm(weight, layer.groups, tuple(conv_in), tuple(conv_out), layer.stride,
                                       layer.dilation, pads, mode)
        else:
            raise CRMTError(f"conv_method must be 'auto', 'dense' or 'fourier', found {ctx.conv_method!r}")
        return ctx.record(self.path, value)

    def estimate(self) -> Tensor:
        """||A v|| with v from persistent power iterations (a lower estimate, differentiable in W)."""
        weight = self.weight(float64=False)
        apply_detached = self._apply(weight.detach())
        adj = self._adjoint_fn(weight.detach())
        with torch.no_grad():
            if self._v is None or self._v.dtype != weight.dtype or self._v.device != weight.device:
                gen = torch.Generator().manual_seed(0)
                v = torch.randn((1, *self.in_shape), generator=gen, dtype=torch.float64)
                self._v = (v / v.norm()).to(weight.dtype).to(weight.device)
                self._iterate(apply_detached, adj, 20)
            self._iterate(apply_detached, adj, self._n_iter)
        return torch.linalg.vector_norm(self._apply(weight)(self._v))

    _n_iter = 1

    def set_power_iterations(self, n: int) -> None:
        self._n_iter = int(n)

    def _iterate(self, apply: Callable[[Tensor], Tensor], adj: Optional[Callable[[Tensor], Tensor]],
                 n: int) -> None:
        for _ in range(n):
            y = apply(self._v)
            v = adj(y) if adj is not None else adjoint(apply, y, self.in_shape)
            norm = v.norm()
            if norm > 0:
                self._v = (v / norm).detach()


    def accepts_batchnorm(self, shape: Shape) -> bool:
        return not self.transposed


@lipschitz_rule(*CONV_TYPES)
def conv_rule(layer: nn.Module, site: LayerSite) -> ConvPlan:
    return ConvPlan(site.path, layer, site.in_shape, site.out_shape, transposed=False)


@lipschitz_rule(*CONV_TRANSPOSE_TYPES)
def conv_transpose_rule(layer: nn.Module, site: LayerSite) -> ConvPlan:
    return ConvPlan(site.path, layer, site.in_shape, site.out_shape, transposed=True)
