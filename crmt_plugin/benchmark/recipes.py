"""The training recipes of the benchmark: four baselines, their CRMT variants, and the paper's plain CRMT-JT.

=============  ==========================================================================================
method         one training step (B samples)
=============  ==========================================================================================
jt             CE(h(x), y)
crmt-jt        ``crmt_loss(crmt(x), y)`` (library defaults, so the shared scale of ``CRMTWrapper``), a = 0.1
               at the start, then step 2
pgd-at         CE(h(x_adv), y), x_adv = l2-PGD on CE, joint budget over all modalities
crmt-at        ``crmt_loss(crmt(x_adv), y)``, then step 2
trades         CE(h(x), y) + beta KL(h(x) || h(x_adv)), x_adv maximising the KL
crmt-trades    ``crmt_loss(crmt(x_adv), y, base_loss=<the TRADES loss>)``, then step 2
mixup          lam CE(h(x_mix), y) + (1 - lam) CE(h(x_mix), y_perm), lam ~ Beta(alpha, alpha)
crmt-mix       ``crmt_loss(crmt(x_mix), y, y_b=y_perm, lam=lam)``, a = 0.1 at the start, then step 2
paper-crmt-jt  the paper's procedure as published: ``crmt_loss(..., rho=2, margin="raw")``, a = 0.1 at
               the start, no shared scale; step 2 with SGD (lr 3e-5, momentum 0.9, weight decay 1e-2), a third of
               step 1's epochs, objective the mean joint radius, no accuracy constraint
=============  ==========================================================================================

The CRMT methods use the **library defaults** of :func:`crmt_plugin.crmt_loss` and
:meth:`~crmt_plugin.CRMTWrapper.fit_integration` (``rho`` / ``temperature`` only when set in
:class:`TrainConfig`); step 2 gets the validation split as ``val_loader=`` when the library's
``fit_integration`` accepts it. Training attacks (PGD-AT, TRADES and their CRMT variants) are l2-PGD
on all modalities jointly, on the raw inputs (the units the evaluation attacks in), with budget
``TrainConfig.train_eps`` (the CLI sets it to the evaluation radius). Model selection: the epoch with
the best clean validation accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import attacks as attacks_module
from ..errors import CRMTError
from ..loss import crmt_loss
from ..wrapper import CRMTWrapper
from .data import BenchmarkData, batch_list, batches, standardization
from .lipschitz_models import (LIPSCHITZ_METHODS, lipschitz_loss, lipschitz_model, sound_certified_accuracy,
                               sound_constants)
from .models import ENCODER_FAMILIES, BenchmarkNet, FrozenEncoder, build_model, encoder_for

__all__ = ["METHODS", "PAIRS", "CRMT_METHODS", "INTEGRATION_INIT", "TrainConfig", "Trained", "train",
           "check_methods", "accuracy", "BestOnValidation", "new_model", "Schedule", "training_schedule",
           "DEFAULT_MIN_STEPS", "NEUTRAL_FILL_METHODS", "PLAUSIBLE_FILL_SHARE", "neutral_fill_modalities"]

METHODS = ("jt", "crmt-jt", "pgd-at", "crmt-at", "trades", "crmt-trades", "mixup", "crmt-mix", "paper-crmt-jt",
           *LIPSCHITZ_METHODS)
CRMT_METHODS = ("crmt-jt", "crmt-at", "crmt-trades", "crmt-mix", "paper-crmt-jt", "crmt-lip")
# the recipes that add ``CRMTWrapper.missing_fill_loss`` (weight ``TrainConfig.missing_fill_weight``): not the paper's
# recipe as published, not the certified one (its loss is the certificate's)
NEUTRAL_FILL_METHODS = ("crmt-jt", "crmt-at", "crmt-trades", "crmt-mix")
ADVERSARIAL = ("pgd-at", "crmt-at", "trades", "crmt-trades")
# CRMT methods whose head has the shared scale (the CRMTWrapper default, shared_scale=True, scale_gain=1): all
# but the paper's recipe, which has the paper's a = softplus(alpha) (docs/method.md, "The shared scale")
SHARED_SCALE = tuple(m for m in CRMT_METHODS if m != "paper-crmt-jt")
# initial a of each CRMT method's head (None: CRMTWrapper's default, a fitted to the fresh head, about
# 1 / sqrt(3 M) for M equal feature blocks). a scales the base loss's gradient on the encoders and not the
# scale-free margin term's, so a small start gives the margin term more weight early in training: 0.1 (the
# paper's fresh initialisation) raises JT's and Mixup's robustness on every benchmark data set and lowers the
# adversarial recipes' joint robustness (docs/method.md, "The initial a")
INTEGRATION_INIT = {"crmt-jt": 0.1, "crmt-mix": 0.1, "crmt-at": None, "crmt-trades": None, "paper-crmt-jt": 0.1}
# (baseline, variant): the comparisons of the report
PAIRS = (("jt", "crmt-jt"), ("pgd-at", "crmt-at"), ("trades", "crmt-trades"), ("mixup", "crmt-mix"),
         ("jt", "paper-crmt-jt"), ("paper-crmt-jt", "crmt-jt"), ("lip-jt", "crmt-lip"))


# The training budget is counted in optimiser steps, not epochs: 30 epochs of a 32-sample set at batch 64 are 30
# steps, and JT under-fits (issue 21). 1500 steps is about what the matrix's sets already got at 30 epochs (570 to 870
# steps) rounded up to where their validation accuracy had stopped moving; docs/method.md, "The training budget".
DEFAULT_MIN_STEPS = 1500
MAX_BATCH = 64


@dataclass(frozen=True)
class Schedule:
    """How long one recipe trains on ``num_train`` samples: ``epochs`` x ``steps_per_epoch`` steps of ``batch_size``."""

    batch_size: int
    steps_per_epoch: int
    epochs: int

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def training_schedule(num_train: int, cfg: "TrainConfig") -> Schedule:
    """The training budget of every recipe, by optimiser steps:

        batch  = cfg.batch_size, or else min(64, max(8, 2 ** floor(log2(N / 8))))   (at least ~8 batches an epoch)
        steps  = ceil(N / batch) per epoch (a last batch of one sample is skipped: BatchNorm)
        epochs = min(max_epochs, max(cfg.epochs, ceil(min_steps / steps)))

    so a large set trains ``cfg.epochs`` epochs and a small one as many epochs as ``min_steps`` steps need.

    Example:

        >>> training_schedule(1200, TrainConfig())      # mfeat: 19 batches of 64, 79 epochs
        Schedule(batch_size=64, steps_per_epoch=19, epochs=79)
        >>> training_schedule(48, TrainConfig())        # 48 samples: batches of 8, 250 epochs
        Schedule(batch_size=8, steps_per_epoch=6, epochs=250)
        >>> training_schedule(48, TrainConfig(min_steps=0, epochs=2, batch_size=16)).steps
        6
    """
    n = max(int(num_train), 1)
    if cfg.batch_size is not None:
        batch = int(cfg.batch_size)
    else:
        batch = min(MAX_BATCH, max(8, 2 ** int(math.floor(math.log2(max(n / 8, 1))))))
    steps = n // batch + (1 if n % batch >= 2 else 0)
    steps = max(steps, 1)
    epochs = max(int(cfg.epochs), math.ceil(max(int(cfg.min_steps), 0) / steps))
    return Schedule(batch_size=batch, steps_per_epoch=steps, epochs=max(1, min(int(cfg.max_epochs), epochs)))


def check_methods(methods) -> List[str]:
    """The method names, validated (CRMTError naming the unknown ones and the known ones)."""
    methods = [m.strip() for m in methods if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CRMTError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if not methods:
        raise CRMTError(f"no method given; known: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise CRMTError(f"a method is listed twice: {methods}")
    return methods


@dataclass
class TrainConfig:
    """Step-1 settings shared by every recipe (defaults in brackets).

    epochs [30: the least number of epochs], min_steps [1500: the least number of optimiser steps], max_epochs
    [1000], batch_size [None: the size rule of :func:`training_schedule`, at most 64], lr [1e-3] and
    weight_decay [1e-4] of Adam; train_eps [1.0] and
    train_steps [3] of the training PGD; beta [6.0] (TRADES); alpha [1.0] (Mixup); rho, margin,
    temperature, penalty, margin_target [None: library default] of ``crmt_loss`` (every CRMT method but
    ``paper-crmt-jt``, which is the paper's formula); integration_init [None: the method's entry of
    ``INTEGRATION_INIT``; a number, or ``"fit"`` for the wrapper's default] of every CRMT head but
    ``paper-crmt-jt``'s; integration_epochs [None: library default] of step 2; encoder ["bn"] the encoder
    family of :func:`new_model`.
    """

    epochs: int = 30
    batch_size: Optional[int] = None
    min_steps: int = DEFAULT_MIN_STEPS
    max_epochs: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    train_eps: float = 1.0
    train_steps: int = 3
    beta: float = 6.0
    alpha: float = 1.0
    rho: Optional[float] = None
    temperature: Optional[float] = None
    margin: Optional[str] = None
    penalty: Optional[str] = None
    margin_target: Optional[float] = None
    integration_init: Union[float, str, None] = None
    integration_epochs: Optional[int] = None
    encoder: str = "bn"
    missing_fill_weight: float = 1.0

    def loss_kwargs(self) -> Dict[str, Any]:
        """The ``crmt_loss`` keywords that differ from the library's defaults."""
        names = ("rho", "margin", "temperature", "penalty", "margin_target")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class Trained:
    """A trained model and what its training produced.

    Attributes:
        model: the plain model to save and attack (for CRMT methods ``crmt.export()``: a plain
            ``nn.Linear`` fusion head with the same logits); eval mode.
        crmt: the :class:`~crmt_plugin.CRMTWrapper` (CRMT methods) or ``None``.
        lipschitz: the empirical constants step 2 used (CRMT methods) or ``None``.
        step2: the :class:`~crmt_plugin.IntegrationResult` fields (CRMT methods) or ``None``.
    """

    method: str
    seed: int
    model: nn.Module
    crmt: Optional[CRMTWrapper]
    lipschitz: Any
    step2: Optional[Dict[str, Any]]
    best_val: float
    best_epoch: int
    train_seconds: float
    train_cpu_seconds: float = 0.0
    history: List[Dict[str, float]] = field(default_factory=list)
    schedule: Optional[Schedule] = None
    selection: Optional[Dict[str, Any]] = None  # crmt-benchmark --select: the candidates' validation scores
    missing_fill_modalities: Optional[List[str]] = None  # the modalities the missing-fill term constrained


# the largest share of training samples that may lie within the radius of a modality's fill for the missing-fill
# term to constrain that modality (a few outliers do not make the fill a plausible input)
PLAUSIBLE_FILL_SHARE = 0.01


def neutral_fill_modalities(train_x: Dict[str, Tensor], fill: Dict[str, Tensor], radius: float) -> List[str]:
    """The modalities the missing-fill term may constrain: those whose fill is *not* a plausible input, i.e. fewer
    than ``PLAUSIBLE_FILL_SHARE`` of the training samples lie within l2 ``radius`` of it (in that modality alone).
    ``crmt.missing_fill_loss`` constrains only these: where real samples sit within the attack radius of the fill
    (BasicMotions' "standing" gyroscope windows, a quarter of the set, within 2.95 of the mean window), "the fill
    carries no evidence" contradicts
    their class, and a joint attack that moves them onto the fill removes the modality for free (measured:
    CRMT-AT's joint accuracy 77.5 -> 62.5 % with the term on both modalities, docs/method.md).

    Example:

        >>> x = {"a": torch.randn(100, 4) + 5.0, "b": torch.randn(100, 3)}
        >>> neutral_fill_modalities(x, {"a": torch.zeros(4), "b": torch.zeros(3)}, radius=1.0)
        ['a']
    """
    out = []
    for name, x in train_x.items():
        distance = (x - fill[name].to(x)).flatten(1).norm(dim=1)
        if float((distance < radius).float().mean()) < PLAUSIBLE_FILL_SHARE:
            out.append(name)
    return out


def _kl(adversarial_logits: Tensor, clean_logits: Tensor) -> Tensor:
    """TRADES' KL(softmax(clean) || softmax(adversarial)), batch mean, gradient through both."""
    return F.kl_div(F.log_softmax(adversarial_logits, 1), F.softmax(clean_logits, 1), reduction="batchmean")


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, inputs: Dict[str, Tensor], y: Tensor, batch_size: int = 512
                      ) -> Tuple[float, float]:
    """(clean accuracy, mean cross-entropy) of ``model(**inputs)`` (eval mode; the model's modes are restored)."""
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    correct, loss = 0, 0.0
    for xb, yb in batches(inputs, y, batch_size):
        logits = model(**xb)
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
    for m, t in saved:
        m.training = t
    n = max(int(y.shape[0]), 1)
    return correct / n, loss / n


