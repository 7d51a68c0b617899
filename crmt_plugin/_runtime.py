"""Internal runtime plumbing shared by every module: batches, devices, autocast, finiteness and label
checks, the exact mode guard, and how to call a user's model.

This module sits directly above :mod:`crmt_plugin.errors` and :mod:`crmt_plugin._optional` in the
dependency line and imports nothing else from the package, so any module may use it. Its names are
public *within* the package (no leading underscore, so no module imports a private name of
another); it is not part of the user-facing API.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._optional import progress_bar
from .errors import CRMTError

__all__ = [
    "Inputs",
    "PrepareBatch",
    "iterate_batches",
    "no_autocast",
    "finite_probe",
    "non_finite_modalities",
    "non_finite_samples",
    "check_labels",
    "reduce_per_sample",
    "ModeGuard",
    "call_model",
    "logits_of",
    "output_logits",
    "pick_logits",
    "OutputPicker",
    "describe_output",
    "check_forward_signature",
    "keywords_only",
    "takes_modalities_by_name",
    "ModelCall",
    "module_device",
    "move_batch",
]

Inputs = Mapping[str, Tensor]
PrepareBatch = Callable[[Any], Tuple[Inputs, Tensor]]

INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


# --------------------------------------------------------------------------------------------------
# batches and devices


def iterate_batches(
    loader: Iterable[Any],
    prepare_batch: Optional[PrepareBatch] = None,
    *,
    progress: bool = False,
    desc: str = "",
    max_batches: Optional[int] = None,
) -> Iterator[Tuple[Inputs, Tensor]]:
    """Yield ``(inputs_dict, y)`` from a loader of ``(inputs_dict, y)`` or of any layout that
    ``prepare_batch`` maps to it; at most ``max_batches`` batches; a progress bar if asked.

    Example::

        >>> batches = [({"a": torch.zeros(2, 3)}, torch.zeros(2, dtype=torch.long))]
        >>> [tuple(x["a"].shape) for x, _ in iterate_batches(batches)]
        [(2, 3)]
    """
    iterable: Iterable[Any] = loader
    if progress:
        total = None
        try:
            total = len(loader)  # type: ignore[arg-type]
            if max_batches is not None:
                total = min(total, max_batches)
        except TypeError:
            pass
        iterable = progress_bar(loader, desc=desc, total=total, leave=False)
    for i, batch in enumerate(iterable):
        if max_batches is not None and i >= max_batches:
            break
        if prepare_batch is not None:
            batch = prepare_batch(batch)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping)):
            raise CRMTError(
                f"expected loader batches of (inputs_dict, y), found {type(batch).__name__}; pass "
                "prepare_batch=lambda batch: (inputs_dict, y) to adapt another layout"
            )
        yield batch[0], batch[1]


def module_device(model: Any, default: Optional[torch.device] = None) -> Optional[torch.device]:
    """The device of the first parameter (or buffer) of ``model``; ``default`` when it has none."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return default


def move_batch(
    inputs: Inputs, y: Tensor, device: Optional[torch.device]
) -> Tuple[Dict[str, Tensor], Tensor]:
    """``inputs`` and ``y`` on ``device`` (unchanged when ``device`` is None)."""
    if device is None:
        return dict(inputs), y
    moved = {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in inputs.items()}
    return moved, (y.to(device, non_blocking=True) if isinstance(y, Tensor) else y)


