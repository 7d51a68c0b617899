"""torch.fx: modules with a custom forward (``x + f(x)``, ``cat``, ``view``, slicing, ``F.relu``, ...).

The module is traced (every layer with a declaration or a rule stays one call), run once on zeros to learn
every node's shape, and each input-dependent node becomes one step of a :class:`GraphPlan`:
submodule calls are compiled by the module walk, functions that compute a layer (``F.relu``,
``F.avg_pool2d``) by that layer's rule, tensor operations by their handler in ``tensor_ops.py``.
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
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import CRMTError
from .plan import Context, Plan, Shape, how_to_declare, is_nonexpansive, join, where
from .registry import declared, functional_layer_for, op_key, rule_for, tensor_op_for
from .rounding import add_up, mul_up, sqrt_up

__all__ = ["Tracer", "trace", "describe", "variable_nodes", "input_nodes", "is_known_op", "trace_failure",
           "GraphPlan", "TracedCall", "TraceCompiler"]

CompileFn = Callable[[nn.Module, Shape, str, Context], Tuple[Plan, Shape]]
InplaceHeadFn = Callable[[Optional[nn.Module], Shape, str, Context], Optional[nn.Module]]

CONST_METHODS = {"size", "dim", "numel"}               # results that depend on the shape only
CONST_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}

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
    """One call of a traced forward, as a tensor-operation handler sees it (handlers: ``tensor_ops.py``).

    ``module`` / ``parent_path``: the traced module and its path; ``path``: this call's path;
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
        self.path = join(compiler.path, node.name)          # this call's path (per_layer, messages)
        self.parent_path = compiler.path                    # the traced module's path
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
    """Compiles a traced module: every node of its graph becomes one propagation step of a :class:`GraphPlan`.

    ``compile_child(module, in_shape, path, ctx) -> (plan, out_shape)`` compiles a submodule (the module walk,
    :func:`~crmt_plugin.bounds.graph.compile_module`); ``inplace_head(module, in_shape, path, ctx)`` returns the
    in-place layer with L > 1 that would run first on a shared tensor, if any.
    """

    def __init__(self, module: nn.Module, in_shape: Shape, path: str, ctx: Context, compile_child: CompileFn,
                 inplace_head: InplaceHeadFn) -> None:
        self.module, self.in_shape, self.path, self.ctx = module, in_shape, path, ctx
        self.compile_child, self.inplace_head = compile_child, inplace_head
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
            head = self.inplace_head(sub, shape, join(self.path, node.target), self.ctx)
            if head is not None:
                raise self.refuse(node, f"overwrites a tensor that is used elsewhere with {type(head).__name__}"
                                        f"(inplace=True), whose Lipschitz constant exceeds 1 (use inplace=False)")
        producer = self.module_plans.get(first)
        if producer is not None and len(first.users) == 1 and producer.absorb(node.target, sub, shape, self.path,
                                                                               self.ctx):
            self.emit(node, "scale", 1.0, [first])          # folded into the conv/linear before it
            return
        plan, _ = self.compile_child(sub, shape, join(self.path, node.target), self.ctx)
        self.module_plans[node] = plan
        self.emit(node, "scale", plan, [first])

    def _functional_layer(self, call: TracedCall, factory: Callable, shared: bool) -> None:
        x = call.single()
        try:
            layer = factory(call.args[1:], call.kwargs, self.ctx.was_training(self.module))
        except (TypeError, ValueError) as exc:
            raise call.refuse(f"has arguments we could not read ({exc})") from exc
        plan, _ = self.compile_child(layer, self.shape_of(x)[1:], call.path, self.ctx)
        if shared and not is_nonexpansive(plan):
            raise call.refuse("overwrites a tensor that is used elsewhere with a map whose Lipschitz constant "
                              "exceeds 1 (use inplace=False)")
        self.emit(call.node, "scale", plan, [x])


def trace_failure(exc: Exception) -> str:
    return (f"it is not an nn.Sequential or a known layer, and tracing its forward with torch.fx failed "
            f"({type(exc).__name__}: {exc})")