def accuracy(model: nn.Module, inputs: Dict[str, Tensor], y: Tensor, batch_size: int = 512) -> float:
    """Clean accuracy of ``model(**inputs)`` (eval mode; the model's modes are restored)."""
    return accuracy_and_loss(model, inputs, y, batch_size)[0]


class BestOnValidation:
    """Model selection on the validation split: keep a copy of the weights of the epoch with the best
    validation accuracy; among epochs of equal accuracy, the one with the lower validation loss (when given;
    without it ties keep the earlier epoch). The tie-break matters on small validation splits, where the
    accuracy saturates early and "the first epoch at 100 %" would be an under-trained model.

    Example:

        >>> import torch
        >>> net, best = torch.nn.Linear(2, 2), BestOnValidation()
        >>> best.update(net, 0.5), best.update(net, 0.4), best.best_epoch
        (True, False, 1)
        >>> best.update(net, 0.5, 0.3), best.update(net, 0.5, 0.4), best.best_epoch
        (True, False, 3)
        >>> best.restore(net)
    """

    def __init__(self) -> None:
        self.best_val, self.best_epoch, self.epochs = -1.0, 0, 0
        self.best_loss = math.inf
        self.state: Optional[Dict[str, Tensor]] = None

    def update(self, model: nn.Module, val_accuracy: float, val_loss: Optional[float] = None) -> bool:
        """Record one epoch's validation accuracy (and loss); True when it is the best so far (weights copied)."""
        self.epochs += 1
        loss = math.inf if val_loss is None or not math.isfinite(val_loss) else float(val_loss)
        if val_accuracy > self.best_val or (val_accuracy == self.best_val and loss < self.best_loss):
            self.best_val, self.best_epoch, self.best_loss = float(val_accuracy), self.epochs, loss
            self.state = copy.deepcopy(model.state_dict())
            return True
        return False

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights (nothing when no epoch was recorded)."""
        if self.state is not None:
            model.load_state_dict(self.state)


def _supports(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _step2(method: str, crmt: CRMTWrapper, train_loader, val_loader, lipschitz, cfg: TrainConfig,
           seed: int, missing_fill: Optional[Dict[str, Tensor]] = None, step1_epochs: Optional[int] = None
           ) -> Dict[str, Any]:
    from ..integration import fit_integration

    kwargs: Dict[str, Any] = {"generator": torch.Generator().manual_seed(seed + 7)}
    if method == "paper-crmt-jt":
        kwargs["epochs"] = max(1, (cfg.epochs if step1_epochs is None else step1_epochs) // 3)
        kwargs["optimizer"] = lambda params: torch.optim.SGD(params, lr=3e-5, momentum=0.9, weight_decay=1e-2)
        # as published: the mean joint radius on the training data, no accuracy constraint, no early stop
        if _supports(fit_integration, "objective"):
            kwargs["objective"] = "mean_radius"
        if _supports(fit_integration, "accuracy_tolerance"):
            kwargs["accuracy_tolerance"] = math.inf
        if _supports(fit_integration, "patience"):
            kwargs["patience"] = None
    else:
        if cfg.integration_epochs is not None:
            kwargs["epochs"] = cfg.integration_epochs
        if _supports(fit_integration, "val_loader"):
            kwargs["val_loader"] = val_loader
        if missing_fill is not None and _supports(fit_integration, "missing_fill"):
            kwargs["missing_fill"] = missing_fill
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = crmt.fit_integration(train_loader, lipschitz=lipschitz, **kwargs)
    out = _plain(dataclasses.asdict(result) if dataclasses.is_dataclass(result) else vars(result))
    out["warnings"] = [str(w.message) for w in caught]
    return out


def _plain(value: Any) -> Any:
    """JSON-friendly copy (tensors to lists, unknown objects to str)."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    return str(value)


