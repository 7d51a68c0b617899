"""What each layer type contributes to a bound: one registry of per-layer rules, filled by decorators.

Every layer family registers its rules here (``linear.py``, ``conv.py``, ``norm.py``, ``activations.py``,
``pooling.py``, ``dropout.py``, ``tensor_ops.py``, ``graph.py``); the module walk, the torch.fx walk and the
unsupported-layer check all ask :func:`rule_for` -- there is no second list. A user registers a rule for
their own layer type the same way::

    from crmt_plugin.bounds import lipschitz_rule, lipschitz_upper_bound

    class Scale(nn.Module):                      # y = c x
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return self.c * x

    @lipschitz_rule(Scale)
    def scale_rule(layer, site):                 # site: LayerSite (path, in_shape, out_shape, ctx)
        return abs(layer.c)                      # a sound bound (float >= 0), or a Plan

    lipschitz_upper_bound(nn.Sequential(nn.Linear(4, 4), Scale(3.0)), (4,))   # 3 ||W||_2

Rules are looked up by the class whose ``forward`` the module runs (a subclass that does not override
``forward`` shares its parent's rule; one that does is a new layer). :func:`declare_lipschitz` (a bound
for one instance or type) takes precedence over rules.

Three kinds of entries:

* **layer rules** (:func:`lipschitz_rule`): ``rule(layer, site) -> float | Plan``. A float is a sound
  bound for the layer on ``site.in_shape`` (constant in the :class:`~crmt_plugin.bounds.LipschitzPenalty`);
  a :class:`~crmt_plugin.bounds.plan.Plan` also gives a differentiable estimate. With ``composite=True``
  the rule compiles the children itself and returns ``(plan, out_shape)`` (``site.out_shape`` is None),
  and the unsupported-layer check looks into the module's children (``nn.Sequential``, ``Residual``).
* **functional layers** (:func:`functional_layer`): a function met in a traced ``forward``
  (``F.relu``, ``torch.tanh``, ``x.relu()``, ``F.avg_pool2d``) mapped to the layer it computes, so
  its bound comes from that layer's rule: ``factory(args, kwargs, training) -> nn.Module``.
* **tensor operations** (:func:`tensor_op`): ``+``, ``*``, ``cat``, ``view``, slicing, ... in a traced
  ``forward``; handlers are called by the fx walk (:mod:`crmt_plugin.bounds.traced`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

from torch import nn

from ..errors import CRMTError
from .plan import Context, Fixed, Plan, Shape, where

__all__ = [
    "BoundLike", "declare_lipschitz", "declared", "forward_owner", "LayerSite", "LayerRule", "lipschitz_rule",
    "remove_lipschitz_rule", "rule_for", "registered_types", "functional_layer", "functional_layer_for",
    "tensor_op", "tensor_op_for", "tensor_op_problem", "op_key",
]

BoundLike = Union[float, Callable[[nn.Module, Shape], float]]


# ----------------------------------------------------------------------------------------------
# declarations: a bound for one instance or one exact type, trusted as given
# ----------------------------------------------------------------------------------------------

_DECLARED_INSTANCES: "weakref.WeakKeyDictionary[nn.Module, BoundLike]" = weakref.WeakKeyDictionary()
_DECLARED_TYPES: Dict[type, BoundLike] = {}


def declare_lipschitz(target: Union[nn.Module, type], bound: Optional[BoundLike]) -> Union[nn.Module, type]:
    """Declare an l2 Lipschitz bound for a module instance or a module type (``None`` removes it).

    Example::

        declare_lipschitz(my_encoder.orthogonal_block, 1.0)       # this instance is 1-Lipschitz
        declare_lipschitz(GroupSort, 1.0)                         # every GroupSort layer
        declare_lipschitz(MyBlock, lambda m, shape: 1 + lipschitz_upper_bound(m.inner, shape))

    ``bound`` is a float >= 0, or a callable ``(module, input_shape) -> float`` evaluated when a
    bound is computed (``input_shape`` is one sample's shape, without the batch dimension).
    An instance declaration wins over a type declaration; a type declaration applies to that exact
    type only (a subclass may compute something else). Declared bounds are trusted as given: a
    bound computed with them is only as sound as the declaration. Returns ``target``.
    To give a *computed* bound for every layer of a type, register a rule with :func:`lipschitz_rule`.
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


def declared(module: nn.Module) -> Optional[BoundLike]:
    """The bound declared for this instance, else for its exact type, else None."""
    if module in _DECLARED_INSTANCES:
        return _DECLARED_INSTANCES[module]
    return _DECLARED_TYPES.get(type(module))


# ----------------------------------------------------------------------------------------------
# layer rules
# ----------------------------------------------------------------------------------------------

def forward_owner(module: nn.Module) -> type:
    """The class whose ``forward`` the module runs (a subclass overriding forward is a new layer)."""
    for cls in type(module).__mro__:
        if "forward" in cls.__dict__:
            return cls
    return nn.Module


@dataclass
class LayerSite:
    """Where a rule is applied: the layer's ``path`` (for messages and ``per_layer``), one sample's input and
    output shapes (no batch dimension; ``out_shape`` is None for composite rules) and the :class:`Context`
    (``ctx.was_training(layer)``, ``ctx.penalty``, ``ctx.dense_max``, ...)."""

    path: str
    in_shape: Shape
    out_shape: Optional[Shape]
    ctx: Context
    module: Optional[nn.Module] = None

    @property
    def where(self) -> str:
        """``'path' (Type)``, how messages name the layer."""
        return where(self.path, self.module) if self.module is not None else f"'{self.path or '<root>'}'"

    def refuse(self, why: str) -> CRMTError:
        """A CRMTError naming the layer: ``layer 'path' (Type) <why>``."""
        return CRMTError(f"layer {self.where} {why}")


@dataclass(frozen=True)
class LayerRule:
    """A registered rule: ``fn(layer, site)``; ``composite`` rules compile their children themselves."""

    types: Tuple[type, ...]
    fn: Callable[[nn.Module, LayerSite], Any]
    composite: bool = False

    def compile(self, module: nn.Module, site: LayerSite) -> Plan:
        """Apply a (non-composite) rule: its Plan, or a :class:`Fixed` plan of the float it returned."""
        try:
            result = self.fn(module, site)
        except CRMTError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise CRMTError(f"the Lipschitz rule {self.fn.__name__!r} for layer {site.where} raised: {exc}") from exc
        if isinstance(result, Plan):
            return result
        try:
            value = float(result)
        except (TypeError, ValueError):
            raise CRMTError(
                f"the Lipschitz rule {self.fn.__name__!r} for layer {site.where} returned "
                f"{type(result).__name__}, expected a float >= 0 or a crmt_plugin.bounds.plan.Plan"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise CRMTError(
                f"the Lipschitz rule {self.fn.__name__!r} for layer {site.where} returned {value}, "
                f"expected a finite float >= 0"
            )
        return Fixed(site.path, lambda: value)


_RULES: Dict[type, LayerRule] = {}


def lipschitz_rule(*types: type, composite: bool = False, replace: bool = False) -> Callable[[Callable], Callable]:
    """Register ``rule(layer, site) -> float | Plan`` as the bound of every layer whose forward is one of ``types``.

    Example::

        @lipschitz_rule(Scale)
        def scale_rule(layer, site):
            return abs(layer.c)          # sound bound of x -> c x on site.in_shape

    The float must be a guaranteed upper bound of the layer's l2 Lipschitz constant on one sample of
    shape ``site.in_shape`` (round upwards; see :mod:`crmt_plugin.bounds.rounding`); raise
    ``site.refuse("...")`` for a configuration the rule cannot bound. ``replace=True`` overrides an existing
    rule (built-in ones included); without it a second rule for the same type is an error.
    Returns the rule function unchanged.
    """
    if not types:
        raise CRMTError("lipschitz_rule: name at least one nn.Module subclass, e.g. @lipschitz_rule(MyLayer)")
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise CRMTError(f"lipschitz_rule: {t!r} is not an nn.Module subclass")

    def register(fn: Callable) -> Callable:
        if not callable(fn):
            raise CRMTError(f"lipschitz_rule: the rule must be a callable (layer, site), found {type(fn).__name__}")
        taken = [t for t in types if t in _RULES and not replace]
        if taken:
            names = ", ".join(f"{t.__name__} ({_RULES[t].fn.__name__})" for t in taken)
            raise CRMTError(
                f"lipschitz_rule: already registered: {names}; pass replace=True to override, or remove the "
                f"rule with crmt_plugin.bounds.remove_lipschitz_rule first"
            )
        rule = LayerRule(tuple(types), fn, composite)
        for t in types:
            _RULES[t] = rule
        return fn

    return register


def remove_lipschitz_rule(*types: type) -> None:
    """Remove the rules of ``types`` (missing ones are ignored)."""
    for t in types:
        _RULES.pop(t, None)


def rule_for(module: nn.Module) -> Optional[LayerRule]:
    """The rule for this module (looked up by :func:`forward_owner`), or None."""
    return _RULES.get(forward_owner(module))


def registered_types() -> Tuple[type, ...]:
    """Every layer type with a rule, in registration order."""
    return tuple(_RULES)


# ----------------------------------------------------------------------------------------------
# traced forwards: functions that compute a layer, and tensor operations
# ----------------------------------------------------------------------------------------------

OpKey = Union[Callable, Tuple[str, str]]
_FUNCTIONAL: Dict[Any, Callable[[list, dict, bool], nn.Module]] = {}
_TENSOR_OPS: Dict[Any, Callable[[Any], None]] = {}
_TENSOR_OP_CHECKS: Dict[Any, Callable[[int], Optional[str]]] = {}


def op_key(op: str, target: Any) -> Any:
    """The registry key of an fx node: the function for ``call_function``, ("method", name) for ``call_method``."""
    return ("method", target) if op == "call_method" else target


def _keys(targets: Tuple[Any, ...], methods: Tuple[str, ...]) -> list:
    return list(targets) + [("method", m) for m in methods]


def functional_layer(*targets: Callable, methods: Tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Register ``factory(args, kwargs, training) -> nn.Module``: the layer a function of a traced forward computes.

    ``args`` are the call's arguments after the input tensor, ``kwargs`` its keyword arguments, ``training``
    the traced module's own training flag. ``methods`` names tensor methods (``x.relu()``) computing the same.
    """
    def register(factory: Callable) -> Callable:
        for key in _keys(targets, methods):
            _FUNCTIONAL[key] = factory
        return factory

    return register


def functional_layer_for(key: Any) -> Optional[Callable[[list, dict, bool], nn.Module]]:
    """The layer factory registered for an fx node key (:func:`op_key`), or None."""
    try:
        return _FUNCTIONAL.get(key)
    except TypeError:       # unhashable target
        return None


def tensor_op(*targets: Callable, methods: Tuple[str, ...] = (),
              check: Optional[Callable[[int], Optional[str]]] = None) -> Callable[[Callable], Callable]:
    """Register ``handler(call)`` for tensor operations of a traced forward (``call``: see ``traced.TracedCall``).

    ``check(n_inputs)``: what the unsupported-layer check reports when the operation is called with
    ``n_inputs`` input-dependent arguments (e.g. ``x * x``), or None when that is fine.
    """
    def register(handler: Callable) -> Callable:
        for key in _keys(targets, methods):
            _TENSOR_OPS[key] = handler
            if check is not None:
                _TENSOR_OP_CHECKS[key] = check
        return handler

    return register


def tensor_op_for(key: Any) -> Optional[Callable[[Any], None]]:
    """The tensor-operation handler registered for an fx node key (:func:`op_key`), or None."""
    try:
        return _TENSOR_OPS.get(key)
    except TypeError:
        return None


def tensor_op_problem(key: Any, n_inputs: int) -> Optional[str]:
    """Why the operation cannot be bounded with ``n_inputs`` input-dependent arguments, or None (see ``check``)."""
    try:
        check = _TENSOR_OP_CHECKS.get(key)
    except TypeError:
        return None
    return None if check is None else check(n_inputs)
