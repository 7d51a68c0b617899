"""Composition: the module walk (rules, ``nn.Sequential``, :class:`Residual`), torch.fx tracing of custom
forwards, and the unsupported-layer check that lists every layer without a bound at once.

The walk asks the registry (:func:`~crmt_plugin.bounds.registry.rule_for`) for each module; a module
without a rule but with a custom ``forward`` is traced with torch.fx and its graph is bounded by
Lipschitz propagation: L(input) = 1, L(f(u)) = L_f L(u), L(u + v) <= L(u) + L(v),
L(cat(u, v)) <= sqrt(L(u)^2 + L(v)^2), constants 0.

    >>> import torch
    >>> from torch import nn
    >>> from crmt_plugin.bounds import lipschitz_upper_bound
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + torch.relu(self.fc(x))
    >>> block = Block()
    >>> abs(lipschitz_upper_bound(block, (4,)) - (1 + lipschitz_upper_bound(block.fc, (4,)))) < 1e-12
    True
    >>> for row in unsupported_layers(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Tanh(), nn.GroupNorm(1, 4))):
    ...     print(row)
    ('1', 'LayerNorm', 'no sound bound is known for LayerNorm')
    ('3', 'GroupNorm', 'no sound bound is known for GroupNorm')
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import CRMTError
from .plan import Context, Fixed, Plan, Shape, Sum, Chain, how_to_declare, join, where
from .registry import (
    LayerSite, declared, forward_owner, functional_layer_for, lipschitz_rule, op_key, rule_for, tensor_op_for,
)
from .rounding import add_up, mul_up, sqrt_up

__all__ = ["Residual", "compile_module", "compiled", "unsupported_layers", "refuse_unsupported", "check_shape",
           "module_spec", "GraphPlan", "TracedCall"]

CONST_METHODS = {"size", "dim", "numel"}               # results that depend on the shape only
CONST_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


class Residual(nn.Module):
    """``x -> shortcut(x) + branch(x)`` (``shortcut`` defaults to the identity).

    Example:

        >>> import torch
        >>> from crmt_plugin.bounds import lipschitz_upper_bound
        >>> block = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)))
        >>> block(torch.randn(2, 8, 14, 14)).shape                          # (B, 8, 14, 14)
        torch.Size([2, 8, 14, 14])
        >>> L, L_branch = lipschitz_upper_bound(block, (8, 14, 14)), lipschitz_upper_bound(block.branch, (8, 14, 14))
        >>> abs(L - (1 + L_branch)) < 1e-12                               # 1 + L(branch), rounded up
        True

    Bound: ``L(shortcut) + L(branch)`` (triangle inequality), i.e. ``1 + L(branch)`` for ``x + branch(x)``.
    Custom modules that compute ``x + f(x)`` in their ``forward`` need not be rewritten: they are
    traced with torch.fx (see :func:`~crmt_plugin.bounds.lipschitz_upper_bound`).
    """

    def __init__(self, branch: nn.Module, shortcut: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.branch(x)


# ----------------------------------------------------------------------------------------------
# the module walk
# ----------------------------------------------------------------------------------------------

def run_probe(module: nn.Module, in_shape: Shape, ctx: Context, at: str) -> Any:
    """Run ``module`` on zeros of shape (2, *in_shape) (no grad) -- to learn the output shape."""
    dtype, device = ctx.spec
    x = torch.zeros((2, *in_shape), dtype=dtype, device=device)
    try:
        with torch.no_grad():
            return module(x)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise CRMTError(
            f"layer {at} failed on an input of shape (B, {', '.join(map(str, in_shape))}) "
            f"(input_shape is one sample's shape, without the batch dimension): {exc}"
        ) from exc


def output_shape(module: nn.Module, in_shape: Shape, ctx: Context, at: str) -> Shape:
    """One sample's output shape; refuses non-tensor outputs and maps that mix the batch."""
    out = run_probe(module, in_shape, ctx, at)
    if not isinstance(out, Tensor):
        raise CRMTError(f"layer {at} returns {type(out).__name__}, expected one tensor; {how_to_declare(module)}")
    if out.dim() == 0 or out.shape[0] != 2:
        raise CRMTError(
            f"layer {at} maps a batch of 2 samples to shape {tuple(out.shape)}: it mixes the batch "
            f"dimension, so it has no per-sample Lipschitz constant"
        )
    return tuple(out.shape[1:])


