"""Attack losses: ``callable(logits (B, K), y) -> (B,)``, maximised by the attack.

Untargeted losses take the true labels; targeted ones take ``(logits, y, target)`` and grow as the
target class overtakes the true one. A loss may also be named by a string in :class:`~crmt_plugin.attacks.PGD`
(``"ce"``, ``"dlr"``, ``"cw"``); :func:`resolve_loss` maps the names to the functions below.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor, nn

from ..errors import CRMTError

__all__ = [
    "cross_entropy_loss",
    "cw_margin_loss",
    "dlr_loss",
    "trades_kl_loss",
    "targeted_ce_loss",
    "targeted_cw_loss",
    "targeted_dlr_loss",
    "resolve_loss",
]

LossFn = Callable[..., Tensor]


def cross_entropy_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy, the default attack loss.

    Example:

        >>> cross_entropy_loss(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])).shape   # (B,)
        torch.Size([4])
    """
    return nn.functional.cross_entropy(logits, y, reduction="none")


def _true_and_rest(logits: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """(z_y (B,), logits with the true class at -inf (B, K))."""
    index = y.long().unsqueeze(1)
    return logits.gather(1, index).squeeze(1), logits.scatter(1, index, float("-inf"))


def cw_margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample Carlini-Wagner margin ``max_{k != y} z_k - z_y`` (> 0 exactly when misclassified).

    Not to be confused with :func:`crmt_plugin.margin_loss`, the CRMT training regulariser.

    Example:

        >>> cw_margin_loss(torch.tensor([[2.0, 0.5, 1.0]]), torch.tensor([0]))
        tensor([-1.])
    """
    z_y, others = _true_and_rest(logits, y)
    return others.amax(dim=1) - z_y


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (Croce & Hein, 2020), scale- and shift-invariant:

        DLR(z, y) = -(z_y - max_{k != y} z_k) / (z_pi1 - z_pi3 + 1e-12)

    with ``z_pi1 >= z_pi2 >= z_pi3`` the sorted logits. Positive exactly when misclassified; the same
    for ``a * z + b`` (a > 0), so a head that rescales its logits cannot hide the gradient. Needs K >= 3.

    Example:

        >>> dlr_loss(torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0]))     # -(3 - 1) / (3 - 0)
        tensor([-0.6667])
    """
    if logits.shape[1] < 3:
        raise CRMTError(f"the DLR loss needs at least 3 classes, found {logits.shape[1]}; use loss='cw'")
    z_sorted = logits.sort(dim=1, descending=True).values
    z_y, others = _true_and_rest(logits, y)
    return -(z_y - others.amax(dim=1)) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)


def targeted_ce_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """``-CE(z, target)``: grows as the target class gains probability.

    Example:

        >>> targeted_ce_loss(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([1, 2])).shape
        torch.Size([2])
    """
    return -nn.functional.cross_entropy(logits, target.long(), reduction="none")


def targeted_cw_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """``z_target - z_y`` (> 0 once the target beats the true class).

    Example:

        >>> targeted_cw_loss(torch.tensor([[2.0, 0.5, 1.0]]), torch.tensor([0]), torch.tensor([2]))
        tensor([-1.])
    """
    z = logits
    return z.gather(1, target.long().unsqueeze(1)).squeeze(1) - z.gather(1, y.long().unsqueeze(1)).squeeze(1)


def targeted_dlr_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """Targeted DLR (Croce & Hein, 2020): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``.

    Scale- and shift-invariant; needs K >= 4.

    Example:

        >>> z = torch.tensor([[4.0, 2.0, 1.0, 0.0]])
        >>> targeted_dlr_loss(z, torch.tensor([0]), torch.tensor([1]))      # -(4 - 2) / (4 - 0.5)
        tensor([-0.5714])
    """
    if logits.shape[1] < 4:
        raise CRMTError(f"the targeted DLR loss needs at least 4 classes, found {logits.shape[1]}; use loss='cw'")
    z_sorted = logits.sort(dim=1, descending=True).values
    gap = targeted_cw_loss(logits, y, target)
    return gap / (z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3]) + 1e-12)


def trades_kl_loss(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Per-sample ``KL(softmax(target_logits) || softmax(logits))``, the TRADES inner objective.

    Pass the *clean* model's logits (detached) in place of the labels::

        clean = model(inputs).detach()                    # (B, K)
        adv = PGD(eps=0.5, loss=trades_kl_loss)(model, inputs, clean)

    The KL gradient is exactly zero at the clean point, so keep ``random_start=True`` (the default).

    Example:

        >>> trades_kl_loss(torch.zeros(2, 3), torch.zeros(2, 3))
        tensor([0., 0.])
    """
    if target_logits.shape != logits.shape:
        raise CRMTError(
            f"trades_kl_loss expects target logits of the same shape as the logits {tuple(logits.shape)}, "
            f"found {tuple(target_logits.shape)}; pass the clean model's logits as `y`"
        )
    log_p = nn.functional.log_softmax(target_logits.detach(), dim=1)
    log_q = nn.functional.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


# name -> (untargeted, targeted)
LOSSES: Dict[str, Tuple[LossFn, LossFn]] = {
    "ce": (cross_entropy_loss, targeted_ce_loss),
    "cw": (cw_margin_loss, targeted_cw_loss),
    "dlr": (dlr_loss, targeted_dlr_loss),
}


def resolve_loss(loss: Union[None, str, LossFn], targeted: bool) -> Tuple[str, LossFn]:
    """``(name, function)`` of an attack loss given by name (``"ce"``, ``"cw"``, ``"dlr"``), as a
    callable, or ``None`` (cross-entropy); ``targeted`` picks the ``(logits, y, target)`` version.

    Example:

        >>> resolve_loss("dlr", targeted=True)[0]
        'dlr'
    """
    if loss is None:
        loss = "ce"
    if isinstance(loss, str):
        key = {"margin": "cw", "cross_entropy": "ce"}.get(loss, loss)
        if key not in LOSSES:
            raise CRMTError(f"unknown attack loss {loss!r}; known: {sorted(LOSSES)} or a callable(logits, y) -> (B,)")
        return key, LOSSES[key][1 if targeted else 0]
    if not callable(loss):
        raise CRMTError(f"loss must be a name {sorted(LOSSES)} or a callable, found {type(loss).__name__}")
    name: Optional[str] = getattr(loss, "__name__", None)
    return (name or type(loss).__name__), loss
