"""LipschitzPenalty: a differentiable estimate of the encoder bound, to train encoders with small bounds."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import CRMTError
from .graph import check_shape, compiled, module_spec
from .plan import Context, walk

__all__ = ["LipschitzPenalty"]


class LipschitzPenalty:
    """Differentiable estimate of the encoder's Lipschitz bound, to train encoders with small bounds.

    Example:

        >>> import torch
        >>> from crmt_plugin.bounds import lipschitz_upper_bound
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> encoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        ...                         nn.Linear(4 * 8 * 8, 8))
        >>> penalty = LipschitzPenalty(encoder, (1, 8, 8))
        >>> value = penalty()                                     # 0-dim tensor
        >>> (1e-2 * value.log()).backward()                       # add it to the loss: gradients reach the weights
        >>> encoder[0].weight.grad is not None
        True
        >>> bool(value <= lipschitz_upper_bound(encoder.eval(), (1, 8, 8)) * (1 + 1e-4))   # the sound value
        True

    ``penalty()`` is the same product/sum of per-layer norms as
    :func:`~crmt_plugin.bounds.lipschitz_upper_bound`, with each Linear/Conv norm estimated as ||A v|| where v
    comes from ``n_power_iterations`` power iterations per call, warm-started from the previous call (like
    ``torch.nn.utils.parametrizations.spectral_norm``) -- a lower estimate of the exact norm that
    converges as training proceeds; BatchNorm uses |gamma| / sqrt(running_var + eps). It is a
    regulariser, not a certificate: compute the sound bound with ``lipschitz_upper_bound``.
    Eval-mode semantics are used throughout (Dropout counts 1, BatchNorm may be in training mode),
    and layers without trainable norms (activations, pooling, declared bounds) are constants.
    The layer structure is analysed once, at construction: build a new penalty if you replace layers.
    """

    def __init__(self, module: nn.Module, input_shape: Sequence[int], *, n_power_iterations: int = 1) -> None:
        shape = check_shape(input_shape, "input_shape")
        if int(n_power_iterations) < 1:
            raise CRMTError(f"n_power_iterations must be >= 1, found {n_power_iterations}")
        self.module = module
        self.input_shape = shape
        ctx = Context(penalty=True)
        self._plan, _ = compiled(module, shape, "", ctx)
        for plan in walk(self._plan):
            plan.set_power_iterations(int(n_power_iterations))
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
            dtype, device = module_spec(self.module)
            value = torch.tensor(float(value), dtype=dtype, device=device)
        return value

    def __repr__(self) -> str:
        return f"LipschitzPenalty({type(self.module).__name__}, input_shape={self.input_shape})"
