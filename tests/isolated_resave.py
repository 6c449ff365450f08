"""Loads a saved folder as remote code and saves it again, the way a Hub user without vlmheads would.

    python isolated_resave.py FOLDER REQUEST.pt RESULTS.pt   (REQUEST.pt: {"target": folder to save into})

Run through `without_vlmheads.py`, so that only the folder's own code can serve the Auto classes.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoModel

folder, request_file, results_file = sys.argv[1:]
target = Path(torch.load(request_file)["target"])
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
model.save_pretrained(target)
torch.save(
    {
        "classes": [type(model).__module__ + "." + type(model).__name__],
        "files": sorted(path.name for path in target.glob("*.py")),
        "custom_pipelines": model.config.custom_pipelines,
    },
    results_file,
)
