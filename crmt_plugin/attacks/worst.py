"""The per-sample worst case over several attacks, and the evaluation presets built on it."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._runtime import ModeGuard, logits_of
from ..errors import CRMTError
from .base import Attack, BoundValue, Budget, ModelCall, check_inputs, resolve_modalities
from .pgd import PGD

__all__ = ["WorstCase", "strong_attack", "fast_attack"]

_SHARED = ("eps", "norm", "modalities", "bounds", "generator", "eval_mode", "call")


def _index_value(value: Any, index: Tensor, batch: int) -> Any:
    if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value[index.to(value.device)]
    return value


class WorstCase(Attack):
    """Per sample, the adversarial input of the first attack that fooled the model, otherwise the
    one with the lowest margin ``z_y - max_{k != y} z_k``.

    The attacks run in order; each later attack runs only on the samples no earlier one fooled (so
    cheap attacks first make the whole cheaper). Settings shared by every attack (``eps``, ``norm``,
    ``modalities``, ``bounds``, ``generator``, ``eval_mode``, ``call``) can be changed for all at
    once with :meth:`replace`, which is how :func:`~crmt_plugin.evaluation.evaluate_robustness`
    sweeps radii and modality sets.

    Example::

        attack = WorstCase([PGD(1.0, loss="ce"), PGD(1.0, loss="dlr"), Square(1.0)])
        adv = attack(model, inputs, y)

    >>> WorstCase([PGD(1.0), PGD(1.0, loss="dlr")], name="mine").label
    'mine-l2'

    Cost: the sum of the members' costs, each on the samples still standing, plus one forward
    pass per member. Needs class labels ``y``.
    """

    name = "WorstCase"

    def __init__(self, attacks: Sequence[Attack], *, name: Optional[str] = None) -> None:
        attacks = list(attacks)
        if not attacks:
            raise CRMTError("WorstCase needs at least one attack")
        for a in attacks:
            if not isinstance(a, Attack):
                raise CRMTError(f"WorstCase: every member must be an attack of crmt_plugin.attacks, found "
                                f"{type(a).__name__}")
        first = attacks[0]
        super().__init__(first.eps, norm=first.norm, modalities=first.modalities, bounds=first.bounds or None,
                         generator=first.generator, eval_mode=first.eval_mode, call=first.call)
        self.attacks = attacks
        if name is not None:
            self.name = name
        self._config = dict(attacks=attacks, name=name)

    @property
    def label(self) -> str:
        return f"{self.name}-{self.norm}"

    @property
    def cost(self) -> Dict[str, int]:
        """Upper bound of the model passes per call (every member on the full batch)."""
        total = {"forward_backward": 0, "forward": len(self.attacks)}
        for a in self.attacks:
            for k, v in getattr(a, "cost", {}).items():
                total[k] = total.get(k, 0) + v
        return total

    def replace(self, **changes: Any) -> "WorstCase":
        """A copy with settings changed on every member (``eps``, ``modalities``, ...) or new ``attacks``."""
        own = {k: changes.pop(k) for k in ("attacks", "name") if k in changes}
        unknown = set(changes) - set(_SHARED)
        if unknown:
            raise CRMTError(f"WorstCase.replace: unknown settings {sorted(unknown)}; known: {sorted(_SHARED)} "
                            "(shared by every member), attacks, name")
        attacks = own.get("attacks", self.attacks)
        return WorstCase([a.replace(**changes) if changes else a for a in attacks],
                         name=own.get("name", self._config["name"]))

    def __repr__(self) -> str:
        return f"WorstCase([{', '.join(repr(a) for a in self.attacks)}], name={self._config['name']!r})"

    def _subset(self, attack: Attack, index: Tensor, batch: int) -> Attack:
        changes: Dict[str, Any] = {}
        eps = attack.eps
        if isinstance(eps, Tensor) and eps.dim() == 1:
            changes["eps"] = eps[index.to(eps.device)]
        elif isinstance(eps, Mapping) and any(isinstance(v, Tensor) and v.dim() == 1 for v in eps.values()):
            changes["eps"] = {k: _index_value(v, index, batch) for k, v in eps.items()}
        if attack.bounds and any(isinstance(b, Tensor) and b.dim() >= 1 and b.shape[0] == batch > 1
                                 for pair in attack.bounds.values() for b in pair):
            changes["bounds"] = {k: tuple(_index_value(b, index, batch) if isinstance(b, Tensor) and b.dim() >= 2
                                          else b for b in pair) for k, pair in attack.bounds.items()}
        return attack.replace(**changes) if changes else attack

    def __call__(self, model: Callable[..., Any], inputs: Mapping[str, Tensor], y: Tensor) -> Dict[str, Tensor]:
        check_inputs(inputs)
        touched: List[str] = []
        for a in self.attacks:
            for n in resolve_modalities(inputs, a.modalities, self.label):
                if n not in touched:
                    touched.append(n)
        first = inputs[touched[0]]
        batch = first.shape[0]
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != batch or y.is_floating_point():
            raise CRMTError(f"{self.label}: y must hold the class labels, shape ({batch},), found "
                            f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
        y = y.detach().to(first.device)
        result: Dict[str, Tensor] = {}
        fooled = torch.zeros(batch, dtype=torch.bool, device=first.device)
        best_margin = torch.full((batch,), float("inf"), dtype=torch.float64, device=first.device)
        for i, attack in enumerate(self.attacks):
            standing = (~fooled).nonzero().squeeze(1)
            if standing.numel() == 0:
                break
            everyone = standing.numel() == batch
            sub_inputs = inputs if everyone else {k: _index_value(v, standing, batch) for k, v in inputs.items()}
            sub_y = y if everyone else y[standing]
            member = attack if everyone else self._subset(attack, standing, batch)
            adv = member(model, sub_inputs, sub_y)
            with ModeGuard(model, self.eval_mode), torch.no_grad():
                logits = logits_of(model, adv, self.call).detach()
            z_y = logits.gather(1, sub_y.long().unsqueeze(1)).squeeze(1)
            margin = (z_y - logits.scatter(1, sub_y.long().unsqueeze(1), float("-inf")).amax(dim=1)).double()
            wrong = logits.argmax(dim=1) != sub_y
            better = wrong | (margin < best_margin[standing]) if i else torch.ones_like(wrong)
            rows = standing[better]
            for n in touched:
                if n not in result:
                    result[n] = inputs[n].detach().clone()
                result[n][rows] = adv[n][better].to(result[n].dtype)
            best_margin[rows] = margin[better]
            fooled[rows] = wrong[better]
        return {k: (result[k] if k in result else v) for k, v in inputs.items()}


def strong_attack(
    eps: Budget,
    *,
    norm: str = "l2",
    modalities: Optional[Union[str, Sequence[str]]] = None,
    bounds: Optional[Mapping[str, Tuple[BoundValue, BoundValue]]] = None,
    generator: Optional[torch.Generator] = None,
    steps: int = 50,
    restarts: int = 2,
    targets: int = 3,
    call: Optional[ModelCall] = None,
) -> WorstCase:
    """The library's strong evaluation attack: the per-sample worst case (:class:`WorstCase`) of

    1. APGD-CE: ``PGD(eps, loss="ce", schedule="apgd", steps=steps)``, one run;
    2. APGD-DLR: ``PGD(eps, loss="dlr", schedule="apgd", steps=steps, restarts=restarts)``;
    3. APGD-T-DLR: targeted DLR runs against the ``targets`` most likely other classes;
    4. APGD-T-CW: targeted CW-margin runs against the same classes.

    DLR is scale-invariant, so a head that shrinks or stretches its logits (as the CRMT head does)
    cannot make the attack's gradient uninformative; the targeted runs find the closest boundary.
    With fewer than 3 classes (4 for the targeted runs) the DLR runs use the CW margin instead.

    Cost (the default ``steps=50, restarts=2, targets=3``): at most ``(1 + 2 + 3 + 3) * 51 = 459``
    forward+backward passes and 6 forward passes per batch; every member after the first runs only
    on the samples not yet fooled, so on a model with accuracy a under attack it is close to
    ``51 + 408 * a``. About 45x :func:`fast_attack`.

    Example::

        attack = strong_attack(1.0, bounds={"image": (-0.43, 2.81)})
        adv = attack(model, inputs, y)              # or: evaluate_robustness(model, loader, radii=[1, 2])

    >>> strong_attack(1.0).label, [a.label for a in strong_attack(1.0).attacks]
    ('strong-l2', ['APGD-l2', 'APGD-dlr-l2', 'APGD-T-dlr-l2', 'APGD-T-cw-l2'])
    """
    shared = dict(norm=norm, modalities=modalities, bounds=bounds, generator=generator, call=call,
                  schedule="apgd", steps=steps)
    members: List[Attack] = [
        PGD(eps, loss="ce", **shared),  # type: ignore[arg-type]
        PGD(eps, loss="dlr", restarts=restarts, **shared),  # type: ignore[arg-type]
    ]
    if targets:
        members += [PGD(eps, loss="dlr", targets=targets, **shared),  # type: ignore[arg-type]
                    PGD(eps, loss="cw", targets=targets, **shared)]  # type: ignore[arg-type]
    return WorstCase(members, name="strong")


def fast_attack(
    eps: Budget,
    *,
    norm: str = "l2",
    modalities: Optional[Union[str, Sequence[str]]] = None,
    bounds: Optional[Mapping[str, Tuple[BoundValue, BoundValue]]] = None,
    generator: Optional[torch.Generator] = None,
    call: Optional[ModelCall] = None,
) -> PGD:
    """The cheap preset: ``PGD(eps, steps=10)`` with cross-entropy, one random start.

    **Weaker than** :func:`strong_attack`: on the AV-digits CRMT-JT model it leaves up to ~25
    points more accuracy at l2 radius 2 (docs/evaluation.md), because cross-entropy gradients are
    uninformative on heads with small logits. Use it for quick looks and training-time monitoring,
    not for published robustness numbers.

    Cost: 10 forward+backward passes and 1 forward pass per batch.

    >>> fast_attack(1.0).label, fast_attack(1.0).steps
    ('PGD-l2', 10)
    """
    return PGD(eps, norm=norm, modalities=modalities, bounds=bounds, generator=generator, call=call, steps=10)

