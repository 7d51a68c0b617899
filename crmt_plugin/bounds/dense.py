"""Sound upper bounds of operator norms of dense linear maps (exact up to a rigorous float64 margin).

    >>> import torch
    >>> w = torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> 3.0 <= matrix_norm(w) <= 3.0 * (1 + 2e-6)
    True
    >>> 3.0 <= dense_norm(lambda x: x @ w.T, (2,), (2,), abs_sum=3.0) <= 3.0 * (1 + 2e-6)
    True
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .plan import Shape
from .rounding import REL_MARGIN, UNIT_ROUNDOFF, add_up, inflate, mul_up, sqrt_up

__all__ = ["adjoint", "dense_norm", "matrix_norm"]


def adjoint(apply: Callable[[Tensor], Tensor], y: Tensor, in_shape: Shape) -> Tensor:
    """A^T y for a batched linear map ``apply`` (the vector-Jacobian product)."""
    with torch.enable_grad():
        x = torch.zeros((y.shape[0], *in_shape), dtype=y.dtype, device=y.device, requires_grad=True)
        out = apply(x)
        (g,) = torch.autograd.grad(out, x, y)
    return g


def dense_norm(apply: Callable[[Tensor], Tensor], in_shape: Shape, out_shape: Shape, abs_sum: float,
               dtype: torch.dtype = torch.float64, device: Optional[torch.device] = None,
               adjoint_fn: Optional[Callable[[Tensor], Tensor]] = None) -> float:
    """Sound upper bound of ||A||_2 for the linear map ``apply`` (batched, float64), via its Gram matrix.

    With n = min(n_in, n_out) we form B = A^T A (n_in <= n_out) or A A^T column by column
    (B e_i = A^T (A e_i), A^T by ``adjoint_fn`` or autograd), take lambda_max(B) with ``torch.linalg.eigvalsh``
    and return sqrt(lambda_max + 1e-6 ||B||_2 + err). Soundness:

    * every computed entry of B is a dot product of length <= N = max(n_in, n_out) of entries of A;
      with ``abs_sum`` >= max(||A||_1, ||A||_inf) (max column / row abs sums) the rounding error obeys
      |B^ - B| <= gamma_N |A|^T |A| entrywise (Higham, Accuracy and Stability, Thm 3.5 -- any
      summation order), so ||B^ - B||_2 <= gamma_N abs_sum^2 =: err (we use 4 (N + 2) u abs_sum^2,
      which also covers one rounding in each entry of A itself);
    * eigvalsh is backward stable: its eigenvalues are exact for B^ + E with ||E||_2 <= p(n) u ||B^||_2,
      p a modest polynomial; 1e-6 ||B^||_2 exceeds that for any n this code will see (n <= 1e5);
    * Weyl: lambda_max(B) <= lambda_max(B^) + ||E||_2 + ||B^ - B||_2, and ||A||_2^2 = lambda_max(B).
    """
    device = torch.device("cpu") if device is None else device
    if adjoint_fn is None:
        adjoint_fn = lambda y: adjoint(apply, y, in_shape)  # noqa: E731
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
            cols = adjoint_fn(apply(basis.view(-1, *in_shape)))
        else:
            cols = apply(adjoint_fn(basis.view(-1, *out_shape)))
        gram[start:stop] = cols.reshape(stop - start, n)
    gram = 0.5 * (gram + gram.T)           # symmetrise: one more rounding per entry, within err
    eig = torch.linalg.eigvalsh(gram)
    lam_max, lam_min = float(eig[-1]), float(eig[0])
    norm_b = max(abs(lam_max), abs(lam_min))
    err = mul_up(mul_up(4.0 * (big + 2), UNIT_ROUNDOFF), mul_up(abs_sum, abs_sum))
    lam = add_up(add_up(lam_max, mul_up(REL_MARGIN, norm_b)), err)
    return sqrt_up(lam)


def matrix_norm(w: Tensor) -> float:
    """Sound upper bound of ||W||_2 for a 2-D float64 matrix: SVD + 1e-6 relative + rounding.

    ``torch.linalg.matrix_norm(ord=2)`` is the largest singular value from a backward-stable SVD:
    exact for W + E with ||E||_2 <= p(m, n) u ||W||_2, far below the 1e-6 relative margin.
    """
    if w.numel() == 0:
        return 0.0
    return inflate(float(torch.linalg.matrix_norm(w, ord=2)))
