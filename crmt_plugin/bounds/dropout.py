"""Dropout: the identity in eval mode (bound 1); in training mode x * mask / (1 - p), so 1 / (1 - p) for any mask.

    >>> from torch import nn
    >>> from crmt_plugin.bounds import lipschitz_upper_bound
    >>> lipschitz_upper_bound(nn.Dropout(0.5).eval(), (3,))
    1.0
    >>> round(lipschitz_upper_bound(nn.Dropout(0.5).train(), (3,)), 12)      # rounded up: 2 + 1 ulp
    2.0

AlphaDropout / FeatureAlphaDropout are supported in eval mode only. The penalty uses eval semantics (1).
``F.dropout(x, p, training)`` in a traced forward is mapped to ``nn.Dropout(p)`` in the mode it runs in.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import LayerSite, functional_layer, lipschitz_rule
from .rounding import up

__all__ = ["DROPOUT_TYPES"]

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@lipschitz_rule(*DROPOUT_TYPES)
def dropout_rule(layer: nn.Module, site: LayerSite) -> float:
    p = float(layer.p)
    if site.ctx.was_training(layer) and not site.ctx.penalty:
        return 0.0 if p >= 1 else up(1.0 / (1.0 - p))      # x * mask / (1 - p), for any mask
    return 1.0


@lipschitz_rule(nn.AlphaDropout, nn.FeatureAlphaDropout)
def alpha_dropout_rule(layer: nn.Module, site: LayerSite) -> float:
    if site.ctx.was_training(layer) and not site.ctx.penalty:
        raise site.refuse("is in training mode; call .eval() on the encoder first")
    return 1.0


@functional_layer(F.dropout)
def dropout_function(args: list, kwargs: dict, training: bool) -> nn.Module:
    """``F.dropout(x, p=0.5, training=True)``; ``training`` here is the traced module's own flag: the trace runs
    in eval mode, where ``training=self.training`` reads False, so either one being True means dropout."""
    p = args[0] if args else kwargs.get("p", 0.5)
    active = args[1] if len(args) > 1 else kwargs.get("training", True)
    return nn.Dropout(p).train(active is True or training)
