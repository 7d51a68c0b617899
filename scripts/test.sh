#!/usr/bin/env bash
# The README's test command: install (scripts/install.sh), lint (ruff, config in pyproject.toml), run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
lint=()
for d in crmt_plugin tests examples benchmarks experiments scripts; do
    [ -d "$d" ] && lint+=("$d")
done
echo "test.sh: ruff check ${lint[*]}"
python3 -m ruff check "${lint[@]}"
python3 -m pytest -q -p no:cacheprovider tests
