"""The late-fusion check: which modality does each column of the fusion head's input depend on?

CRMT's certificate bounds every uni-modal logit z^(m) = W~^(m) phi^(m)(x^(m)) by a Lipschitz
constant of x^(m) **alone**. That holds only if block m of the head's input (its columns
``offset_m .. offset_m + d_m - 1``) depends on modality m and on nothing else. Nothing in a
declaration ``modalities={"audio": 3, "visual": 3}`` guarantees it: the model may concatenate the
features in another order, with other widths, or mix the modalities before the head
(cross-attention, early fusion, a gate or a normalisation over several modalities).

:func:`probe` measures it. It captures the head's input with a forward pre-hook, perturbs one
modality at a time (a roll of the batch, two large and one small Gaussian perturbation for a
floating-point input; a roll and random values taken from the batch for an integer input) and
records which columns move. A column that moves for two modalities mixes them; a column that never
moves is *constant* on the probe batch (a dead unit) and compatible with any block. The model runs
in eval mode with gradients off, and every submodule's ``training`` flag is restored afterwards;
the probe draws from its own random generator (the global one is untouched).

The verdict is empirical in one direction only: a reported dependence is real (the column moved),
while a dependence that none of the perturbations triggers is missed. With several random
perturbations of every sample this is unlikely for the models CRMT targets.

Example::

    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.fc = nn.Linear(2, 3), nn.Linear(4, 2), nn.Linear(5, 3)
    ...     def forward(self, a, b):
    ...         return self.fc(torch.cat([self.b(b), self.a(a)], dim=1))   # [b, a]
    >>> net = Net()
    >>> batch = {"a": torch.randn(8, 2), "b": torch.randn(8, 4)}
    >>> report = probe(net, lambda x: net(**x), {"fc": net.fc}, batch)
    >>> report.blocks("fc")
    [(0, 2, ('b',)), (2, 5, ('a',))]
    >>> dict(discover_widths(report, "fc"))
    {'b': 2, 'a': 3}
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._runtime import Inputs, ModeGuard
from .errors import CRMTError

__all__ = [
    "StructureReport",
    "probe",
    "check_concatenated",
    "check_per_modality",
    "discover_widths",
    "find_output_layers",
    "WHY_LATE_FUSION",
]

WHY_LATE_FUSION = (
    "CRMT's certificate bounds each uni-modal logit z^(m) by a Lipschitz constant of x^(m) alone, so "
    "block m of the fusion head's input must depend on modality m only; a feature that depends on "
    "several modalities (cross-attention, early fusion, a gate or a normalisation over several "
    "modalities) breaks that bound, and the certificate does not apply to this model"
)

Block = Tuple[int, int, Tuple[str, ...]]  # [start, stop), the modalities the columns depend on


def _columns(start: int, stop: int) -> str:
    """'columns 3–5' for the half-open range [3, 6); 'column 3' for one."""
    return f"column {start}" if stop - start == 1 else f"columns {start}–{stop - 1}"


@dataclass
class StructureReport:
    """Which modalities move which head-input columns.

    Attributes:
        modalities: the probed modality names, in the order of ``dependence``'s rows.
        dependence: {target: (M, D) bool}, True where perturbing modality m moved column j of that
            target module's input.
        samples: how many samples the probe used.
    """

    modalities: Tuple[str, ...]
    dependence: Dict[str, Tensor]
    samples: int

    def owners(self, target: str) -> List[Tuple[str, ...]]:
        """Per column of ``target``'s input: the modalities it depends on (empty: constant)."""
        dep = self.dependence[target]
        return [tuple(n for i, n in enumerate(self.modalities) if bool(dep[i, j])) for j in range(dep.shape[1])]

    def blocks(self, target: str) -> List[Block]:
        """Maximal runs of consecutive columns with the same owners: ``[(start, stop, owners), ...]``."""
        runs: List[Block] = []
        for j, owner in enumerate(self.owners(target)):
            if runs and runs[-1][2] == owner:
                runs[-1] = (runs[-1][0], j + 1, owner)
            else:
                runs.append((j, j + 1, owner))
        return runs

    def mixing(self, target: str) -> List[Block]:
        """The runs of columns that depend on more than one modality."""
        return [b for b in self.blocks(target) if len(b[2]) > 1]


