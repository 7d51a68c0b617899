"""The benchmark's sound-certificate numbers: joint and per-modality certified accuracy, and the region.

For a wrapper and sound encoder constants, on the test inputs and the run's radius r:

* ``certified_sound``: fraction of samples classified correctly with sound joint radius >= r;
* ``certified_sound:<m>``: the same with only modality m perturbed (radius_per_modality[m] >= r);
* ``certified_sound_curve``: {"joint" or m: [[radius, fraction], ...]} at ``CURVE_FRACTIONS`` x r;
* ``certified_sound_region``: [{"eps": {m: budget}, "certified": fraction}] -- the fraction certified
  under *every* perturbation with ||eps^(m)|| <= budget_m for all modalities at once
  (:meth:`~crmt_plugin.Certificate.certified`), for budgets ``REGION_FRACTIONS`` x r per modality
  (every combination for M <= 3 modalities, else each modality alone and all at the same budget).

    >>> import torch
    >>> from crmt_plugin import CRMTWrapper
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fusion = torch.nn.Linear(4, 3)
    ...     def forward(self, a, b):
    ...         return self.fusion(torch.cat([a, b], 1))
    >>> crmt = CRMTWrapper(Net(), head="fusion", modalities={"a": 2, "b": 2})
    >>> x, y = {"a": torch.randn(8, 2), "b": torch.randn(8, 2)}, torch.zeros(8, dtype=torch.long)
    >>> row = sound_summary(crmt, {"a": 1.0, "b": 1.0}, x, y, 0.5)
    >>> sorted(k for k in row if not k.endswith(("curve", "region", "radius")))
    ['certified_sound', 'certified_sound:a', 'certified_sound:b']
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Mapping

import torch
from torch import Tensor

from ..certify import Certificate
from .data import batches

__all__ = ["CURVE_FRACTIONS", "REGION_FRACTIONS", "sound_summary", "empty_summary", "region_grid"]

CURVE_FRACTIONS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
REGION_FRACTIONS = (0.0, 0.5, 1.0, 1.5, 2.0)


def region_grid(modalities, radius: float) -> List[Dict[str, float]]:
    """The per-modality budget vectors of ``certified_sound_region``."""
    values = [float(radius) * f for f in REGION_FRACTIONS]
    if len(modalities) <= 3:
        return [dict(zip(modalities, combo)) for combo in itertools.product(values, repeat=len(modalities))]
    out = [{m: v} for m in modalities for v in values]
    return out + [{m: v for m in modalities} for v in values]


def _fraction(flags: Tensor) -> float:
    return float(flags.double().mean()) if flags.numel() else 0.0


def sound_summary(wrapper: Any, lipschitz: Any, inputs: Mapping[str, Tensor], y: Tensor, radius: float,
                  batch_size: int = 1000) -> Dict[str, Any]:
    """The row entries of the module docstring (certificates computed once, in batches)."""
    certs: List[Certificate] = [wrapper.certify(xb, yb, lipschitz=lipschitz)
                                for xb, yb in batches(inputs, y, batch_size)]
    mods = list(wrapper.modalities)
    correct = torch.cat([c.correct for c in certs])
    joint = torch.cat([c.radius for c in certs])
    per = {m: torch.cat([c.radius_per_modality[m] for c in certs]) for m in mods}
    row: Dict[str, Any] = {"certified_sound": _fraction(correct & (joint >= radius))}
    for m in mods:
        row[f"certified_sound:{m}"] = _fraction(correct & (per[m] >= radius))
    curve = {}
    for key, r in [("joint", joint)] + list(per.items()):
        curve[key] = [[float(radius) * f, _fraction(correct & (r >= float(radius) * f))] for f in CURVE_FRACTIONS]
    row["certified_sound_curve"] = curve
    region = []
    for eps in region_grid(mods, radius):
        flags = torch.cat([c.certified(eps) for c in certs])
        region.append({"eps": eps, "certified": _fraction(flags)})
    row["certified_sound_region"] = region
    row["certified_sound_median_radius"] = float(joint.median()) if joint.numel() else 0.0
    return row


def empty_summary(modalities) -> Dict[str, Any]:
    """The entries where no sound bound exists: 0 certified everywhere (no curve, no region)."""
    row: Dict[str, Any] = {"certified_sound": 0.0}
    for m in modalities:
        row[f"certified_sound:{m}"] = 0.0
    return row
