"""Upward-rounded float arithmetic: every operation on bounds rounds towards +inf.

A bound computed with these helpers is an upper bound of the exact real-number result:

    >>> up(1.0) > 1.0, mul_up(3.0, 1.0) == 3.0, add_up(0.1, 0.2) >= 0.1 + 0.2
    (True, True, True)
    >>> inflate(2.0) > 2.0 * (1 + 1e-6) - 1e-15
    True
"""

from __future__ import annotations

import math

__all__ = ["UNIT_ROUNDOFF", "REL_MARGIN", "INF", "up", "mul_up", "add_up", "sqrt_up", "inflate"]

UNIT_ROUNDOFF = 2.0 ** -53    # unit roundoff u of float64
REL_MARGIN = 1e-6             # covers the backward error of float64 SVD / eigensolvers (p(n) u << 1e-6)
INF = float("inf")


def up(x: float) -> float:
    """Smallest float above the round-to-nearest result ``x``: an upper bound of the exact value."""
    return math.nextafter(float(x), INF) if x != 0.0 else 0.0


def mul_up(a: float, b: float) -> float:
    """a * b rounded up (exact when one factor is 1; 0 when the product is <= 0)."""
    if a == 1.0 or b == 1.0:
        return a * b
    return up(a * b) if a * b > 0 else 0.0


def add_up(a: float, b: float) -> float:
    """a + b rounded up (exact when one term is 0)."""
    if a == 0.0 or b == 0.0:
        return a + b
    return up(a + b)


def sqrt_up(x: float) -> float:
    """sqrt(max(x, 0)) rounded up."""
    return up(math.sqrt(max(float(x), 0.0)))


def inflate(value: float, absolute: float = 0.0) -> float:
    """value * (1 + 1e-6) + absolute, rounded up: the safety margin of every computed norm."""
    return add_up(mul_up(float(value), 1.0 + REL_MARGIN), float(absolute))
