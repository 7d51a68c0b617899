"""The library's one exception type, and the one way it warns (at the user's line)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Type

__all__ = ["CRMTError", "warn"]


class CRMTError(ValueError):
    """Raised for every misuse ``crmt_plugin`` detects.

    Messages say what was expected, what was found, and where possible how to fix it::

        CRMTError: head 'fusion.fc' is a Conv1d, expected torch.nn.Linear
    """


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# frames that only pass a call through on its way into crmt_plugin (decorators, context managers, a
# Lightning Trainer calling a callback): the warning goes to the user's line above them
PASS_THROUGH = ("torch", "contextlib", "functools", "importlib", "runpy", "lightning", "pytorch_lightning",
                "lightning_fabric")


def warn(message: str, category: Type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` reported at the caller's file and line: the first stack
    frame outside ``crmt_plugin`` (and outside the torch / Lightning / contextlib frames that only pass
    the call through), so ``-W`` filters, ``pytest.warns`` and the printed location name the user's
    code, never the library's.

    Example::

        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("something the user should know")
        >>> caught[0].filename.startswith("<doctest")   # the line that called warn(...), not errors.py
        True
    """
    frame = sys._getframe(1)
    chosen = None
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        top = str(frame.f_globals.get("__name__", "")).split(".")[0]
        if not filename.startswith(PACKAGE_DIR) and top not in PASS_THROUGH:
            chosen = frame
            break
        frame = frame.f_back
    if chosen is None:  # only library and pass-through frames (e.g. python -m crmt_plugin.benchmark)
        chosen = sys._getframe(1)
    module_globals = chosen.f_globals
    warnings.warn_explicit(
        message, category, chosen.f_code.co_filename, chosen.f_lineno,
        module=str(module_globals.get("__name__", "<unknown>")),
        registry=module_globals.setdefault("__warningregistry__", {}),
        # no module_globals (as warnings.warn itself does): with them the source line is fetched through the
        # module's __loader__, which fails for code read from stdin (`python -`: "'__main__' is not a built-in
        # module"); the printed line comes from the file name instead
    )