def declared_plan(module: nn.Module, bound: Any, in_shape: Shape, path: str, ctx: Context) -> Tuple[Plan, Shape]:
    at = where(path, module)
    out_shape = output_shape(module, in_shape, ctx, at)
    if callable(bound):
        try:
            value = float(bound(module, tuple(in_shape)))
        except CRMTError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CRMTError(f"the bound declared for layer {at} raised: {exc}") from exc
        if not math.isfinite(value) or value < 0:
            raise CRMTError(f"the bound declared for layer {at} returned {value}, expected a float >= 0")
    else:
        value = float(bound)
    return Fixed(path, lambda: value), out_shape


def is_torch_layer(module: nn.Module) -> bool:
    """A leaf layer of torch itself (no children, forward defined in torch): tracing it teaches nothing."""
    return not any(True for _ in module.children()) and forward_owner(module).__module__.split(".")[0] == "torch"


def compile_module(module: nn.Module, in_shape: Shape, path: str, ctx: Context) -> Tuple[Plan, Shape]:
    """Compile ``module`` for one sample of shape ``in_shape``: (plan, output shape).

    Order: a declaration (:func:`~crmt_plugin.bounds.declare_lipschitz`), else the registered rule, else
    torch.fx tracing of a custom forward, else a refusal.
    """
    bound = declared(module)
    if bound is not None:
        return declared_plan(module, bound, in_shape, path, ctx)
    rule = rule_for(module)
    if rule is not None:
        if rule.composite:
            return rule.fn(module, LayerSite(path, tuple(in_shape), None, ctx, module))
        out_shape = output_shape(module, in_shape, ctx, where(path, module))
        return rule.compile(module, LayerSite(path, tuple(in_shape), out_shape, ctx, module)), out_shape
    if not is_torch_layer(module):
        return TraceCompiler(module, tuple(in_shape), path, ctx).compile()
    raise CRMTError(
        f"cannot bound the Lipschitz constant of layer {where(path, module)}: no sound bound is known for "
        f"{type(module).__name__}; {how_to_declare(module)}, or replace the layer"
    )


@lipschitz_rule(nn.Sequential, composite=True)
def sequential_rule(module: nn.Sequential, site: LayerSite) -> Tuple[Plan, Shape]:
    """The product of the layers' bounds, shapes tracked through them; a layer may absorb the next one
    (an eval BatchNorm right after a Conv/Linear is folded in: see :class:`~crmt_plugin.bounds.norm.FoldsBatchNorm`)."""
    parts, shape = [], tuple(site.in_shape)
    children = list(module.named_children())
    i = 0
    while i < len(children):
        name, child = children[i]
        plan, shape = compile_module(child, shape, join(site.path, name), site.ctx)
        if i + 1 < len(children) and plan.absorb(children[i + 1][0], children[i + 1][1], shape, site.path, site.ctx):
            i += 1
        parts.append(plan)
        i += 1
    return Chain(site.path, parts), shape


@lipschitz_rule(Residual, composite=True)
def residual_rule(module: Residual, site: LayerSite) -> Tuple[Plan, Shape]:
    """L(shortcut) + L(branch) (triangle inequality)."""
    path, ctx, in_shape = site.path, site.ctx, site.in_shape
    for part in (module.branch, module.shortcut):
        head = expansive_inplace_head(part, in_shape, ctx)
        if head is not None:
            raise CRMTError(
                f"Residual {site.where}: {type(head).__name__}(inplace=True) overwrites the block's input, which "
                f"the other path also uses, with a map whose Lipschitz constant exceeds 1; use inplace=False"
            )
    branch, b_shape = compile_module(module.branch, in_shape, join(path, "branch"), ctx)
    if module.shortcut is None:
        skip, s_shape = Fixed(join(path, "shortcut"), lambda: 1.0), tuple(in_shape)
    else:
        skip, s_shape = compile_module(module.shortcut, in_shape, join(path, "shortcut"), ctx)
    if b_shape != s_shape:
        raise CRMTError(
            f"Residual {site.where}: branch output {b_shape} and shortcut output {s_shape} differ "
            f"(they are added, so they must have the same per-sample shape)"
        )
    return Sum(path, [skip, branch]), b_shape


def is_nonexpansive(plan: Plan) -> bool:
    """Whether a compiled layer is known to be 1-Lipschitz (a constant bound <= 1)."""
    return isinstance(plan, Fixed) and plan.value() <= 1.0