def _perturbations(x: Tensor, generator: torch.Generator, count: int) -> List[Tensor]:
    """Variants of ``x`` (B, ...) that differ from it: a roll of the batch, then random ones."""
    out: List[Tensor] = []
    batch = x.shape[0]
    if batch > 1:
        out.append(torch.roll(x, shifts=1, dims=0))
    if x.is_floating_point() or x.is_complex():
        finite = x.detach()
        std = float(finite.double().std()) if finite.numel() > 1 else float(finite.double().abs().sum())
        if not (std > 0 and std < float("inf")):
            std = 1.0
        for i in range(count):
            scale = std * (0.01 if i == count - 1 else 1.0)  # the last one small: saturating encoders
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            out.append(x + (noise * scale).to(device=x.device, dtype=x.dtype))
    elif x.numel():
        values = torch.unique(x.detach().cpu())
        for _ in range(count):
            index = torch.randint(0, values.numel(), x.shape, generator=generator)
            out.append(values[index].to(device=x.device, dtype=x.dtype))
    return [p for p in out if not torch.equal(p, x)]


def probe(
    model: nn.Module,
    run: Callable[[Inputs], object],
    targets: Mapping[str, nn.Module],
    inputs: Inputs,
    *,
    perturbations: int = 3,
    max_samples: int = 64,
    seed: int = 0,
) -> StructureReport:
    """Perturb one modality at a time and record which input columns of each target module move.

    Args:
        model: the model (its mode is switched to eval and restored exactly afterwards).
        run: ``run(inputs)`` runs the model on an input dict (its return value is ignored).
        targets: {name: module} whose *input* (the first positional argument, (..., D)) is watched;
            each must be called exactly once per forward.
        inputs: {modality: (B, ...)} a batch (the first ``max_samples`` samples are used).
        perturbations: random perturbations per modality (plus a roll of the batch when B > 1).
        seed: seed of the probe's own generator.

    Returns:
        :class:`StructureReport`. Raises :class:`CRMTError` for an empty batch, a target that is
        not called exactly once, a model that is not deterministic in eval mode, or a modality that
        cannot be varied on this batch.
    """
    names = tuple(inputs)
    if not names:
        raise CRMTError("the structure probe needs a non-empty input dict {modality: tensor}")
    for n, x in inputs.items():
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise CRMTError(f"the structure probe needs a batch tensor (B, ...) for modality {n!r}, found {x!r}")
    batch = min(int(x.shape[0]) for x in inputs.values())
    if batch == 0:
        raise CRMTError("the structure probe needs at least one sample; the batch is empty")
    batch = min(batch, max_samples)
    base = {n: x[:batch] for n, x in inputs.items()}
    captured: Dict[str, List[Tensor]] = {t: [] for t in targets}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], Tensor):
                raise CRMTError(f"the fusion head {name!r} must be called with a tensor as first argument")
            captured[name].append(args[0].detach())
        return hook

    def capture(batch_inputs: Inputs) -> Dict[str, Tensor]:
        for lst in captured.values():
            lst.clear()
        run(batch_inputs)
        result = {}
        for t, calls in captured.items():
            if len(calls) != 1:
                raise CRMTError(
                    f"the fusion head {t!r} was called {len(calls)} times in one forward; it must be "
                    "called exactly once (on the features of every modality)"
                )
            x = calls[0]
            result[t] = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        return result

    generator = torch.Generator().manual_seed(seed)
    handles = [module.register_forward_pre_hook(hook_for(t)) for t, module in targets.items()]
    try:
        with ModeGuard(model, eval_mode=True), torch.no_grad():
            first = capture(base)
            second = capture(base)
            tolerance = {}
            for t in targets:
                x0 = first[t].double()
                noise = (second[t].double() - x0).abs()
                if not bool(torch.isfinite(x0).all()):
                    raise CRMTError(f"the input of the fusion head {t!r} holds NaN/Inf on the probe batch")
                scale = float(x0.abs().max()) if x0.numel() else 0.0
                if x0.numel() and float(noise.max()) > 1e-3 * max(scale, 1e-12):
                    raise CRMTError(
                        f"the input of the fusion head {t!r} differs between two identical forward passes in "
                        f"eval mode (largest difference {float(noise.max()):.3g}): the structure cannot be "
                        "checked, and no certificate holds for a random model"
                    )
                column = x0.abs().amax(dim=0)
                floor = torch.maximum(column, torch.full_like(column, 1e-6 * scale))
                tolerance[t] = 1e-6 * floor + 4 * noise.amax(dim=0) + 1e-300
            dependence = {t: torch.zeros(len(names), first[t].shape[1], dtype=torch.bool) for t in targets}
            for i, name in enumerate(names):
                variants = _perturbations(base[name], generator, perturbations)
                if not variants:
                    raise CRMTError(
                        f"modality {name!r} cannot be varied on this batch (one sample of a non-floating "
                        f"input, or identical values): pass a batch with varied values of {name!r}"
                    )
                for variant in variants:
                    moved = capture({**base, name: variant})
                    for t in targets:
                        diff = (moved[t].double() - first[t].double()).abs()
                        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
                        dependence[t][i] |= (diff > tolerance[t]).any(dim=0).cpu()
    finally:
        for h in handles:
            h.remove()
    return StructureReport(modalities=names, dependence=dependence, samples=batch)


