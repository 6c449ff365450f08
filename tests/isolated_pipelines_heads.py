"""Runs the heads' pipelines from saved folders the way a Hub user without vlmheads would, all in one interpreter.

    python isolated_pipelines_heads.py FOLDER INPUTS.pt OUTPUTS.pt

`INPUTS.pt`: `{"image_path": str, "calls": [{"task", "folder", "kwargs", "seed"}, ...]}`. Each call builds
`pipeline(task, model=folder, trust_remote_code=True)` and runs it on the image file with `kwargs` after seeding
torch. Run through `without_vlmheads.py`, so that only each folder's own code can serve the pipelines and models.
"""

import sys

import torch
from transformers import pipeline

_, inputs_file, outputs_file = sys.argv[1:]
request = torch.load(inputs_file)
classes, pipelines, results = [], [], []
for call in request["calls"]:
    runner = pipeline(call["task"], model=call["folder"], trust_remote_code=True)
    # transformers' own ImageClassificationPipeline serves a pooling="vision" classifier: only the model class is
    # checked to come from the folder; the pipeline classes are reported apart.
    classes.append(f"{type(runner.model).__module__}.{type(runner.model).__name__}")
    pipelines.append(f"{type(runner).__module__}.{type(runner).__name__}")
    torch.manual_seed(call["seed"])
    result = runner(request["image_path"], **call["kwargs"])
    if isinstance(result, dict):
        result = {name: torch.from_numpy(value) for name, value in result.items()}
    results.append(result)
torch.save({"classes": classes, "pipelines": pipelines, "results": results}, outputs_file)
