"""Loads a saved VLA the way a Hub user without vlmheads would, and predicts actions for saved inputs.

    python isolated_load_vla.py FOLDER REQUEST.pt RESULTS.pt

Run through `without_vlmheads.py`, so that only the folder's own code can serve the Auto classes.
"""

import sys

import torch
from transformers import AutoConfig, AutoModel

folder, request_file, results_file = sys.argv[1:]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
request = torch.load(request_file)
torch.manual_seed(0)
results = {
    "classes": [type(obj).__module__ + "." + type(obj).__name__ for obj in (config, model)],
    "actions": model.predict_actions(**request["inputs"]),
}
torch.save(results, results_file)
