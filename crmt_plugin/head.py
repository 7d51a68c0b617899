"""The re-parameterised fusion head of CRMT.

    h(x) = sum_m a^(m) * (W~^(m) phi^(m)(x^(m))) + b

* ``W~^(m)`` (K, d_m) has orthonormal rows (``W~ W~^T = I_K``) when K <= d_m. It is computed from a
  free matrix ``V^(m)`` by a QR factorisation of ``V^(m)^T`` (Gram-Schmidt of the rows, signs fixed
  so the map is smooth). When K > d_m orthonormal rows are impossible: the rows are only normalised
  to unit length (``orthonormal_rows[m]`` is False and the tighter certificate is not used).
* ``a^(m)`` (K,) are the class-wise integration weights, kept non-negative by a softplus:
  ``a = softplus(alpha)``; with ``shared_scale=True``, ``a = exp(g * tau) * softplus(alpha)``, one
  learnable log-scale ``tau`` shared by every modality and class (see :class:`CRMTHead`).
* ``b`` (K,) is the shared bias.

W~ is computed once per parameter update, not once per call: the head caches the QR factors of each
``V^(m)`` against the parameter's version counter (see :meth:`CRMTHead.clear_cache`), so the extra
forward passes of an attack (PGD-AT, TRADES), of evaluation and of step 2 reuse them. Gradients are
those of the uncached map (the QR's own backward formula, applied to the cached factors).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._runtime import no_autocast
from .errors import CRMTError

__all__ = ["CRMTHead"]

_MIN_INTEGRATION = 1e-6


def _inverse_softplus(a: Tensor) -> Tensor:
    a = a.clamp_min(_MIN_INTEGRATION)
    # log(expm1(a)), written stably for large a.
    return a + torch.log(-torch.expm1(-a))


def orthonormalize_rows(v: Tensor) -> Tensor:
    """Rows of ``v`` (..., K, d), K <= d, made orthonormal by QR; smooth and differentiable.

    ``W~ = (Q diag(sign(diag R)))^T`` where ``V^T = Q R``; equals ``v`` when ``v`` already has
    orthonormal rows. Leading dimensions, if any, are a batch. (One QR per modality, not one batched
    QR over modalities of equal width: measured, batching saves ~7% of the QR at K = 31 but costs
    ~6% at K >= 101 — see docs/benchmarks.md.)
    """
    q, r = torch.linalg.qr(v.mT, mode="reduced")  # q: (..., d, K), r: (..., K, K)
    signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) >= 0, 1.0, -1.0).to(q.dtype)
    return (q * signs.unsqueeze(-2)).mT


def normalize_rows(v: Tensor) -> Tensor:
    """Rows of ``v`` (..., K, d) scaled to unit l2 norm (the K > d fallback)."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)


class _Factors(NamedTuple):
    """What the cache keeps per modality: the key it was computed for and the detached results.

    ``source`` is a weak reference to the parameter (a tensor swapped in by ``functional_call``, a
    deep copy or a re-created parameter is another object: a miss); ``key`` holds the number of
    optimiser steps taken in the process and the parameter's version counter, ``data_ptr``, dtype
    and device: optimiser steps (fused ones too), ``load_state_dict``, edits under ``no_grad`` and
    ``.to(...)`` all change it. ``weight`` is W~ (K, d); ``r`` (K, K) and ``signs`` (K,) are the
    triangular factor of the QR of V^T and its sign fix, V^T = W~^T diag(signs) r, kept for the
    backward (None for unit-norm rows: K > d or ``orthonormal=False``).
    """

    source: "weakref.ref[Tensor]"
    key: Tuple[Any, ...]
    weight: Tensor
    r: Optional[Tensor]
    signs: Optional[Tensor]


class _OptimiserSteps:
    """Counts ``torch.optim`` optimiser steps in this process (a global post-step hook, registered
    when the first CRMTHead is built). Part of the cache key: a fused optimiser (``Adam(fused=True)``)
    updates parameters without bumping their version counters, so the version alone is not enough."""

    count = 0
    handle: Any = None

    @classmethod
    def hook(cls, optimizer: Any, args: Any, kwargs: Any) -> None:
        cls.count += 1

    @classmethod
    def install(cls) -> None:
        if cls.handle is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            cls.handle = register_optimizer_step_post_hook(cls.hook)


def _key(v: Tensor) -> Tuple[Any, ...]:
    return (_OptimiserSteps.count, v._version, v.data_ptr(), v.dtype, v.device)