def no_autocast(device: torch.device):
    """A context that disables autocast on ``device``'s type: Lipschitz estimation, step 2 and
    certificates run the model in its own dtype, never in an enclosing bf16/fp16 autocast."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # pragma: no cover - a device type without autocast support
        return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# finiteness and labels


def finite_probe(x: Tensor) -> Tensor:
    """sum(x) as a float64 scalar: non-finite whenever x holds a NaN or an Inf."""
    x = x.detach()
    return (x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()).double()


def non_finite_modalities(inputs: Inputs) -> List[str]:
    """Names of the modalities whose floating-point input holds a NaN or an Inf (host syncs)."""
    return [
        n for n, x in inputs.items()
        if isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all())
    ]


def non_finite_samples(inputs: Inputs, batch: int, device: torch.device) -> Tensor:
    """(batch,) bool: the samples with a NaN or an Inf in any floating-point input."""
    bad = torch.zeros(batch, dtype=torch.bool, device=device)
    for x in inputs.values():
        if isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 1 and x.shape[0] == batch:
            finite = torch.isfinite(x)
            bad |= ~(finite.flatten(1).all(dim=1) if finite.dim() > 1 else finite).to(device)
    return bad


def check_labels(y: Any, batch: int, num_classes: int, what: str = "y") -> None:
    """Raise :class:`CRMTError` unless ``y`` is an integer tensor (batch,) of classes 0..K-1."""
    if not isinstance(y, Tensor) or y.dtype not in INTEGER_DTYPES:
        raise CRMTError(f"{what} must be an integer tensor of class indices (B,), found {type(y).__name__} "
                        f"{getattr(y, 'dtype', '')}")
    if y.shape != (batch,):
        raise CRMTError(f"{what} must have shape ({batch},) to match the logits, found {tuple(y.shape)}")
    if batch:
        low, high = torch.aminmax(y)  # one reduction instead of (y < 0) | (y >= K) then any()
        if int(low) < 0 or int(high) >= num_classes:
            bad = y[(y < 0) | (y >= num_classes)][:5].tolist()
            raise CRMTError(f"{what} holds labels outside [0, {num_classes - 1}] (K = {num_classes}): {bad}")


def reduce_per_sample(per_sample: Tensor, reduction: str) -> Tensor:
    """A per-sample loss (B,) reduced as asked: ``"mean"`` (an empty batch is an error: its mean is undefined),
    ``"sum"`` or ``"none"`` (returned as is).

    Example::

        >>> reduce_per_sample(torch.tensor([1.0, 3.0]), "mean")
        tensor(2.)
    """
    if reduction == "mean":
        if per_sample.numel() == 0:
            raise CRMTError(
                "empty batch (B = 0): its mean is undefined; skip the batch, or use reduction='sum' "
                "(0, zero gradients) or 'none' ((0,))"
            )
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise CRMTError(f"reduction must be 'mean', 'sum' or 'none', found {reduction!r}")


# --------------------------------------------------------------------------------------------------
# modes


class ModeGuard:
    """Context manager: optionally switch a module to eval mode, then restore the ``training`` flag
    of *every* submodule exactly as it was (a BatchNorm frozen with ``.eval()`` inside a training
    model stays frozen; ``model.train(was_training)`` would reset it).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with ModeGuard(net, eval_mode=True):
        ...     assert not net.training
        >>> net.training, net[1].training
        (True, False)
    """

    def __init__(self, model: Any, eval_mode: bool = True) -> None:
        self.model = model if isinstance(model, nn.Module) else None
        self.eval_mode = eval_mode
        self.saved: List[Tuple[nn.Module, bool]] = []

    def __enter__(self) -> "ModeGuard":
        if self.model is not None:
            self.saved = [(m, m.training) for m in self.model.modules()]
            if self.eval_mode:
                self.model.eval()
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, training in self.saved:
            module.training = training


# --------------------------------------------------------------------------------------------------
# calling a model

ModelCall = Callable[[Any, Inputs], Any]


def keywords_only(model: Callable[..., Any]) -> bool:
    """True when the model's forward takes no positional argument (``forward(self, **inputs)``)."""
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    keyword = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return not any(p.kind in positional for p in params) and any(p.kind in keyword for p in params)


def takes_modalities_by_name(model: Callable[..., Any], names: Sequence[str]) -> bool:
    """True when ``model(**{name: tensor})`` binds to the forward: keywords only (``forward(self,
    **inputs)``), or every modality name is a parameter of the forward and every required
    parameter is a modality (``forward(self, audio, image)``)."""
    if keywords_only(model):
        return True
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    kind = inspect.Parameter
    by_name = {p.name for p in params if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)}
    var_keyword = any(p.kind is kind.VAR_KEYWORD for p in params)
    required = {p.name for p in params if p.default is kind.empty
                and p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)}
    if not names or not required <= set(names):
        return False
    return all(n in by_name for n in names) or (var_keyword and bool(set(names) & by_name))


def call_model(model: Callable[..., Any], inputs: Inputs, call: Optional[ModelCall] = None) -> Any:
    """Run ``model`` on an input dict: ``call(model, inputs)`` when given, else ``model(**inputs)``
    when the forward takes the modalities by name (``forward(self, audio, image)`` or
    ``forward(self, **inputs)``), else ``model(inputs)``.

    Example::

        >>> class Net(nn.Module):
        ...     def forward(self, audio, image):
        ...         return audio + image
        >>> call_model(Net(), {"audio": torch.ones(1), "image": torch.ones(1)})
        tensor([2.])
    """
    if call is not None:
        return call(model, inputs)
    return model(**inputs) if takes_modalities_by_name(model, list(inputs)) else model(inputs)