_PRETRAINED: Dict[Any, Dict[str, Dict[str, Tensor]]] = {}


def _pretrain(body: nn.Module, name: str, data: BenchmarkData, cfg: "TrainConfig", schedule: Schedule,
              generator: torch.Generator) -> None:
    """Train ``body`` on modality ``name`` alone (CE through a temporary linear head); keep its best epoch."""
    train_x, train_y = data.part("train")
    val_x, val_y = data.part("validation")
    net = nn.Sequential(body, nn.Linear(body.out_features, data.num_classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state = -1.0, copy.deepcopy(body.state_dict())
    for _ in range(schedule.epochs):
        net.train()
        for xb, yb in batches({name: train_x[name]}, train_y, schedule.batch_size, shuffle=True, generator=generator):
            if yb.shape[0] < 2:
                continue
            loss = F.cross_entropy(net(xb[name]), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            val = float((net(val_x[name]).argmax(1) == val_y).double().mean())
        if val > best:
            best, best_state = val, copy.deepcopy(body.state_dict())
    body.load_state_dict(best_state)


def pretrained_bodies(data: BenchmarkData, cfg: "TrainConfig", seed: int) -> Dict[str, nn.Module]:
    """For ``encoder="frozen"``: one ``"bn"`` encoder per modality, trained on that modality alone (CE through a
    temporary linear head, Adam, the step budget of :func:`training_schedule`, the epoch with the best validation
    accuracy), as a user's pretrained encoder would be. Computed once per (data, seed) and reused by every method
    (they all start from the same pretrained encoders); eval mode."""
    train_x, train_y = data.part("train")
    stats = {n: standardization(t) for n, t in train_x.items()}
    num_train = int(train_y.shape[0])
    schedule = training_schedule(num_train, cfg)
    key = (data.path, id(data), seed, schedule, cfg.lr, cfg.weight_decay)
    bodies: Dict[str, nn.Module] = {}
    for i, (name, shape) in enumerate(data.sample_shapes().items()):
        with torch.random.fork_rng():  # the caller's global RNG stays as it was, cached or not
            torch.manual_seed(seed * 1000 + 17 + i)
            body = encoder_for(shape, *stats[name], num_train, data.num_classes, "bn")
            if name in _PRETRAINED.get(key, {}):
                body.load_state_dict(_PRETRAINED[key][name])
            else:
                _pretrain(body, name, data, cfg, schedule, torch.Generator().manual_seed(seed * 1000 + 17 + i))
                _PRETRAINED.setdefault(key, {})[name] = copy.deepcopy(body.state_dict())
        bodies[name] = body.eval()
    return bodies


def new_model(data: BenchmarkData, encoder: str = "bn", cfg: Optional["TrainConfig"] = None,
              seed: int = 0) -> BenchmarkNet:
    """A fresh model for ``data`` (train statistics inside; uses the global torch RNG).

    ``encoder``: the family of :func:`~crmt_plugin.benchmark.models.encoder_for` (``"bn"``, ``"ln"``), or
    ``"frozen"``: :func:`pretrained_bodies` (``cfg`` and ``seed`` say how) in a
    :class:`~crmt_plugin.benchmark.models.FrozenEncoder` each, only their projections and the head train."""
    if encoder not in ENCODER_FAMILIES:
        raise CRMTError(f"unknown encoder family {encoder!r}; known: {', '.join(ENCODER_FAMILIES)}")
    train_x, _ = data.part("train")
    stats = {n: standardization(t) for n, t in train_x.items()}
    num_train = int(train_x[data.modalities[0]].shape[0])
    if encoder != "frozen":
        return build_model(data.sample_shapes(), stats, num_train, data.num_classes, encoder)
    bodies = pretrained_bodies(data, cfg if cfg is not None else TrainConfig(), seed)
    return BenchmarkNet({n: FrozenEncoder(b, b.out_features) for n, b in bodies.items()}, data.num_classes)


def train(method: str, data: BenchmarkData, cfg: TrainConfig, seed: int, *, device: torch.device = torch.device("cpu"),
          epoch_bar: Optional[Callable[[range], Any]] = None) -> Trained:
    """Train one recipe with one seed on the train split, select the epoch on the validation split.

    ``epoch_bar`` wraps the epoch range (a progress bar) and may have ``set_postfix``.
    """
    check_methods([method])
    started, cpu_started = time.time(), time.process_time()
    torch.manual_seed(seed)
    model = lipschitz_model(data) if method in LIPSCHITZ_METHODS else new_model(data, cfg.encoder, cfg, seed)
    model = model.to(device)
    crmt: Optional[CRMTWrapper] = None
    if method in CRMT_METHODS:
        init = {} if method in SHARED_SCALE else {"shared_scale": False}
        start = INTEGRATION_INIT.get(method) if cfg.integration_init is None or method == "paper-crmt-jt" else (
            None if cfg.integration_init == "fit" else float(cfg.integration_init))
        if start is not None:
            init["integration_init"] = start
        crmt = CRMTWrapper(model, head="fusion", modalities=model.feature_dims, **init)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    attack_generator = torch.Generator().manual_seed(seed + 1)
    train_x, train_y = data.part("train")
    val_x, val_y = data.part("validation")
    train_x = {n: t.to(device) for n, t in train_x.items()}
    val_x = {n: t.to(device) for n, t in val_x.items()}
    train_y, val_y = train_y.to(device), val_y.to(device)
    loss_kw = cfg.loss_kwargs()
    if method == "paper-crmt-jt":
        loss_kw = {"rho": 2.0, "margin": "raw"}
    attack = None
    if method in ADVERSARIAL:
        extra = {"loss": attacks_module.trades_kl_loss} if "trades" in method else {}
        attack = attacks_module.PGD(cfg.train_eps, norm="l2", steps=cfg.train_steps, generator=attack_generator,
                                    **extra)
    mix = torch.distributions.Beta(cfg.alpha, cfg.alpha)

    # what stands for a missing modality (the evaluation's fill): step 2's constraint, and for the CRMT recipes a
    # missing modality that carries no evidence (on the modalities where the fill is no plausible input)
    fill = {n: m.to(device).expand(data.x[n].shape[1:]).clone() for n, m in data.train_mean().items()}
    neutral = (neutral_fill_modalities(train_x, fill, cfg.train_eps)
               if method in NEUTRAL_FILL_METHODS and cfg.missing_fill_weight > 0 else [])

    def loss_of(inputs: Dict[str, Tensor], y: Tensor) -> Tensor:
        loss = recipe_loss(inputs, y)
        if neutral:
            loss = loss + cfg.missing_fill_weight * crmt.missing_fill_loss(fill, neutral)
        return loss

    def recipe_loss(inputs: Dict[str, Tensor], y: Tensor) -> Tensor:
        if method in LIPSCHITZ_METHODS:  # certified training of Lipschitz encoders (lipschitz_models.py)
            return lip_loss(inputs, y)
        if method == "jt":
            return F.cross_entropy(model(**inputs), y)
        if method in ("crmt-jt", "paper-crmt-jt"):
            return crmt_loss(crmt(inputs), y, **loss_kw)
        if method == "pgd-at":
            return F.cross_entropy(model(**attack(model, inputs, y)), y)
        if method == "crmt-at":
            return crmt_loss(crmt(attack(model, inputs, y)), y, **loss_kw)
        if method == "trades":
            logits = model(**inputs)
            adversarial = attack(model, inputs, logits.detach())
            return F.cross_entropy(logits, y) + cfg.beta * _kl(model(**adversarial), logits)
        if method == "crmt-trades":
            out = crmt(inputs)
            adversarial = attack(model, inputs, out.logits.detach())

            def trades_base(adv_logits: Tensor, labels: Tensor) -> Tensor:
                return F.cross_entropy(out.logits, labels) + cfg.beta * _kl(adv_logits, out.logits)

            return crmt_loss(crmt(adversarial), y, base_loss=trades_base, **loss_kw)
        lam = float(mix.sample())
        other = torch.randperm(y.shape[0], generator=generator).to(y.device)
        mixed = {n: lam * x + (1 - lam) * x[other] for n, x in inputs.items()}
        if method == "mixup":
            logits = model(**mixed)
            return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[other])
        return crmt_loss(crmt(mixed), y, y_b=y[other], lam=lam, **loss_kw)  # crmt-mix

    selection = BestOnValidation()
    history: List[Dict[str, float]] = []
    schedule = training_schedule(int(train_y.shape[0]), cfg)
    if method in LIPSCHITZ_METHODS:
        lip_loss = lipschitz_loss(method, model, crmt, cfg.train_eps, schedule.steps, rho=cfg.rho)  # --rho too
    epochs = range(1, schedule.epochs + 1)
    bar = epoch_bar(epochs) if epoch_bar is not None else epochs
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for inputs, y in batches(train_x, train_y, schedule.batch_size, shuffle=True, generator=generator):
            if y.shape[0] < 2:  # BatchNorm cannot train on one sample
                continue
            loss = loss_of(inputs, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            count += 1
        val, val_loss = accuracy_and_loss(model, val_x, val_y)
        history.append({"epoch": epoch, "train_loss": total / max(count, 1), "val_accuracy": val,
                        "val_loss": val_loss})
        if method in LIPSCHITZ_METHODS:  # certified training: keep the epoch that certifies most (lipschitz_models)
            history[-1]["val_certified_sound"] = sound_certified_accuracy(model, val_x, val_y, cfg.train_eps)
            selection.update(model, history[-1]["val_certified_sound"], val_loss)
        else:
            selection.update(model, val, val_loss)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / max(count, 1):.3f}", val=f"{val:.3f}", best=f"{selection.best_val:.3f}")
    selection.restore(model)
    model.eval()
    lipschitz = step2 = None
    if crmt is not None:
        train_loader = batch_list(train_x, train_y)
        val_loader = batch_list(val_x, val_y)
        lipschitz = crmt.estimate_lipschitz(train_loader)
        step2_lip = sound_constants(model, data) if method in LIPSCHITZ_METHODS else lipschitz  # crmt-lip: sound
        step2 = _step2(method, crmt, train_loader, val_loader, step2_lip, cfg, seed, fill, schedule.epochs)
        plain = crmt.export().eval()
    else:
        plain = model
    return Trained(method=method, seed=seed, model=plain, crmt=crmt, lipschitz=lipschitz, step2=step2,
                   missing_fill_modalities=neutral if method in NEUTRAL_FILL_METHODS else None,
                   best_val=selection.best_val, best_epoch=selection.best_epoch, train_seconds=time.time() - started,
                   train_cpu_seconds=time.process_time() - cpu_started, history=history, schedule=schedule)
