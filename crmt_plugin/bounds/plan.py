"""Plans: a module compiled for one input shape, with a sound ``bound`` and a differentiable ``estimate``.

A rule (see :mod:`crmt_plugin.bounds.registry`) turns one layer into a :class:`Plan`; the graph walk
composes them with :class:`Chain` (L(f o g) <= L(f) L(g)) and :class:`Sum` (L(f + g) <= L(f) + L(g)):

    >>> plan = Chain("", [Fixed("0", lambda: 2.0), Sum("1", [Fixed("1.a", lambda: 1.0), Fixed("1.b", lambda: 0.5)])])
    >>> plan.bound(Context()) >= 3.0, plan.estimate()                  # bound: rounded upwards
    (True, 3.0)
    >>> [p.path for p in walk(plan)]
    ['', '0', '1', '1.a', '1.b']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .rounding import add_up, mul_up

__all__ = ["Shape", "Context", "Plan", "Fixed", "Chain", "Sum", "walk", "is_nonexpansive", "join", "where",
           "how_to_declare"]

Shape = Tuple[int, ...]


@dataclass
class Context:
    """What a compilation (and the bound computed from it) is for.

    * ``dense_max`` / ``conv_method``: see :func:`crmt_plugin.bounds.lipschitz_upper_bound`;
    * ``penalty``: compiled for :class:`~crmt_plugin.bounds.LipschitzPenalty` (eval semantics, no refusal of
      training-mode layers);
    * ``flags``: every submodule's ``training`` flag before the walk set ``eval()`` (see :meth:`was_training`);
    * ``spec``: (dtype, device) of the module's tensors, for the probe inputs;
    * ``per_layer``: when a dict, every layer's bound is recorded there by path (:meth:`record`).
    """

    dense_max: int = 4096
    conv_method: str = "auto"          # "auto" | "dense" | "fourier"
    penalty: bool = False
    flags: Dict[nn.Module, bool] = field(default_factory=dict)
    spec: Tuple[torch.dtype, torch.device] = (torch.float32, torch.device("cpu"))
    per_layer: Optional[Dict[str, float]] = None

    def was_training(self, module: nn.Module) -> bool:
        """The module's ``training`` flag as the user left it (the walk runs everything in eval mode)."""
        return self.flags.get(module, module.training)

    def record(self, path: str, value: float) -> float:
        """Store ``value`` as the bound of the layer at ``path`` when ``per_layer`` was asked for."""
        if self.per_layer is not None:
            self.per_layer[path] = value
        return value


class Plan:
    """A module compiled for one input shape. ``bound`` is sound (float); ``estimate`` is differentiable."""

    path = ""

    def bound(self, ctx: Context) -> float:
        raise NotImplementedError

    def estimate(self) -> Union[Tensor, float]:
        raise NotImplementedError

    def children(self) -> Sequence["Plan"]:
        """The plans this one is composed of (for :func:`walk`)."""
        return ()

    def set_power_iterations(self, n: int) -> None:
        """Power iterations per :meth:`estimate` call (only plans estimated by power iteration use it)."""

    def absorb(self, name: str, module: nn.Module, shape: Shape, path: str, ctx: Context) -> bool:
        """Fold the layer ``module`` that directly follows this one into it (e.g. an eval-mode BatchNorm after a
        Conv/Linear, whose pair has a far smaller norm). Returns whether it did; by default nothing is folded."""
        return False


class Fixed(Plan):
    """A layer whose bound does not depend on trainable parameters (activations, pooling, declared bounds)."""

    def __init__(self, path: str, compute: Callable[[], float]) -> None:
        self.path, self._compute, self._value = path, compute, None

    def value(self) -> float:
        """The (lazily computed, cached) bound."""
        if self._value is None:
            self._value = float(self._compute())
        return self._value

    def bound(self, ctx: Context) -> float:
        return ctx.record(self.path, self.value())

    def estimate(self) -> float:
        return self.value()


class Chain(Plan):
    """A composition f_n o ... o f_1: the product of the parts' bounds."""

    def __init__(self, path: str, parts: List[Plan]) -> None:
        self.path, self.parts = path, parts

    def children(self) -> Sequence[Plan]:
        return self.parts

    def bound(self, ctx: Context) -> float:
        total = 1.0
        for part in self.parts:
            total = mul_up(total, part.bound(ctx))
        return total

    def estimate(self) -> Union[Tensor, float]:
        total: Union[Tensor, float] = 1.0
        for part in self.parts:
            total = total * part.estimate()
        return total


class Sum(Plan):
    """A sum f_1 + ... + f_n of maps of the same input: the sum of the parts' bounds."""

    def __init__(self, path: str, parts: List[Plan]) -> None:
        self.path, self.parts = path, parts

    def children(self) -> Sequence[Plan]:
        return self.parts

    def bound(self, ctx: Context) -> float:
        total = 0.0
        for part in self.parts:
            total = add_up(total, part.bound(ctx))
        return total

    def estimate(self) -> Union[Tensor, float]:
        total: Union[Tensor, float] = 0.0
        for part in self.parts:
            total = total + part.estimate()
        return total


def is_nonexpansive(plan: Plan) -> bool:
    """Whether a compiled layer is known to be 1-Lipschitz (a constant bound <= 1)."""
    return isinstance(plan, Fixed) and plan.value() <= 1.0


def walk(plan: Plan) -> Iterator[Plan]:
    """``plan`` and every plan it is composed of, depth first."""
    yield plan
    for part in plan.children():
        yield from walk(part)


def join(path: str, name: str) -> str:
    """The path of child ``name`` of the layer at ``path``."""
    return f"{path}.{name}" if path else name


def where(path: str, module: nn.Module) -> str:
    """How messages name a layer: ``'enc.1' (LayerNorm)``."""
    return f"'{path or '<root>'}' ({type(module).__name__})"


def how_to_declare(module: nn.Module) -> str:
    """The fix offered when a layer has no known bound."""
    name = type(module).__name__
    return (
        f"declare a bound with crmt_plugin.bounds.declare_lipschitz(<this module or {name}>, "
        f"bound), where bound is a float or a callable (module, input_shape) -> float, or register a rule "
        f"with @crmt_plugin.bounds.lipschitz_rule({name})"
    )
