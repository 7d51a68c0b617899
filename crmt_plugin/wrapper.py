"""``CRMTWrapper``: CRMT for a user's own multi-modal model, inside the user's own training loop."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ._runtime import (
    Inputs,
    ModeGuard,
    PrepareBatch,
    check_labels,
    finite_probe,
    iterate_batches,
    no_autocast,
    non_finite_modalities,
)
from .certify import Certificate, radii_from_unimodal, resolve_denominator
from .errors import CRMTError
from .head import CRMTHead
from .integration import IntegrationResult, fit_integration
from .lipschitz import LipschitzConstants, LipschitzLike, as_lipschitz, estimate_lipschitz

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


class CRMTWrapper(nn.Module):
    """Wrap a late-fusion model so it trains, integrates and certifies with CRMT.

    The model's fusion ``nn.Linear(sum_m d_m, K)`` at ``head`` is replaced **in place** by a
    :class:`~crmt_plugin.head.CRMTHead` initialised from its weights (a trained joint-training head
    converts to the nearest CRMT head). The user's own ``model(...)`` keeps returning fused logits.

    Example::

        >>> crmt = CRMTWrapper(model, head="fusion.fc", modalities={"audio": 512, "visual": 512})
        >>> optimizer = torch.optim.SGD(crmt.parameters(), lr=1e-2)   # build it AFTER wrapping
        >>> out = crmt({"audio": xa, "visual": xv})     # out.logits (B, K), out.unimodal["audio"] (B, K)
        >>> loss = crmt_plugin.crmt_loss(out, y, rho=2.0)

    Args:
        model: the user's model. Its forward must return the head's output unchanged.
        head: dotted path of the fusion ``nn.Linear`` (as in ``model.get_submodule``).
        modalities: modality name -> feature width, in the order the head's input concatenates them.
            Input dicts must carry exactly these names.
        call: how to run the model on an input dict, ``call(model, inputs) -> logits``; default
            ``model(**inputs)``.
        integration_init: initial a^(m) for every class; default: fitted to the existing head.
        orthonormal: ``True`` (CRMT): orthonormal rows of W~^(m). ``False``: unit-norm rows, which
            reproduce the existing head exactly — to certify or evaluate a trained joint-training
            model as it is, on equal terms with CRMT (certificates stay sound: they use the Gram
            matrix of the actual rows).
        check_finite: raise :class:`CRMTError` when a training forward (train mode, grad enabled)
            sees NaN/Inf inputs or produces NaN/Inf logits (one host sync per step; one graph break
            under ``torch.compile``: turn it off for ``fullgraph=True``). Inference forwards are never
            checked; ``certify``, ``estimate_lipschitz`` and ``fit_integration`` always are.
    """

    def __init__(
        self,
        model: nn.Module,
        head: str,
        modalities: Mapping[str, int],
        *,
        call: Optional[Callable[[nn.Module, Inputs], Tensor]] = None,
        integration_init: Optional[float] = None,
        orthonormal: bool = True,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise CRMTError(f"model must be a torch.nn.Module, found {type(model).__name__}")
        if not isinstance(modalities, Mapping) or not modalities:
            raise CRMTError(f"modalities must map name -> feature width, found {modalities!r}")
        _check_not_data_parallel(model)
        parent, attr, linear = _resolve(model, head)
        if isinstance(linear, CRMTHead):
            raise CRMTError(f"head {head!r} is already a CRMT head: the model was wrapped before")
        if not isinstance(linear, nn.Linear):
            raise CRMTError(f"head {head!r} is a {type(linear).__name__}, expected torch.nn.Linear")
        total = sum(modalities.values())
        if total != linear.in_features:
            raise CRMTError(
                f"modality widths {dict(modalities)} sum to {total}, but head {head!r} has "
                f"in_features={linear.in_features}"
            )
        crmt_head = CRMTHead.from_linear(linear, modalities, integration_init=integration_init,
                                         orthonormal=orthonormal)
        setattr(parent, attr, crmt_head)
        self.model = model
        self.head_path = head
        self.check_finite = check_finite
        self._call = call

    # ------------------------------------------------------------------ attributes
    @property
    def head(self) -> CRMTHead:
        """The CRMT head inside the model."""
        return self.model.get_submodule(self.head_path)

    @property
    def modalities(self) -> Tuple[str, ...]:
        return self.head.modalities

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def integration_weights(self) -> Dict[str, Tensor]:
        """{name: a^(m) (K,)}, detached."""
        a = self.head.integration_weights().detach()
        return dict(zip(self.modalities, a))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

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

    def forward(self, inputs: Inputs) -> CRMTOutput:
        inputs = self.check_inputs(inputs)
        logits = self._call(self.model, inputs) if self._call is not None else self.model(**inputs)
        last = self.head.pop_last()
        if self.check_finite and self.training and torch.is_grad_enabled():
            # A sum is NaN/Inf as soon as one element is (and ~100x cheaper than isfinite on CPU); a
            # non-finite sum of finite values (overflow) is sorted out by the exact check below.
            probes = [finite_probe(logits)] + [finite_probe(x).to(logits.device) for x in inputs.values() if x.is_floating_point()]
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
        with ModeGuard(self.model, eval_mode=True), torch.no_grad():
            out = self(inputs)
        z = torch.stack([out.unimodal[n] for n in self.modalities], dim=1).double()
        if y is None:
            y = out.logits.argmax(dim=1)
        check_labels(y, z.shape[0], self.num_classes)
        sick = non_finite_modalities(inputs)
        if sick:
            raise CRMTError(
                f"the inputs of modalities {sick} hold NaN/Inf: no certificate can be given for them "
                "(a perturbation ball around a non-finite input means nothing)"
            )
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
            radius, per_modality, correct = radii_from_unimodal(
                z, a, bias, y.to(z.device), lip, denominator=kind, gram=gram
            )
        return Certificate(
            radius=radius,
            radius_per_modality={n: per_modality[:, i] for i, n in enumerate(self.modalities)},
            correct=correct,
            sound=lip.sound,
            denominator=kind,
            source=lip.source,
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
        """A deep copy of the user's model with a plain ``nn.Linear`` head computing the same
        logits (weight concat_m a^(m) W~^(m), bias b): no CRMT overhead, no dependency."""
        head = self.head
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
        if not isinstance(plain.get_submodule(self.head_path), nn.Linear):  # pragma: no cover - defensive
            raise CRMTError("export failed to replace the CRMT head")
        return plain
