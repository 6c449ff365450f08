#!/usr/bin/env bash
# Sets up .venv and runs the main job: the offline Orion fine-tuning demo. The demo's own folder
# (outputs/orion_demo) is replaced on each run; pass --output_dir DIR to keep a run elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== Setup: .venv with torch and vlmheads"
bash scripts/setup.sh
echo "== Orion demo: fine-tuning a tiny Orion on the synthetic driving set (examples/train_orion.py)"
.venv/bin/python examples/train_orion.py --overwrite_output_dir "$@"
echo "== Closed-loop demo: a tiny Orion planner trained on highway-env expert drives held-out seeds (examples/demo_closed_loop.py)"
.venv/bin/python examples/demo_closed_loop.py
