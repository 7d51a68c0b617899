"""Shape layers and the tensor operations of a traced forward: what each contributes to the bound.

=============================================  ================================================================
operation                                      bound (and what is refused)
=============================================  ================================================================
Flatten, Unflatten, Identity; view, reshape,   1 (a permutation of the entries; moving the batch dim is refused)
flatten, squeeze, permute, transpose, x[:, ..]
u + v, u - v                                   L(u) + L(v) (broadcasting an input, i.e. copying it: refused)
-x, c * x, x / c (c a number)                  |c| (1 / |c|)
x * p, x / p (p a parameter / buffer)          max |p| (max 1 / |p|), differentiable in p for the penalty
cat / stack (not on the batch dim)             sqrt(L(u)^2 + L(v)^2)
mean / sum over n non-batch entries            1 / sqrt(n) / sqrt(n)
=============================================  ================================================================

The handlers are called by the fx walk (:class:`~crmt_plugin.bounds.traced.TraceCompiler`) with a
:class:`~crmt_plugin.bounds.traced.TracedCall`. Example (``x.view`` and ``x * 0.5`` of a traced forward):

    >>> import torch
    >>> from torch import nn
    >>> from crmt_plugin.bounds import lipschitz_upper_bound
    >>> class Half(nn.Module):
    ...     def forward(self, x):
    ...         return x.view(x.shape[0], -1) * 0.5
    >>> round(lipschitz_upper_bound(Half(), (2, 3)), 12)
    0.5
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn

from .plan import Context, Plan, join
from .registry import LayerSite, lipschitz_rule, tensor_op
from .rounding import sqrt_up, up

__all__ = ["AttrScale"]


@lipschitz_rule(nn.Flatten, nn.Unflatten, nn.Identity)
def shape_layer_rule(layer: nn.Module, site: LayerSite) -> float:
    return 1.0


class AttrScale(Plan):
    """Elementwise multiplication (or division) by a parameter/buffer c: L = max |c| (or max 1/|c|)."""

    def __init__(self, path: str, owner: nn.Module, target: str, divide: bool) -> None:
        self.path, self.owner, self.target, self.divide = path, owner, target, divide

    def _tensor(self) -> Tensor:
        obj: Any = self.owner
        for part in self.target.split("."):
            obj = getattr(obj, part)
        return obj

    def bound(self, ctx: Context) -> float:
        t = self._tensor().detach().to(torch.float64).abs()
        return ctx.record(self.path, up(up(float((1.0 / t).max()) if self.divide else float(t.max()))))

    def estimate(self) -> Tensor:
        t = self._tensor().abs()
        return (1.0 / t).max() if self.divide else t.max()


@tensor_op(operator.add, torch.add, operator.sub, torch.sub, operator.iadd, operator.isub,
           methods=("add", "add_", "sub", "sub_"))
def add_op(call: Any) -> None:
    if "alpha" in call.kwargs:
        raise call.refuse("uses alpha=")
    for v in call.inputs:
        if call.shape_of(v) != call.out_shape:
            raise call.refuse(f"broadcasts {call.shape_of(v)} to {call.out_shape} (copies of an input)")
    call.emit("sum", None, call.inputs)


@tensor_op(operator.neg, torch.neg, methods=("neg",))
def neg_op(call: Any) -> None:
    call.emit("scale", 1.0, [call.single()])


def _one_factor(n_inputs: int) -> Optional[str]:
    return "multiplies two input-dependent tensors (not Lipschitz in general)" if n_inputs > 1 else None


def _scale_op(call: Any, divide: bool) -> None:
    problem = _one_factor(len(call.inputs))
    if problem:
        raise call.refuse(problem)
    x = call.x
    other = call.args[1] if len(call.args) > 1 else call.kwargs.get("other")
    if not divide and x is not call.inputs[0]:            # c * x
        x, other = call.inputs[0], x
        call.x = x
    call.single()
    if call.shape_of(x) != call.out_shape:
        raise call.refuse(f"broadcasts {call.shape_of(x)} to {call.out_shape} (copies of an input)")
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        if divide and other == 0:
            raise call.refuse("divides by zero")
        call.emit("scale", up(abs(1.0 / other if divide else float(other))), [x])
    elif isinstance(other, fx.Node) and other.op == "get_attr":
        call.emit("scale", AttrScale(join(call.parent_path, other.target), call.module, other.target, divide), [x])
    else:
        raise call.refuse("multiplies by a value that is not a number or a parameter/buffer")


@tensor_op(operator.mul, torch.mul, operator.imul, methods=("mul", "mul_"), check=_one_factor)
def mul_op(call: Any) -> None:
    _scale_op(call, divide=False)


@tensor_op(operator.truediv, torch.div, operator.itruediv, methods=("div", "div_"), check=_one_factor)
def div_op(call: Any) -> None:
    _scale_op(call, divide=True)


@tensor_op(torch.cat, torch.concat, torch.stack)
def cat_op(call: Any) -> None:
    tensors = call.args[0]
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", 0)
    if dim % len(call.out_shape) == 0:
        raise call.refuse("concatenates along the batch dimension")
    for t in tensors:
        if call.is_variable(t) and not call.is_emitted(t):
            raise call.refuse("uses an unknown tensor")
    call.emit("l2", None, [t for t in tensors if call.is_variable(t)])


@tensor_op(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
           methods=("flatten", "view", "reshape", "view_as", "reshape_as", "squeeze", "unsqueeze", "contiguous",
                    "clone", "detach"))
def reshape_op(call: Any) -> None:
    call.emit("scale", 1.0, [call.single()])


def _moved_dims(call: Any) -> list:
    dims = list(call.args[1:]) + [v for k, v in call.kwargs.items() if k in ("dims", "dim0", "dim1")]
    if dims and isinstance(dims[0], (list, tuple)):
        dims = list(dims[0])
    return dims


@tensor_op(torch.permute, methods=("permute",))
def permute_op(call: Any) -> None:
    x = call.single()
    nd = len(call.shape_of(x))
    dims = _moved_dims(call)
    if not dims or dims[0] % nd != 0:
        raise call.refuse("moves the batch dimension")
    call.emit("scale", 1.0, [x])


@tensor_op(torch.transpose, methods=("transpose",))
def transpose_op(call: Any) -> None:
    x = call.single()
    nd = len(call.shape_of(x))
    if any(d % nd == 0 for d in _moved_dims(call)):
        raise call.refuse("moves the batch dimension")
    call.emit("scale", 1.0, [x])


@tensor_op(operator.getitem)
def getitem_op(call: Any) -> None:
    x = call.single()
    idx = call.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in idx) or \
            not idx or idx[0] != slice(None, None, None):
        raise call.refuse("indexes with something other than basic slicing that keeps the batch (x[:, ...])")
    call.emit("scale", 1.0, [x])


def _reduce_op(call: Any, mean: bool) -> None:
    x = call.single()
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
    if dim is None:
        raise call.refuse("reduces over all dimensions, batch included")
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    nd = len(call.shape_of(x))
    if any(d % nd == 0 for d in dims):
        raise call.refuse("reduces over the batch dimension")
    count = math.prod(call.shape_of(x)[d] for d in dims)
    # mean over groups of n: each output is (1/n) 1^T on its group, norm 1/sqrt(n); sum: sqrt(n)
    call.emit("scale", up(1.0 / math.sqrt(count)) if mean else sqrt_up(count), [x])


@tensor_op(torch.mean, methods=("mean",))
def mean_op(call: Any) -> None:
    _reduce_op(call, mean=True)


@tensor_op(torch.sum, methods=("sum",))
def sum_op(call: Any) -> None:
    _reduce_op(call, mean=False)
