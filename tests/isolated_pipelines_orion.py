"""Runs the Orion pipelines from a saved folder the way a Hub user without vlmheads would.

    python isolated_pipelines_orion.py FOLDER INPUTS.pt OUTPUTS.pt

Run through `without_vlmheads.py`: `pipeline("trajectory-prediction")` plans with the folder's own pipeline code,
`pipeline("image-text-to-text")` answers with the folder's model code, and a copy of the folder whose
`custom_pipelines` names a class its code lacks fails with the error the folder's own code raises.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import pipeline

folder, inputs_file, outputs_file = sys.argv[1:]
request = torch.load(inputs_file)
image = Image.open(request["image_path"])

planner = pipeline("trajectory-prediction", model=folder, trust_remote_code=True)
planned = planner(image, prompt=request["instruction"], **request["features"])

answerer = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image", "image": image}, *request["question"]]}]
answer = answerer(text=messages, max_new_tokens=4, generate_kwargs={"do_sample": False}, return_full_text=False)

stale = Path(outputs_file).with_name("stale")
shutil.copytree(folder, stale)
config = json.loads((stale / "config.json").read_text())
config["custom_pipelines"]["trajectory-prediction"]["impl"] = "pipeline_orion_trajectory.OrionPlanner"
(stale / "config.json").write_text(json.dumps(config))
try:
    pipeline("trajectory-prediction", model=str(stale), trust_remote_code=True)
    stale_error = None
except ValueError as error:
    stale_error = str(error)

models = (planner.model, answerer.model)
torch.save(
    {
        "classes": [f"{type(obj).__module__}.{type(obj).__name__}" for obj in (planner, *models)],
        "waypoints": torch.from_numpy(planned["waypoints"]),
        "answer": answer[0]["generated_text"],
        "stale_error": stale_error,
    },
    outputs_file,
)
