"""Sound upper bounds of the l2 Lipschitz constant of encoders, and a penalty to keep them small.

    >>> enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    ...                     nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 14 * 14, 64)).eval()
    >>> L = lipschitz_upper_bound(enc, (1, 28, 28))       # one sample's shape, no batch dim
    >>> # for all x, y of shape (1, 28, 28):  ||enc(x) - enc(y)||_2 <= L * ||x - y||_2
    >>> lip = encoder_bounds(model.encoders, {"audio": (13, 32), "image": (1, 28, 28)})
    >>> lip.sound, lip.source                              # LipschitzConstants, values (M,)
    (True, 'bound')

The bound is a product (and, for residual/branching graphs, a sum) of per-layer bounds, each a
*guaranteed* upper bound of that layer's l2 operator norm / Lipschitz constant on the actual input
shape, computed in float64 and rounded upwards:

=====================  ==========================================================================
layer                  per-layer bound (proof sketch in the function that computes it)
=====================  ==========================================================================
Linear                 ||W||_2 (float64 SVD, + 1e-6 relative)
Conv1d/2d/3d,          operator norm of the convolution *with* its stride, padding (any mode),
ConvTranspose1d/2d/3d  dilation and groups on the given input shape: exact (Gram matrix of the
                       operator + float64 eigensolver) when the smaller side has <= ``dense_max``
                       entries, else the Fourier bound of a circulant embedding (sound, slightly
                       larger). Never the spectral norm of the reshaped kernel.
BatchNorm (eval)       right after a Conv/Linear: folded in (exact norm of the pair diag(s) A, where
                       s = gamma / sqrt(running_var + eps)); alone: max_c |s_c|. Train mode: refused
AvgPool, Adaptive-     exact operator norm of the (per-channel) averaging operator, e.g.
AvgPool                1/sqrt(H W) for global average pooling
MaxPool, Adaptive-     sqrt(max number of pooling windows that contain one input element)
MaxPool                (1 for non-overlapping windows, 2 for 3x3 stride-2 2-D windows)
ReLU, Tanh, ...        sup |f'|: ReLU/Tanh/Softplus/... 1, LeakyReLU max(1, |slope|),
                       GELU 1.1289, SiLU 1.0998, Mish 1.0885, Sigmoid 1/4, Hardswish 3/2,
                       ELU max(1, alpha), SELU 1.7581, Softmax 1
Flatten, Dropout,      1 (Dropout in train mode: 1/(1-p))
Identity
Sequential             product of its layers' bounds (shapes tracked through the layers)
Residual(branch)       L(shortcut) + L(branch), i.e. 1 + L(branch) for x + branch(x)
other modules          traced with torch.fx: x + f(x), cat, flatten/view, slicing, mean, F.relu, ...
                       are understood; anything else is refused with a CRMTError
=====================  ==========================================================================

Anything else raises :class:`~crmt_plugin.errors.CRMTError` naming the layer; declare a bound for it
with :func:`declare_lipschitz` (the certificate is then only as sound as the declaration).
The bound is for the mathematical function computed by the module in exact arithmetic (float32
rounding of the forward pass is not covered) and assumes forward hooks do not change outputs.

To *train* encoders whose bounds are small enough for non-trivial sound radii, add
:class:`LipschitzPenalty` (a differentiable estimate of the same product) to the loss.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CRMTError

__all__ = ["lipschitz_upper_bound", "encoder_bounds", "declare_lipschitz", "Residual", "LipschitzPenalty"]

Shape = Tuple[int, ...]
BoundLike = Union[float, Callable[[nn.Module, Shape], float]]

_U = 2.0 ** -53            # unit roundoff of float64
_REL_MARGIN = 1e-6         # covers the backward error of float64 SVD / eigensolvers (p(n) u << 1e-6)
_INF = float("inf")


# ----------------------------------------------------------------------------------------------
# upward-rounded float arithmetic: every operation on bounds rounds towards +inf
# ----------------------------------------------------------------------------------------------

def _up(x: float) -> float:
    """Smallest float above the round-to-nearest result ``x``: an upper bound of the exact value."""
    return math.nextafter(float(x), _INF) if x != 0.0 else 0.0


def _mul_up(a: float, b: float) -> float:
    if a == 1.0 or b == 1.0:          # exact
        return a * b
    return _up(a * b) if a * b > 0 else 0.0


def _add_up(a: float, b: float) -> float:
    if a == 0.0 or b == 0.0:          # exact
        return a + b
    return _up(a + b)


def _sqrt_up(x: float) -> float:
    return _up(math.sqrt(max(float(x), 0.0)))


def _inflate(value: float, absolute: float = 0.0) -> float:
    """value * (1 + 1e-6) + absolute, rounded up: the safety margin of every computed norm."""
    return _add_up(_mul_up(float(value), 1.0 + _REL_MARGIN), float(absolute))


# ----------------------------------------------------------------------------------------------
# public: Residual, declare_lipschitz
# ----------------------------------------------------------------------------------------------

class Residual(nn.Module):
    """``x -> shortcut(x) + branch(x)`` (``shortcut`` defaults to the identity).

    Example::

        >>> block = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)))
        >>> block(torch.randn(2, 8, 14, 14)).shape                          # (B, 8, 14, 14)
        torch.Size([2, 8, 14, 14])
        >>> lipschitz_upper_bound(block, (8, 14, 14)) <= 1 + lipschitz_upper_bound(block.branch, (8, 14, 14))
        True

    Bound: ``L(shortcut) + L(branch)`` (triangle inequality), i.e. ``1 + L(branch)`` for ``x + branch(x)``.
    Custom modules that compute ``x + f(x)`` in their ``forward`` need not be rewritten: they are
    traced with torch.fx (see :func:`lipschitz_upper_bound`).
    """

    def __init__(self, branch: nn.Module, shortcut: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.branch(x)


_DECLARED_INSTANCES: "weakref.WeakKeyDictionary[nn.Module, BoundLike]" = weakref.WeakKeyDictionary()
_DECLARED_TYPES: Dict[type, BoundLike] = {}


def declare_lipschitz(target: Union[nn.Module, type], bound: Optional[BoundLike]) -> Union[nn.Module, type]:
    """Declare an l2 Lipschitz bound for a module instance or a module type (``None`` removes it).

    Example::

        >>> declare_lipschitz(my_encoder.orthogonal_block, 1.0)       # this instance is 1-Lipschitz
        >>> declare_lipschitz(GroupSort, 1.0)                         # every GroupSort layer
        >>> declare_lipschitz(MyBlock, lambda m, shape: 1 + lipschitz_upper_bound(m.inner, shape))

    ``bound`` is a float >= 0, or a callable ``(module, input_shape) -> float`` evaluated when a
    bound is computed (``input_shape`` is one sample's shape, without the batch dimension).
    An instance declaration wins over a type declaration; a type declaration applies to that exact
    type only (a subclass may compute something else). Declared bounds are trusted as given: a
    bound computed with them is only as sound as the declaration. Returns ``target``.
    """
    if bound is not None and not callable(bound):
        try:
            value = float(bound)
        except (TypeError, ValueError):
            raise CRMTError(
                f"declare_lipschitz: bound must be a float >= 0, a callable (module, input_shape) -> float, "
                f"or None, found {type(bound).__name__}"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise CRMTError(f"declare_lipschitz: bound must be finite and >= 0, found {value}")
        bound = value
    if isinstance(target, nn.Module):
        if bound is None:
            _DECLARED_INSTANCES.pop(target, None)
        else:
            _DECLARED_INSTANCES[target] = bound
    elif isinstance(target, type) and issubclass(target, nn.Module):
        if bound is None:
            _DECLARED_TYPES.pop(target, None)
        else:
            _DECLARED_TYPES[target] = bound
    else:
        raise CRMTError(
            f"declare_lipschitz: target must be an nn.Module instance or an nn.Module subclass, "
            f"found {type(target).__name__}"
        )
    return target


def _declared(module: nn.Module) -> Optional[BoundLike]:
    if module in _DECLARED_INSTANCES:
        return _DECLARED_INSTANCES[module]
    return _DECLARED_TYPES.get(type(module))


# ----------------------------------------------------------------------------------------------
# context and plans (a module compiled for a given input shape)
# ----------------------------------------------------------------------------------------------

@dataclass
class _Ctx:
    dense_max: int = 4096
    conv_method: str = "auto"          # "auto" | "dense" | "fourier"
    penalty: bool = False              # compile for LipschitzPenalty (eval semantics, no refusals for train mode)
    flags: Dict[nn.Module, bool] = field(default_factory=dict)   # training flags before we set eval()
    spec: Tuple[torch.dtype, torch.device] = (torch.float32, torch.device("cpu"))
    per_layer: Optional[Dict[str, float]] = None

    def was_training(self, module: nn.Module) -> bool:
        return self.flags.get(module, module.training)


def _where(path: str, module: nn.Module) -> str:
    return f"'{path or '<root>'}' ({type(module).__name__})"


def _how_to_declare(module: nn.Module) -> str:
    return (
        f"declare a bound with crmt_plugin.bounds.declare_lipschitz(<this module or {type(module).__name__}>, "
        f"bound), where bound is a float or a callable (module, input_shape) -> float"
    )


class _Plan:
    """A module compiled for one input shape. ``bound`` is sound (float); ``estimate`` is differentiable."""

    path = ""

    def bound(self, ctx: _Ctx) -> float:
        raise NotImplementedError

    def estimate(self) -> Union[Tensor, float]:
        raise NotImplementedError


class _Fixed(_Plan):
    """A layer whose bound does not depend on trainable parameters (activations, pooling, ...)."""

    def __init__(self, path: str, compute: Callable[[], float]) -> None:
        self.path, self._compute, self._value = path, compute, None

    def bound(self, ctx: _Ctx) -> float:
        if self._value is None:
            self._value = float(self._compute())
        if ctx.per_layer is not None:
            ctx.per_layer[self.path] = self._value
        return self._value

    def estimate(self) -> float:
        if self._value is None:
            self._value = float(self._compute())
        return self._value


class _Chain(_Plan):
    def __init__(self, path: str, parts: List[_Plan]) -> None:
        self.path, self.parts = path, parts

    def bound(self, ctx: _Ctx) -> float:
        total = 1.0
        for part in self.parts:
            total = _mul_up(total, part.bound(ctx))
        return total

    def estimate(self) -> Union[Tensor, float]:
        total: Union[Tensor, float] = 1.0
        for part in self.parts:
            total = total * part.estimate()
        return total


class _Sum(_Plan):
    def __init__(self, path: str, parts: List[_Plan]) -> None:
        self.path, self.parts = path, parts

    def bound(self, ctx: _Ctx) -> float:
        total = 0.0
        for part in self.parts:
            total = _add_up(total, part.bound(ctx))
        return total

    def estimate(self) -> Union[Tensor, float]:
        total: Union[Tensor, float] = 0.0
        for part in self.parts:
            total = total + part.estimate()
        return total


# ----------------------------------------------------------------------------------------------
# dense operator norms (exact up to a rigorous float64 margin)
# ----------------------------------------------------------------------------------------------

def _adjoint(apply: Callable[[Tensor], Tensor], y: Tensor, in_shape: Shape) -> Tensor:
    """A^T y for a batched linear map ``apply`` (the vector-Jacobian product)."""
    with torch.enable_grad():
        x = torch.zeros((y.shape[0], *in_shape), dtype=y.dtype, device=y.device, requires_grad=True)
        out = apply(x)
        (g,) = torch.autograd.grad(out, x, y)
    return g


def _dense_norm(apply: Callable[[Tensor], Tensor], in_shape: Shape, out_shape: Shape,
                abs_sum: float, dtype: torch.dtype, device: torch.device,
                adjoint: Optional[Callable[[Tensor], Tensor]] = None) -> float:
    """Sound upper bound of ||A||_2 for the linear map ``apply`` (batched, float64), via its Gram matrix.

    With n = min(n_in, n_out) we form B = A^T A (n_in <= n_out) or A A^T column by column
    (B e_i = A^T (A e_i), A^T by ``adjoint`` or autograd), take lambda_max(B) with ``torch.linalg.eigvalsh`` and return
    sqrt(lambda_max + 1e-6 ||B||_2 + err). Soundness:
    * every computed entry of B is a dot product of length <= N = max(n_in, n_out) of entries of A;
      with ``abs_sum`` >= max(||A||_1, ||A||_inf) (max column / row abs sums) the rounding error obeys
      |B^ - B| <= gamma_N |A|^T |A| entrywise (Higham, Accuracy and Stability, Thm 3.5 -- any
      summation order), so ||B^ - B||_2 <= gamma_N abs_sum^2 =: err (we use 4 (N + 2) u abs_sum^2,
      which also covers one rounding in each entry of A itself);
    * eigvalsh is backward stable: its eigenvalues are exact for B^ + E with ||E||_2 <= p(n) u ||B^||_2,
      p a modest polynomial; 1e-6 ||B^||_2 exceeds that for any n this code will see (n <= 1e5);
    * Weyl: lambda_max(B) <= lambda_max(B^) + ||E||_2 + ||B^ - B||_2, and ||A||_2^2 = lambda_max(B).
    """
    if adjoint is None:
        adjoint = lambda y: _adjoint(apply, y, in_shape)  # noqa: E731
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    gram_in = n_in <= n_out
    n = n_in if gram_in else n_out
    big = max(n_in, n_out)
    chunk = max(1, min(n, (1 << 22) // max(big, 1)))
    gram = torch.empty((n, n), dtype=dtype, device=device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        basis = torch.zeros((stop - start, n), dtype=dtype, device=device)
        basis[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = 1.0
        if gram_in:
            cols = adjoint(apply(basis.view(-1, *in_shape)))
        else:
            cols = apply(adjoint(basis.view(-1, *out_shape)))
        gram[start:stop] = cols.reshape(stop - start, n)
    gram = 0.5 * (gram + gram.T)           # symmetrise: one more rounding per entry, within err
    eig = torch.linalg.eigvalsh(gram)
    lam_max, lam_min = float(eig[-1]), float(eig[0])
    norm_b = max(abs(lam_max), abs(lam_min))
    err = _mul_up(_mul_up(4.0 * (big + 2), _U), _mul_up(abs_sum, abs_sum))
    lam = _add_up(_add_up(lam_max, _mul_up(_REL_MARGIN, norm_b)), err)
    return _sqrt_up(lam)


def _matrix_norm(w: Tensor) -> float:
    """Sound upper bound of ||W||_2 for a 2-D float64 matrix: SVD + 1e-6 relative + rounding.

    ``torch.linalg.matrix_norm(ord=2)`` is the largest singular value from a backward-stable SVD:
    exact for W + E with ||E||_2 <= p(m, n) u ||W||_2, far below the 1e-6 relative margin.
    """
    if w.numel() == 0:
        return 0.0
    return _inflate(float(torch.linalg.matrix_norm(w, ord=2)))


# ----------------------------------------------------------------------------------------------
# convolutions
# ----------------------------------------------------------------------------------------------

def _conv_pads(layer: nn.Module, dims: int) -> List[Tuple[int, int]]:
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


def _pad_source(q: int, n: int, mode: str) -> int:
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


def _pad_multiplicity(n: int, pl: int, pr: int, mode: str) -> int:
    """max over input elements of how many padded positions copy it (1 for zero padding)."""
    if mode == "zeros" or (pl == 0 and pr == 0):
        return 1
    counts = [0] * n
    for q in range(-pl, n + pr):
        counts[_pad_source(q, n, mode)] += 1
    return max(counts)


def _embeddings(n: int, l_out: int, k: int, s: int, d: int, pl: int, pr: int, mode: str) -> List[Tuple[int, int]]:
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
    options.append((m, _pad_multiplicity(n, pl, pr, mode)))
    return options


def _fourier_conv_norm(weight: Tensor, groups: int, in_spatial: Shape, out_spatial: Shape, stride: Shape,
                       dilation: Shape, pads: List[Tuple[int, int]], mode: str) -> float:
    """Sound upper bound of the operator norm of a strided, padded, dilated, grouped convolution.

    The circular stride-s convolution on n' = s m points (per dim) is, after the polyphase split
    z_r[u] = z[s u + r] (channels c_in * s) and writing d t = s q_t + r_t, a stride-1 circular
    convolution on m points; the unitary DFT block-diagonalises it, so its norm is exactly
    max_nu ||K(nu)||_2 with K(nu)[o, (c, r)] = sum_{t: r_t = r} w[o, c, t] exp(2 pi i nu q_t / m)
    (and the max over groups, which are diagonal blocks). See :func:`_embeddings` for why the
    actual layer's norm is at most sqrt(mult) times that. Float64 SVD + 1e-6 relative margin, plus
    an absolute margin 8 (k + 4) u sqrt(k) ||W||_F for the rounding in forming K(nu).
    """
    dims = len(in_spatial)
    c_out = weight.shape[0]
    w = weight.reshape(groups, c_out // groups, weight.shape[1], *weight.shape[2:]).to(torch.complex128)
    k = weight.shape[2:]
    k_total = math.prod(k)
    per_dim = [
        _embeddings(in_spatial[i], out_spatial[i], k[i], stride[i], dilation[i], pads[i][0], pads[i][1], mode)
        for i in range(dims)
    ]
    w_fro = float(torch.linalg.vector_norm(weight))
    abs_err = _mul_up(_mul_up(8.0 * (k_total + 4) * _U, math.sqrt(k_total) * (1 + 1e-9)), w_fro)
    best = _INF
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
        bound = _mul_up(_inflate(norm, abs_err), _sqrt_up(mult))
        best = min(best, bound)
    return best


def _bn_scale(layer: nn.Module, gamma: Optional[Tensor]) -> Tensor:
    var = layer.running_var
    scale = 1.0 / torch.sqrt(var.to(gamma.dtype if gamma is not None else torch.float64) + layer.eps)
    return scale if gamma is None else gamma * scale


def _scaled_weight(layer: nn.Module, bn: Optional[nn.Module], float64: bool) -> Tensor:
    """The layer's weight, times BatchNorm's per-output-channel scale gamma / sqrt(var + eps) when
    an eval-mode BatchNorm follows it: BN(conv_W(x)) = conv_{s W}(x) + const, so the pair is one
    linear operator whose exact norm is often far below ||BN|| ||conv||. (float64: detached; the
    few-ulp rounding of s W is covered by the margins of _dense_norm / _fourier_conv_norm / SVD.)"""
    weight = layer.weight.detach().to(torch.float64) if float64 else layer.weight
    if bn is None:
        return weight
    gamma = bn.weight
    if gamma is not None and float64:
        gamma = gamma.detach().to(torch.float64)
    scale = _bn_scale(bn, gamma).to(weight.dtype)
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


class _ConvPlan(_Plan):
    """Conv{1,2,3}d / ConvTranspose{1,2,3}d: the operator norm of the linear part on this input shape."""

    def __init__(self, path: str, layer: nn.Module, in_shape: Shape, out_shape: Shape, transposed: bool) -> None:
        self.path, self.layer, self.in_shape, self.out_shape = path, layer, in_shape, out_shape
        self.transposed = transposed
        self.bn: Optional[nn.Module] = None      # an eval-mode BatchNorm fused after the conv
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

    def bound(self, ctx: _Ctx) -> float:
        layer = self.layer
        weight = _scaled_weight(layer, self.bn, float64=True)
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
            pads = _conv_pads(layer, dims)
            mode = layer.padding_mode
            mult = math.prod(_pad_multiplicity(conv_in[i], *pads[i], mode) for i in range(dims))
            for i in range(dims):   # consistency with the forward pass we ran
                expect = (conv_in[i] + pads[i][0] + pads[i][1] - layer.dilation[i] * (layer.kernel_size[i] - 1)
                          - 1) // layer.stride[i] + 1
                if expect != conv_out[i]:
                    method = "dense"
        if method == "dense":
            with torch.backends.cudnn.flags(enabled=False):   # no FFT/Winograd algorithms: exact entries
                abs_sum = _mul_up(float(weight.abs().sum()) * (1 + 1e-9), float(mult))
                value = _dense_norm(self._apply(weight), self.in_shape, self.out_shape, abs_sum,
                                    torch.float64, weight.device, self._adjoint_fn(weight))
        elif method == "fourier":
            value = _fourier_conv_norm(weight, layer.groups, tuple(conv_in), tuple(conv_out), layer.stride,
                                       layer.dilation, pads, mode)
        else:
            raise CRMTError(f"conv_method must be 'auto', 'dense' or 'fourier', found {ctx.conv_method!r}")
        if ctx.per_layer is not None:
            ctx.per_layer[self.path] = value
        return value

    def estimate(self) -> Tensor:
        """||A v|| with v from persistent power iterations (a lower estimate, differentiable in W)."""
        weight = _scaled_weight(self.layer, self.bn, float64=False)
        apply_detached = self._apply(weight.detach())
        adjoint = self._adjoint_fn(weight.detach())
        with torch.no_grad():
            if self._v is None or self._v.dtype != weight.dtype or self._v.device != weight.device:
                gen = torch.Generator().manual_seed(0)
                v = torch.randn((1, *self.in_shape), generator=gen, dtype=torch.float64)
                self._v = (v / v.norm()).to(weight.dtype).to(weight.device)
                self._iterate(apply_detached, adjoint, 20)
            self._iterate(apply_detached, adjoint, self._n_iter)
        return torch.linalg.vector_norm(self._apply(weight)(self._v))

    _n_iter = 1

    def _iterate(self, apply: Callable[[Tensor], Tensor], adjoint: Optional[Callable[[Tensor], Tensor]],
                 n: int) -> None:
        for _ in range(n):
            y = apply(self._v)
            v = adjoint(y) if adjoint is not None else _adjoint(apply, y, self.in_shape)
            norm = v.norm()
            if norm > 0:
                self._v = (v / norm).detach()


# ----------------------------------------------------------------------------------------------
# other parametrised layers
# ----------------------------------------------------------------------------------------------

class _LinearPlan(_Plan):
    """nn.Linear on (*, in): the map is I kron W, whose norm is ||W||_2 (bias does not matter)."""

    def __init__(self, path: str, layer: nn.Linear) -> None:
        self.path, self.layer = path, layer
        self.bn: Optional[nn.Module] = None      # an eval-mode BatchNorm1d fused after the layer
        self._v: Optional[Tensor] = None
        self._n_iter = 1

    def bound(self, ctx: _Ctx) -> float:
        value = _matrix_norm(_scaled_weight(self.layer, self.bn, float64=True))
        if ctx.per_layer is not None:
            ctx.per_layer[self.path] = value
        return value

    def estimate(self) -> Tensor:
        w = _scaled_weight(self.layer, self.bn, float64=False)
        with torch.no_grad():
            wd = w.detach()
            if self._v is None or self._v.dtype != w.dtype or self._v.device != w.device:
                gen = torch.Generator().manual_seed(0)
                v = torch.randn(w.shape[1], generator=gen, dtype=torch.float64)
                self._v = (v / v.norm()).to(w.dtype).to(w.device)
                n = 20
            else:
                n = self._n_iter
            for _ in range(n):
                v = wd.T @ (wd @ self._v)
                if v.norm() > 0:
                    self._v = v / v.norm()
        return torch.linalg.vector_norm(w @ self._v)


class _BatchNormPlan(_Plan):
    """BatchNorm in eval mode: y = gamma (x - mu) / sqrt(var + eps) + beta per channel, a diagonal
    linear map plus a constant: L = max_c |gamma_c| / sqrt(running_var_c + eps)."""

    def __init__(self, path: str, layer: nn.Module) -> None:
        self.path, self.layer = path, layer

    def bound(self, ctx: _Ctx) -> float:
        layer = self.layer
        gamma = layer.weight.detach().to(torch.float64) if layer.weight is not None else None
        scale = _bn_scale(layer, gamma).abs()
        value = _inflate(float(scale.max()) if scale.numel() else 0.0)   # sqrt/div: a few ulps << 1e-6
        if ctx.per_layer is not None:
            ctx.per_layer[self.path] = value
        return value

    def estimate(self) -> Union[Tensor, float]:
        layer = self.layer
        scale = _bn_scale(layer, layer.weight)
        return scale.abs().max()


class _PReLUPlan(_Plan):
    def __init__(self, path: str, layer: nn.PReLU) -> None:
        self.path, self.layer = path, layer

    def bound(self, ctx: _Ctx) -> float:
        value = max(1.0, float(self.layer.weight.detach().abs().max()))
        if ctx.per_layer is not None:
            ctx.per_layer[self.path] = value
        return value

    def estimate(self) -> Union[Tensor, float]:
        return torch.clamp(self.layer.weight.abs().max(), min=1.0)


# ----------------------------------------------------------------------------------------------
# activations: sup |f'| (elementwise f with |f'| <= c is c-Lipschitz in l2)
# ----------------------------------------------------------------------------------------------

def _gelu_erf() -> float:
    """GELU f = x Phi(x): f' = Phi + x phi, f'' = phi (2 - x^2), so sup |f'| = f'(sqrt 2)
    = (1 + erf(1)) / 2 + 1 / (e sqrt(pi)) = 1.12890...  (f'(-sqrt 2) = -0.1289; f' -> 0, 1 at -inf, inf)."""
    return _inflate(0.5 * (1.0 + math.erf(1.0)) + math.exp(-1.0) / math.sqrt(math.pi))


def _silu() -> float:
    """SiLU f = x sigma(x): f' = sigma (1 + x (1 - sigma)), f'' = sigma (1 - sigma) (2 + x (1 - 2 sigma)),
    zero where x tanh(x / 2) = 2, i.e. x* = +-2.3994; sup |f'| = f'(x*) = 1.09984... (f'(-x*) = -0.0998)."""
    lo, hi = 2.0, 3.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid * math.tanh(mid / 2) < 2.0:
            lo = mid
        else:
            hi = mid
    x = 0.5 * (lo + hi)
    sig = 1.0 / (1.0 + math.exp(-x))
    return _inflate(sig * (1 + x * (1 - sig)))


_GRID_CACHE: Dict[str, float] = {}


def _grid_sup_derivative(name: str, fn: Callable[[Tensor], Tensor]) -> float:
    """sup |f'| for a smooth activation without a closed form (GELU-tanh, Mish), numerically.

    On each cell [x_i, x_i + h] of a grid of [-20, 20] (h = 1e-4), |f'| peaks at an end point or at
    an interior x* with f''(x*) = 0, where Taylor gives |f'(x*)| <= |f'(x_i)| + h^2 / 8 sup |f'''|.
    We take sup |f'''| <= 2 max_grid |f'''| + 1 (a generous allowance: f''' of these functions is
    smooth and below 1) and add the usual 1e-6 relative margin. Beyond +-20 these functions are x
    or 0 up to ~e^-20, so |f'| < 1.0001 there, below the sup (> 1.08) found inside.
    """
    if name not in _GRID_CACHE:
        h = 1e-4
        x = torch.arange(-20.0, 20.0 + h, h, dtype=torch.float64).requires_grad_(True)
        with torch.enable_grad():
            (d1,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
            (d2,) = torch.autograd.grad(d1.sum(), x, create_graph=True)
            (d3,) = torch.autograd.grad(d2.sum(), x)
        m1, m3 = float(d1.detach().abs().max()), float(d3.abs().max())
        _GRID_CACHE[name] = _inflate(m1, h * h / 8 * (2 * m3 + 1))
    return _GRID_CACHE[name]


_SELU = 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717


def _activation_bound(layer: nn.Module, where: str, t: Optional[type] = None) -> Optional[float]:
    """sup |f'| of an elementwise activation module (``t``: the class whose forward it runs)."""
    t = type(layer) if t is None else t
    if t in (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity):
        return 1.0
    if t is nn.Hardtanh:
        return 1.0
    if t is nn.Softplus:       # sigma(beta x) <= 1 (torch's switch to x above `threshold` is an e^-threshold jump)
        return 1.0
    if t is nn.Softshrink:
        return 1.0
    if t is nn.LeakyReLU:
        return max(1.0, abs(float(layer.negative_slope)))
    if t is nn.ELU:            # f' = alpha e^x on x < 0
        return max(1.0, abs(float(layer.alpha)))
    if t is nn.CELU:           # f' = e^(x / alpha) <= 1 on x < 0 for alpha > 0
        if float(layer.alpha) > 0:
            return 1.0
        raise CRMTError(f"layer {where}: CELU with alpha <= 0 is not supported")
    # constants below get the 1e-6 margin: torch's kernels use float32 constants (1/6 = 0.16666667163)
    if t is nn.SELU:
        return _inflate(_SELU)
    if t is nn.Sigmoid:
        return _inflate(0.25)
    if t is nn.Hardsigmoid:
        return _inflate(1.0 / 6.0)
    if t is nn.Hardswish:      # x relu6(x + 3) / 6: f' = (2x + 3) / 6 in (-1/2, 3/2) on (-3, 3)
        return _inflate(1.5)
    if t is nn.GELU:
        if layer.approximate == "none":
            return _gelu_erf()
        return _grid_sup_derivative("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"))
    if t is nn.SiLU:
        return _silu()
    if t is nn.Mish:
        return _grid_sup_derivative("mish", F.mish)
    if t in (nn.Softmax, nn.Softmin):
        # J = diag(p) - p p^T is PSD with eigenvalues <= max p <= 1 (Gao & Pavel 2017: 1-Lipschitz)
        return 1.0
    return None


# ----------------------------------------------------------------------------------------------
# pooling
# ----------------------------------------------------------------------------------------------

def _window_counts_max(n: int, l_out: int, k: int, s: int, p: int, d: int) -> int:
    """max over positions of one dim of the number of max-pool windows [j s - p + t d] containing it."""
    counts = [0] * n
    for j in range(l_out):
        for t in range(k):
            i = j * s - p + t * d
            if 0 <= i < n:
                counts[i] += 1
    return max(counts) if counts else 0


def _adaptive_counts_max(n: int, l_out: int) -> int:
    counts = [0] * n
    for j in range(l_out):
        lo, hi = (j * n) // l_out, -(-((j + 1) * n) // l_out)
        for i in range(lo, hi):
            counts[i] += 1
    return max(counts) if counts else 0


def _pool_dims(layer: nn.Module) -> int:
    """Number of pooled (spatial) dims: 1, 2 or 3 from the pooling class (AvgPool2d -> 2)."""
    for cls in type(layer).__mro__:
        if cls.__name__[-2:] in ("1d", "2d", "3d"):
            return int(cls.__name__[-2])
    raise CRMTError(f"unknown pooling layer {type(layer).__name__}")  # pragma: no cover


def _maxpool_bound(layer: nn.Module, in_shape: Shape, out_shape: Shape) -> float:
    """Max pooling: |max_W a - max_W b| <= max_{i in W} |a_i - b_i| <= ||(a - b)_W||_2, and summing the
    squares over windows counts each input n_i times: L <= sqrt(max_i n_i). Windows are products of
    per-dim windows, so max n_i is the product of the per-dim maxima."""
    dims = _pool_dims(layer)
    in_sp, out_sp = in_shape[-dims:], out_shape[-dims:]

    def tup(v: Any) -> Tuple[int, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims

    total = 1
    if isinstance(layer, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        for i in range(dims):
            total *= _adaptive_counts_max(in_sp[i], out_sp[i])
    else:
        k, s = tup(layer.kernel_size), tup(layer.stride if layer.stride is not None else layer.kernel_size)
        p, d = tup(layer.padding), tup(layer.dilation)
        for i in range(dims):
            total *= _window_counts_max(in_sp[i], out_sp[i], k[i], s[i], p[i], d[i])
    return _sqrt_up(total)


def _avgpool_bound(layer: nn.Module, in_shape: Shape, out_shape: Shape, ctx: _Ctx) -> float:
    """Average pooling is the same nonnegative linear map P on every channel: L = ||P||_2, computed
    exactly on one channel (dense Gram matrix) when it has <= ``dense_max`` elements; otherwise
    min(Schur test sqrt(||P||_1 ||P||_inf) -- exact for non-overlapping and global pooling --, and for
    plain AvgPool the Fourier bound of the equivalent depthwise conv with kernel 1 / prod(k))."""
    dims = _pool_dims(layer)
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
    col = _adjoint(apply, torch.ones((1, 1, *sp_out), dtype=dtype, device=device), one_in)   # P^T 1
    n = max(math.prod(sp_in), math.prod(sp_out))
    slack = 1 + 4 * (n + 2) * _U
    r_max, c_max = float(row.max()) * slack, float(col.max()) * slack
    schur = _sqrt_up(_mul_up(r_max, c_max) * slack)
    if min(math.prod(sp_in), math.prod(sp_out)) <= ctx.dense_max:
        exact = _dense_norm(apply, one_in, (1, *sp_out), max(r_max, c_max), dtype, device)
        return min(exact, schur)
    best = schur
    if isinstance(layer, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) and not layer.ceil_mode and \
            getattr(layer, "divisor_override", None) is None:
        def tup(v: Any) -> Tuple[int, ...]:
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
        k, s, p = tup(layer.kernel_size), tup(layer.stride if layer.stride else layer.kernel_size), tup(layer.padding)
        if layer.count_include_pad or all(x == 0 for x in p):
            weight = torch.full((1, 1, *k), 1.0 / math.prod(k), dtype=torch.float64)
            fourier = _fourier_conv_norm(weight, 1, sp_in, sp_out, s, (1,) * dims, [(x, x) for x in p], "zeros")
            best = min(best, _inflate(fourier))   # 1/prod(k) itself carries one rounding
    return best


# ----------------------------------------------------------------------------------------------
# compile a module for an input shape
# ----------------------------------------------------------------------------------------------

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_AVG_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
              nn.AdaptiveAvgPool3d)
_MAX_TYPES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
              nn.AdaptiveMaxPool3d)
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_SHAPE_TYPES = (nn.Flatten, nn.Unflatten, nn.Identity)
_KNOWN_LEAVES = (nn.Linear, nn.PReLU, nn.AlphaDropout, nn.FeatureAlphaDropout, *_BN_TYPES, *_CONV_TYPES,
                 *_CONVT_TYPES, *_AVG_TYPES, *_MAX_TYPES, *_DROPOUT_TYPES, *_SHAPE_TYPES)


def _forward_owner(module: nn.Module) -> type:
    """The class whose ``forward`` the module runs (a subclass overriding forward is a new layer)."""
    for cls in type(module).__mro__:
        if "forward" in cls.__dict__:
            return cls
    return nn.Module


def _is_known_leaf(module: nn.Module) -> bool:
    owner = _forward_owner(module)
    return owner in _KNOWN_LEAVES or _activation_bound_safe(owner)


def _activation_bound_safe(owner: type) -> bool:
    return owner in (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
                     nn.Hardtanh, nn.Softplus, nn.Softshrink, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
                     nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.GELU, nn.SiLU, nn.Mish, nn.Softmax,
                     nn.Softmin)


def _run(module: nn.Module, in_shape: Shape, ctx: _Ctx, where: str) -> Any:
    dtype, device = ctx.spec
    x = torch.zeros((2, *in_shape), dtype=dtype, device=device)
    try:
        with torch.no_grad():
            return module(x)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise CRMTError(
            f"layer {where} failed on an input of shape (B, {', '.join(map(str, in_shape))}) "
            f"(input_shape is one sample's shape, without the batch dimension): {exc}"
        ) from exc


def _out_shape(module: nn.Module, in_shape: Shape, ctx: _Ctx, where: str) -> Shape:
    out = _run(module, in_shape, ctx, where)
    if not isinstance(out, Tensor):
        raise CRMTError(f"layer {where} returns {type(out).__name__}, expected one tensor; {_how_to_declare(module)}")
    if out.dim() == 0 or out.shape[0] != 2:
        raise CRMTError(
            f"layer {where} maps a batch of 2 samples to shape {tuple(out.shape)}: it mixes the batch "
            f"dimension, so it has no per-sample Lipschitz constant"
        )
    return tuple(out.shape[1:])


def _compile(module: nn.Module, in_shape: Shape, path: str, ctx: _Ctx) -> Tuple[_Plan, Shape]:
    where = _where(path, module)
    declared = _declared(module)
    if declared is not None:
        out_shape = _out_shape(module, in_shape, ctx, where)
        if callable(declared):
            try:
                value = float(declared(module, tuple(in_shape)))
            except CRMTError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise CRMTError(f"the bound declared for layer {where} raised: {exc}") from exc
            if not math.isfinite(value) or value < 0:
                raise CRMTError(f"the bound declared for layer {where} returned {value}, expected a float >= 0")
        else:
            value = float(declared)
        return _Fixed(path, lambda: value), out_shape

    if isinstance(module, Residual) and _forward_owner(module) is Residual:
        for part in (module.branch, module.shortcut):
            head = _expansive_inplace_head(part, ctx)
            if head is not None:
                raise CRMTError(
                    f"Residual {where}: {type(head).__name__}(inplace=True) overwrites the block's input, which "
                    f"the other path also uses, with a map whose Lipschitz constant exceeds 1; use inplace=False"
                )
        branch, b_shape = _compile(module.branch, in_shape, _join(path, "branch"), ctx)
        if module.shortcut is None:
            skip, s_shape = _Fixed(_join(path, "shortcut"), lambda: 1.0), tuple(in_shape)
        else:
            skip, s_shape = _compile(module.shortcut, in_shape, _join(path, "shortcut"), ctx)
        if b_shape != s_shape:
            raise CRMTError(
                f"Residual {where}: branch output {b_shape} and shortcut output {s_shape} differ "
                f"(they are added, so they must have the same per-sample shape)"
            )
        return _Sum(path, [skip, branch]), b_shape

    if isinstance(module, nn.Sequential) and _forward_owner(module) is nn.Sequential:
        parts, shape = [], tuple(in_shape)
        children = list(module.named_children())
        i = 0
        while i < len(children):
            name, child = children[i]
            plan, shape = _compile(child, shape, _join(path, name), ctx)
            if i + 1 < len(children) and _fuse_batchnorm(plan, children[i + 1], shape, path, ctx):
                i += 1
            parts.append(plan)
            i += 1
        return _Chain(path, parts), shape

    owner = _forward_owner(module)
    if owner in _KNOWN_LEAVES or _activation_bound_safe(owner):
        return _compile_leaf(module, owner, tuple(in_shape), path, ctx)

    if any(True for _ in module.children()) or owner.__module__.split(".")[0] != "torch":
        return _compile_traced(module, tuple(in_shape), path, ctx)

    raise CRMTError(
        f"cannot bound the Lipschitz constant of layer {where}: no sound bound is known for "
        f"{type(module).__name__}; {_how_to_declare(module)}, or replace the layer"
    )


def _fuse_batchnorm(plan: _Plan, following: Tuple[str, nn.Module], shape: Shape, path: str, ctx: _Ctx) -> bool:
    """Fold an eval-mode BatchNorm that directly follows a Conv/Linear into its plan (see _scaled_weight)."""
    name, bn = following
    if not isinstance(plan, (_ConvPlan, _LinearPlan)) or getattr(plan, "transposed", False) or \
            _forward_owner(bn) not in _BN_TYPES or _declared(bn) is not None or _declared(plan.layer) is not None:
        return False
    if isinstance(plan, _LinearPlan) and len(shape) != 1:
        return False
    if bn.num_features != shape[0]:
        return False
    _compile_leaf(bn, _forward_owner(bn), shape, _join(path, name), ctx)     # the same checks (eval mode, stats)
    plan.bn = bn
    plan.path = f"{plan.path}+{name}"
    return True


def _expansive_inplace_head(module: Optional[nn.Module], ctx: _Ctx) -> Optional[nn.Module]:
    """The in-place layer that runs first on a block's input, if it may enlarge distances (L > 1).

    An in-place layer f overwrites its input; anything else that reads that tensor (a residual skip)
    then sees f(x) instead of x. That keeps every bound sound when L(f) <= 1 (ReLU, Hardtanh, eval
    Dropout), but not otherwise.
    """
    m = module
    while isinstance(m, nn.Sequential) and _forward_owner(m) is nn.Sequential and len(m) > 0:
        m = m[0]
    if m is None or getattr(m, "inplace", False) is not True:
        return None
    owner = _forward_owner(m)
    if owner in _DROPOUT_TYPES and not ctx.was_training(m):
        return None
    if _activation_bound_safe(owner):
        value = _activation_bound(m, "", owner)
        if value is not None and value <= 1.0:
            return None
    return m


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _compile_leaf(module: nn.Module, owner: type, in_shape: Shape, path: str, ctx: _Ctx) -> Tuple[_Plan, Shape]:
    where = _where(path, module)
    if owner in _BN_TYPES or isinstance(module, _BN_TYPES):
        if module.running_var is None or not module.track_running_stats:
            raise CRMTError(
                f"layer {where} has no running statistics (track_running_stats=False): it normalises with "
                f"the batch's statistics even in eval mode, so it has no per-sample Lipschitz constant; "
                f"{_how_to_declare(module)}"
            )
        if ctx.was_training(module) and not ctx.penalty:
            raise CRMTError(
                f"layer {where} is in training mode: it normalises with the batch's statistics, so it has "
                f"no per-sample Lipschitz constant. Call .eval() on the encoder first -- the bound is for "
                f"the eval-mode function (running statistics), the one that is certified"
            )
        return _BatchNormPlan(path, module), _out_shape(module, in_shape, ctx, where)   # (eval: no stats update)
    out_shape = _out_shape(module, in_shape, ctx, where)
    if owner is nn.Linear:
        return _LinearPlan(path, module), out_shape
    if owner in _CONV_TYPES or owner in _CONVT_TYPES:
        return _ConvPlan(path, module, in_shape, out_shape, transposed=owner in _CONVT_TYPES), out_shape
    if owner is nn.PReLU:
        return _PReLUPlan(path, module), out_shape
    if owner in _SHAPE_TYPES:
        return _Fixed(path, lambda: 1.0), out_shape
    if owner in _DROPOUT_TYPES:
        p = float(module.p)
        if ctx.was_training(module) and not ctx.penalty:
            value = 0.0 if p >= 1 else _up(1.0 / (1.0 - p))    # x * mask / (1 - p), for any mask
        else:
            value = 1.0
        return _Fixed(path, lambda: value), out_shape
    if owner in (nn.AlphaDropout, nn.FeatureAlphaDropout):
        if ctx.was_training(module) and not ctx.penalty:
            raise CRMTError(f"layer {where} is in training mode; call .eval() on the encoder first")
        return _Fixed(path, lambda: 1.0), out_shape
    if owner in _AVG_TYPES:
        return _Fixed(path, lambda: _avgpool_bound(module, in_shape, out_shape, ctx)), out_shape
    if owner in _MAX_TYPES:
        if getattr(module, "return_indices", False):
            raise CRMTError(f"layer {where} returns indices; only return_indices=False is supported")
        return _Fixed(path, lambda: _maxpool_bound(module, in_shape, out_shape)), out_shape
    if owner in (nn.Softmax, nn.Softmin):
        dim = module.dim
        if dim is None or dim % (len(in_shape) + 1) == 0:
            raise CRMTError(f"layer {where}: dim={dim} includes the batch dimension; pass an explicit dim >= 1")
    value = _activation_bound(module, where, owner)
    if value is None:  # pragma: no cover - _activation_bound_safe and _activation_bound are kept in sync
        raise CRMTError(f"cannot bound the Lipschitz constant of layer {where}; {_how_to_declare(module)}")
    return _Fixed(path, lambda: value), out_shape


# ----------------------------------------------------------------------------------------------
# torch.fx: modules with a custom forward (x + f(x), cat, view, slicing, F.relu, ...)
# ----------------------------------------------------------------------------------------------

def _fx_rules() -> Dict[Any, Tuple[str, Any]]:
    """call_function / call_method targets we understand: name -> (kind, extra)."""
    acts = {
        F.relu: nn.ReLU, torch.relu: nn.ReLU, F.relu6: nn.ReLU6, torch.tanh: nn.Tanh, F.tanh: nn.Tanh,
        torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, F.silu: nn.SiLU, F.mish: nn.Mish,
        F.hardswish: nn.Hardswish, F.hardsigmoid: nn.Hardsigmoid, F.softsign: nn.Softsign,
        F.logsigmoid: nn.LogSigmoid, F.tanhshrink: nn.Tanhshrink, F.selu: nn.SELU, torch.selu: nn.SELU,
    }
    rules: Dict[Any, Tuple[str, Any]] = {f: ("act", cls) for f, cls in acts.items()}
    rules.update({
        F.leaky_relu: ("act_args", lambda a: nn.LeakyReLU(*a)),
        F.elu: ("act_args", lambda a: nn.ELU(*a[:1])),
        F.celu: ("act_args", lambda a: nn.CELU(*a[:1])),
        F.gelu: ("act_kw", lambda kw: nn.GELU(approximate=kw.get("approximate", "none"))),
        F.softplus: ("act", nn.Softplus), F.hardtanh: ("act", nn.Hardtanh), F.softshrink: ("act", nn.Softshrink),
        F.dropout: ("dropout", None),
        F.adaptive_avg_pool1d: ("pool", nn.AdaptiveAvgPool1d), F.adaptive_avg_pool2d: ("pool", nn.AdaptiveAvgPool2d),
        F.adaptive_max_pool1d: ("pool", nn.AdaptiveMaxPool1d), F.adaptive_max_pool2d: ("pool", nn.AdaptiveMaxPool2d),
        F.avg_pool1d: ("pool", nn.AvgPool1d), F.avg_pool2d: ("pool", nn.AvgPool2d),
        F.max_pool1d: ("pool", nn.MaxPool1d), F.max_pool2d: ("pool", nn.MaxPool2d),
        operator.add: ("sum", None), torch.add: ("sum", None), operator.sub: ("sum", None),
        torch.sub: ("sum", None), operator.iadd: ("sum", None), operator.isub: ("sum", None),
        operator.neg: ("scale1", None), torch.neg: ("scale1", None),
        operator.mul: ("mul", None), torch.mul: ("mul", None), operator.imul: ("mul", None),
        operator.truediv: ("div", None), torch.div: ("div", None), operator.itruediv: ("div", None),
        torch.cat: ("cat", None), torch.concat: ("cat", None), torch.stack: ("cat", None),
        torch.flatten: ("reshape", None), torch.reshape: ("reshape", None), torch.squeeze: ("reshape", None),
        torch.unsqueeze: ("reshape", None), torch.permute: ("permute", None), torch.transpose: ("transpose", None),
        operator.getitem: ("getitem", None), torch.mean: ("mean", None), torch.sum: ("sum_reduce", None),
    })
    methods = {
        "relu": ("act", nn.ReLU), "relu_": ("act", nn.ReLU), "tanh": ("act", nn.Tanh), "sigmoid": ("act", nn.Sigmoid),
        "add": ("sum", None), "add_": ("sum", None), "sub": ("sum", None), "sub_": ("sum", None),
        "neg": ("scale1", None), "mul": ("mul", None), "mul_": ("mul", None), "div": ("div", None),
        "div_": ("div", None), "flatten": ("reshape", None), "view": ("reshape", None), "reshape": ("reshape", None),
        "view_as": ("reshape", None), "reshape_as": ("reshape", None), "squeeze": ("reshape", None),
        "unsqueeze": ("reshape", None), "contiguous": ("reshape", None), "clone": ("reshape", None),
        "detach": ("reshape", None), "permute": ("permute", None), "transpose": ("transpose", None),
        "mean": ("mean", None), "sum": ("sum_reduce", None),
    }
    rules.update({("method", k): v for k, v in methods.items()})
    return rules


_FX_RULES: Optional[Dict[Any, Tuple[str, Any]]] = None
_CONST_METHODS = {"size", "dim", "numel"}               # results that depend on the shape only
_CONST_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


class _AttrScale(_Plan):
    """Elementwise multiplication (or division) by a parameter/buffer c: L = max |c| (or max 1/|c|)."""

    def __init__(self, path: str, owner: nn.Module, target: str, divide: bool) -> None:
        self.path, self.owner, self.target, self.divide = path, owner, target, divide

    def _tensor(self) -> Tensor:
        obj: Any = self.owner
        for part in self.target.split("."):
            obj = getattr(obj, part)
        return obj

    def bound(self, ctx: _Ctx) -> float:
        t = self._tensor().detach().to(torch.float64).abs()
        value = _up(_up(float((1.0 / t).max()) if self.divide else float(t.max())))
        if ctx.per_layer is not None:
            ctx.per_layer[self.path] = value
        return value

    def estimate(self) -> Tensor:
        t = self._tensor().abs()
        return (1.0 / t).max() if self.divide else t.max()


class _GraphPlan(_Plan):
    """Lipschitz propagation over a traced graph: L(input) = 1, L(f(u)) = L_f L(u),
    L(u + v) = L(u) + L(v), L(cat(u, v)) = sqrt(L(u)^2 + L(v)^2), constants 0."""

    def __init__(self, path: str, ops: List[Tuple[str, Any, List[int]]], result: int) -> None:
        self.path, self.ops, self.result = path, ops, result

    def _run(self, fn_scale: Callable, fn_sum: Callable, fn_l2: Callable, one: Any) -> Any:
        values: List[Any] = []
        for kind, payload, inputs in self.ops:
            if kind == "input":
                values.append(one)
            elif kind == "const":
                values.append(0.0)
            elif kind == "scale":
                values.append(fn_scale(payload, values[inputs[0]]))
            elif kind == "sum":
                values.append(fn_sum([values[i] for i in inputs]))
            else:
                values.append(fn_l2([values[i] for i in inputs]))
        return values[self.result]

    def bound(self, ctx: _Ctx) -> float:
        def scale(payload: Any, v: float) -> float:
            factor = payload if isinstance(payload, float) else payload.bound(ctx)
            return _mul_up(factor, v)

        def total(vs: List[float]) -> float:
            out = 0.0
            for v in vs:
                out = _add_up(out, v)
            return out

        def l2(vs: List[float]) -> float:
            out = 0.0
            for v in vs:
                out = _add_up(out, _mul_up(v, v))
            return _sqrt_up(out)

        return self._run(scale, total, l2, 1.0)

    def estimate(self) -> Union[Tensor, float]:
        def scale(payload: Any, v: Any) -> Any:
            return v * (payload if isinstance(payload, float) else payload.estimate())

        def l2(vs: List[Any]) -> Any:
            squares = sum(v * v for v in vs)
            return torch.sqrt(squares) if isinstance(squares, Tensor) else math.sqrt(squares)

        return self._run(scale, lambda vs: sum(vs), l2, 1.0)


def _compile_traced(module: nn.Module, in_shape: Shape, path: str, ctx: _Ctx) -> Tuple[_Plan, Shape]:
    import torch.fx as fx

    global _FX_RULES
    if _FX_RULES is None:
        _FX_RULES = _fx_rules()
    where = _where(path, module)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if _declared(m) is not None or isinstance(m, (Residual, nn.Sequential)):
                return True
            return super().is_leaf_module(m, qualname) or _is_known_leaf(m)

    try:
        graph = Tracer().trace(module)
        gm = fx.GraphModule(module, graph)
    except Exception as exc:  # noqa: BLE001
        raise CRMTError(
            f"cannot bound the Lipschitz constant of layer {where}: it is not an nn.Sequential or a known "
            f"layer, and tracing its forward with torch.fx failed ({type(exc).__name__}: {exc}); "
            f"{_how_to_declare(module)}, or rewrite it with nn.Sequential / crmt_plugin.bounds.Residual"
        ) from exc

    values: Dict[Any, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            values[n] = out
            return out

    dtype, device = ctx.spec
    try:
        with torch.no_grad():
            Recorder(gm).run(torch.zeros((2, *in_shape), dtype=dtype, device=device))
    except Exception as exc:  # noqa: BLE001
        raise CRMTError(
            f"layer {where} failed on an input of shape (B, {', '.join(map(str, in_shape))}) "
            f"(input_shape is one sample's shape, without the batch dimension): {exc}"
        ) from exc

    index: Dict[Any, int] = {}
    variable: Dict[Any, bool] = {}
    ops: List[Tuple[str, Any, List[int]]] = []
    placeholders = 0
    result: Optional[int] = None
    module_plans: Dict[Any, _Plan] = {}

    def describe(node: Any) -> str:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        args = list(node.args[1:] if node.op == "call_method" else node.args)
        args = ", ".join([str(a) for a in args] + [f"{k}={v}" for k, v in node.kwargs.items()])
        call = f"{node.args[0]}.{target}" if node.op == "call_method" and node.args else target
        return f"`{node.name} = {call}({args})`"

    def refuse(node: Any, why: str) -> CRMTError:
        return CRMTError(
            f"cannot bound the Lipschitz constant of layer {where}: the operation {describe(node)} "
            f"in its forward {why}; {_how_to_declare(module)}"
        )

    def var_args(node: Any) -> List[Any]:
        found: List[Any] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if variable.get(a) else None)
        return found

    def batch_ok(node: Any) -> None:
        v = values.get(node)
        if not isinstance(v, Tensor):
            raise refuse(node, "produces a non-tensor value from the input")
        if v.dim() == 0 or v.shape[0] != 2:
            raise refuse(node, f"maps a batch of 2 samples to shape {tuple(v.shape)} (it mixes the batch dimension)")

    def shape_of(node: Any) -> Tuple[int, ...]:
        return tuple(values[node].shape)

    def emit(node: Any, kind: str, payload: Any, inputs: List[Any]) -> None:
        index[node] = len(ops)
        ops.append((kind, payload, [index[i] for i in inputs]))

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
            if placeholders == 1:
                variable[node] = True
                emit(node, "input", None, [])
            elif node.args:        # optional argument with a default: a constant
                variable[node] = False
                emit(node, "const", None, [])
            else:
                raise refuse(node, "is a second required input (encoders take one tensor)")
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or not variable.get(out):
                raise refuse(node, "does not return one tensor computed from the input")
            result = index[out]
            continue
        vargs = var_args(node)
        if not vargs or node.op == "get_attr" or (node.op == "call_method" and node.target in _CONST_METHODS) \
                or (node.op == "call_function" and node.target is getattr and len(node.args) > 1
                    and node.args[1] in _CONST_ATTRS):
            variable[node] = False
            emit(node, "const", None, [])
            continue
        variable[node] = True
        batch_ok(node)
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            first = node.args[0] if node.args else None
            if len(vargs) != 1 or first is not vargs[0] or len(node.args) != 1 or node.kwargs:
                raise refuse(node, "calls a submodule with more than one input")
            head = _expansive_inplace_head(sub, ctx)
            if head is not None and len(first.users) > 1:
                raise refuse(node, f"overwrites a tensor that is used elsewhere with {type(head).__name__}"
                                   f"(inplace=True), whose Lipschitz constant exceeds 1 (use inplace=False)")
            producer = module_plans.get(first)
            if producer is not None and len(first.users) == 1 and \
                    _fuse_batchnorm(producer, (node.target, sub), shape_of(first)[1:], path, ctx):
                emit(node, "scale", 1.0, [first])          # folded into the conv/linear before it
                continue
            plan, _ = _compile(sub, shape_of(first)[1:], _join(path, node.target), ctx)
            module_plans[node] = plan
            emit(node, "scale", plan, [first])
            continue
        key = node.target if node.op == "call_function" else ("method", node.target)
        rule = _FX_RULES.get(key) if isinstance(key, tuple) or callable(key) else None
        if rule is None:
            raise refuse(node, "is not one whose Lipschitz constant is known")
        kind, extra = rule
        args, kwargs = list(node.args), dict(node.kwargs)
        x = args[0] if args else None
        out_shape = shape_of(node)
        sub_path = _join(path, node.name)

        def single() -> Any:
            if len(vargs) != 1 or x is not vargs[0]:
                raise refuse(node, "combines several inputs-dependent tensors in a way we cannot bound")
            return x

        inplace = kwargs.get("inplace") is True or (node.op == "call_method" and str(node.target).endswith("_"))
        if inplace and kind not in ("act", "act_args", "act_kw") and x is not None and \
                isinstance(x, fx.Node) and len(x.users) > 1:
            raise refuse(node, "modifies in place a tensor that is used elsewhere")
        if kind in ("act", "act_args", "act_kw"):
            single()
            if kind == "act":
                layer = extra(*args[1:], **{k: v for k, v in kwargs.items() if k != "inplace"})
            elif kind == "act_args":
                layer = extra([a for a in args[1:2]] if len(args) > 1 else
                              [v for k, v in kwargs.items() if k in ("negative_slope", "alpha")])
            else:
                layer = extra(kwargs)
            value = _activation_bound(layer, f"'{sub_path}'")
            if inplace and value > 1.0 and len(x.users) > 1:
                raise refuse(node, "overwrites a tensor that is used elsewhere with a map whose Lipschitz constant "
                                   "exceeds 1 (use inplace=False)")
            emit(node, "scale", float(value), [x])
        elif kind == "dropout":
            single()
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", True)
            # traced in eval mode: `self.training` reads False, so use the module's own flag too
            training = (training is True or ctx.was_training(module)) and not ctx.penalty
            value = (0.0 if p >= 1 else _up(1.0 / (1.0 - p))) if training else 1.0
            emit(node, "scale", value, [x])
        elif kind == "pool":
            single()
            try:
                layer = extra(*args[1:], **kwargs)
            except TypeError as exc:
                raise refuse(node, f"has arguments we could not read ({exc})") from exc
            plan, _ = _compile_leaf(layer, extra, shape_of(x)[1:], sub_path, ctx)
            emit(node, "scale", plan, [x])
        elif kind == "sum":
            if "alpha" in kwargs:
                raise refuse(node, "uses alpha=")
            for v in vargs:
                if shape_of(v) != out_shape:
                    raise refuse(node, f"broadcasts {shape_of(v)} to {out_shape} (copies of an input)")
            emit(node, "sum", None, vargs)
        elif kind == "scale1":
            emit(node, "scale", 1.0, [single()])
        elif kind in ("mul", "div"):
            if len(vargs) != 1:
                raise refuse(node, "multiplies two input-dependent tensors (not Lipschitz in general)")
            other = args[1] if len(args) > 1 else kwargs.get("other")
            if kind == "mul" and x is not vargs[0]:
                x, other = vargs[0], x
            single()
            if shape_of(x) != out_shape:
                raise refuse(node, f"broadcasts {shape_of(x)} to {out_shape} (copies of an input)")
            if isinstance(other, (int, float)) and not isinstance(other, bool):
                if kind == "div" and other == 0:
                    raise refuse(node, "divides by zero")
                emit(node, "scale", _up(abs(1.0 / other if kind == "div" else float(other))), [x])
            elif isinstance(other, fx.Node) and other.op == "get_attr":
                emit(node, "scale", _AttrScale(_join(path, other.target), module, other.target, kind == "div"), [x])
            else:
                raise refuse(node, "multiplies by a value that is not a number or a parameter/buffer")
        elif kind == "cat":
            tensors = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim % len(out_shape) == 0:
                raise refuse(node, "concatenates along the batch dimension")
            for t in tensors:
                if isinstance(t, fx.Node) and variable.get(t) and index.get(t) is None:
                    raise refuse(node, "uses an unknown tensor")
            emit(node, "l2", None, [t for t in tensors if isinstance(t, fx.Node) and variable.get(t)])
        elif kind == "reshape":
            single()
            emit(node, "scale", 1.0, [x])
        elif kind in ("permute", "transpose"):
            single()
            nd = len(shape_of(x))
            dims = list(args[1:]) + [v for k, v in kwargs.items() if k in ("dims", "dim0", "dim1")]
            if dims and isinstance(dims[0], (list, tuple)):
                dims = list(dims[0])
            if kind == "permute" and (not dims or dims[0] % nd != 0):
                raise refuse(node, "moves the batch dimension")
            if kind == "transpose" and any(d % nd == 0 for d in dims):
                raise refuse(node, "moves the batch dimension")
            emit(node, "scale", 1.0, [x])
        elif kind == "getitem":
            single()
            idx = args[1]
            idx = idx if isinstance(idx, tuple) else (idx,)
            if not all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in idx) or \
                    not idx or idx[0] != slice(None, None, None):
                raise refuse(node, "indexes with something other than basic slicing that keeps the batch (x[:, ...])")
            emit(node, "scale", 1.0, [x])
        elif kind in ("mean", "sum_reduce"):
            single()
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is None:
                raise refuse(node, "reduces over all dimensions, batch included")
            dims = dim if isinstance(dim, (list, tuple)) else (dim,)
            nd = len(shape_of(x))
            if any(d % nd == 0 for d in dims):
                raise refuse(node, "reduces over the batch dimension")
            count = math.prod(shape_of(x)[d] for d in dims)
            # mean over groups of n: each output is (1/n) 1^T on its group, norm 1/sqrt(n); sum: sqrt(n)
            value = _up(1.0 / math.sqrt(count)) if kind == "mean" else _sqrt_up(count)
            emit(node, "scale", value, [x])
        else:  # pragma: no cover - table and dispatch are kept in sync
            raise refuse(node, "is not supported")

    if result is None:  # pragma: no cover
        raise CRMTError(f"layer {where}: traced graph has no output")
    out = values[next(n for n in gm.graph.nodes if n.op == "output").args[0]]
    return _GraphPlan(path, ops, result), tuple(out.shape[1:])


# ----------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------

def _check_shape(input_shape: Any, what: str) -> Shape:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise CRMTError(f"{what} must be a tuple of ints (one sample's shape), found {input_shape!r}") from None
    if any(s <= 0 for s in shape):
        raise CRMTError(f"{what} must have positive sizes, found {shape}")
    return shape


def _spec(module: nn.Module) -> Tuple[torch.dtype, torch.device]:
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _compiled(module: nn.Module, shape: Shape, name: str, ctx: _Ctx) -> Tuple[_Plan, Shape]:
    """Compile with every submodule in eval mode (no BatchNorm statistics updates), flags restored."""
    if not isinstance(module, nn.Module):
        raise CRMTError(f"expected an nn.Module, found {type(module).__name__}")
    ctx.flags = {m: m.training for m in module.modules()}
    ctx.spec = _spec(module)
    try:
        module.eval()
        return _compile(module, shape, name, ctx)
    finally:
        for m, flag in ctx.flags.items():
            m.training = flag


def lipschitz_upper_bound(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    dense_max: int = 4096,
    conv_method: str = "auto",
    per_layer: Optional[Dict[str, float]] = None,
    name: str = "",
) -> float:
    """A guaranteed upper bound L of the l2 Lipschitz constant of ``module`` on one sample.

    Example::

        >>> enc = nn.Sequential(nn.Conv1d(13, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 64)).eval()
        >>> layers = {}
        >>> L = lipschitz_upper_bound(enc, (13, 32), per_layer=layers)   # x: (13, 32), no batch dim
        >>> # ||enc(x) - enc(y)||_2 <= L ||x - y||_2   for all x, y;   L = prod(layers.values())
        >>> layers                                                      # path -> per-layer bound
        {'0': 3.1, '1': 1.0, '2': 1.0, '3': 0.17677, '4': 1.0, '5': 1.9}

    Args:
        module: the encoder; BatchNorm layers must be in eval mode (``module.eval()``).
        input_shape: one sample's shape, without the batch dimension, e.g. ``(1, 28, 28)``.
        dense_max: convolutions (and pooling) whose smaller side has at most this many entries get
            their exact operator norm (Gram matrix + float64 eigensolver, ~1-4 s at 4096); larger
            ones a sound Fourier bound (milliseconds, a few % above exact for zero padding).
        conv_method: ``"auto"``, ``"dense"`` (always exact) or ``"fourier"`` (always Fourier).
        per_layer: optional dict, filled with ``{layer path: bound}`` to see which layers dominate.
        name: prefix of the layer paths in messages and ``per_layer`` (e.g. the modality name).

    Returns ``L`` (float, rounded upwards); see the module docstring for the per-layer bounds and
    their proofs. Parameters, buffers and training flags are left as they were.

    Raises:
        CRMTError: a layer without a known bound (declare one with :func:`declare_lipschitz`), a
            BatchNorm in training mode or without running statistics, or a shape that does not fit.
    """
    shape = _check_shape(input_shape, "input_shape")
    if conv_method not in ("auto", "dense", "fourier"):
        raise CRMTError(f"conv_method must be 'auto', 'dense' or 'fourier', found {conv_method!r}")
    ctx = _Ctx(dense_max=int(dense_max), conv_method=conv_method, per_layer=per_layer)
    plan, _ = _compiled(module, shape, name, ctx)
    flags = ctx.flags
    try:
        module.eval()     # pooling bounds run the layers again
        return float(plan.bound(ctx))
    finally:
        for m, flag in flags.items():
            m.training = flag


def encoder_bounds(
    encoders: Mapping[str, nn.Module],
    input_shapes: Mapping[str, Sequence[int]],
    **kwargs: Any,
):
    """Sound per-modality encoder bounds L^(m) as :class:`~crmt_plugin.lipschitz.LipschitzConstants`.

    Example::

        >>> lip = encoder_bounds(model.encoders, {"audio": (13, 32), "image": (1, 28, 28)})
        >>> lip.values.shape, lip.sound, lip.source      # values (M,) float64, in ``encoders`` order
        (torch.Size([2]), True, 'bound')
        >>> shapes = {k: v.shape[1:] for k, v in batch_inputs.items()}      # from a batch

    ``encoders`` maps modality name -> encoder phi^(m) (an ``nn.ModuleDict`` works);
    ``input_shapes`` maps the same names to one sample's shape. ``kwargs`` go to
    :func:`lipschitz_upper_bound` (``dense_max``, ``conv_method``).
    """
    from .lipschitz import LipschitzConstants    # lazy: the core module imports nothing from here

    names = tuple(encoders.keys())
    if set(names) != set(input_shapes.keys()):
        raise CRMTError(
            f"encoder_bounds: encoders and input_shapes must name the same modalities, found "
            f"{sorted(names)} and {sorted(input_shapes.keys())}"
        )
    if "per_layer" in kwargs or "name" in kwargs:
        raise CRMTError("encoder_bounds: per_layer and name are per-encoder; call lipschitz_upper_bound")
    values = [lipschitz_upper_bound(encoders[n], input_shapes[n], name=n, **kwargs) for n in names]
    return LipschitzConstants(torch.tensor(values, dtype=torch.float64), names, sound=True, source="bound")


class LipschitzPenalty:
    """Differentiable estimate of the encoder's Lipschitz bound, to train encoders with small bounds.

    Example::

        >>> penalty = LipschitzPenalty(model.encoders["image"], (1, 28, 28))
        >>> loss = crmt_loss(out, y) + 1e-2 * penalty().log()     # penalty(): 0-dim tensor
        >>> loss.backward()                                       # gradients reach the weights
        >>> lipschitz_upper_bound(model.encoders["image"].eval(), (1, 28, 28))   # the sound value

    ``penalty()`` is the same product/sum of per-layer norms as :func:`lipschitz_upper_bound`, with
    each Linear/Conv norm estimated as ||A v|| where v comes from ``n_power_iterations`` power
    iterations per call, warm-started from the previous call (like
    ``torch.nn.utils.parametrizations.spectral_norm``) -- a lower estimate of the exact norm that
    converges as training proceeds; BatchNorm uses |gamma| / sqrt(running_var + eps). It is a
    regulariser, not a certificate: compute the sound bound with :func:`lipschitz_upper_bound`.
    Eval-mode semantics are used throughout (Dropout counts 1, BatchNorm may be in training mode),
    and layers without trainable norms (activations, pooling, declared bounds) are constants.
    The layer structure is analysed once, at construction: build a new penalty if you replace layers.
    """

    def __init__(self, module: nn.Module, input_shape: Sequence[int], *, n_power_iterations: int = 1) -> None:
        shape = _check_shape(input_shape, "input_shape")
        if int(n_power_iterations) < 1:
            raise CRMTError(f"n_power_iterations must be >= 1, found {n_power_iterations}")
        self.module = module
        self.input_shape = shape
        ctx = _Ctx(penalty=True)
        self._plan, _ = _compiled(module, shape, "", ctx)
        for plan in _walk(self._plan):
            if isinstance(plan, (_ConvPlan, _LinearPlan)):
                plan._n_iter = int(n_power_iterations)
        flags = ctx.flags
        try:
            module.eval()
            self._plan.estimate()          # constants (pooling) and warm-up power iterations, in eval mode
        finally:
            for m, flag in flags.items():
                m.training = flag

    def __call__(self) -> Tensor:
        value = self._plan.estimate()
        if not isinstance(value, Tensor):
            dtype, device = _spec(self.module)
            value = torch.tensor(float(value), dtype=dtype, device=device)
        return value

    def __repr__(self) -> str:
        return f"LipschitzPenalty({type(self.module).__name__}, input_shape={self.input_shape})"


def _walk(plan: _Plan):
    yield plan
    if isinstance(plan, (_Chain, _Sum)):
        for part in plan.parts:
            yield from _walk(part)
    elif isinstance(plan, _GraphPlan):
        for _, payload, _ in plan.ops:
            if isinstance(payload, _Plan):
                yield from _walk(payload)
