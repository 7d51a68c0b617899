"""Shared fixtures and test settings. The shared test models live in tests/helpers.py (re-exported
here for the modules that import them from conftest)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from helpers import LateFusion, cnn_batch, cnn_model, linear_model  # noqa: F401 - re-exported

torch.set_num_threads(int(os.environ.get("CRMT_TEST_THREADS", "1")))
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def cnn():
    return cnn_model()
