"""Elementwise activations: an elementwise f with |f'| <= c is c-Lipschitz in l2, so each bound is sup |f'|.

=====================================================  ===========================================
layer (and the functions of a traced forward)          bound
=====================================================  ===========================================
ReLU, ReLU6, Hardtanh, Tanh, Softplus, Softsign,       1
Softshrink, Tanhshrink, LogSigmoid, CELU(alpha > 0)
LeakyReLU, PReLU                                       max(1, |slope|)
ELU                                                    max(1, |alpha|)
GELU (erf / tanh), SiLU, Mish                          1.128904 / 1.128993, 1.099839, 1.088499
Sigmoid, Hardsigmoid, Hardswish, SELU                  1/4, 1/6, 3/2, 1.7581 (+1e-6: float32 constants)
Softmax, Softmin (dim != batch)                        1 (Jacobian diag(p) - p p^T, eigenvalues <= 1)
=====================================================  ===========================================

    >>> from torch import nn
    >>> from crmt_plugin.bounds import lipschitz_upper_bound
    >>> lipschitz_upper_bound(nn.LeakyReLU(-3.0), (5,)), round(lipschitz_upper_bound(nn.GELU(), (5,)), 4)
    (3.0, 1.1289)

``F.relu(x)``, ``torch.tanh(x)``, ``x.relu()``, ``F.gelu(x, approximate="tanh")``, ... in a traced forward
are mapped to these layers (:func:`~crmt_plugin.bounds.registry.functional_layer`), so each activation's
bound is written once, in its rule below.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CRMTError
from .plan import Context, Plan
from .registry import LayerSite, forward_owner, functional_layer, lipschitz_rule
from .rounding import inflate

__all__ = ["gelu_erf_bound", "silu_bound", "grid_sup_derivative", "PReLUPlan"]

SELU_SCALE = 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717


# ----------------------------------------------------------------------------------------------
# closed forms and a rigorous numerical sup for the smooth ones
# ----------------------------------------------------------------------------------------------

def gelu_erf_bound() -> float:
    """GELU f = x Phi(x): f' = Phi + x phi, f'' = phi (2 - x^2), so sup |f'| = f'(sqrt 2)
    = (1 + erf(1)) / 2 + 1 / (e sqrt(pi)) = 1.12890...  (f'(-sqrt 2) = -0.1289; f' -> 0, 1 at -inf, inf)."""
    return inflate(0.5 * (1.0 + math.erf(1.0)) + math.exp(-1.0) / math.sqrt(math.pi))


def silu_bound() -> float:
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
    return inflate(sig * (1 + x * (1 - sig)))


_GRID_CACHE: Dict[str, float] = {}


def grid_sup_derivative(name: str, fn: Callable[[Tensor], Tensor]) -> float:
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
        _GRID_CACHE[name] = inflate(m1, h * h / 8 * (2 * m3 + 1))
    return _GRID_CACHE[name]


# ----------------------------------------------------------------------------------------------
# rules: one per activation family
# ----------------------------------------------------------------------------------------------

@lipschitz_rule(nn.ReLU, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardtanh, nn.Softshrink, nn.Softplus)
def one_lipschitz_rule(layer: nn.Module, site: LayerSite) -> float:
    # ReLU6 runs Hardtanh.forward (clamp to [0, 6]), so the Hardtanh entry covers it.
    # Softplus: sigma(beta x) <= 1 (torch's switch to x above `threshold` is an e^-threshold jump)
    return 1.0


@lipschitz_rule(nn.LeakyReLU)
def leaky_relu_rule(layer: nn.LeakyReLU, site: LayerSite) -> float:
    return max(1.0, abs(float(layer.negative_slope)))


@lipschitz_rule(nn.ELU)
def elu_rule(layer: nn.ELU, site: LayerSite) -> float:
    return max(1.0, abs(float(layer.alpha)))          # f' = alpha e^x on x < 0


@lipschitz_rule(nn.CELU)
def celu_rule(layer: nn.CELU, site: LayerSite) -> float:
    if float(layer.alpha) > 0:                        # f' = e^(x / alpha) <= 1 on x < 0
        return 1.0
    raise CRMTError(f"layer {site.where}: CELU with alpha <= 0 is not supported")


# constants below get the 1e-6 margin: torch's kernels use float32 constants (1/6 = 0.16666667163)
_CONSTANTS = {nn.SELU: SELU_SCALE, nn.Sigmoid: 0.25, nn.Hardsigmoid: 1.0 / 6.0,
              nn.Hardswish: 1.5}                      # Hardswish x relu6(x + 3) / 6: f' = (2x + 3) / 6 on (-3, 3)


@lipschitz_rule(*_CONSTANTS)
def constant_slope_rule(layer: nn.Module, site: LayerSite) -> float:
    return inflate(_CONSTANTS[forward_owner(layer)])


@lipschitz_rule(nn.GELU)
def gelu_rule(layer: nn.GELU, site: LayerSite) -> float:
    if layer.approximate == "none":
        return gelu_erf_bound()
    return grid_sup_derivative("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"))


@lipschitz_rule(nn.SiLU)
def silu_rule(layer: nn.SiLU, site: LayerSite) -> float:
    return silu_bound()


@lipschitz_rule(nn.Mish)
def mish_rule(layer: nn.Mish, site: LayerSite) -> float:
    return grid_sup_derivative("mish", F.mish)


@lipschitz_rule(nn.Softmax, nn.Softmin)
def softmax_rule(layer: nn.Module, site: LayerSite) -> float:
    # J = diag(p) - p p^T is PSD with eigenvalues <= max p <= 1 (Gao & Pavel 2017: 1-Lipschitz)
    dim = layer.dim
    if dim is None or dim % (len(site.in_shape) + 1) == 0:
        raise CRMTError(f"layer {site.where}: dim={dim} includes the batch dimension; pass an explicit dim >= 1")
    return 1.0


class PReLUPlan(Plan):
    """PReLU: max(1, max |a|) with the learnt slopes a (differentiable in a for the penalty)."""

    def __init__(self, path: str, layer: nn.PReLU) -> None:
        self.path, self.layer = path, layer

    def bound(self, ctx: Context) -> float:
        return ctx.record(self.path, max(1.0, float(self.layer.weight.detach().abs().max())))

    def estimate(self) -> Union[Tensor, float]:
        return torch.clamp(self.layer.weight.abs().max(), min=1.0)


@lipschitz_rule(nn.PReLU)
def prelu_rule(layer: nn.PReLU, site: LayerSite) -> Plan:
    return PReLUPlan(site.path, layer)


# ----------------------------------------------------------------------------------------------
# the same activations called as functions in a traced forward
# ----------------------------------------------------------------------------------------------

def _plain(cls: type) -> Callable[[list, dict, bool], nn.Module]:
    """``F.f(x, *args, **kwargs)`` computes ``cls(*args, **kwargs)`` (``inplace`` dropped: it changes nothing)."""
    def factory(args: list, kwargs: dict, training: bool) -> nn.Module:
        return cls(*args, **{k: v for k, v in kwargs.items() if k != "inplace"})
    factory.__name__ = f"{cls.__name__}_from_function"
    return factory


for _cls, _functions, _methods in [
    (nn.ReLU, (F.relu, torch.relu), ("relu", "relu_")), (nn.ReLU6, (F.relu6,), ()),
    (nn.Tanh, (torch.tanh, F.tanh), ("tanh",)), (nn.Sigmoid, (torch.sigmoid, F.sigmoid), ("sigmoid",)),
    (nn.SiLU, (F.silu,), ()), (nn.Mish, (F.mish,), ()), (nn.Hardswish, (F.hardswish,), ()),
    (nn.Hardsigmoid, (F.hardsigmoid,), ()), (nn.Softsign, (F.softsign,), ()), (nn.LogSigmoid, (F.logsigmoid,), ()),
    (nn.Tanhshrink, (F.tanhshrink,), ()), (nn.SELU, (F.selu, torch.selu), ()), (nn.Softplus, (F.softplus,), ()),
    (nn.Hardtanh, (F.hardtanh,), ()), (nn.Softshrink, (F.softshrink,), ()),
]:
    functional_layer(*_functions, methods=_methods)(_plain(_cls))
del _cls, _functions, _methods


def _slope_arg(args: list, kwargs: dict) -> list:
    return list(args[:1]) if args else [v for k, v in kwargs.items() if k in ("negative_slope", "alpha")]


@functional_layer(F.leaky_relu)
def leaky_relu_function(args: list, kwargs: dict, training: bool) -> nn.Module:
    return nn.LeakyReLU(*_slope_arg(args, kwargs))


@functional_layer(F.elu)
def elu_function(args: list, kwargs: dict, training: bool) -> nn.Module:
    return nn.ELU(*_slope_arg(args, kwargs)[:1])


@functional_layer(F.celu)
def celu_function(args: list, kwargs: dict, training: bool) -> nn.Module:
    return nn.CELU(*_slope_arg(args, kwargs)[:1])


@functional_layer(F.gelu)
def gelu_function(args: list, kwargs: dict, training: bool) -> nn.Module:
    return nn.GELU(approximate=kwargs.get("approximate", "none"))
