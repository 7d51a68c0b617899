"""``CRMTWrapper``: CRMT for a user's own multi-modal model, inside the user's own training loop."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._runtime import (
    OutputPicker,
    check_forward_signature,
    pick_logits,
    Inputs,
    ModeGuard,
    PrepareBatch,
    check_labels,
    finite_probe,
    iterate_batches,
    no_autocast,
    non_finite_modalities,
)
from .certify import Certificate, certificate_terms, radii_from_margins, resolve_denominator, stored_margins
from .errors import CRMTError
from .fusion import SummedHeadShare
from .head import CRMTHead
from .integration import IntegrationResult, fit_integration
from .lipschitz import LipschitzConstants, LipschitzLike, as_lipschitz, estimate_lipschitz
from .structure import (
    StructureReport,
    candidates_message,
    check_concatenated,
    check_per_modality,
    discover_widths,
    find_output_layers,
    probe,
)

__all__ = ["CRMTWrapper", "CRMTOutput"]

@dataclass
class CRMTOutput:
    """What ``crmt(inputs)`` returns.

    Attributes:
        logits: (B, K) fused logits h(x) = sum_m a^(m) z^(m) + b.
        unimodal: {name: (B, K)} uni-modal logits z^(m) = W~^(m) phi^(m)(x^(m)), before a.
        features: {name: (B, d_m)} the encoder features phi^(m)(x^(m)) fed to the head.
    """

    logits: Tensor
    unimodal: Dict[str, Tensor]
    features: Dict[str, Tensor]


def _register_output_as_pytree() -> None:
    """Make :class:`CRMTOutput` a pytree node, so torch utilities that walk a module's output (DDP
    with ``static_graph=True`` / ``find_unused_parameters=True``, ``torch.export``) see its tensors.
    Without it DDP's static graph skips the first iteration's gradient all-reduce, silently."""
    import torch.utils._pytree as pytree

    try:
        if hasattr(pytree, "register_dataclass"):
            pytree.register_dataclass(CRMTOutput, serialized_type_name="crmt_plugin.CRMTOutput")
        else:  # pragma: no cover - torch < 2.2
            pytree._register_pytree_node(
                CRMTOutput,
                lambda out: ([out.logits, out.unimodal, out.features], None),
                lambda values, _: CRMTOutput(*values),
            )
    except ValueError:  # pragma: no cover - already registered (module reloaded)
        pass


_register_output_as_pytree()


def _check_not_data_parallel(model: nn.Module) -> None:
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, (DistributedDataParallel, DataParallel)):
            where = f"at {name!r}" if name else "itself"
            raise CRMTError(
                f"the model {where} is a {type(module).__name__}: wrap the plain model with CRMTWrapper "
                "first, then DistributedDataParallel(crmt). DDP registers its gradient hooks on the "
                "parameters it sees when it is built, so the CRMT head that replaces the fusion "
                "nn.Linear afterwards would never have its gradients synchronised"
            )


def _resolve(model: nn.Module, path: str) -> Tuple[nn.Module, str, nn.Module]:
    if not isinstance(path, str) or not path:
        raise CRMTError(f"a head path must be a non-empty dotted module path (str), found {path!r}")
    parent_path, _, attr = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
        module = parent.get_submodule(attr)
    except AttributeError:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise CRMTError(
            f"head {path!r} not found in {type(model).__name__}; its nn.Linear layers are {names}"
        ) from None
    return parent, attr, module


def _linear_at(model: nn.Module, path: str) -> nn.Linear:
    _, _, linear = _resolve(model, path)
    if isinstance(linear, (CRMTHead, SummedHeadShare)):
        raise CRMTError(f"head {path!r} is already a CRMT head: the model was wrapped before")
    if not isinstance(linear, nn.Linear):
        raise CRMTError(f"head {path!r} is a {type(linear).__name__}, expected torch.nn.Linear")
    return linear


def _example_dict(example_inputs: Any) -> Optional[Dict[str, Tensor]]:
    if example_inputs is None:
        return None
    pair = isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2
    if pair and isinstance(example_inputs[0], Mapping):
        example_inputs = example_inputs[0]  # an (inputs, y) batch
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise CRMTError(f"example_inputs must be a batch dict {{modality: tensor (B, ...)}}, found "
                        f"{type(example_inputs).__name__}")
    for name, value in example_inputs.items():
        if not isinstance(value, Tensor):
            raise CRMTError(f"example_inputs[{name!r}] must be a tensor, found {type(value).__name__}")
    return dict(example_inputs)


class CRMTWrapper(nn.Module):
    """Wrap a late-fusion model so it trains, integrates and certifies with CRMT.

    The model's fusion ``nn.Linear(sum_m d_m, K)`` at ``head`` is replaced **in place** by a
    :class:`~crmt_plugin.head.CRMTHead` initialised from its weights (a trained joint-training head
    converts to the nearest CRMT head). The user's own ``model(...)`` keeps returning fused logits.
    A fusion that *adds* per-modality logits is given as ``head={name: path of nn.Linear(d_m, K)}``.

    Example::

        crmt = CRMTWrapper(model, example_inputs=batch)   # head and modalities discovered, structure checked
        crmt = CRMTWrapper(model, head="fusion.fc", modalities={"audio": 512, "visual": 512})
        crmt = CRMTWrapper(model, head={"tab": "tab_head", "sensor": "sensor_head"})   # sum of heads
        optimizer = torch.optim.SGD(crmt.parameters(), lr=1e-2)   # build it AFTER wrapping
        out = crmt({"audio": xa, "visual": xv})     # out.logits (B, K), out.unimodal["audio"] (B, K)
        loss = crmt_plugin.crmt_loss(out, y, rho=2.0)

    Args:
        model: the user's model. Its forward must return the head's output unchanged (possibly
            inside a tuple, dict or output object: see ``output``).
        head: dotted path of the fusion ``nn.Linear`` (as in ``model.get_submodule``), or a mapping
            {modality: dotted path of that modality's ``nn.Linear(d_m, K)``} for a model whose output
            is the sum of per-modality heads (biases are summed into one CRMT bias). ``None``:
            discovered from ``example_inputs`` (the ``nn.Linear`` whose output is the model's output,
            or the per-modality heads whose outputs add up to it).
        modalities: modality name -> feature width, in the order the head's input concatenates them.
            Input dicts must carry exactly these names. ``None``: the names are the keys of
            ``example_inputs`` and the order and widths are measured (or, for a sum of heads, the
            mapping's keys and the heads' ``in_features``).
        example_inputs: a batch ``{name: (B, ...)}`` (or an ``(inputs, y)`` batch). With it the
            late-fusion structure is verified at wrap time (see :mod:`crmt_plugin.structure`), the
            forward's signature is tried, and anything not given is discovered. Without it the
            structure is verified by the first :meth:`certify`.
        output: where the logits are in the model's output: ``None`` (the output, or its ``.logits``),
            an int (a tuple's element), a str (a dict key or attribute) or a callable ``out -> logits``.
        call: how to run the model on an input dict, ``call(model, inputs) -> output``; default
            ``model(**inputs)`` (the forward's parameters must be named after the modalities).
        integration_init: initial a^(m) for every class; default: fitted to the existing head (what a
            trained head needs). For a fresh model trained with ``crmt_loss`` on clean or mixed inputs,
            0.1 (the paper's start) measured more robust; with adversarial training keep the default
            (docs/method.md, "The initial a").
        orthonormal: ``True`` (CRMT): orthonormal rows of W~^(m). ``False``: unit-norm rows, which
            reproduce the existing head exactly — to certify or evaluate a trained joint-training
            model as it is, on equal terms with CRMT (certificates stay sound: they use the Gram
            matrix of the actual rows).
        shared_scale, scale_gain: one learnable scale shared by all a^(m), a = exp(scale_gain * tau)
            softplus(alpha) (on by default, gain 1): without it the CRMT head's logits grow slower
            than a plain head's under Adam and it can underfit (see
            :class:`~crmt_plugin.head.CRMTHead` and docs/method.md, "The shared scale").
            ``shared_scale=False`` is the paper's parametrisation (a = softplus(alpha) only).
        check_finite: raise :class:`CRMTError` when a training forward (train mode, grad enabled)
            sees NaN/Inf inputs or produces NaN/Inf logits (one host sync per step; one graph break
            under ``torch.compile``: turn it off for ``fullgraph=True``). Inference forwards are never
            checked; ``certify``, ``estimate_lipschitz`` and ``fit_integration`` always are.
    """

    def __init__(
        self,
        model: nn.Module,
        head: Union[None, str, Mapping[str, str]] = None,
        modalities: Optional[Mapping[str, int]] = None,
        *,
        example_inputs: Any = None,
        output: OutputPicker = None,
        call: Optional[Callable[[nn.Module, Inputs], Any]] = None,
        integration_init: Optional[float] = None,
        orthonormal: bool = True,
        shared_scale: bool = True,
        scale_gain: float = 1.0,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise CRMTError(f"model must be a torch.nn.Module, found {type(model).__name__}")
        if modalities is not None and (not isinstance(modalities, Mapping) or not modalities):
            raise CRMTError(f"modalities must map name -> feature width, found {modalities!r}")
        if isinstance(output, bool) or not (output is None or isinstance(output, (int, str)) or callable(output)):
            raise CRMTError(f"output must be None, an int, a str or a callable picking the logits, found {output!r}")
        _check_not_data_parallel(model)
        self._call = call
        self._output = output
        example = _example_dict(example_inputs)
        declared = list(modalities) if modalities is not None else (list(head) if isinstance(head, Mapping) else None)
        if example is not None and declared is not None and set(example) != set(declared):
            raise CRMTError(f"example_inputs carries the modalities {sorted(example)}, the model is declared with "
                            f"{sorted(declared)}")
        names = declared if declared is not None else (list(example) if example is not None else None)
        if call is None and names is not None:
            check_forward_signature(model, names)
        if example is not None:
            self._try_forward(model, example)
        if head is None or (modalities is None and not isinstance(head, Mapping)):
            if example is None:
                raise CRMTError(
                    "pass head= (the dotted path of the fusion nn.Linear) and modalities= ({name: width} in the "
                    "order the head concatenates them), or example_inputs= (a batch dict) to discover them"
                )
        report: Optional[StructureReport] = None
        if head is None:
            head, report = self._discover_head(model, example)
        head_options = {"integration_init": integration_init, "orthonormal": orthonormal,
                        "shared_scale": shared_scale, "scale_gain": scale_gain}
        if isinstance(head, Mapping):
            crmt_head, report = self._wrap_sum(model, head, modalities, example, report, head_options)
        else:
            crmt_head, report = self._wrap_concat(model, head, modalities, example, report, head_options)
        self.model = model
        self.head_path = head if isinstance(head, str) else dict(head)
        self.check_finite = check_finite
        self.structure: Optional[StructureReport] = report
        self._verified_key = self._structure_key() if report is not None else None

    # ------------------------------------------------------------------ wrapping
    def _raw_call(self, model: nn.Module, inputs: Inputs) -> Any:
        return self._call(model, inputs) if self._call is not None else model(**inputs)

    def _run_on(self, model: nn.Module) -> Callable[[Inputs], Tensor]:
        return lambda inputs: pick_logits(self._raw_call(model, inputs), self._output)

    def _try_forward(self, model: nn.Module, example: Inputs) -> None:
        with ModeGuard(model, eval_mode=True), torch.no_grad():
            try:
                out = self._raw_call(model, example)
            except TypeError as exc:
                how = "your call=" if self._call is not None else "model(**inputs)"
                raise CRMTError(
                    f"calling the model as {how} on example_inputs with the modalities {list(example)} failed: "
                    f"{exc}. Name the forward's arguments after the modalities or pass call=lambda model, inputs: ..."
                ) from exc
        logits = pick_logits(out, self._output)
        if logits.dim() != 2:
            raise CRMTError(f"the model's logits must have shape (B, K), found {tuple(logits.shape)}; pick them "
                            "with output=")

    def _discover_head(
        self, model: nn.Module, example: Inputs
    ) -> Tuple[Union[str, Dict[str, str]], Optional[StructureReport]]:
        wrapped = [n for n, m in model.named_modules() if isinstance(m, (CRMTHead, SummedHeadShare))]
        if wrapped:
            raise CRMTError(f"the model already holds CRMT heads at {wrapped}: it was wrapped before")
        exact, summands, logits = find_output_layers(model, self._run_on(model), example)
        num_classes = int(logits.shape[-1])
        if len(exact) == 1:
            return exact[0], None
        if len(exact) > 1:
            raise CRMTError(f"the model's output is the output of several nn.Linear layers {sorted(exact)}: the fusion "
                            "head is ambiguous; pass head= with one of them")
        if not summands:
            raise CRMTError(
                "no nn.Linear produces the model's output, and no set of per-modality nn.Linear outputs adds up "
                f"to it ({candidates_message(model, num_classes)}). The model must return the fusion head's "
                "output unchanged (pick it with output= if it returns a tuple or dict); or pass head= explicitly"
            )
        modules = {path: model.get_submodule(path) for path in summands}
        report = probe(model, self._run_on(model), modules, example)
        mapping: Dict[str, str] = {}
        for path in summands:
            if report.mixing(path):
                check_per_modality(report, {"?": path})
            owners = sorted({o[0] for o in report.owners(path) if o})
            if len(owners) != 1:
                raise CRMTError(
                    f"the model's output is the sum of {summands}, but the input of {path!r} depends on "
                    f"{owners or 'no modality'}: each summand must read one modality's features; pass head= "
                    "explicitly"
                )
            if owners[0] in mapping:
                raise CRMTError(f"the heads {mapping[owners[0]]!r} and {path!r} both read modality {owners[0]!r}: "
                                "the sum-of-heads fusion is ambiguous; pass head={modality: path} explicitly")
            mapping[owners[0]] = path
        missing = [n for n in example if n not in mapping]
        if missing:
            raise CRMTError(f"the model's output is the sum of {summands}, but no head reads the modalities "
                            f"{missing}; pass head= explicitly")
        return {n: mapping[n] for n in example if n in mapping}, report

    def _check_output_is(self, model: nn.Module, modules: Sequence[nn.Module], example: Inputs, what: str) -> None:
        """The model's logits must be the head's output (or the sum of the heads' outputs)."""
        outs: List[Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _a, out: outs.append(out)) for m in modules]
        try:
            with ModeGuard(model, eval_mode=True), torch.no_grad():
                logits = self._run_on(model)(example)
        finally:
            for h in handles:
                h.remove()
        if len(outs) == len(modules) and all(isinstance(o, Tensor) and o.shape == logits.shape for o in outs):
            total = outs[0] if len(outs) == 1 else sum(o.double() for o in outs)
            scale = max(float(logits.double().abs().max()) if logits.numel() else 1.0, 1.0)
            if total is logits or torch.allclose(total.double(), logits.double(), rtol=1e-5, atol=1e-6 * scale):
                return
        raise CRMTError(
            f"the model's output is not {what}: the model must return the fusion head's output unchanged for "
            "the CRMT head's logits to be the model's (post-processing voids the certificate). Pick the logits "
            "with output= if the model returns a tuple or dict"
        )

    def _wrap_concat(self, model, head, modalities, example, report, head_options):
        linear = _linear_at(model, head)
        if example is not None:
            self._check_output_is(model, [linear], example, f"the output of head {head!r}")
            report = probe(model, self._run_on(model), {head: linear}, example)
        if modalities is None:
            assert report is not None
            modalities = discover_widths(report, head)
        total = sum(modalities.values())
        if total != linear.in_features:
            raise CRMTError(
                f"modality widths {dict(modalities)} sum to {total}, but head {head!r} has "
                f"in_features={linear.in_features}"
            )
        if report is not None:
            check_concatenated(report, head, modalities)
        crmt_head = CRMTHead.from_linear(linear, modalities, **head_options)
        parent, attr, _ = _resolve(model, head)
        setattr(parent, attr, crmt_head)
        self._shares: Optional[Dict[str, str]] = None
        self._head_location = head
        return crmt_head, report

    def _wrap_sum(self, model, head, modalities, example, report, head_options):
        if not head:
            raise CRMTError("head mapping is empty: give {modality: dotted path of its nn.Linear(d_m, K)}")
        paths = {str(n): p for n, p in head.items()}
        linears = {n: _linear_at(model, p) for n, p in paths.items()}
        seen: Dict[int, str] = {}
        for n, lin in linears.items():
            if id(lin) in seen:
                raise CRMTError(f"modalities {seen[id(lin)]!r} and {n!r} map to the same nn.Linear: a sum of heads "
                                "needs one head per modality")
            seen[id(lin)] = n
        outs = {lin.out_features for lin in linears.values()}
        if len(outs) != 1:
            raise CRMTError(f"the per-modality heads must all have K outputs; found out_features "
                            f"{ {n: lin.out_features for n, lin in linears.items()} }")
        widths = {n: lin.in_features for n, lin in linears.items()}
        if modalities is not None and dict(modalities) != widths:
            raise CRMTError(f"modalities {dict(modalities)} do not match the heads' in_features {widths}")
        if example is not None:
            self._check_output_is(model, list(linears.values()), example,
                                  f"the sum of the heads {list(paths.values())}")
            if report is None:
                report = probe(model, self._run_on(model), {p: linears[n] for n, p in paths.items()}, example)
            check_per_modality(report, paths)
        weight = torch.cat([lin.weight.detach() for lin in linears.values()], dim=1)
        has_bias = {n: lin.bias is not None for n, lin in linears.items()}
        virtual = nn.Linear(weight.shape[1], weight.shape[0], bias=any(has_bias.values()),
                            device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            virtual.weight.copy_(weight)
            if virtual.bias is not None:
                virtual.bias.copy_(sum(lin.bias.detach() for lin in linears.values() if lin.bias is not None))
        crmt_head = CRMTHead.from_linear(virtual, widths, **head_options)
        carrier = next((n for n in paths if has_bias[n]), None)
        for i, (n, p) in enumerate(paths.items()):
            share = SummedHeadShare(crmt_head, n, owner=(i == 0), carries_bias=(n == carrier), has_bias=has_bias[n])
            parent, attr, _ = _resolve(model, p)
            setattr(parent, attr, share)
        self._shares = paths
        self._head_location = f"{next(iter(paths.values()))}.head"
        return crmt_head, report


    # ------------------------------------------------------------------ attributes
    @property
    def head(self) -> CRMTHead:
        """The CRMT head inside the model (for a sum of heads: the one head all shares use)."""
        return self.model.get_submodule(self._head_location)

    @property
    def modalities(self) -> Tuple[str, ...]:
        """Modality names, in head order (the order of the head's input blocks)."""
        return self.head.modalities

    @property
    def widths(self) -> "OrderedDict[str, int]":
        """{name: d_m} in head order."""
        return OrderedDict(self.head.widths)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def structure_verified(self) -> bool:
        """True when the late-fusion structure was verified for the model as it is now (a submodule
        replaced since, or another ``call``/``output``, invalidates the verdict)."""
        return self._verified_key is not None and self._verified_key == self._structure_key()

    def integration_weights(self) -> Dict[str, Tensor]:
        """{name: a^(m) (K,)}, detached."""
        a = self.head.integration_weights().detach()
        return dict(zip(self.modalities, a))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "model" not in self._modules:
                raise
            return getattr(self._modules["model"], name)

    # ------------------------------------------------------------------ structure
    def _structure_key(self) -> tuple:
        return (tuple(self.head.widths.items()), tuple(id(m) for m in self.model.modules()),
                id(self._call), repr(self._output) if isinstance(self._output, (int, str)) else id(self._output))

    def _probe_targets(self) -> Dict[str, nn.Module]:
        if self._shares is None:
            return {self._head_location: self.head}
        return {p: self.model.get_submodule(p) for p in self._shares.values()}

    def _discard_last(self) -> None:
        targets = [self.head] if self._shares is None else list(self._probe_targets().values())
        for t in targets:
            t._last = None

    def verify_structure(self, inputs: Inputs) -> StructureReport:
        """Check the late-fusion structure on a batch (see :mod:`crmt_plugin.structure`) and remember
        the verdict: raises :class:`CRMTError` when block m of the head's input does not depend on
        modality m alone (another order, another split, or modalities mixed before the head).

        ``certify`` calls it on its own batch when the structure was not verified yet; call it
        yourself after replacing a submodule. Returns the :class:`StructureReport`.
        """
        inputs = self.check_inputs(inputs)
        sick = non_finite_modalities(inputs)
        if sick:
            raise CRMTError(f"the inputs of modalities {sick} hold NaN/Inf: the structure cannot be checked on them")
        try:
            report = probe(self.model, self._run_on(self.model), self._probe_targets(), inputs)
        finally:
            self._discard_last()
        if self._shares is None:
            check_concatenated(report, self._head_location, self.head.widths)
        else:
            check_per_modality(report, self._shares)
        self.structure = report
        self._verified_key = self._structure_key()
        return report

    # ------------------------------------------------------------------ forward
    def check_inputs(self, inputs: Inputs) -> Inputs:
        """Validate an input dict: exactly the wrapper's modalities, each a tensor."""
        if not isinstance(inputs, Mapping):
            raise CRMTError(f"inputs must be a mapping modality name -> tensor, found {type(inputs).__name__}")
        expected = set(self.modalities)
        found = set(inputs)
        if found != expected:
            missing, unknown = sorted(expected - found), sorted(found - expected)
            raise CRMTError(
                f"inputs must carry exactly the modalities {list(self.modalities)}; "
                f"missing {missing}, unknown {unknown}"
            )
        for name, value in inputs.items():
            if not isinstance(value, Tensor):
                raise CRMTError(f"input {name!r} must be a tensor, found {type(value).__name__}")
        return inputs

    def _pop_last(self) -> Dict[str, Dict[str, Tensor]]:
        if self._shares is None:
            return self.head.pop_last()
        unimodal: Dict[str, Tensor] = {}
        features: Dict[str, Tensor] = {}
        for name, path in self._shares.items():
            unimodal[name], features[name] = self.model.get_submodule(path).pop_last()
        return {"unimodal": unimodal, "features": features}

    def forward(self, inputs: Inputs) -> CRMTOutput:
        inputs = self.check_inputs(inputs)
        logits = pick_logits(self._raw_call(self.model, inputs), self._output)
        last = self._pop_last()
        if self.check_finite and self.training and torch.is_grad_enabled():
            # A sum is NaN/Inf as soon as one element is (and ~100x cheaper than isfinite on CPU); a
            # non-finite sum of finite values (overflow) is sorted out by the exact check below.
            probes = [finite_probe(logits)] + [finite_probe(x).to(logits.device)
                                               for x in inputs.values() if x.is_floating_point()]
            if not bool(torch.isfinite(torch.stack(probes)).all()):  # one host sync per training step
                bad = int((~torch.isfinite(logits).all(dim=-1)).sum())
                sick = non_finite_modalities(inputs)
                if bad or sick:
                    raise CRMTError(
                        f"{bad} of {logits.shape[0]} samples have non-finite logits; modalities with NaN/Inf "
                        f"inputs: {sick or 'none (the model itself diverged)'}. NaN/Inf inputs are refused even "
                        "when the model squashes them to finite logits: their gradients are NaN"
                    )
        return CRMTOutput(logits=logits, unimodal=last["unimodal"], features=last["features"])

    def missing_fill_loss(self, fill: Mapping[str, Tensor],
                          modalities: Union[str, Sequence[str], None] = None) -> Tensor:
        """Scalar: how much class evidence each modality carries when it is *missing* (replaced by its fill).

        ``fill`` maps every modality to one sample's input (no batch dimension) that stands for the modality
        when it is missing, e.g. the training mean (``crmt_plugin.attacks.modality_means``). With the CRMT
        decomposition h = sum_m u^(m) + b, u^(m) = a^(m) * z^(m), a missing modality m adds u^(m)(fill) to
        every sample's logits; if that vector favours a class, it overrides the modalities that are there
        (a mean-filled sensor window can sit far from every real window). The term

            mean_m KL(uniform_K || softmax(u^(m)(fill))) = mean_m [LSE_k u_k^(m) - mean_k u_k^(m) - log K]

        is >= 0 and 0 exactly when u^(m)(fill) is the same for every class, so that with m missing the
        prediction is the other modalities' own prediction (the one CRMT's margin term trains). ``modalities``:
        the ones to constrain (default all; ``fill`` still names every modality, the forward needs them all).
        Leave out a modality whose fill is a plausible input (real samples within your attack radius of it, e.g.
        a "no motion" sensor class near the mean window): there "no evidence" contradicts those samples' class,
        and an attack that moves them onto the fill gets the modality's removal for free. One forward
        of a batch of one per step, in eval mode (BatchNorm running statistics, no dropout: the mode the
        missing-modality evaluation runs in), every submodule's ``training`` flag restored exactly. Under DDP call
        it on this wrapper (``ddp.module``), not through DDP: its gradient joins the same backward and is averaged
        with the rest (tests/test_distributed.py).

        Example::

            >>> import torch
            >>> from torch import nn
            >>> crmt = CRMTWrapper(nn.Sequential(nn.Linear(7, 5)), head="0", modalities={"a": 4, "b": 3},
            ...                    call=lambda model, x: model(torch.cat([x["a"], x["b"]], 1)))   # identity encoders
            >>> term = crmt.missing_fill_loss({"a": torch.ones(4), "b": torch.ones(3)})
            >>> term.backward()
            >>> bool(term >= 0), term.shape
            (True, torch.Size([]))
        """
        names = list(self.modalities) if modalities is None else [modalities] if isinstance(modalities, str) else \
            list(modalities)
        if not names or not set(names) <= set(self.modalities):
            raise CRMTError(f"missing_fill_loss: modalities must be a non-empty subset of {list(self.modalities)}, "
                            f"found {names}")
        z = self.fill_unimodal_logits(fill)                                            # (M, K)
        rows = [self.modalities.index(n) for n in names]
        a = self.head.integration_weights()
        u = a[rows] * z[rows].to(a.dtype)                                              # (M', K)
        kl = torch.logsumexp(u, dim=1) - u.mean(dim=1) - math.log(u.shape[1])
        return kl.mean()

    def fill_unimodal_logits(self, fill: Mapping[str, Tensor]) -> Tensor:
        """(M, K) z^(m)(fill): each modality's uni-modal logits at its fill input, rows in modality order.

        ``fill`` maps every modality to one sample's input (no batch dimension). One forward of a batch of one in
        eval mode, every submodule's ``training`` flag restored exactly; differentiable (wrap it in
        ``torch.no_grad()`` for values only). What step 2 protects with ``missing_fill`` and what
        :meth:`missing_fill_loss` constrains.

        Example::

            >>> import torch
            >>> from torch import nn
            >>> crmt = CRMTWrapper(nn.Sequential(nn.Linear(7, 3)), head="0", modalities={"a": 4, "b": 3},
            ...                    call=lambda model, x: model(torch.cat([x["a"], x["b"]], 1)))   # identity encoders
            >>> crmt.fill_unimodal_logits({"a": torch.zeros(4), "b": torch.zeros(3)}).shape
            torch.Size([2, 3])
        """
        if not isinstance(fill, Mapping) or set(fill) != set(self.modalities):
            found = sorted(fill) if isinstance(fill, Mapping) else type(fill).__name__
            raise CRMTError(
                f"a missing-modality fill (missing_fill) must map every modality {list(self.modalities)} to one "
                f"sample's input (e.g. crmt_plugin.attacks.modality_means(train_loader)), found {found}"
            )
        device = self._device()
        inputs = {n: torch.as_tensor(fill[n]).to(device).unsqueeze(0) for n in self.modalities}
        with ModeGuard(self.model, eval_mode=True):
            out = self(inputs)
        return torch.stack([out.unimodal[n][0] for n in self.modalities])

    def _device(self) -> torch.device:
        return self.head.bias.device

    def _to_device(self, inputs: Inputs, y: Tensor) -> Tuple[Dict[str, Tensor], Tensor]:
        device = self._device()
        return {n: t.to(device, non_blocking=True) for n, t in inputs.items()}, y.to(device, non_blocking=True)

    # ------------------------------------------------------------------ CRMT steps
    def estimate_lipschitz(
        self,
        loader: Iterable,
        *,
        max_batches: Optional[int] = None,
        prepare_batch: Optional[PrepareBatch] = None,
        progress: bool = False,
        vectorize: bool = True,
    ) -> LipschitzConstants:
        """Empirical tau (M, K): max over the data of ||grad_{x^(m)} z_k^(m)||; ``sound=False``.

        Eval mode (restored afterwards), all classes in one vectorised backward per batch
        (``vectorize=False``: one backward per class on the same graph, identical values — faster for
        convolutional encoders on CPU), max over ``torch.distributed`` ranks.
        """
        moved = ((self._to_device(*b)) for b in iterate_batches(loader, prepare_batch))
        return estimate_lipschitz(self, moved, max_batches=max_batches, progress=progress, vectorize=vectorize)

    def certify(
        self,
        inputs: Inputs,
        y: Optional[Tensor] = None,
        *,
        lipschitz: LipschitzLike,
        denominator: str = "auto",
    ) -> Certificate:
        """Certified radii for a batch (eval mode, no grad, autocast off; the model's mode is restored).

        Local to the calling process (no collective). An empty batch gives an empty certificate.

        Args:
            inputs: {name: (B, ...)}.
            y: (B,) labels; ``None`` certifies the model's own predictions.
            lipschitz: :class:`LipschitzConstants` or a ``{name: L}`` mapping of declared
                (sound) encoder bounds.
            denominator: ``"auto"`` (``"tight"`` for per-modality constants, else ``"paper"``),
                ``"paper"`` or ``"tight"``.

        Returns:
            :class:`Certificate` with ``radius`` (B,), ``radius_per_modality`` {name: (B,)},
            ``correct`` (B,), ``sound``.
        """
        with no_autocast(self._device()):  # certify the model in its own dtype, never bf16/fp16
            return self._certify(inputs, y, lipschitz, denominator)

    def _certify(self, inputs: Inputs, y: Optional[Tensor], lipschitz: LipschitzLike, denominator: str) -> Certificate:
        lip = as_lipschitz(lipschitz).aligned(self.modalities)
        kind = resolve_denominator(denominator, lip)
        head = self.head
        with torch.no_grad():
            a = head.integration_weights().double()
            bias = head.bias.double()
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(bias).all())):
            raise CRMTError(
                f"the CRMT head has non-finite integration weights a {a.tolist()} or bias {bias.tolist()}: "
                "no certificate can be given (training diverged?)"
            )
        inputs = self.check_inputs(inputs)
        sick = non_finite_modalities(inputs)
        if sick:
            raise CRMTError(
                f"the inputs of modalities {sick} hold NaN/Inf: no certificate can be given for them "
                "(a perturbation ball around a non-finite input means nothing)"
            )
        batch = min((int(x.shape[0]) for x in inputs.values() if x.dim()), default=0)
        if not self.structure_verified and batch > 0:
            self.verify_structure(inputs)  # raises on a model that is not late fusion as declared
        verified = self.structure_verified
        with ModeGuard(self.model, eval_mode=True), torch.no_grad():
            out = self(inputs)
        z = torch.stack([out.unimodal[n] for n in self.modalities], dim=1).double()
        if y is None:
            y = out.logits.argmax(dim=1)
        check_labels(y, z.shape[0], self.num_classes)
        if not bool(torch.isfinite(z).all()):
            raise CRMTError(
                f"{int((~torch.isfinite(z)).flatten(1).any(1).sum())} samples have non-finite uni-modal "
                "logits: no certificate can be given for them (check the inputs for NaN/Inf)"
            )
        with torch.no_grad():
            gram = self.gram_matrices().double() if kind == "tight" else None
            fused = torch.einsum("bmk,mk->bk", z, a) + bias
            scale = fused.abs().amax().clamp_min(1.0) if fused.numel() else 1.0
            if not torch.allclose(fused, out.logits.double(), atol=1e-3 * float(scale), rtol=1e-3):
                raise CRMTError(
                    "the model's output differs from the CRMT head's fused logits: the model must return "
                    "the head's output unchanged for the certificate to hold"
                )
            y = y.to(z.device)
            margins, denominators, correct = certificate_terms(z, a, bias, y, lip, denominator=kind, gram=gram)
            radius, per_modality = radii_from_margins(margins, denominators, correct, y)
        return Certificate(
            radius=radius,
            radius_per_modality={n: per_modality[:, i] for i, n in enumerate(self.modalities)},
            correct=correct,
            sound=lip.sound and verified,
            denominator=kind,
            source=lip.source,
            margins=stored_margins(margins, y),
            denominators=denominators,
        )

    def gram_matrices(self) -> Tensor:
        """W~^(m) W~^(m)^T for every modality, (M, K, K): the identity for orthonormal rows."""
        head = self.head
        weights = [head.unimodal_weight(n).detach() for n in self.modalities]
        return torch.stack([w @ w.transpose(0, 1) for w in weights])

    def fit_integration(self, loader: Iterable, *, lipschitz: LipschitzLike, **kwargs) -> IntegrationResult:
        """Step 2: tune only a^(m) to maximise the mean certified radius; see
        :func:`crmt_plugin.integration.fit_integration` for the arguments."""
        return fit_integration(self, loader, lipschitz=lipschitz, **kwargs)

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise :class:`CRMTError` if ``optimizer`` misses the CRMT head's parameters (an optimizer
        built before wrapping trains the replaced ``nn.Linear``, silently)."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.head.named_parameters() if id(p) not in held]
        if missing:
            raise CRMTError(
                f"the optimizer does not hold the CRMT head parameters {missing}: build it after "
                "wrapping, from crmt.parameters()"
            )

    # ------------------------------------------------------------------ export
    def export(self) -> nn.Module:
        """A deep copy of the user's model with plain ``nn.Linear`` heads computing the same logits
        (concatenating head: weight concat_m a^(m) W~^(m), bias b; sum of heads: one
        ``nn.Linear(d_m, K)`` per modality with weight a^(m) W~^(m), the bias b on the first head that
        had a bias): no CRMT overhead, no dependency."""
        head = self.head
        if self._shares is not None:
            return self._export_sum(head)
        with torch.no_grad():
            weight = head.fused_weight().detach().clone()
            bias = head.bias.detach().clone()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=isinstance(head.bias, nn.Parameter),
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if linear.bias is not None:
                linear.bias.copy_(bias)
        memo = {id(head): linear}  # deepcopy substitutes the plain linear for the CRMT head
        plain = copy.deepcopy(self.model, memo)
        if not isinstance(plain.get_submodule(self._head_location), nn.Linear):  # pragma: no cover - defensive
            raise CRMTError("export failed to replace the CRMT head")
        return plain

    def _export_sum(self, head: CRMTHead) -> nn.Module:
        assert self._shares is not None
        memo: Dict[int, Any] = {}
        with torch.no_grad():
            a = head.integration_weights().detach()
            for i, (name, path) in enumerate(self._shares.items()):
                share = self.model.get_submodule(path)
                weight = a[i, :, None] * head.unimodal_weight(name).detach()
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=share.has_bias,
                                   device=weight.device, dtype=weight.dtype)
                linear.weight.copy_(weight)
                if linear.bias is not None:
                    linear.bias.copy_(head.bias.detach() if share.carries_bias else torch.zeros_like(head.bias))
                memo[id(share)] = linear
        plain = copy.deepcopy(self.model, memo)
        if any(not isinstance(plain.get_submodule(p), nn.Linear) for p in self._shares.values()):  # pragma: no cover
            raise CRMTError("export failed to replace the per-modality CRMT heads")
        return plain
