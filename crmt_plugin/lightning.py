"""PyTorch Lightning: CRMT inside a ``LightningModule`` and a ``Trainer``.

Step 1 needs nothing from this module: wrap the model in your ``LightningModule`` and return
``crmt_loss`` from ``training_step`` (DDP included: the CRMT head is an ordinary submodule)::

    class Lit(lightning.pytorch.LightningModule):
        def __init__(self):
            super().__init__()
            self.crmt = crmt_plugin.CRMTWrapper(MyModel(), head="fusion.fc", modalities={"audio": 512, "visual": 512})

        def training_step(self, batch, batch_idx):
            inputs, y = batch
            return crmt_plugin.crmt_loss(self.crmt(inputs), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    trainer = lightning.pytorch.Trainer(max_epochs=8, callbacks=[CRMTCallback()])
    trainer.fit(Lit(), train_loader, val_loader)   # then step 2 on the trainer's loaders

:class:`CRMTCallback` runs the rest at the end of ``fit``: the empirical Lipschitz constants (or the
ones you give), step 2 (``fit_integration``) with the trainer's ``val_dataloaders`` as the validation
split, then logs the uni-modal margins, the integration weights and the certified radius on the
validation split with the trainer's logger (``crmt/...`` keys), and, with ``checkpoint_path``, saves a
checkpoint holding the post-step-2 head (the wrapper's ``state_dict`` is part of the module's) and,
in the callback's state, the Lipschitz constants and step 2's summary; ``Lit.load_from_checkpoint``
rebuilds the wrapper in ``__init__`` and loads the head back.

Under DDP every rank runs the callback on its shard of the data (Lightning's distributed samplers);
the Lipschitz maximum, step 2's sums and the logged means are reduced over the ranks, so all ranks
keep the same a.

``lightning`` (or ``pytorch_lightning``) is an optional dependency, imported when
:class:`CRMTCallback` is first used: ``import crmt_plugin.lightning`` works without it.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, Iterable, Mapping, Optional

import torch
from torch import nn

from ._optional import require
from ._runtime import ModeGuard, iterate_batches, move_batch, module_device
from .distributed import all_reduce_sum
from .errors import CRMTError
from .lipschitz import LipschitzConstants
from .wrapper import CRMTWrapper

__all__ = ["CRMTCallback", "find_wrapper", "unimodal_margins", "lightning_module"]  # noqa: F822 - CRMTCallback: __getattr__


def lightning_module() -> Any:
    """``lightning.pytorch`` (or the standalone ``pytorch_lightning``); a :class:`CRMTError` with the
    install line when neither is installed."""
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        pass
    try:
        return importlib.import_module("pytorch_lightning")
    except ImportError:
        return require("lightning.pytorch", "crmt_plugin.lightning.CRMTCallback")


def find_wrapper(module: nn.Module, attribute: Optional[str] = None) -> CRMTWrapper:
    """The :class:`CRMTWrapper` inside a (Lightning) module: ``module.<attribute>`` when given, else the
    only ``CRMTWrapper`` among its submodules.

    Example::

        >>> from crmt_plugin.models import LateFusionNet
        >>> net = LateFusionNet({"a": nn.Linear(3, 4), "b": nn.Linear(2, 4)}, {"a": 4, "b": 4}, 3)
        >>> holder = nn.Module()
        >>> holder.crmt = crmt_plugin.CRMTWrapper(net, head="fusion.fc", modalities={"a": 4, "b": 4})
        >>> find_wrapper(holder) is holder.crmt
        True
    """
    if attribute is not None:
        found = getattr(module, attribute, None)
        if not isinstance(found, CRMTWrapper):
            raise CRMTError(f"expected a CRMTWrapper at {type(module).__name__}.{attribute}, found "
                            f"{type(found).__name__}; pass wrapper=None to search the submodules")
        return found
    wrappers = [m for m in module.modules() if isinstance(m, CRMTWrapper)]
    if len(wrappers) != 1:
        raise CRMTError(f"expected exactly one CRMTWrapper inside {type(module).__name__}, found {len(wrappers)}; "
                        "wrap the model in the LightningModule's __init__ (self.crmt = CRMTWrapper(...)) or pass "
                        "CRMTCallback(wrapper='attribute name')")
    return wrappers[0]


def unimodal_margins(crmt: CRMTWrapper, loader: Iterable, prepare_batch=None) -> Dict[str, float]:
    """{name: mean uni-modal margin} over ``loader``: the mean over samples of
    ``z_y^(m) - max_{k != y} z_k^(m)`` of each modality's uni-modal logits (B, K) (eval mode, no grad,
    every submodule's mode restored; summed over ``torch.distributed`` ranks). Positive: that modality
    alone separates the true class.

    Example::

        >>> from crmt_plugin.models import LateFusionNet
        >>> net = LateFusionNet({"a": nn.Linear(3, 4), "b": nn.Linear(2, 4)}, {"a": 4, "b": 4}, 3)
        >>> crmt = crmt_plugin.CRMTWrapper(net, head="fusion.fc", modalities={"a": 4, "b": 4})
        >>> batch = ({"a": torch.randn(5, 3), "b": torch.randn(5, 2)}, torch.tensor([0, 1, 2, 0, 1]))
        >>> sorted(unimodal_margins(crmt, [batch]))
        ['a', 'b']
    """
    device = module_device(crmt, torch.device("cpu"))
    sums = torch.zeros(len(crmt.modalities) + 1, dtype=torch.float64, device=device)
    with ModeGuard(crmt, eval_mode=True), torch.no_grad():
        for inputs, y in iterate_batches(loader, prepare_batch):
            inputs, y = move_batch(inputs, y, device)
            out = crmt(inputs)
            for i, name in enumerate(crmt.modalities):
                z = out.unimodal[name].double()
                true = z.gather(1, y.view(-1, 1)).squeeze(1)
                other = z.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
                sums[i] += (true - other).sum()
            sums[-1] += y.shape[0]
    sums = all_reduce_sum(sums)
    count = max(float(sums[-1]), 1.0)
    return {name: float(sums[i]) / count for i, name in enumerate(crmt.modalities)}


def certified_radius(crmt: CRMTWrapper, loader: Iterable, lipschitz: Any, prepare_batch=None) -> Dict[str, float]:
    """{"radius": mean joint certified radius, "radius/<m>": per modality, "accuracy": clean} over
    ``loader`` (0 radius where misclassified; summed over ``torch.distributed`` ranks)."""
    device = module_device(crmt, torch.device("cpu"))
    names = list(crmt.modalities)
    sums = torch.zeros(len(names) + 3, dtype=torch.float64, device=device)
    for inputs, y in iterate_batches(loader, prepare_batch):
        inputs, y = move_batch(inputs, y, device)
        cert = crmt.certify(inputs, y, lipschitz=lipschitz)
        sums[0] += cert.radius.double().sum()
        for i, name in enumerate(names):
            sums[1 + i] += cert.radius_per_modality[name].double().sum()
        sums[-2] += cert.correct.double().sum()
        sums[-1] += y.shape[0]
    sums = all_reduce_sum(sums)
    count = max(float(sums[-1]), 1.0)
    out = {"radius": float(sums[0]) / count, "accuracy": float(sums[-2]) / count}
    out.update({f"radius/{name}": float(sums[1 + i]) / count for i, name in enumerate(names)})
    return out


def first_loader(loaders: Any) -> Optional[Iterable]:
    """The loader itself, or the first of a list / dict of loaders (Lightning's ``val_dataloaders``)."""
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)) and loaders and not isinstance(loaders[0], (list, tuple, dict)):
        return loaders[0]
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    return loaders


