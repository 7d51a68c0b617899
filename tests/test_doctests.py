"""Every ``>>>`` example in crmt_plugin runs: one case per module of the package.

The examples see their module's own globals plus ``torch``, ``nn`` and ``crmt_plugin``; the seed is
fixed before each module. An example that should not run (it needs data, a GPU, a long training) is
written as a plain ``::`` code block without ``>>>`` prompts instead.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch
from torch import nn

import crmt_plugin


def package_modules():
    names = [crmt_plugin.__name__]
    for info in pkgutil.walk_packages(crmt_plugin.__path__, prefix=crmt_plugin.__name__ + "."):
        names.append(info.name)
    return sorted(names)


MODULES = package_modules()


def test_the_walk_finds_the_package():
    assert {"crmt_plugin.head", "crmt_plugin.lipschitz", "crmt_plugin.distributed"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    extra = {"torch": torch, "nn": nn, "crmt_plugin": crmt_plugin}
    tests = [t for t in finder.find(module, name, extraglobs=extra) if t.examples]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    report = []
    for test in tests:
        # a failing example writes its report to ``out``; collect it for the assertion message
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, (f"{results.failed} of {results.attempted} examples in {name} failed:\n"
                                 + "".join(report))
