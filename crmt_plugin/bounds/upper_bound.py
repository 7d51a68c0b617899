"""The entry points: :func:`lipschitz_upper_bound` (one encoder) and :func:`encoder_bounds` (one per modality)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import CRMTError
from ..lipschitz import LipschitzConstants
from .graph import check_shape, compiled
from .plan import Context

__all__ = ["lipschitz_upper_bound", "encoder_bounds"]


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

    Example:

        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> enc = nn.Sequential(nn.Conv1d(13, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 64)).eval()
        >>> layers = {}
        >>> L = lipschitz_upper_bound(enc, (13, 32), per_layer=layers)   # x: (13, 32), no batch dim
        >>> # ||enc(x) - enc(y)||_2 <= L ||x - y||_2   for all x, y;   L = prod(layers.values())
        >>> sorted(layers)                         # path -> per-layer bound; BatchNorm folded into the conv
        ['0+1', '2', '3', '4', '5']
        >>> round(layers["3"], 5)                  # global average pooling over 32 frames: 1 / sqrt(32)
        0.17678

    Args:
        module: the encoder; BatchNorm layers must be in eval mode (``module.eval()``).
        input_shape: one sample's shape, without the batch dimension, e.g. ``(1, 28, 28)``.
        dense_max: convolutions (and pooling) whose smaller side has at most this many entries get
            their exact operator norm (Gram matrix + float64 eigensolver, ~1-4 s at 4096); larger
            ones a sound Fourier bound (milliseconds, a few % above exact for zero padding).
        conv_method: ``"auto"``, ``"dense"`` (always exact) or ``"fourier"`` (always Fourier).
        per_layer: optional dict, filled with ``{layer path: bound}`` to see which layers dominate.
        name: prefix of the layer paths in messages and ``per_layer`` (e.g. the modality name).

    Returns ``L`` (float, rounded upwards); see the package docstring for the per-layer bounds and
    their proofs. Parameters, buffers and training flags are left as they were.

    Raises:
        CRMTError: layers without a known bound (all of them listed at once; declare one with
            :func:`~crmt_plugin.bounds.declare_lipschitz` or register a rule with
            :func:`~crmt_plugin.bounds.lipschitz_rule`), a BatchNorm in training mode or without running
            statistics, or a shape that does not fit.
    """
    shape = check_shape(input_shape, "input_shape")
    if conv_method not in ("auto", "dense", "fourier"):
        raise CRMTError(f"conv_method must be 'auto', 'dense' or 'fourier', found {conv_method!r}")
    ctx = Context(dense_max=int(dense_max), conv_method=conv_method, per_layer=per_layer)
    plan, _ = compiled(module, shape, name, ctx)
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
) -> LipschitzConstants:
    """Sound per-modality encoder bounds L^(m) as :class:`~crmt_plugin.lipschitz.LipschitzConstants`.

    Example:

        >>> encoders = nn.ModuleDict({"audio": nn.Sequential(nn.Flatten(), nn.Linear(6, 4)), "image": nn.Tanh()})
        >>> lip = encoder_bounds(encoders, {"audio": (2, 3), "image": (5,)})
        >>> lip.values.shape, lip.sound, lip.source      # values (M,) float64, in ``encoders`` order
        (torch.Size([2]), True, 'bound')

    From a batch: ``shapes = {k: v.shape[1:] for k, v in batch_inputs.items()}``.
    ``encoders`` maps modality name -> encoder phi^(m) (an ``nn.ModuleDict`` works);
    ``input_shapes`` maps the same names to one sample's shape. ``kwargs`` go to
    :func:`lipschitz_upper_bound` (``dense_max``, ``conv_method``).
    """
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
