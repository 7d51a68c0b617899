"""``crmt-benchmark``: does CRMT help on *my* data? The eight recipes (and the paper's plain CRMT-JT),
trained and attacked on any multi-modal ``.npz``.

Modules, one concern each:

* :mod:`~crmt_plugin.benchmark.data` - the file format: load, validate, split, standardisation statistics;
* :mod:`~crmt_plugin.benchmark.models` - an encoder per array shape, one linear fusion head, raw inputs;
* :mod:`~crmt_plugin.benchmark.recipes` - the training recipes and model selection on validation;
* :mod:`~crmt_plugin.benchmark.evaluate` - strong, gradient-free and missing-modality evaluation,
  certificates, the automatic radius;
* :mod:`~crmt_plugin.benchmark.report` - ``results.json``, ``results.md``, ``robustness.png``;
* :mod:`~crmt_plugin.benchmark.cli` - the command line (``crmt-benchmark``, ``python -m crmt_plugin.benchmark``).
"""

from .data import BenchmarkData, load_npz, save_npz
from .evaluate import EvalConfig, evaluate, find_radius
from .models import BenchmarkNet, build_model
from .recipes import METHODS, PAIRS, TrainConfig, train

__all__ = ["BenchmarkData", "load_npz", "save_npz", "BenchmarkNet", "build_model", "METHODS", "PAIRS",
           "TrainConfig", "train", "EvalConfig", "evaluate", "find_radius"]
