#!/usr/bin/env bash
# Creates .venv with the torch pair that lies on local disk, then vlmheads (editable) with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[test]"