def logits_of(
    model: Callable[..., Any], inputs: Inputs, call: Optional[ModelCall] = None
) -> Tensor:
    """The (B, K) logits of ``call_model(model, inputs, call)``: the output itself, or its
    ``.logits`` attribute (a ``CRMTOutput``, a Hugging Face style output)."""
    out = call_model(model, inputs, call)
    return output_logits(out)


def describe_output(out: Any) -> str:
    """A short description of a model output, for error messages."""
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        parts = ", ".join(describe_output(o) if isinstance(o, Tensor) else type(o).__name__ for o in out)
        return f"a {type(out).__name__} of {len(out)} ({parts})"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out)}"
    return f"a {type(out).__name__}"


OutputPicker = Union[None, int, str, Callable[[Any], Tensor]]


def pick_logits(out: Any, output: OutputPicker) -> Tensor:
    """The (B, K) logits inside a model's output.

    ``output=None``: the output itself (a tensor) or its ``.logits`` tensor; an int: ``out[i]`` (a
    tuple or list); a str: ``out[key]`` (a mapping) or ``getattr(out, key)``; a callable:
    ``output(out)``.

    Example::

        >>> pick_logits((torch.ones(2, 3), torch.zeros(2, 8)), 0).shape
        torch.Size([2, 3])
        >>> pick_logits({"logits": torch.ones(2, 3)}, "logits").shape
        torch.Size([2, 3])
    """
    how = "pass output=0 (a tuple's first element), output=\"logits\" (a key or attribute) or a callable out -> logits"
    if output is None:
        logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
        if not isinstance(logits, Tensor):
            raise CRMTError(f"the model returns {describe_output(out)}, expected the logits (B, K): {how}")
    elif isinstance(output, bool) or not (isinstance(output, (int, str)) or callable(output)):
        raise CRMTError(f"output must be None, an int, a str or a callable picking the logits, found {output!r}")
    elif isinstance(output, int):
        if not isinstance(out, (tuple, list)) or not -len(out) <= output < len(out):
            raise CRMTError(f"output={output} picks element {output} of the model's output, but the model "
                            f"returns {describe_output(out)}")
        logits = out[output]
    elif isinstance(output, str):
        if isinstance(out, Mapping):
            if output not in out:
                raise CRMTError(f"output={output!r}: the model returns {describe_output(out)}")
            logits = out[output]
        elif hasattr(out, output):
            logits = getattr(out, output)
        else:
            raise CRMTError(f"output={output!r}: the model returns {describe_output(out)}, which has no such key or "
                            "attribute")
    else:
        logits = output(out)
    if not isinstance(logits, Tensor) or logits.dim() < 1:
        raise CRMTError(f"the logits picked from the model's output must be a tensor (B, K), found "
                        f"{describe_output(logits)}; the model returns {describe_output(out)}")
    return logits


def check_forward_signature(model: nn.Module, names: Sequence[str]) -> None:
    """Raise unless ``model(**{name: tensor})`` binds to the forward's parameters."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    params = list(signature.parameters.values())
    kind = inspect.Parameter
    var_keyword = any(p.kind is kind.VAR_KEYWORD for p in params)
    by_name = {p.name for p in params if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)}
    required = [p.name for p in params if p.default is kind.empty
                and p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)]
    unaccepted = [] if var_keyword else [n for n in names if n not in by_name]
    unfilled = [n for n in required if n not in names or n not in by_name]
    if unaccepted or unfilled:
        problems = []
        if unaccepted:
            problems.append(f"it takes no argument named {unaccepted}")
        if unfilled:
            problems.append(f"its required arguments {unfilled} are not modality names")
        raise CRMTError(
            f"{type(model).__name__}.forward{signature} cannot be called as model(**inputs) with the modalities "
            f"{list(names)}: {' and '.join(problems)}. Name the forward's arguments after the modalities, or pass "
            "call=lambda model, inputs: model(...) (e.g. model(inputs) or model(inputs['audio'], inputs['video']))"
        )


def output_logits(out: Any, output: "OutputPicker" = None) -> Tensor:
    """(B, K) logits from a model output: the tensor itself or its ``.logits`` tensor by default; see
    :func:`pick_logits` for ``output``."""
    logits = pick_logits(out, output)
    if logits.dim() != 2:
        raise CRMTError(f"the model must return logits (B, K), found a tensor of shape {tuple(logits.shape)}; "
                        "pass output=... (or call=...) to pick the logits")
    return logits
