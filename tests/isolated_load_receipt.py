"""Loads a saved receipt classifier the way a Hub user without vlmheads would, and runs it on saved inputs.

    python isolated_load_receipt.py FOLDER INPUTS.pt OUTPUTS.pt

Run through `without_vlmheads.py`, so that only the folder's own code can serve the Auto classes and the pipeline.
"""

import sys

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoProcessor,
    pipeline,
)

folder, inputs_file, outputs_file = sys.argv[1:]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
classifier = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
request = torch.load(inputs_file)
prompts = None if config.pooling == "vision" else [processor.classification_prompt()] * len(request["image_paths"])
inputs = processor(images=request["image_paths"], text=prompts, padding=True, return_tensors="pt")
answer_inputs = processor(images=request["image_paths"][:1], text=[request["question"]], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
    classifier_logits = classifier(**inputs).logits
results = {
    "classes": [type(obj).__module__ + "." + type(obj).__name__ for obj in (config, model, classifier, processor)],
    "logits": logits,
    "classifier_logits": classifier_logits,
    "generated": model.generate(**answer_inputs, max_new_tokens=4, do_sample=False),
}
if config.pooling == "vision":
    image_classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    results["pipeline"] = image_classifier(request["image_paths"][0])
    results["pipeline_model"] = type(image_classifier.model).__module__
torch.save(results, outputs_file)
