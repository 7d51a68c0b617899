"""Lazy imports of optional dependencies, with a clear message when one is missing."""

from __future__ import annotations

import importlib
from typing import Any, Iterable

from .errors import CRMTError, warn

_INSTALL = {
    "tqdm": "pip install tqdm",
    "matplotlib": "pip install matplotlib",
    "numpy": "pip install numpy",
    "torchattacks": "pip install --no-deps torchattacks==3.5.1",
}


def require(module: str, feature: str = "") -> Any:
    """Import ``module`` or raise CRMTError naming the feature and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        what = f" for {feature}" if feature else ""
        raise CRMTError(
            f"the optional dependency {top!r} is needed{what} but is not installed: "
            f"{_INSTALL.get(top, 'pip install ' + top)}"
        ) from None


def progress_bar(iterable: Iterable, **kwargs: Any) -> Iterable:
    """A tqdm progress bar over ``iterable``; without tqdm installed, one warning and the plain
    iterable (a progress bar is never worth failing a run for). ``kwargs`` go to ``tqdm``."""
    try:
        tqdm = importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        warn("progress bars need the optional dependency 'tqdm' (pip install tqdm); continuing without one")
        return iterable
    return tqdm(iterable, **kwargs)