def _mixing_error(report: StructureReport, target: str, what: str) -> CRMTError:
    runs = report.mixing(target)
    where = "; ".join(f"{_columns(s, e)} depend on {' and '.join(repr(n) for n in owners)}" for s, e, owners in runs)
    return CRMTError(
        f"the model mixes modalities before the fusion head: {what} {where}. {WHY_LATE_FUSION}. Keep the "
        "modalities separate up to the fusion nn.Linear (one encoder per modality, concatenated or summed)"
    )


def check_concatenated(report: StructureReport, target: str, widths: Mapping[str, int]) -> None:
    """Raise :class:`CRMTError` unless block m of ``target``'s input (in the order and widths of
    ``widths``) depends on modality m only. Constant columns are accepted anywhere."""
    if report.mixing(target):
        raise _mixing_error(report, target, "head input")
    declared: List[str] = [n for n, d in widths.items() for _ in range(d)]
    owners = report.owners(target)
    if len(declared) != len(owners):
        raise CRMTError(
            f"the declared widths {dict(widths)} sum to {len(declared)}, but the head input has "
            f"{len(owners)} columns"
        )
    wrong: List[Tuple[int, int, str, str]] = []
    for j, (owner, expected) in enumerate(zip(owners, declared)):
        if owner and owner[0] != expected:
            if wrong and wrong[-1][1] == j and wrong[-1][2:] == (owner[0], expected):
                wrong[-1] = (wrong[-1][0], j + 1, owner[0], expected)
            else:
                wrong.append((j, j + 1, owner[0], expected))
    if wrong:
        found = "; ".join(f"head input {_columns(s, e)} depend on {o!r}, declared {d!r}" for s, e, o, d in wrong)
        blocks = ", ".join(f"{_columns(s, e)}: {'/'.join(o) or 'constant'}" for s, e, o in report.blocks(target))
        raise CRMTError(
            f"the declared modalities {dict(widths)} do not match the model: {found}. Found blocks: "
            f"{blocks}. Declare the modalities in the order and widths the head concatenates them (or pass "
            "example_inputs= and leave modalities out to discover them)"
        )


def check_per_modality(report: StructureReport, targets: Mapping[str, str]) -> None:
    """Sum-of-heads: raise unless the input of head ``targets[m]`` depends on modality m only."""
    for name, target in targets.items():
        if report.mixing(target):
            raise _mixing_error(report, target, f"the input of head {target!r} (declared for {name!r}):")
        others = sorted({o[0] for o in report.owners(target) if o and o[0] != name})
        if others:
            where = "; ".join(f"{_columns(s, e)} depend on {o[0]!r}" for s, e, o in report.blocks(target)
                              if o and o[0] != name)
            raise CRMTError(
                f"the input of head {target!r}, declared for modality {name!r}, depends on {others} "
                f"({where}): map every modality to the nn.Linear that reads its own features"
            )


