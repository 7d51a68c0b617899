"""Rules for the Lipschitz-bounded layers of :mod:`crmt_plugin.lipschitz_layers` (exact or sound constants).

=====================  ==========================================================================
layer                  bound (float64, rounded up)
=====================  ==========================================================================
AOLLinear              ||W diag(d)||_2 of the effective weight (SVD): exact, <= 1
AOLConv1d / 2d         min( AOL certificate sqrt(max_c sum |G_c|) of the effective kernel, the
                       convolution's operator norm on the input shape (``conv.ConvPlan``) )
MaxMin, L2NormPool     1 (exact constants)
ModalityScale          1 / min(scale)
ConvexResidual         |1 - a| + |a| L(branch), with the coefficients the forward applies
=====================  ==========================================================================

Each bound is for the effective weights the forward applies (as float tensors), not for the
"1 by construction" of exact arithmetic, so float32 rounding of the rescaling cannot make it unsound.

    >>> import torch
    >>> from crmt_plugin.lipschitz_layers import AOLLinear
    >>> from crmt_plugin.bounds import lipschitz_upper_bound
    >>> layer = AOLLinear(5, 3)
    >>> exact = float(torch.linalg.matrix_norm(layer.effective_weight().double(), ord=2))
    >>> exact <= lipschitz_upper_bound(layer, (5,)) <= exact * (1 + 2e-6)
    True
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

from torch import Tensor

from ..lipschitz_layers import AOLConvNd, AOLLinear, ConvexResidual, L2NormPool, MaxMin, ModalityScale
from ..lipschitz_layers.rescaling import aol_conv_certificate
from .conv import ConvPlan
from .dense import matrix_norm
from .graph import compile_module
from .plan import Context, Plan, Shape, join
from .registry import LayerSite, lipschitz_rule
from .rounding import add_up, inflate, mul_up, up

__all__ = ["ConvexResidualPlan"]


@lipschitz_rule(AOLLinear)
def aol_linear_rule(layer: AOLLinear, site: LayerSite) -> float:
    return matrix_norm(layer.effective_weight().detach().double())


@lipschitz_rule(AOLConvNd)
def aol_conv_rule(layer: AOLConvNd, site: LayerSite) -> float:
    kernel = layer.effective_weight().detach()
    certificate = inflate(aol_conv_certificate(kernel))
    plain = layer.as_plain()
    exact = ConvPlan(site.path, plain, site.in_shape, site.out_shape, transposed=False).bound(
        Context(dense_max=site.ctx.dense_max, conv_method=site.ctx.conv_method))
    return min(certificate, exact)


@lipschitz_rule(MaxMin, L2NormPool)
def nonexpansive_rule(layer, site: LayerSite) -> float:
    return 1.0


@lipschitz_rule(ModalityScale)
def modality_scale_rule(layer: ModalityScale, site: LayerSite) -> float:
    return up(inflate(layer.lipschitz()))


class ConvexResidualPlan(Plan):
    """|c_skip| + |c_branch| L(branch) (triangle inequality), with the coefficients read when bounding."""

    def __init__(self, path: str, layer: ConvexResidual, branch: Plan) -> None:
        self.path, self.layer, self.branch = path, layer, branch

    def children(self) -> Sequence[Plan]:
        return (self.branch,)

    def _coefficients(self) -> Tuple[float, float]:
        skip, gain = self.layer.coefficients()
        return abs(float(skip.detach())), abs(float(gain.detach()))

    def bound(self, ctx: Context) -> float:
        skip, gain = self._coefficients()
        return ctx.record(self.path, add_up(skip, mul_up(gain, self.branch.bound(ctx))))

    def estimate(self) -> Union[Tensor, float]:
        skip, gain = self.layer.coefficients()
        return skip.abs() + gain.abs() * self.branch.estimate()


@lipschitz_rule(ConvexResidual, composite=True)
def convex_residual_rule(layer: ConvexResidual, site: LayerSite) -> Tuple[Plan, Shape]:
    branch, shape = compile_module(layer.branch, site.in_shape, join(site.path, "branch"), site.ctx)
    if tuple(shape) != tuple(site.in_shape):
        raise site.refuse(f"changes the shape {tuple(site.in_shape)} -> {tuple(shape)}; the branch of a "
                          "ConvexResidual must keep it (x and branch(x) are added)")
    return ConvexResidualPlan(site.path, layer, branch), tuple(shape)