def expansive_inplace_head(module: Optional[nn.Module], in_shape: Shape, ctx: Context) -> Optional[nn.Module]:
    """The in-place layer that runs first on a block's input, if it may enlarge distances (L > 1).

    An in-place layer f overwrites its input; anything else that reads that tensor (a residual skip)
    then sees f(x) instead of x. That keeps every bound sound when L(f) <= 1 (ReLU, Hardtanh, eval
    Dropout), but not otherwise.
    """
    m = module
    while isinstance(m, nn.Sequential) and forward_owner(m) is nn.Sequential and len(m) > 0:
        m = m[0]
    if m is None or getattr(m, "inplace", False) is not True:
        return None
    bound = declared(m)
    if bound is not None:
        return None if not callable(bound) and float(bound) <= 1.0 else m
    rule = rule_for(m)
    if rule is None or rule.composite:
        return m
    plan, _ = compile_module(m, in_shape, "", ctx)
    return None if is_nonexpansive(plan) else m


# ----------------------------------------------------------------------------------------------
# torch.fx: modules with a custom forward (x + f(x), cat, view, slicing, F.relu, ...)
# ----------------------------------------------------------------------------------------------

class Tracer(fx.Tracer):
    """Keeps every layer with a declaration or a rule as one call (the walk bounds it by its rule)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if declared(m) is not None or rule_for(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)


def trace(module: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(module, Tracer().trace(module))


def describe(node: fx.Node) -> str:
    """A node as source-like text, e.g. `` `amax = x.amax(dim=(2, 3))` ``."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    args = list(node.args[1:] if node.op == "call_method" else node.args)
    args = ", ".join([str(a) for a in args] + [f"{k}={v}" for k, v in node.kwargs.items()])
    call = f"{node.args[0]}.{target}" if node.op == "call_method" and node.args else target
    return f"`{node.name} = {call}({args})`"


def variable_nodes(gm: fx.GraphModule) -> Dict[fx.Node, bool]:
    """Which nodes depend on the input (the first placeholder); shape queries and attributes are constants."""
    variable: Dict[fx.Node, bool] = {}
    placeholders = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            placeholders += 1
            variable[node] = placeholders == 1
            continue
        if node.op == "output":
            continue
        depends = any(variable.get(a) for a in input_nodes(node))
        constant = (not depends or node.op == "get_attr"
                    or (node.op == "call_method" and node.target in CONST_METHODS)
                    or (node.op == "call_function" and node.target is getattr and len(node.args) > 1
                        and node.args[1] in CONST_ATTRS))
        variable[node] = not constant
    return variable


def input_nodes(node: fx.Node) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def is_known_op(node: fx.Node) -> bool:
    key = op_key(node.op, node.target)
    return functional_layer_for(key) is not None or tensor_op_for(key) is not None


class GraphPlan(Plan):
    """Lipschitz propagation over a traced graph: L(input) = 1, L(f(u)) = L_f L(u),
    L(u + v) = L(u) + L(v), L(cat(u, v)) = sqrt(L(u)^2 + L(v)^2), constants 0."""

    def __init__(self, path: str, ops: List[Tuple[str, Any, List[int]]], result: int) -> None:
        self.path, self.ops, self.result = path, ops, result

    def children(self) -> Sequence[Plan]:
        return [payload for _, payload, _ in self.ops if isinstance(payload, Plan)]

    def _run(self, fn_scale: Callable, fn_sum: Callable, fn_l2: Callable, one: Any) -> Any:
        values: List[Any] = []
        for kind, payload, inputs in self.ops:
            if kind == "input":
                values.append(one)
            elif kind == "const":
                values.append(0.0)
            elif kind == "scale":
                values.append(fn_scale(payload, values[inputs[0]]))
            elif kind == "sum":
                values.append(fn_sum([values[i] for i in inputs]))
            else:
                values.append(fn_l2([values[i] for i in inputs]))
        return values[self.result]

    def bound(self, ctx: Context) -> float:
        def scale(payload: Any, v: float) -> float:
            return mul_up(payload if isinstance(payload, float) else payload.bound(ctx), v)

        def total(vs: List[float]) -> float:
            out = 0.0
            for v in vs:
                out = add_up(out, v)
            return out

        def l2(vs: List[float]) -> float:
            out = 0.0
            for v in vs:
                out = add_up(out, mul_up(v, v))
            return sqrt_up(out)

        return self._run(scale, total, l2, 1.0)

    def estimate(self) -> Union[Tensor, float]:
        def scale(payload: Any, v: Any) -> Any:
            return v * (payload if isinstance(payload, float) else payload.estimate())

        def l2(vs: List[Any]) -> Any:
            squares = sum(v * v for v in vs)
            return torch.sqrt(squares) if isinstance(squares, Tensor) else math.sqrt(squares)

        return self._run(scale, lambda vs: sum(vs), l2, 1.0)


