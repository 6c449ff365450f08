#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite, then the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -n 2 --dist worksteal "$@"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
