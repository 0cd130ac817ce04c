#!/usr/bin/env bash
# Set up, then run the whole test suite (unit, filesystem-level and real mounts).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k index`.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/ruff check ebsfs tests scripts || exit 1
.venv/bin/ruff format --check -q ebsfs tests scripts || { echo "test: run .venv/bin/ruff format ebsfs tests scripts" >&2; exit 1; }
.venv/bin/mypy ebsfs scripts tests || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then  # a filter that matches nothing is a mistake, not a pass
    echo "test: pytest collected no tests" >&2
fi
exit "$rc"