class TracedCall:
    """One call of a traced forward, as a tensor-operation handler sees it (see ``tensor_ops.py``).

    ``args`` / ``kwargs``: the call's arguments (``args[0]``, ``x``, is the tensor it is called on);
    ``inputs``: the input-dependent nodes among them; ``out_shape``: its output shape, batch included;
    ``shape_of(node)``; ``single()``: ``x`` when it is the one input-dependent argument, else a refusal;
    ``emit(kind, payload, inputs)`` records the propagation rule: ``"scale"`` (payload a float or a Plan),
    ``"sum"``, ``"l2"``; ``refuse(why)`` builds the CRMTError.
    """

    def __init__(self, compiler: "TraceCompiler", node: fx.Node, inputs: List[fx.Node]) -> None:
        self.compiler, self.node, self.inputs = compiler, node, inputs
        self.args, self.kwargs = list(node.args), dict(node.kwargs)
        self.x = self.args[0] if self.args else None
        self.out_shape = compiler.shape_of(node)
        self.path = join(compiler.path, node.name)
        self.module, self.ctx = compiler.module, compiler.ctx

    def shape_of(self, node: fx.Node) -> Tuple[int, ...]:
        return self.compiler.shape_of(node)

    def is_variable(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and bool(self.compiler.variable.get(node))

    def is_emitted(self, node: fx.Node) -> bool:
        return node in self.compiler.index

    def refuse(self, why: str) -> CRMTError:
        return self.compiler.refuse(self.node, why)

    def single(self) -> fx.Node:
        if len(self.inputs) != 1 or self.x is not self.inputs[0]:
            raise self.refuse("combines several inputs-dependent tensors in a way we cannot bound")
        return self.x

    def emit(self, kind: str, payload: Any, inputs: List[fx.Node]) -> None:
        self.compiler.emit(self.node, kind, payload, inputs)


class TraceCompiler:
    """Compiles a traced module: every node of its graph becomes one propagation step of a :class:`GraphPlan`."""

    def __init__(self, module: nn.Module, in_shape: Shape, path: str, ctx: Context) -> None:
        self.module, self.in_shape, self.path, self.ctx = module, in_shape, path, ctx
        self.at = where(path, module)
        self.values: Dict[fx.Node, Any] = {}
        self.index: Dict[fx.Node, int] = {}
        self.variable: Dict[fx.Node, bool] = {}
        self.ops: List[Tuple[str, Any, List[int]]] = []
        self.module_plans: Dict[fx.Node, Plan] = {}

    def refuse(self, node: fx.Node, why: str) -> CRMTError:
        return CRMTError(
            f"cannot bound the Lipschitz constant of layer {self.at}: the operation {describe(node)} "
            f"in its forward {why}; {how_to_declare(self.module)}"
        )

    def shape_of(self, node: fx.Node) -> Tuple[int, ...]:
        return tuple(self.values[node].shape)

    def emit(self, node: fx.Node, kind: str, payload: Any, inputs: List[fx.Node]) -> None:
        self.index[node] = len(self.ops)
        self.ops.append((kind, payload, [self.index[i] for i in inputs]))

    def _trace_and_run(self) -> fx.GraphModule:
        try:
            gm = trace(self.module)
        except Exception as exc:  # noqa: BLE001
            raise CRMTError(
                f"cannot bound the Lipschitz constant of layer {self.at}: {trace_failure(exc)}; "
                f"{how_to_declare(self.module)}, or rewrite it with nn.Sequential / crmt_plugin.bounds.Residual"
            ) from exc
        values = self.values

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                values[n] = out
                return out

        dtype, device = self.ctx.spec
        try:
            with torch.no_grad():
                Recorder(gm).run(torch.zeros((2, *self.in_shape), dtype=dtype, device=device))
        except Exception as exc:  # noqa: BLE001
            raise CRMTError(
                f"layer {self.at} failed on an input of shape (B, {', '.join(map(str, self.in_shape))}) "
                f"(input_shape is one sample's shape, without the batch dimension): {exc}"
            ) from exc
        return gm

    def compile(self) -> Tuple[Plan, Shape]:
        gm = self._trace_and_run()
        self.variable = variable_nodes(gm)
        placeholders = 0
        result: Optional[int] = None
        output: Any = None
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                placeholders += 1
                if placeholders > 1 and not node.args:
                    raise self.refuse(node, "is a second required input (encoders take one tensor)")
                self.emit(node, "input" if placeholders == 1 else "const", None, [])   # optional args: constants
            elif node.op == "output":
                output = node.args[0]
                if not isinstance(output, fx.Node) or not self.variable.get(output):
                    raise self.refuse(node, "does not return one tensor computed from the input")
                result = self.index[output]
            elif not self.variable[node]:
                self.emit(node, "const", None, [])
            else:
                self._variable_node(gm, node)
        if result is None:  # pragma: no cover
            raise CRMTError(f"layer {self.at}: traced graph has no output")
        return GraphPlan(self.path, self.ops, result), tuple(self.values[output].shape[1:])

    def _variable_node(self, gm: fx.GraphModule, node: fx.Node) -> None:
        value = self.values.get(node)
        if not isinstance(value, Tensor):
            raise self.refuse(node, "produces a non-tensor value from the input")
        if value.dim() == 0 or value.shape[0] != 2:
            raise self.refuse(node, f"maps a batch of 2 samples to shape {tuple(value.shape)} "
                                    f"(it mixes the batch dimension)")
        inputs = [a for a in input_nodes(node) if self.variable.get(a)]
        if node.op == "call_module":
            self._call_module(gm, node, inputs)
            return
        key = op_key(node.op, node.target)
        factory, handler = functional_layer_for(key), tensor_op_for(key)
        if factory is None and handler is None:
            raise self.refuse(node, "is not one whose Lipschitz constant is known")
        call = TracedCall(self, node, inputs)
        inplace = call.kwargs.get("inplace") is True or (node.op == "call_method" and str(node.target).endswith("_"))
        shared = inplace and isinstance(call.x, fx.Node) and len(call.x.users) > 1
        if factory is not None:
            self._functional_layer(call, factory, shared)
            return
        if shared:
            raise call.refuse("modifies in place a tensor that is used elsewhere")
        handler(call)

    def _call_module(self, gm: fx.GraphModule, node: fx.Node, inputs: List[fx.Node]) -> None:
        sub = gm.get_submodule(node.target)
        first = node.args[0] if node.args else None
        if len(inputs) != 1 or first is not inputs[0] or len(node.args) != 1 or node.kwargs:
            raise self.refuse(node, "calls a submodule with more than one input")
        shape = self.shape_of(first)[1:]
        if len(first.users) > 1:
            head = expansive_inplace_head(sub, shape, self.ctx)
            if head is not None:
                raise self.refuse(node, f"overwrites a tensor that is used elsewhere with {type(head).__name__}"
                                        f"(inplace=True), whose Lipschitz constant exceeds 1 (use inplace=False)")
        producer = self.module_plans.get(first)
        if producer is not None and len(first.users) == 1 and producer.absorb(node.target, sub, shape, self.path,
                                                                               self.ctx):
            self.emit(node, "scale", 1.0, [first])          # folded into the conv/linear before it
            return
        plan, _ = compile_module(sub, shape, join(self.path, node.target), self.ctx)
        self.module_plans[node] = plan
        self.emit(node, "scale", plan, [first])

    def _functional_layer(self, call: TracedCall, factory: Callable, shared: bool) -> None:
        x = call.single()
        try:
            layer = factory(call.args[1:], call.kwargs, self.ctx.was_training(self.module))
        except (TypeError, ValueError) as exc:
            raise call.refuse(f"has arguments we could not read ({exc})") from exc
        plan, _ = compile_module(layer, self.shape_of(x)[1:], call.path, self.ctx)
        if shared and not is_nonexpansive(plan):
            raise call.refuse("overwrites a tensor that is used elsewhere with a map whose Lipschitz constant "
                              "exceeds 1 (use inplace=False)")
        self.emit(call.node, "scale", plan, [x])


def trace_failure(exc: Exception) -> str:
    return (f"it is not an nn.Sequential or a known layer, and tracing its forward with torch.fx failed "
            f"({type(exc).__name__}: {exc})")


# ----------------------------------------------------------------------------------------------
# the unsupported-layer check: every layer without a bound, at once
# ----------------------------------------------------------------------------------------------

def _scan(module: nn.Module, path: str, found: List[Tuple[str, nn.Module, str]]) -> None:
    if declared(module) is not None:
        return
    rule = rule_for(module)
    if rule is not None:
        if rule.composite:
            for name, child in module.named_children():
                _scan(child, join(path, name), found)
        return
    if is_torch_layer(module):
        found.append((path, module, f"no sound bound is known for {type(module).__name__}"))
        return
    try:
        gm = trace(module)
    except Exception as exc:  # noqa: BLE001 - reported with the others
        found.append((path, module, trace_failure(exc)))
        return
    variable = variable_nodes(gm)
    unknown = []
    for node in gm.graph.nodes:
        if not variable.get(node) or node.op == "placeholder":
            continue
        if node.op == "call_module":
            _scan(gm.get_submodule(node.target), join(path, node.target), found)
        elif node.op in ("call_function", "call_method") and not is_known_op(node):
            unknown.append(describe(node))
    if len(unknown) == 1:
        found.append((path, module, f"the operation {unknown[0]} in its forward is not one whose Lipschitz "
                                    f"constant is known"))
    elif unknown:
        found.append((path, module, f"the operations {', '.join(unknown)} in its forward are not ones whose "
                                    f"Lipschitz constant is known"))


def unsupported_layers(module: nn.Module, name: str = "") -> List[Tuple[str, str, str]]:
    """Every layer of ``module`` that no declaration, rule or traced operation covers: ``[(path, type, why)]``.

    Empty when the walk can bound every layer (it may still refuse a configuration, e.g. a BatchNorm in
    training mode). ``name`` prefixes the paths, as in :func:`~crmt_plugin.bounds.lipschitz_upper_bound`.
    """
    found: List[Tuple[str, nn.Module, str]] = []
    _scan(module, name, found)
    return [(path or "<root>", type(m).__name__, why) for path, m, why in found]


def refuse_unsupported(module: nn.Module, name: str = "") -> None:
    """Raise one CRMTError listing every unsupported layer (see :func:`unsupported_layers`), if any."""
    found: List[Tuple[str, nn.Module, str]] = []
    _scan(module, name, found)
    if len(found) == 1:
        path, m, why = found[0]
        fix = how_to_declare(m) + (", or replace the layer" if why.startswith("no sound") else "")
        raise CRMTError(f"cannot bound the Lipschitz constant of layer {where(path, m)}: {why}; {fix}")
    if found:
        items = "; ".join(f"({i}) {where(path, m)}: {why}" for i, (path, m, why) in enumerate(found, 1))
        raise CRMTError(
            f"cannot bound the Lipschitz constant of {len(found)} layers: {items}. For each, declare a bound with "
            f"crmt_plugin.bounds.declare_lipschitz(<the module or its type>, bound) (a float or a callable "
            f"(module, input_shape) -> float), register a rule with @crmt_plugin.bounds.lipschitz_rule(<its type>), "
            f"or replace the layer"
        )


# ----------------------------------------------------------------------------------------------
# compiling a whole encoder
# ----------------------------------------------------------------------------------------------

def check_shape(input_shape: Any, what: str) -> Shape:
    """One sample's shape as a tuple of positive ints."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise CRMTError(f"{what} must be a tuple of ints (one sample's shape), found {input_shape!r}") from None
    if any(s <= 0 for s in shape):
        raise CRMTError(f"{what} must have positive sizes, found {shape}")
    return shape


def module_spec(module: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """(dtype, device) of the module's first floating tensor (default dtype on CPU when none)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def compiled(module: nn.Module, shape: Shape, name: str, ctx: Context) -> Tuple[Plan, Shape]:
    """Check every layer is supported, then compile with every submodule in eval mode (no BatchNorm
    statistics updates); the training flags are restored."""
    if not isinstance(module, nn.Module):
        raise CRMTError(f"expected an nn.Module, found {type(module).__name__}")
    ctx.flags = {m: m.training for m in module.modules()}
    ctx.spec = module_spec(module)
    try:
        module.eval()
        refuse_unsupported(module, name)        # traced in eval mode, as compiled
        return compile_module(module, shape, name, ctx)
    finally:
        for m, flag in ctx.flags.items():
            m.training = flag
