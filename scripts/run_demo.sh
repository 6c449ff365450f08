#!/usr/bin/env bash
# Sets up .venv and runs the main job: the offline Orion fine-tuning demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/train_orion.py "$@"