def lipschitz_from_state(state: Mapping[str, Any]) -> LipschitzConstants:
    return LipschitzConstants(torch.tensor(state["values"], dtype=torch.float64), tuple(state["modalities"]),
                              bool(state["sound"]), str(state["source"]))


class CallbackLogic:
    """What :class:`CRMTCallback` does, independent of the Lightning base class (built lazily)."""

    def __init__(self, *, wrapper: Optional[str] = None, lipschitz: Any = None, step2: bool = True,
                 train_loader: Optional[Iterable] = None, val_loader: Optional[Iterable] = None,
                 checkpoint_path: Optional[str] = None, prefix: str = "crmt/", prepare_batch=None,
                 **fit_kwargs: Any) -> None:
        self.wrapper, self.lipschitz, self.step2 = wrapper, lipschitz, step2
        self.train_loader, self.val_loader = train_loader, val_loader
        self.checkpoint_path, self.prefix, self.prepare_batch = checkpoint_path, prefix, prepare_batch
        self.fit_kwargs = fit_kwargs
        self.result: Any = None
        self.metrics: Dict[str, float] = {}
        self.lipschitz_used: Optional[LipschitzConstants] = None
        self.loaded_step2: Optional[Dict[str, Any]] = None  # step 2's summary, from a checkpoint

    # -- the hook ------------------------------------------------------------------------------------

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        crmt = find_wrapper(pl_module, self.wrapper)
        train = self.train_loader if self.train_loader is not None else trainer.train_dataloader
        val = self.val_loader if self.val_loader is not None else first_loader(trainer.val_dataloaders)
        if train is None:
            raise CRMTError("CRMTCallback: the trainer has no train_dataloader after fit; pass "
                            "CRMTCallback(train_loader=...)")
        lip = self.lipschitz
        if lip is None:
            lip = crmt.estimate_lipschitz(train, prepare_batch=self.prepare_batch)
        self.lipschitz_used = lip if isinstance(lip, LipschitzConstants) else LipschitzConstants.declared(lip)
        if self.step2:
            kwargs = dict(self.fit_kwargs)
            if val is not None:
                kwargs.setdefault("val_loader", val)
            if self.prepare_batch is not None:
                kwargs.setdefault("prepare_batch", self.prepare_batch)
            self.result = crmt.fit_integration(train, lipschitz=lip, **kwargs)
        self.metrics = self.measure(crmt, val if val is not None else train, lip)
        logger = getattr(trainer, "logger", None)
        if logger is not None:
            logger.log_metrics(self.metrics, step=int(getattr(trainer, "global_step", 0)))
            if hasattr(logger, "save"):
                logger.save()
        if self.checkpoint_path is not None:
            trainer.save_checkpoint(self.checkpoint_path)  # every rank calls it; rank 0 writes

    def measure(self, crmt: CRMTWrapper, loader: Iterable, lipschitz: Any) -> Dict[str, float]:
        p = self.prefix
        metrics = {f"{p}margin/{n}": v for n, v in unimodal_margins(crmt, loader, self.prepare_batch).items()}
        for name, a in crmt.integration_weights().items():
            metrics[f"{p}a/{name}"] = float(a.double().mean())
        metrics.update({f"{p}{k}": v for k, v in certified_radius(crmt, loader, lipschitz, self.prepare_batch).items()})
        if self.result is not None:
            metrics[f"{p}step2/best_epoch"] = float(self.result.best_epoch)
            metrics[f"{p}step2/rejected_epochs"] = float(len(self.result.rejected_epochs))
        return metrics

    # -- the callback's checkpoint state -------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        result = self.result
        return {
            "lipschitz": self.lipschitz_used.to_dict() if self.lipschitz_used is not None else None,
            "metrics": dict(self.metrics),
            "step2": None if result is None else {
                "best_epoch": result.best_epoch, "rejected_epochs": list(result.rejected_epochs),
                "selected_on": result.selected_on, "mean_radius_before": result.mean_radius_before,
                "mean_radius_after": result.mean_radius_after},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        lip = state_dict.get("lipschitz")
        self.lipschitz_used = None if lip is None else lipschitz_from_state(lip)
        self.metrics = dict(state_dict.get("metrics") or {})
        self.loaded_step2 = state_dict.get("step2")


BUILT: Dict[str, type] = {}


def build_callback_class() -> type:
    pl = lightning_module()

    class CRMTCallback(CallbackLogic, pl.Callback):
        """A Lightning ``Callback``: at the end of ``fit``, the Lipschitz constants, step 2 on the
        trainer's loaders, the ``crmt/...`` metrics in the logger, an optional checkpoint.

        Args:
            wrapper: the attribute of the LightningModule holding the :class:`CRMTWrapper` (default:
                the only one among its submodules).
            lipschitz: constants for step 2 and the certificate (a :class:`LipschitzConstants` or a
                ``{name: L}`` declaration); default: ``estimate_lipschitz`` on the training loader.
            step2: run ``fit_integration`` (False: only measure and log).
            train_loader / val_loader: override the trainer's ``train_dataloader`` /
                ``val_dataloaders`` (the first one) — step 2 optimises a on the first, selects on the second.
            checkpoint_path: after step 2, ``trainer.save_checkpoint(checkpoint_path)``.
            prefix: of the logged keys (``crmt/margin/<m>``, ``crmt/a/<m>``, ``crmt/radius``,
                ``crmt/radius/<m>``, ``crmt/accuracy``, ``crmt/step2/...``).
            prepare_batch: maps a batch of your loaders to ``(inputs_dict, y)``.
            **fit_kwargs: passed to ``fit_integration`` (``epochs``, ``accuracy_tolerance``,
                ``missing_fill``, ...).

        After ``fit``: ``callback.result`` (the :class:`IntegrationResult`), ``callback.metrics``,
        ``callback.lipschitz_used``.
        """

        def __init__(self, **kwargs: Any) -> None:
            pl.Callback.__init__(self)
            CallbackLogic.__init__(self, **kwargs)

        def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
            CallbackLogic.on_fit_end(self, trainer, pl_module)

        def state_dict(self) -> Dict[str, Any]:
            return CallbackLogic.state_dict(self)

        def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
            CallbackLogic.load_state_dict(self, state_dict)

    CRMTCallback.__module__ = __name__
    CRMTCallback.__qualname__ = "CRMTCallback"
    return CRMTCallback


def __getattr__(name: str) -> Any:
    if name == "CRMTCallback":  # built on first use, so that importing this module needs no lightning
        if name not in BUILT:
            BUILT[name] = build_callback_class()
        globals()[name] = BUILT[name]
        return BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
