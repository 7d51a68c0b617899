"""BatchNorm (eval mode): a diagonal affine map per channel, alone or folded into the Conv/Linear before it.

y = gamma (x - mu) / sqrt(var + eps) + beta, so L = max_c |gamma_c| / sqrt(running_var_c + eps) alone; right
after a Conv/Linear W the pair is the linear map diag(s) W (s = gamma / sqrt(var + eps)) plus a constant,
whose exact norm is often far below ||diag(s)|| ||W||:

    >>> import torch
    >>> from torch import nn
    >>> from crmt_plugin.bounds import lipschitz_upper_bound
    >>> bn = nn.BatchNorm1d(3).eval()
    >>> with torch.no_grad():
    ...     _ = bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    >>> round(lipschitz_upper_bound(bn, (3,)), 4)             # max |gamma| / sqrt(1 + 1e-5)
    2.0

A BatchNorm in training mode normalises with the batch's statistics: it has no per-sample constant and
is refused (except in :class:`~crmt_plugin.bounds.LipschitzPenalty`, which uses eval semantics).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..errors import CRMTError
from .plan import Context, Plan, Shape, how_to_declare, join, where
from .registry import LayerSite, declared, forward_owner, lipschitz_rule
from .rounding import inflate

__all__ = ["BATCHNORM_TYPES", "bn_scale", "scaled_weight", "check_batchnorm", "BatchNormPlan", "FoldsBatchNorm"]

BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)      # BatchNorm1d/2d/3d run _BatchNorm.forward


def bn_scale(layer: nn.Module, gamma: Optional[Tensor]) -> Tensor:
    """s = gamma / sqrt(running_var + eps) per channel (1 / sqrt(...) when the layer has no affine weight)."""
    var = layer.running_var
    scale = 1.0 / torch.sqrt(var.to(gamma.dtype if gamma is not None else torch.float64) + layer.eps)
    return scale if gamma is None else gamma * scale


def scaled_weight(layer: nn.Module, bn: Optional[nn.Module], float64: bool) -> Tensor:
    """The layer's weight, times BatchNorm's per-output-channel scale gamma / sqrt(var + eps) when
    an eval-mode BatchNorm follows it: BN(conv_W(x)) = conv_{s W}(x) + const, so the pair is one
    linear operator whose exact norm is often far below ||BN|| ||conv||. (float64: detached; the
    few-ulp rounding of s W is covered by the margins of the dense / Fourier / SVD norms.)"""
    weight = layer.weight.detach().to(torch.float64) if float64 else layer.weight
    if bn is None:
        return weight
    gamma = bn.weight
    if gamma is not None and float64:
        gamma = gamma.detach().to(torch.float64)
    scale = bn_scale(bn, gamma).to(weight.dtype)
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


def check_batchnorm(module: nn.Module, path: str, ctx: Context) -> None:
    """Refuse a BatchNorm without running statistics, or in training mode (outside the penalty)."""
    at = where(path, module)
    if module.running_var is None or not module.track_running_stats:
        raise CRMTError(
            f"layer {at} has no running statistics (track_running_stats=False): it normalises with "
            f"the batch's statistics even in eval mode, so it has no per-sample Lipschitz constant; "
            f"{how_to_declare(module)}"
        )
    if ctx.was_training(module) and not ctx.penalty:
        raise CRMTError(
            f"layer {at} is in training mode: it normalises with the batch's statistics, so it has "
            f"no per-sample Lipschitz constant. Call .eval() on the encoder first -- the bound is for "
            f"the eval-mode function (running statistics), the one that is certified"
        )


class BatchNormPlan(Plan):
    """BatchNorm alone: L = max_c |gamma_c| / sqrt(running_var_c + eps)."""

    def __init__(self, path: str, layer: nn.Module) -> None:
        self.path, self.layer = path, layer

    def bound(self, ctx: Context) -> float:
        layer = self.layer
        gamma = layer.weight.detach().to(torch.float64) if layer.weight is not None else None
        scale = bn_scale(layer, gamma).abs()
        value = inflate(float(scale.max()) if scale.numel() else 0.0)   # sqrt/div: a few ulps << 1e-6
        return ctx.record(self.path, value)

    def estimate(self) -> Union[Tensor, float]:
        return bn_scale(self.layer, self.layer.weight).abs().max()


class FoldsBatchNorm(Plan):
    """Base of the Linear / Conv plans: an eval-mode BatchNorm right after the layer is folded into it."""

    layer: nn.Module
    bn: Optional[nn.Module] = None

    def accepts_batchnorm(self, shape: Shape) -> bool:
        """Whether a BatchNorm on this layer's output (per-sample ``shape``) scales its output channels."""
        return True

    def absorb(self, name: str, module: nn.Module, shape: Shape, path: str, ctx: Context) -> bool:
        if self.bn is not None or forward_owner(module) not in BATCHNORM_TYPES or declared(module) is not None \
                or declared(self.layer) is not None or not self.accepts_batchnorm(shape) \
                or module.num_features != shape[0]:
            return False
        check_batchnorm(module, join(path, name), ctx)
        self.bn = module
        self.path = f"{self.path}+{name}"
        return True

    def weight(self, float64: bool) -> Tensor:
        """The (BatchNorm-scaled) weight: float64 and detached for the bound, differentiable for the estimate."""
        return scaled_weight(self.layer, self.bn, float64)


@lipschitz_rule(*BATCHNORM_TYPES)
def batchnorm_rule(layer: nn.Module, site: LayerSite) -> Plan:
    check_batchnorm(layer, site.path, site.ctx)
    return BatchNormPlan(site.path, layer)

