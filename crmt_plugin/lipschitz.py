"""Lipschitz constants of the uni-modal logits, and where they come from.

Two shapes are accepted wherever Lipschitz constants are:

* per class, ``values`` (M, K): tau_k^(m), the l2 Lipschitz constant of x^(m) -> z_k^(m);
* per modality, ``values`` (M,): L^(m), a Lipschitz constant of the encoder x^(m) -> phi^(m)(x^(m)).
  Because every row of W~^(m) has unit norm, tau_k^(m) <= L^(m); with orthonormal rows it also
  enables the tighter certificate (see :mod:`crmt_plugin.certify`).

``sound`` says whether the values are guaranteed upper bounds. Estimates from sampled gradients
(:func:`estimate_lipschitz`) are *lower* estimates of the true constants: certificates built on them
are estimates, never guarantees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._runtime import ModeGuard, iterate_batches, no_autocast, non_finite_modalities
from .distributed import all_reduce_max, is_distributed, raise_on_every_rank
from .errors import CRMTError

__all__ = ["LipschitzConstants", "estimate_lipschitz"]


@dataclass(frozen=True)
class LipschitzConstants:
    """Lipschitz constants for certification.

    Attributes:
        values: (M, K) per-class constants tau_k^(m), or (M,) per-modality encoder constants L^(m).
        modalities: the M modality names, in the order of ``values``' rows.
        sound: True only when every value is a guaranteed upper bound.
        source: ``"empirical"`` (sampled gradients), ``"declared"`` (stated by the user),
            ``"bound"`` (computed upper bound, :func:`crmt_plugin.bounds.encoder_bounds`).

    Example::

        >>> lip = LipschitzConstants.declared({"audio": 1.0, "image": 1.0})   # 1-Lipschitz encoders
        >>> lip.sound, lip.per_class
        (True, False)
    """

    values: Tensor
    modalities: Tuple[str, ...]
    sound: bool
    source: str

    def __post_init__(self) -> None:
        values = self.values
        if not isinstance(values, Tensor) or not values.is_floating_point():
            raise CRMTError(f"Lipschitz values must be a floating-point tensor, found {type(values).__name__}")
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if values.dim() not in (1, 2) or values.shape[0] != len(self.modalities):
            raise CRMTError(
                f"Lipschitz values must have shape (M,) or (M, K) with M = {len(self.modalities)} "
                f"modalities {list(self.modalities)}, found {tuple(values.shape)}"
            )
        if not bool(torch.isfinite(values).all()):
            raise CRMTError(f"Lipschitz values must be finite, found {values.tolist()}")
        if bool((values < 0).any()):
            raise CRMTError(f"Lipschitz values must be >= 0, found {values.tolist()}")

    @property
    def per_class(self) -> bool:
        """True for (M, K) per-class constants, False for (M,) per-modality encoder constants."""
        return self.values.dim() == 2

    @classmethod
    def declared(cls, bounds: Mapping[str, float], *, sound: bool = True) -> "LipschitzConstants":
        """Per-modality encoder bounds L^(m) stated by the user (e.g. 1-Lipschitz architectures).

        The certificate is only as sound as the declaration: see docs/reliability.md.
        """
        names = tuple(bounds)
        values = torch.tensor([float(bounds[n]) for n in names], dtype=torch.float64)
        return cls(values, names, sound=sound, source="declared")

    def per_class_values(self, num_classes: int) -> Tensor:
        """tau (M, K): the per-class constants, broadcasting per-modality ones (tau_k^(m) <= L^(m))."""
        if self.per_class:
            if self.values.shape[1] != num_classes:
                raise CRMTError(
                    f"Lipschitz values have K = {self.values.shape[1]} classes, the model has {num_classes}"
                )
            return self.values
        return self.values.unsqueeze(1).expand(-1, num_classes)

    def aligned(self, modalities: Sequence[str]) -> "LipschitzConstants":
        """The same constants with rows in the given modality order (all modalities required)."""
        if set(modalities) != set(self.modalities) or len(modalities) != len(self.modalities):
            raise CRMTError(
                f"Lipschitz constants are for modalities {list(self.modalities)}, the model has {list(modalities)}"
            )
        index = [self.modalities.index(n) for n in modalities]
        return LipschitzConstants(self.values[index], tuple(modalities), self.sound, self.source)

    def to_dict(self) -> dict:
        return {"values": self.values.tolist(), "modalities": list(self.modalities),
                "sound": self.sound, "source": self.source}


LipschitzLike = Union[LipschitzConstants, Mapping[str, float]]


def as_lipschitz(lipschitz: LipschitzLike) -> LipschitzConstants:
    """Accept a :class:`LipschitzConstants` or a ``{name: L}`` mapping (declared, sound)."""
    if isinstance(lipschitz, LipschitzConstants):
        return lipschitz
    if isinstance(lipschitz, Mapping):
        return LipschitzConstants.declared(lipschitz)
    raise CRMTError(
        f"lipschitz must be LipschitzConstants or a mapping name -> bound, found {type(lipschitz).__name__}"
    )


def _unimodal_input_gradient_norms(
    forward: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]],
    inputs: Mapping[str, Tensor],
    num_classes: int,
    vectorize: bool = True,
) -> Tensor:
    """max over the batch of ||d z_k^(m) / d x^(m)||, shape (M, K), with one vectorised backward.

    ``forward`` maps the inputs to the uni-modal logits {name: (B, K)}. The K backward passes run as
    one batched (vmapped) backward: cotangent k is the one-hot e_k on every modality's z^(m) at
    once. This separates modalities because z^(m) depends on x^(m) alone (late fusion) and samples
    because the model is in eval mode (no cross-sample BatchNorm statistics). ``vectorize=False``
    (or an op without a batching rule) runs the K backward passes one after the other on the same
    graph instead — the same values, and faster for convolutional encoders on CPU, where
    ``convolution_backward`` has no batching rule worth the name (see docs/benchmarks.md).
    """
    names = list(inputs)
    leaves = {n: t.detach().requires_grad_(True) for n, t in inputs.items()}
    with torch.enable_grad():
        unimodal = forward(leaves)
        outputs = [unimodal[n] for n in names]
        batch = outputs[0].shape[0]
        eye = torch.eye(num_classes, dtype=outputs[0].dtype, device=outputs[0].device)
        cotangents = [eye.unsqueeze(1).expand(num_classes, batch, num_classes) for _ in outputs]
        grads = None
        if vectorize:
            try:  # retain_graph: the per-class fallback below may still need the graph
                grads = torch.autograd.grad(
                    outputs, [leaves[n] for n in names], grad_outputs=cotangents,
                    is_grads_batched=True, allow_unused=True, retain_graph=True,
                )
            except RuntimeError:  # an op without a batching rule
                grads = None
        if grads is None:  # one backward per class, on the same graph
            grads_per_class = [
                torch.autograd.grad(outputs, [leaves[n] for n in names], grad_outputs=[c[k] for c in cotangents],
                                    retain_graph=k + 1 < num_classes, allow_unused=True)
                for k in range(num_classes)
            ]
            grads = [
                torch.stack([g[i] if g[i] is not None else torch.zeros_like(leaves[n]) for g in grads_per_class])
                for i, n in enumerate(names)
            ]
    norms = []
    for name, g in zip(names, grads):
        if g is None:  # z^(m) does not depend on x^(m) at all
            norms.append(torch.zeros(num_classes, dtype=torch.float64, device=leaves[name].device))
            continue
        per_sample = torch.linalg.vector_norm(g.flatten(2).double(), dim=2)  # (K, B)
        norms.append(per_sample.amax(dim=1))
    return torch.stack(norms)  # (M, K)


def estimate_lipschitz(
    crmt,
    loader: Iterable,
    *,
    max_batches: Optional[int] = None,
    prepare_batch: Optional[Callable] = None,
    progress: bool = False,
    vectorize: bool = True,
) -> LipschitzConstants:
    """Empirical tau_k^(m) = max over the data of ||grad_{x^(m)} z_k^(m)(x)||, shape (M, K).

    Runs the wrapped model in eval mode (restored afterwards), with all K classes in one vectorised
    backward per batch. Under ``torch.distributed`` the result is the max over all ranks; every rank
    must call it (a rank with no batches contributes nothing), and an error on any rank is raised on
    all of them. Empty batches are skipped; an enclosing autocast is disabled.
    The result has ``sound=False``: a maximum of sampled gradient norms is a *lower* estimate of the
    true Lipschitz constant, so radii built on it are estimates, not guarantees.

    Use :meth:`CRMTWrapper.estimate_lipschitz`, which calls this. Example (two linear encoders
    into one fusion ``nn.Linear``; ``tau_k^(m) = ||W~_k^(m) A_m||`` exactly for a linear encoder A_m)::

        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.audio, self.image = nn.Linear(6, 5), nn.Linear(4, 3)
        ...         self.fc = nn.Linear(5 + 3, 4)
        ...     def forward(self, audio, image):
        ...         return self.fc(torch.cat([self.audio(audio), self.image(image)], dim=1))
        >>> crmt = crmt_plugin.CRMTWrapper(Net(), head="fc", modalities={"audio": 5, "image": 3})
        >>> batch = ({"audio": torch.randn(8, 6), "image": torch.randn(8, 4)}, torch.randint(0, 4, (8,)))
        >>> lip = estimate_lipschitz(crmt, [batch])
        >>> lip.values.shape, lip.sound                     # (M, K), an estimate
        (torch.Size([2, 4]), False)
        >>> exact = torch.linalg.vector_norm(crmt.head.unimodal_weight("audio") @ crmt.model.audio.weight, dim=1)
        >>> torch.allclose(lip.values[0], exact.detach().to(lip.values.dtype))
        True
    """
    names = crmt.modalities
    num_classes = crmt.num_classes
    device = crmt.head.bias.device
    running: Optional[Tensor] = None
    failure: Optional[Exception] = None
    try:
        with ModeGuard(crmt.model, eval_mode=True):
            batches = iterate_batches(loader, prepare_batch, progress=progress, desc="Lipschitz",
                                      max_batches=max_batches)
            for inputs, _ in batches:
                inputs = crmt.check_inputs(inputs)
                if next(iter(inputs.values())).shape[0] == 0:  # an empty batch has no gradient to measure
                    continue
                sick = non_finite_modalities(inputs)
                if sick:
                    raise CRMTError(f"non-finite inputs (NaN/Inf) of modalities {sick} while estimating "
                                    "Lipschitz constants")
                with no_autocast(device):  # gradients of the model in its own dtype, not bf16/fp16
                    values = _unimodal_input_gradient_norms(lambda x: crmt(x).unimodal, inputs, num_classes,
                                                            vectorize)
                running = values if running is None else torch.maximum(running, values)
    except Exception as exc:  # noqa: BLE001 - under torch.distributed: raised below, on every rank
        if not is_distributed():
            raise
        failure = exc
    # Every rank reaches the same collectives, whatever it saw (no batch, a failure, NaN).
    raise_on_every_rank(failure, device, "estimate_lipschitz")
    local_bad = running is not None and not bool(torch.isfinite(running).all())
    flags = all_reduce_max(torch.tensor([float(running is not None), float(local_bad)],
                                        dtype=torch.float64, device=device))
    if float(flags[0]) == 0:
        raise CRMTError("estimate_lipschitz got an empty loader: it needs at least one non-empty batch")
    if float(flags[1]) > 0:
        where = running.tolist() if local_bad else "on another rank"
        raise CRMTError(f"non-finite gradient norms while estimating Lipschitz constants: {where}")
    if running is None:  # this rank saw no data: 0 is neutral for the max (constants are >= 0)
        running = torch.zeros(len(names), num_classes, dtype=torch.float64, device=device)
    running = all_reduce_max(running)
    return LipschitzConstants(running, tuple(names), sound=False, source="empirical")
