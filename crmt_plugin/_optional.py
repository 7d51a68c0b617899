"""Lazy imports of optional dependencies, with a clear message when one is missing."""

from __future__ import annotations

import importlib
from typing import Any

from .errors import CRMTError

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


def tqdm(iterable, **kwargs):
    """tqdm progress bar over ``iterable`` (needs the optional ``tqdm``)."""
    return require("tqdm.auto", "progress bars").tqdm(iterable, **kwargs)