class _CachedOrthonormalRows(torch.autograd.Function):
    """W~ = orthonormalize_rows(V) from cached factors: no QR in the forward.

    Backward: with the sign-fixed factors V^T = Q R', Q = W~^T, R' = S R, S = diag(signs) (a QR of
    V^T, so the QR's differential applies), G = dL/dW~ and dL/dR' = 0: M = -G Q (K, K),
    C = tril(M, -1) + tril(M, -1)^T + diag(M), dL/dV^T = (G^T + Q C) R'^{-T} = ((G^T + Q C) S) R^{-T}
    -- the backward of ``torch.linalg.qr``. A double backward (``create_graph=True``) recomputes the QR under autograd
    instead, so higher derivatives are those of the uncached map.
    """

    @staticmethod
    def forward(ctx: Any, v: Tensor, weight: Tensor, r: Tensor, signs: Tensor) -> Tensor:
        ctx.save_for_backward(weight, r, signs)
        ctx.source, ctx.version = v, v._version
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        weight, r, signs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the QR itself
            v = ctx.source
            if v._version != ctx.version:
                raise CRMTError(
                    "CRMT head: a direction parameter was modified in place between the forward and a "
                    "double backward (create_graph=True); run the forward again after the update"
                )
            with torch.enable_grad():
                (grad_v,) = torch.autograd.grad(orthonormalize_rows(v), v, grad, create_graph=True)
            return grad_v, None, None, None
        q = weight.mT  # (d, K)
        m = grad @ q  # -M
        minus_c = m.tril() + m.tril(-1).mT
        # a triangular solve from the right (measured ~3.5x faster on this CPU than the equivalent
        # left solve with R on the (K, d) transpose)
        rhs = torch.addmm(grad.mT, q, minus_c, alpha=-1) * signs
        grad_vt = torch.linalg.solve_triangular(r.mT, rhs, upper=False, left=False)
        return grad_vt.mT, None, None, None


try:
    from torch._C._functorch import is_functorch_wrapped_tensor as _functorch_wrapped
except ImportError:  # pragma: no cover - very old torch
    def _functorch_wrapped(v: Tensor) -> bool:
        return False


_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling  # torch < 2.3


