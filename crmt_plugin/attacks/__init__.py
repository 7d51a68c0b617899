"""Multi-modal attacks: PGD / APGD / FGM / Square on any subset of modalities, their per-sample worst
case, evaluation presets, missing modality, a single-tensor adapter.

One uniform contract, like torchattacks but for a dict of modalities::

    attack = PGD(eps=1.0, norm="l2", modalities=["audio"], steps=10, restarts=2)
    adv = attack(model, inputs, y)        # inputs: {"audio": (B, 13, 32), "image": (B, 1, 28, 28)}
    adv["image"] is inputs["image"]       # True: untouched modalities are the very same tensors

    strong = strong_attack(1.0, bounds={"image": (-0.43, 2.81)})   # the strong evaluation preset
    fast = fast_attack(1.0)                                        # PGD-10: cheap and weaker

``model`` is any callable taking the dict of tensors (``model(inputs)``; a module whose forward
takes the modalities as keywords only is called as ``model(**inputs)``; any other way through
``call=``) and returning logits ``(B, K)`` or an object with a ``.logits`` attribute (a
``CRMTWrapper`` returns a ``CRMTOutput``). Pass the ``nn.Module`` itself rather than a lambda
around it, so that its mode can be managed.

Budgets (per sample, always respected exactly after a final projection, up to the floating-point
rounding of ``x + delta``):

* ``eps=1.0`` (a number): one *joint* budget over the attacked modalities;
  l2: ``sqrt(sum_m ||delta_m||_2^2) <= eps``, linf: ``max_m ||delta_m||_inf <= eps``.
* ``eps={"audio": 0.5, "image": 2.0}``: one budget per modality; the keys are the attacked ones.
* any budget may be a float tensor of shape ``(B,)``: one budget per sample.

Model mode: by default an attack runs the model in eval mode and afterwards restores the
``training`` flag of *every* submodule exactly as it was. ``eval_mode=False`` keeps the mode.

Modules: :mod:`.base` (the :class:`Attack` contract), :mod:`.balls` (l2 / linf balls, a registry by
norm), :mod:`.pgd` (PGD, FGM), :mod:`.square` (Square), :mod:`.worst` (WorstCase and the presets),
:mod:`.losses`, :mod:`.missing` (drop_modality, modality_means), :mod:`.adapter` (ModalityAdapter).

>>> sorted(BALLS)
['l2', 'linf']
"""

from .adapter import ModalityAdapter
from .balls import BALLS, Ball, register_ball
from .base import Attack
from .losses import (
    cross_entropy_loss,
    cw_margin_loss,
    dlr_loss,
    targeted_ce_loss,
    targeted_cw_loss,
    targeted_dlr_loss,
    trades_kl_loss,
)
from .missing import drop_modality, modality_means
from .pgd import FGM, PGD
from .square import Square
from .worst import WorstCase, fast_attack, strong_attack

__all__ = [
    "Attack",
    "FGM",
    "PGD",
    "Square",
    "WorstCase",
    "strong_attack",
    "fast_attack",
    "cross_entropy_loss",
    "cw_margin_loss",
    "dlr_loss",
    "targeted_ce_loss",
    "targeted_cw_loss",
    "targeted_dlr_loss",
    "trades_kl_loss",
    "drop_modality",
    "modality_means",
    "ModalityAdapter",
    "Ball",
    "BALLS",
    "register_ball",
]
