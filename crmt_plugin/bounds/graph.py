"""Composition: the module walk (declarations, rules, ``nn.Sequential``, :class:`Residual`) and the
unsupported-layer check that lists every layer without a bound at once.

The walk asks the registry (:func:`~crmt_plugin.bounds.registry.rule_for`) for each module; a module
without a rule but with a custom ``forward`` is traced with torch.fx (:mod:`~crmt_plugin.bounds.traced`).
Sequential: L(f_n o ... o f_1) <= prod L(f_i); Residual: L(shortcut + branch) <= L(shortcut) + L(branch).

    >>> from torch import nn
    >>> for row in unsupported_layers(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Tanh(), nn.GroupNorm(1, 4))):
    ...     print(row)
    ('1', 'LayerNorm', 'no sound bound is known for LayerNorm')
    ('3', 'GroupNorm', 'no sound bound is known for GroupNorm')
"""

from __future__ import annotations

import itertools
import math
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import CRMTError
from .plan import Chain, Context, Fixed, Plan, Shape, Sum, how_to_declare, is_nonexpansive, join, where
from .registry import LayerSite, declared, forward_owner, lipschitz_rule, op_key, rule_for, tensor_op_problem
from .traced import TraceCompiler, describe, input_nodes, is_known_op, trace, trace_failure, variable_nodes

__all__ = ["Residual", "compile_module", "compiled", "unsupported_layers", "refuse_unsupported", "check_shape",
           "module_spec", "expansive_inplace_head"]


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
        return TraceCompiler(module, tuple(in_shape), path, ctx, compile_module, expansive_inplace_head).compile()
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
    for name, part in (("branch", module.branch), ("shortcut", module.shortcut)):
        head = expansive_inplace_head(part, in_shape, join(path, name), ctx)
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


def expansive_inplace_head(module: Optional[nn.Module], in_shape: Shape, path: str,
                           ctx: Context) -> Optional[nn.Module]:
    """The in-place layer that runs first on a block's input, if it may enlarge distances (L > 1).

    An in-place layer f overwrites its input; anything else that reads that tensor (a residual skip)
    then sees f(x) instead of x. That keeps every bound sound when L(f) <= 1 (ReLU, Hardtanh, eval
    Dropout), but not otherwise.
    """
    m = module
    while isinstance(m, nn.Sequential) and forward_owner(m) is nn.Sequential and len(m) > 0:
        name, m = next(iter(m.named_children()))
        path = join(path, name)
    if m is None or getattr(m, "inplace", False) is not True:
        return None
    bound = declared(m)
    if bound is not None:
        return None if not callable(bound) and float(bound) <= 1.0 else m
    rule = rule_for(m)
    if rule is None or rule.composite:
        return m
    plan, _ = compile_module(m, in_shape, path, ctx)
    return None if is_nonexpansive(plan) else m


# ----------------------------------------------------------------------------------------------
# torch.fx: modules with a custom forward (x + f(x), cat, view, slicing, F.relu, ...)
# ----------------------------------------------------------------------------------------------

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
        elif node.op in ("call_function", "call_method"):
            if not is_known_op(node):
                unknown.append((describe(node), "is not one whose Lipschitz constant is known"))
                continue
            n_inputs = sum(1 for a in input_nodes(node) if variable.get(a))
            problem = tensor_op_problem(op_key(node.op, node.target), n_inputs)
            if problem:
                unknown.append((describe(node), problem))
    if len(unknown) == 1:
        found.append((path, module, f"the operation {unknown[0][0]} in its forward {unknown[0][1]}"))
    elif unknown:
        ops = ", ".join(f"{text} {why}" for text, why in unknown)
        found.append((path, module, f"operations in its forward cannot be bounded: {ops}"))


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
