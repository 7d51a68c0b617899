"""Robustness evaluation: accuracy under attacks / missing modalities / certificates, tables, plots.

The protocol of spec §5 in one call::

    from crmt_plugin.attacks import modality_means
    result = evaluate_robustness(
        crmt, test_loader,                           # any model taking a dict of tensors
        radii=[0.1, 0.5, 1.0, 2.0],                  # the strong attack at each l2 budget (default)
        bounds=splits.bounds,                        # valid input ranges, for the default attacks
        lipschitz=lip,                               # adds certified accuracy (CRMTWrapper only)
        fill=modality_means(train_loader),           # missing modality: zeros and training mean
    )
    print(result.table("markdown", pivot=True))      # accuracy vs radius per attacked modality
    result.plot("robustness.png")

and the modality-preference diagnosis::

    report = modality_report(crmt, test_loader, radius=1.0, lipschitz=lip)
    print(report)              # names the preferred modality and the weak spot

The model runs in eval mode; every submodule's ``training`` flag is restored afterwards.

Modules: :mod:`.runner` (evaluate_robustness and the preparation shared with the report),
:mod:`.report` (modality_report), :mod:`.results` (result types), :mod:`.render` (tables, plot).

>>> from crmt_plugin.evaluation import RobustnessResult
>>> RobustnessResult(rows=[], modalities=("a",)).rows
[]
"""

from .report import modality_report
from .results import ModalityReport, RobustnessResult
from .runner import evaluate_robustness

__all__ = ["evaluate_robustness", "RobustnessResult", "modality_report", "ModalityReport"]
