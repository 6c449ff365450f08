"""Loads a saved folder the way a Hub user without vlmheads would, and runs it on saved inputs.

    python isolated_load.py FOLDER INPUTS.pt OUTPUTS.pt

`vlmheads` is made unimportable first, so only the folder's own code can serve the Auto classes.
"""

import importlib.abc
import sys


class _BlockVlmheads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "vlmheads":
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, _BlockVlmheads())

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoProcessor  # noqa: E402

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
