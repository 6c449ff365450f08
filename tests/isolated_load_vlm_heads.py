"""Loads saved vlmheads heads the way a Hub user without vlmheads would, and runs each on its saved inputs.

    python isolated_load_vlm_heads.py FOLDER INPUTS.pt OUTPUTS.pt

`INPUTS.pt` lists the models under FOLDER: `{"models": [{"folder", "auto_class", "inputs", "seed"}, ...]}`. One
interpreter loads them all (the remote-code checks of every family in one run). Run through `without_vlmheads.py`,
so that only each folder's own code can serve the Auto classes.
"""

import sys

import torch
import transformers
from transformers import AutoConfig

_, inputs_file, outputs_file = sys.argv[1:]
request = torch.load(inputs_file)
classes, outputs, generated = [], [], []
for entry in request["models"]:
    config = AutoConfig.from_pretrained(entry["folder"], trust_remote_code=True)
    auto_class = getattr(transformers, entry["auto_class"])
    model = auto_class.from_pretrained(entry["folder"], trust_remote_code=True).eval()
    classes += [type(obj).__module__ + "." + type(obj).__name__ for obj in (config, model)]
    torch.manual_seed(entry["seed"])
    with torch.no_grad():
        output = model(**entry["inputs"])
    outputs.append(output.logits if "logits" in output else output.trajectory)
    generated.append(model.generate(**entry["generate_inputs"], max_new_tokens=2, do_sample=False))
torch.save({"classes": classes, "outputs": outputs, "generated": generated}, outputs_file)