def _cacheable(v: Tensor) -> bool:
    """The cache is for plain eager tensors: under torch.compile, functorch transforms or tensor
    subclasses the map is computed as written (the compiler and the transforms see the QR)."""
    return type(v) in (nn.Parameter, Tensor) and not _is_compiling() and not _functorch_wrapped(v)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # pragma: no cover - torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class CRMTHead(nn.Module):
    """Drop-in replacement of a fusion ``nn.Linear(sum_m d_m, K)``.

    Called like the linear it replaces, on the concatenated features (B, sum_m d_m), it returns the
    fused logits (B, K) and keeps the uni-modal logits z^(m) (B, K) and features phi^(m) (B, d_m)
    of the last call for :class:`~crmt_plugin.CRMTWrapper` to collect.

    Example::

        >>> head = CRMTHead.from_linear(nn.Linear(5 + 3, 4), {"audio": 5, "image": 3})
        >>> head(torch.randn(2, 8)).shape
        torch.Size([2, 4])
        >>> head.integration_weights().shape        # a, (M, K)
        torch.Size([2, 4])

    Parameters are ``directions.<name>`` (V^(m), (K, d_m)), ``integration.<name>`` (alpha^(m),
    (K,), a = softplus(alpha)) and ``bias`` (K,); a head built from a bias-free linear keeps a zero
    ``bias`` buffer instead.

    **Shared scale** (``shared_scale=True``; off by default here, on by default in
    :class:`~crmt_plugin.CRMTWrapper`): one more scalar parameter ``log_scale`` (tau, starting at 0)
    and a = exp(scale_gain * tau) * softplus(alpha). A plain linear head can grow the scale of its
    logits fast (Adam moves each of its K * sum_m d_m weights by about lr per step); the CRMT head
    keeps that scale in only M * K integration weights, so under Adam its fused logits stay 2-3x
    smaller and it can underfit: clean accuracy 2 points below joint training on AV digits with noisy
    audio after 30 epochs, and a weaker TRADES KL and training attack for PGD-AT (docs/method.md, "The
    shared scale"). tau moves every a^(m) together, so the scale is free while the ratios between
    modalities, which decide the modality preference CRMT removes, move no faster than before.
    ``scale_gain`` (default 1) multiplies tau's step: under Adam the scale changes by about a factor
    exp(scale_gain * lr) per step. Gain 10 catches up faster but overshoots once the training set is
    fitted (logits 2x a plain head's on the mfeat sets, robustness down 1-5 points); gain 1 does
    neither on the benchmark's six data sets. The scale is part of a: certificates, step 2 (which
    changes alpha only, tau stays) and :meth:`~crmt_plugin.CRMTWrapper.export` all see the same
    function.

        >>> head = CRMTHead({"audio": 5, "image": 3}, 4, shared_scale=True)
        >>> with torch.no_grad():
        ...     _ = head.log_scale.fill_(1.0)                   # exp(1 * 1.0) = e
        >>> bool(torch.allclose(head.integration_weights(), 0.1 * torch.e * torch.ones(2, 4)))
        True
    """

    def __init__(
        self,
        modalities: Mapping[str, int],
        num_classes: int,
        *,
        bias: bool = True,
        integration_init: float = 0.1,
        orthonormal: bool = True,
        shared_scale: bool = False,
        scale_gain: float = 1.0,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if len(modalities) < 2:
            raise CRMTError(
                f"CRMT needs at least 2 modalities, got {len(modalities)}: {list(modalities)}"
            )
        if num_classes < 2:
            raise CRMTError(f"CRMT needs at least 2 classes, got num_classes={num_classes}")
        for name, width in modalities.items():
            if not isinstance(name, str) or not name or "." in name:
                raise CRMTError(
                    f"modality names must be non-empty strings without '.', got {name!r}"
                )
            if not isinstance(width, int) or width < 1:
                raise CRMTError(f"feature width of modality {name!r} must be a positive int, got {width!r}")
        if integration_init <= 0:
            raise CRMTError(f"integration_init must be > 0, got {integration_init}")
        number = isinstance(scale_gain, (int, float)) and not isinstance(scale_gain, bool)
        if not number or not 0 < scale_gain < float("inf"):
            raise CRMTError(f"scale_gain must be a finite number > 0, got {scale_gain!r}")
        self.widths: "OrderedDict[str, int]" = OrderedDict(modalities)
        self.num_classes = int(num_classes)
        self.orthonormal = bool(orthonormal)
        kw = {"dtype": dtype, "device": device}
        self.directions = nn.ParameterDict(
            {
                name: nn.Parameter(
                    orthonormalize_rows(torch.randn(num_classes, d, **kw))
                    if self.orthonormal and num_classes <= d
                    else normalize_rows(torch.randn(num_classes, d, **kw))
                )
                for name, d in self.widths.items()
            }
        )
        init = _inverse_softplus(torch.full((num_classes,), float(integration_init), **kw))
        self.integration = nn.ParameterDict(
            {name: nn.Parameter(init.clone()) for name in self.widths}
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_classes, **kw))
        else:
            self.register_buffer("bias", torch.zeros(num_classes, **kw))
        self.scale_gain = float(scale_gain)
        self.log_scale: Optional[nn.Parameter] = nn.Parameter(torch.zeros((), **kw)) if shared_scale else None
        self._last: Optional[Dict[str, Dict[str, Tensor]]] = None
        self.cache_directions = True
        self._factors: Dict[str, _Factors] = {}
        _OptimiserSteps.install()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        modalities: Mapping[str, int],
        *,
        integration_init: Optional[float] = None,
        orthonormal: bool = True,
        shared_scale: bool = False,
        scale_gain: float = 1.0,
    ) -> "CRMTHead":
        """The CRMT head closest to a trained joint-training head.

        For each block W^(m) (K, d_m) of ``linear.weight``: W~^(m) is its orthonormal polar factor
        (the orthonormal matrix nearest to W^(m)), and a_k^(m) = <W_k^(m), W~_k^(m)> >= 0 the
        least-squares scale of each row (K > d_m: W~ = row-normalised W, a = row norms, exact).
        ``b`` is copied. With ``integration_init`` given, every a is set to that value instead.
        ``orthonormal=False`` keeps unit-norm rows for every modality: W~ = row-normalised W and
        a = row norms reproduce the linear head exactly (to certify a trained JT model as it is).
        ``shared_scale`` / ``scale_gain``: see the class; the shared scale starts at 1 (tau = 0).
        """
        weight = linear.weight.detach()
        head = cls(
            modalities,
            weight.shape[0],
            bias=linear.bias is not None,
            integration_init=integration_init or 0.1,
            orthonormal=orthonormal,
            shared_scale=shared_scale,
            scale_gain=scale_gain,
            dtype=weight.dtype,
            device=weight.device,
        )
        with torch.no_grad():
            for name, block in zip(head.widths, torch.split(weight, list(head.widths.values()), dim=1)):
                if head.orthonormal_rows[name]:
                    u, _, vh = torch.linalg.svd(block.double(), full_matrices=False)
                    direction = (u @ vh).to(block.dtype)
                    scale = (block * direction).sum(dim=1)
                else:
                    scale = torch.linalg.vector_norm(block, dim=1)
                    direction = normalize_rows(block)
                head.directions[name].copy_(direction)
                if integration_init is None:
                    head.integration[name].copy_(_inverse_softplus(scale))
            if linear.bias is not None:
                head.bias.copy_(linear.bias.detach())
        return head

    # ------------------------------------------------------------------ views
    @property
    def modalities(self) -> tuple:
        """Modality names, in the order the concatenated features hold them."""
        return tuple(self.widths)

    @property
    def orthonormal_rows(self) -> Dict[str, bool]:
        """Per modality: True when W~^(m) has orthonormal rows (K <= d_m and ``orthonormal``), False
        for unit-norm rows."""
        return {name: self.orthonormal and self.num_classes <= d for name, d in self.widths.items()}

    def unimodal_weight(self, name: str) -> Tensor:
        """W~^(m) (K, d_m): orthonormal rows (K <= d_m) or unit-norm rows (K > d_m, or
        ``orthonormal=False``). Differentiable w.r.t. ``directions[name]``; computed once per
        update of that parameter (cached, see :meth:`clear_cache`)."""
        # a copy (differentiable where it needs to be): an in-place edit of the result must not
        # reach the cache
        return self._weight(name).clone()

    def _weight(self, name: str) -> Tensor:
        """W~^(m), from the cache where it is current. Not to be modified in place."""
        v = self.directions[name]
        orthonormal = self.orthonormal and self.num_classes <= v.shape[1]
        if not (self.cache_directions and _cacheable(v)):
            return orthonormalize_rows(v) if orthonormal else normalize_rows(v)
        key = _key(v)
        factors = self._factors.get(name)
        grad = v.requires_grad and torch.is_grad_enabled()
        if factors is None or factors.key != key or factors.source() is not v:
            if grad and orthonormal and not _autocast_on(v.device.type):
                # the first call after an update that needs the graph (a training forward): the QR
                # under autograd, exactly as without the cache, and its factors kept for later calls
                q, r = torch.linalg.qr(v.mT, mode="reduced")
                signs = torch.where(torch.diagonal(r) >= 0, 1.0, -1.0).to(q.dtype)
                weight = (q * signs).mT
                self._factors[name] = _Factors(weakref.ref(v), key, weight.detach(), r.detach(), signs)
                return weight
            factors = self._factorise(v, orthonormal, key)
            self._factors[name] = factors
        if not grad:
            return factors.weight
        if orthonormal:
            return _CachedOrthonormalRows.apply(v, factors.weight, factors.r, factors.signs)
        return normalize_rows(v)  # cheap and elementwise: the graph is built as usual

    @staticmethod
    def _factorise(source: Tensor, orthonormal: bool, key: Tuple[Any, ...]) -> _Factors:
        # detached, in the parameter's own dtype (never an enclosing autocast's), normal tensors even
        # inside inference_mode: the factors must serve any later call (the contexts only where needed)
        with contextlib.ExitStack() as stack:
            if torch.is_inference_mode_enabled():
                stack.enter_context(torch.inference_mode(False))
            if _autocast_on(source.device.type):
                stack.enter_context(no_autocast(source.device))
            v = source.detach()
            if orthonormal:
                q, r = torch.linalg.qr(v.mT, mode="reduced")
                signs = torch.where(torch.diagonal(r) >= 0, 1.0, -1.0).to(q.dtype)
                weight = (q * signs).mT  # exactly orthonormalize_rows(v)
            else:
                r = signs = None
                weight = normalize_rows(v)
        return _Factors(weakref.ref(source), key, weight, r, signs)

    def clear_cache(self) -> None:
        """Forget the cached W~ (and QR factors) of every modality.

        The cache is keyed on each ``directions`` parameter's version counter, storage, dtype and
        device and on the count of ``torch.optim`` steps taken in the process, so optimiser steps
        (fused ones too), ``load_state_dict``, in-place edits under ``torch.no_grad()``, ``.to(...)``
        and DDP's broadcasts are all seen. Writes through ``param.data`` are not (autograd does not
        count them; ``torch.autograd.gradcheck`` perturbs inputs that way), nor is an optimiser of
        your own that is no ``torch.optim.Optimizer`` and writes through ``.data``: call this after
        such an edit, or set ``head.cache_directions = False`` to compute W~ at every call.

        Example::

            >>> head = CRMTHead({"audio": 5, "image": 3}, 4)
            >>> w = head.unimodal_weight("audio")                  # one QR; later calls reuse it
            >>> with torch.no_grad():
            ...     _ = head.directions["audio"].add_(0.5)           # seen: the version counter moved
            >>> w2 = head.unimodal_weight("audio")                 # recomputed
            >>> torch.equal(w, w2), torch.allclose(w2 @ w2.T, torch.eye(4), atol=1e-5)
            (False, True)
            >>> _ = head.directions["audio"].data.mul_(2.0)        # not seen: clear the cache
            >>> head.clear_cache()
        """
        self._factors.clear()

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_factors"] = {}  # weak references do not pickle; the cache is rebuilt on first use
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # a checkpoint with or without the shared scale, loaded into a head of the other kind: say how to wrap
        key = prefix + "log_scale"
        has_key = key in state_dict
        if strict and has_key != (self.log_scale is not None):
            found = "has" if has_key else "has no"
            raise CRMTError(
                f"the checkpoint {found} the shared scale '{key}', the CRMT head expected "
                f"{'it' if self.log_scale is not None else 'none'}: wrap with "
                f"CRMTWrapper(..., shared_scale={has_key}) before loading (checkpoints saved before 2026-12-02 "
                "have no shared scale; the wrapper's default has it)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def integration_weights(self) -> Tensor:
        """a (M, K), non-negative, rows in modality order: softplus(alpha), times the shared scale
        (:meth:`shared_scale_factor`) when the head has one."""
        a = F.softplus(torch.stack([self.integration[name] for name in self.widths]))
        return a if self.log_scale is None else a * self.shared_scale_factor()

    def shared_scale_factor(self) -> Tensor:
        """exp(scale_gain * tau), a scalar tensor (1 without a shared scale)."""
        if self.log_scale is None:
            return torch.ones((), dtype=self.bias.dtype, device=self.bias.device)
        return torch.exp(self.scale_gain * self.log_scale)

    def fused_weight(self) -> Tensor:
        """The equivalent plain weight (K, sum_m d_m): concat_m a^(m)[:, None] * W~^(m)."""
        a = self.integration_weights()
        return torch.cat(
            [a[i, :, None] * self._weight(name) for i, name in enumerate(self.widths)], dim=1
        )

    @property
    def in_features(self) -> int:
        return sum(self.widths.values())

    @property
    def out_features(self) -> int:
        return self.num_classes

    # ------------------------------------------------------------------ forward
    def split_features(self, features: Tensor) -> Dict[str, Tensor]:
        """(B, sum_m d_m) -> {name: (B, d_m)}."""
        if features.shape[-1] != self.in_features:
            raise CRMTError(
                f"CRMT head expected concatenated features with last dimension {self.in_features} "
                f"(widths {dict(self.widths)}), found shape {tuple(features.shape)}"
            )
        return dict(zip(self.widths, torch.split(features, list(self.widths.values()), dim=-1)))

    def forward(self, features: Tensor) -> Tensor:
        parts = self.split_features(features)
        unimodal = {name: F.linear(parts[name], self._weight(name)) for name in self.widths}
        fused = self.bias
        for a_m, name in zip(self.integration_weights().unbind(0), self.widths):
            fused = torch.addcmul(fused, a_m, unimodal[name])  # fused + a^(m) * z^(m), one op
        self._last = {"unimodal": unimodal, "features": parts}
        return fused

    def pop_last(self) -> Dict[str, Dict[str, Tensor]]:
        """The uni-modal logits and features of the last forward call (and forget them)."""
        last, self._last = self._last, None
        if last is None:
            raise CRMTError(
                "the CRMT head was not called during the model's forward: check that `head` names "
                "the fusion layer the model actually uses"
            )
        return last

    def extra_repr(self) -> str:
        scale = f", shared_scale=True, scale_gain={self.scale_gain:g}" if self.log_scale is not None else ""
        return f"modalities={dict(self.widths)}, num_classes={self.num_classes}, orthonormal={self.orthonormal}{scale}"
