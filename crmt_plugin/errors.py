"""The library's one exception type."""

from __future__ import annotations

__all__ = ["CRMTError"]


class CRMTError(ValueError):
    """Raised for every misuse ``crmt_plugin`` detects.

    Messages say what was expected, what was found, and where possible how to fix it::

        CRMTError: head 'fusion.fc' is a Conv1d, expected torch.nn.Linear
    """
