"""Loads a saved folder the way a Hub user without vlmheads would, and runs it on saved inputs.

    python isolated_load.py FOLDER INPUTS.pt OUTPUTS.pt

Run through `without_vlmheads.py`, so that only the folder's own code can serve the Auto classes.
"""

import sys

import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor

folder, inputs_file, outputs_file = sys.argv[1:]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
request = torch.load(inputs_file)
images = [Image.open(path) for path in request["image_paths"]]
inputs = processor(text=request["text"], images=images, **request["features"], return_tensors="pt")
with torch.no_grad():
    out = model(**inputs)
torch.save(
    {
        "classes": [type(obj).__module__ + "." + type(obj).__name__ for obj in (config, model, processor)],
        "input_ids": inputs["input_ids"],
        "trajectory": out.trajectory,
        "logits": out.logits,
    },
    outputs_file,
)
