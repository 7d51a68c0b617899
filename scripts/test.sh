#!/usr/bin/env bash
# The README's test command: install (scripts/install.sh), lint (ruff, config in pyproject.toml), run the suite.
# Lint findings do not stop the tests; the command fails if either fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
lint=()
for d in crmt_plugin tests examples benchmarks experiments scripts; do
    if [ -d "$d" ]; then lint+=("$d"); fi
done
echo "test.sh: ruff check ${lint[*]}"
ruff_status=0
python3 -m ruff check --output-format concise "${lint[@]}" || ruff_status=$?
python3 -m pytest -q -p no:cacheprovider tests
if [ "$ruff_status" -ne 0 ]; then
    echo "test.sh: the tests passed, but ruff found the violations listed above" >&2
    exit "$ruff_status"
fi