def discover_widths(report: StructureReport, target: str) -> "OrderedDict[str, int]":
    """{modality: d_m} in the order the head input concatenates them, from the probe.

    Constant columns join the neighbouring block when that is unambiguous (inside one block, or at
    either end); between two different blocks the split is ambiguous and raises.
    """
    if report.mixing(target):
        raise _mixing_error(report, target, "head input")
    blocks = report.blocks(target)
    named = [b for b in blocks if b[2]]
    if not named:
        raise CRMTError(f"no column of the head input moved when any modality {list(report.modalities)} was "
                        "perturbed: the head input does not depend on the inputs on this batch")
    order: List[str] = []
    for _, _, owner in named:
        if order and order[-1] == owner[0]:
            continue
        if owner[0] in order:
            runs = ", ".join(f"{_columns(s, e)}: {o[0]}" for s, e, o in named)
            raise CRMTError(
                f"the head input interleaves the modalities ({runs}): a CRMT head needs each modality's "
                "features as one contiguous block; concatenate them per modality"
            )
        order.append(owner[0])
    missing = [n for n in report.modalities if n not in order]
    if missing:
        raise CRMTError(
            f"the head input does not depend on the modalities {missing} (columns by modality: "
            + ", ".join(f"{_columns(s, e)}: {'/'.join(o) or 'constant'}" for s, e, o in blocks)
            + "); CRMT needs every modality's features in the fusion head"
        )
    widths: "OrderedDict[str, int]" = OrderedDict((n, 0) for n in order)
    for i, (start, stop, owner) in enumerate(blocks):
        if owner:
            widths[owner[0]] += stop - start
            continue
        before = blocks[i - 1][2] if i > 0 else ()
        after = blocks[i + 1][2] if i + 1 < len(blocks) else ()
        if before and after and before != after:
            raise CRMTError(
                f"head input {_columns(start, stop)} did not move under any perturbation and lie between "
                f"the blocks of {before[0]!r} and {after[0]!r}: the split is ambiguous on this batch. Pass "
                "modalities={name: width} explicitly (or a batch that exercises those features)"
            )
        widths[(before or after)[0]] += stop - start
    return widths


def find_output_layers(
    model: nn.Module, run: Callable[[Inputs], Tensor], inputs: Inputs
) -> Tuple[List[str], List[str], Tensor]:
    """Find the fusion layer(s): ``(exact, summands, logits)``.

    ``exact``: the ``nn.Linear`` layers whose output *is* (or, failing that, equals) the model's
    logits. ``summands``: when ``exact`` is empty, the ``nn.Linear`` layers with the logits' shape,
    each called once, whose outputs add up to the logits (a sum-of-heads fusion; empty otherwise).
    Runs the model once in eval mode without gradients (modes restored).
    """
    outputs: Dict[str, List[Tensor]] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, _args: tuple, out: object) -> None:
            if isinstance(out, Tensor):
                outputs.setdefault(name, []).append(out)
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with ModeGuard(model, eval_mode=True), torch.no_grad():
            logits = run(inputs)
    finally:
        for h in handles:
            h.remove()
    identical = [n for n, outs in outputs.items() if any(o is logits for o in outs)]
    exact = identical or [n for n, outs in outputs.items()
                          if any(o.shape == logits.shape and torch.equal(o, logits) for o in outs)]
    summands: List[str] = []
    if not exact:
        shaped = [n for n, outs in outputs.items() if len(outs) == 1 and outs[0].shape == logits.shape]
        if len(shaped) >= 2:
            total = sum(outputs[n][0].double() for n in shaped)
            scale = float(logits.double().abs().max()) if logits.numel() else 1.0
            if torch.allclose(total, logits.double(), rtol=1e-5, atol=1e-6 * max(scale, 1.0)):
                summands = shaped
    return exact, summands, logits


def candidates_message(model: nn.Module, num_classes: Optional[int]) -> str:
    """The model's nn.Linear layers (with K outputs first), for error messages."""
    layers: Sequence[Tuple[str, nn.Linear]] = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    fitting = [f"{n} ({m.in_features}->{m.out_features})" for n, m in layers if m.out_features == num_classes]
    others = [f"{n} ({m.in_features}->{m.out_features})" for n, m in layers if m.out_features != num_classes]
    return f"nn.Linear layers with {num_classes} outputs: {fitting or 'none'}; others: {others or 'none'}"
