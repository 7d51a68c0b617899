"""A soundness check users can run: attack every certified sample inside its certified radius.

:func:`check_certificates` certifies every batch of a loader, then attacks each certified sample
with strong attacks at ``scale`` (default 0.99) times its radius — once jointly (all modalities,
budget ``scale * radius``) and once per modality (that modality alone, budget
``scale * radius_per_modality[m]``) — and reports every sample whose prediction changed.

What a violation means depends on the constants:

* **empirical** constants (``crmt.estimate_lipschitz``, ``cert.sound is False``): sampled
  gradient norms are *lower* estimates of the Lipschitz constants, so the radii are estimates and
  violations are possible. They show by how much the estimate is optimistic.
* **sound** constants (declared or computed upper bounds, ``cert.sound is True``): a violation is
  a bug — in the declared bound (it does not bound the encoder on the tensors you pass), in the
  model (it is not the late-fusion model it was verified as), or in the library.

An attack that finds nothing proves nothing: no violation is evidence, not a proof.

Example::

    import crmt_plugin.testing
    report = crmt_plugin.testing.check_certificates(crmt, val_loader, lipschitz={"audio": 2.0, "image": 1.5})
    print(report)            # counts per scope, the violating samples, and what they mean
    assert report.ok         # no certified sample was flipped
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor

from . import attacks
from ._runtime import ModeGuard, PrepareBatch, iterate_batches, module_device, move_batch
from .errors import CRMTError
from .lipschitz import LipschitzLike

__all__ = ["SoundnessReport", "check_certificates", "default_attacks"]

JOINT = "joint"

AttackFactory = Callable[[Tensor, Optional[Sequence[str]], torch.Generator], Sequence[Any]]


def default_attacks(
    eps: Tensor, modalities: Optional[Sequence[str]], generator: torch.Generator, *, steps: int = 200,
    restarts: int = 5,
) -> List[Any]:
    """The attacks :func:`check_certificates` runs by default, for per-sample l2 budgets ``eps`` (B,).

    l2 PGD with ``steps`` steps, ``restarts`` random restarts and the Carlini-Wagner margin loss;
    plus :func:`crmt_plugin.attacks.strong_attack` (APGD with CE, DLR and targeted losses; at most
    50 steps and 2 restarts) when the installed version has it. ``modalities=None`` attacks all modalities jointly.
    """
    loss = getattr(attacks, "cw_margin_loss", None) or getattr(attacks, "margin_loss")
    members: List[Any] = [attacks.PGD(eps, norm="l2", modalities=modalities, steps=steps, restarts=restarts,
                                      loss=loss, generator=generator)]
    strong = getattr(attacks, "strong_attack", None)
    if strong is not None:
        members.append(strong(eps, norm="l2", modalities=modalities, generator=generator, steps=min(steps, 50),
                              restarts=min(restarts, 2)))
    return members


@dataclass
class SoundnessReport:
    """What :func:`check_certificates` found.

    Attributes:
        sound: the certificates' ``sound`` flag (all batches).
        source: where the Lipschitz constants came from.
        scale: attacks ran at ``scale`` times each sample's radius.
        samples: samples seen.
        certified: samples certified (correct, radius > 0).
        checked: {"joint" or modality name: certified samples attacked in that scope} (a sample with
            an infinite radius cannot be attacked and is not counted).
        violations: {scope: number of samples whose prediction changed inside the radius}.
        violating: {scope: the violating samples' indices, in the loader's order}.
        distances: {scope: the l2 distance of each violating perturbation, relative to the radius}.
    """

    sound: bool
    source: str
    scale: float
    samples: int = 0
    certified: int = 0
    checked: Dict[str, int] = field(default_factory=dict)
    violations: Dict[str, int] = field(default_factory=dict)
    violating: Dict[str, List[int]] = field(default_factory=dict)
    distances: Dict[str, List[float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no certified sample was flipped inside its radius."""
        return not any(self.violations.values())

    @property
    def total_violations(self) -> int:
        return sum(self.violations.values())

    @property
    def message(self) -> str:
        """A plain-words summary: the counts and what they mean for these constants."""
        lines = [f"checked {self.certified} certified of {self.samples} samples at {self.scale:g} x their radius "
                 f"(Lipschitz constants: {self.source}, sound={self.sound})"]
        for scope, n in self.checked.items():
            bad = self.violations.get(scope, 0)
            which = f": samples {self.violating[scope][:10]}{' ...' if bad > 10 else ''}" if bad else ""
            lines.append(f"  {scope}: {bad} of {n} flipped inside the radius{which}")
        if self.ok:
            lines.append("no violation found (evidence, not a proof: an attack that fails proves nothing)")
        elif self.sound:
            lines.append(
                "the constants are declared sound, so these violations are a BUG: a declared Lipschitz bound "
                "does not hold for the tensors passed as inputs (check preprocessing inside the model), the "
                "model is not the late-fusion model it was verified as, or the library is wrong"
            )
        else:
            lines.append(
                "the constants are empirical (sampled gradient norms are lower estimates), so violations are "
                "possible and are not a bug: these radii are estimates, not guarantees"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.message


def _l2(adv: Dict[str, Tensor], clean: Dict[str, Tensor], names: Sequence[str]) -> Tensor:
    total = None
    for n in names:
        d = (adv[n].double() - clean[n].double()).flatten(1).pow(2).sum(dim=1)
        total = d if total is None else total + d
    assert total is not None
    return total.sqrt()


def check_certificates(
    crmt: Any,
    loader: Iterable,
    *,
    lipschitz: LipschitzLike,
    scale: float = 0.99,
    denominator: str = "auto",
    per_modality: bool = True,
    steps: int = 200,
    restarts: int = 5,
    attack: Optional[AttackFactory] = None,
    seed: int = 0,
    max_batches: Optional[int] = None,
    prepare_batch: Optional[PrepareBatch] = None,
) -> SoundnessReport:
    """Attack every certified sample inside its certified radius and report the violations.

    For every batch: ``cert = crmt.certify(inputs, y, lipschitz=lipschitz)``; every sample with
    ``cert.correct`` and a finite radius r > 0 is attacked with l2 budget ``scale * r`` on all
    modalities at once, and (``per_modality=True``) with budget ``scale * r^(m)`` on modality m
    alone. A *violation* is an adversarial input within that distance (measured again, in float64)
    whose prediction differs from the label.

    Args:
        crmt: a :class:`~crmt_plugin.CRMTWrapper`.
        loader: batches of ``(inputs_dict, y)`` (or any layout with ``prepare_batch``).
        lipschitz: the constants to certify with (see :meth:`CRMTWrapper.certify`).
        scale: fraction of the radius to attack at, in (0, 1].
        steps, restarts: of the default l2 PGD (CW-margin loss).
        attack: ``attack(eps (B,), modalities or None, generator) -> [attacks]`` replacing
            :func:`default_attacks`; each attack is called ``attack(crmt, inputs, y) -> adv inputs``.
        seed: seed of the attacks' random starts.

    Returns:
        :class:`SoundnessReport`; ``print(report)`` says what the numbers mean (with empirical
        constants violations are possible; with sound ones they are a bug).
    """
    if not callable(getattr(crmt, "certify", None)):
        raise CRMTError(f"check_certificates needs a CRMTWrapper (a model with certify), found {type(crmt).__name__}")
    if not 0 < scale <= 1:
        raise CRMTError(f"scale must be in (0, 1] (a fraction of the certified radius), found {scale}")
    make = attack if attack is not None else (
        lambda eps, mods, gen: default_attacks(eps, mods, gen, steps=steps, restarts=restarts))
    generator = torch.Generator().manual_seed(seed)
    device = module_device(crmt)
    names = tuple(crmt.modalities)
    scopes = [JOINT] + (list(names) if per_modality else [])
    report: Optional[SoundnessReport] = None
    offset = 0
    for inputs, y in iterate_batches(loader, prepare_batch, max_batches=max_batches):
        inputs, y = move_batch(inputs, y, device)
        cert = crmt.certify(inputs, y, lipschitz=lipschitz, denominator=denominator)
        if report is None:
            report = SoundnessReport(sound=cert.sound, source=cert.source, scale=float(scale),
                                     checked={s: 0 for s in scopes}, violations={s: 0 for s in scopes},
                                     violating={s: [] for s in scopes}, distances={s: [] for s in scopes})
        report.sound = report.sound and cert.sound
        batch = int(cert.correct.shape[0])
        report.samples += batch
        report.certified += int((cert.correct & (cert.radius > 0)).sum())
        for scope in scopes:
            radius = cert.radius if scope == JOINT else cert.radius_per_modality[scope]
            mask = cert.correct & (radius > 0) & torch.isfinite(radius)
            index = mask.nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            sub = {n: x[index] for n, x in inputs.items()}
            labels = y[index]
            r = radius[index]
            attacked = list(names) if scope == JOINT else [scope]
            dtype = next(iter(sub.values())).dtype
            eps = (float(scale) * r).to(dtype if dtype.is_floating_point else torch.float64)
            flipped = torch.zeros(index.numel(), dtype=torch.bool, device=r.device)
            distance = torch.zeros(index.numel(), dtype=torch.float64, device=r.device)
            for member in make(eps, None if scope == JOINT else attacked, generator):
                adv = member(crmt, sub, labels)
                with ModeGuard(crmt, eval_mode=True), torch.no_grad():
                    pred = crmt(adv).logits.argmax(dim=1)
                dist = _l2(adv, sub, attacked).to(r.device)
                new = (pred.to(labels.device) != labels).to(r.device) & (dist < r) & ~flipped
                distance = torch.where(new, dist / r, distance)
                flipped |= new
            report.checked[scope] += int(index.numel())
            report.violations[scope] += int(flipped.sum())
            report.violating[scope] += [offset + int(i) for i in index[flipped.to(index.device)].tolist()]
            report.distances[scope] += distance[flipped].tolist()
        offset += batch
    if report is None:
        raise CRMTError("check_certificates got an empty loader: it needs at least one batch")
    return report
