"""The `action-prediction` pipeline of `VLAForActionPrediction`: camera image(s) + instruction (+ robot state) → one
action chunk in the data's units.

It ships next to the model code in every saved VLA folder and is recorded in `config.custom_pipelines`, so that
`pipeline("action-prediction", model=folder, trust_remote_code=True)` works where vlmheads is not installed. The
prompt and the checks are those of training (`VLADataCollator`), so the model reads what it was trained on.
"""

from typing import Any

import numpy as np
import torch
from transformers import Pipeline

from .collator_vla import VLADataCollator, check_manipulation_record
from .image_inputs import open_images
from .pipeline_inputs import ProcessorPipelineMixin, SampleInputsMixin

SAMPLE_KEYS = ("images", "instruction", "state")


class ActionPredictionPipeline(ProcessorPipelineMixin, SampleInputsMixin, Pipeline):
    """Predicts the action chunk of one observation per call.

    ```python
    policy = pipeline("action-prediction", model=folder, trust_remote_code=True)
    policy(camera_image, instruction="pick the red cube", state=joint_positions)
    # {"actions": array (chunk_size, action_dim)}, unnormalised with the statistics in the config
    ```

    `images` is a camera image (path, URL, PIL image, array, tensor) or a list of them; `instruction` the task in
    words; `state` (state_dim,) (or (1, state_dim)) the robot state, required exactly when the model reads one
    (`config.state_dim` > 0). The regression head's output, the flow head's sample (seed torch for repeatable
    samples) or the tokens head's greedy bins. A list of dicts with these keys predicts several observations.
    """

    sample_keys = SAMPLE_KEYS

    processor_needed = "The action-prediction pipeline needs the family's processor"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.collator = VLADataCollator.for_model(self.processor, self.model.config, with_actions=False)

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        if kwargs:
            raise ValueError(f"Unknown arguments {sorted(kwargs)}; the pipeline takes {list(SAMPLE_KEYS)}.")
        return {}, {}, {}

    def preprocess(self, sample: dict[str, Any]) -> dict[str, torch.Tensor]:
        unknown = sorted(set(sample) - set(SAMPLE_KEYS))
        if unknown:
            raise ValueError(f"Unknown sample keys {unknown}; a sample holds {list(SAMPLE_KEYS)}.")
        config = self.model.config
        if sample.get("images") is None:
            raise ValueError("The action-prediction pipeline needs images: one camera image or a list of them.")
        if sample.get("instruction") is None:
            raise ValueError('The action-prediction pipeline needs instruction="..." (the task in words).')
        state = sample.get("state")
        if config.state_dim and state is None:
            raise ValueError(f"This model reads the robot state: pass state=... of shape ({config.state_dim},).")
        if state is not None and not config.state_dim:
            raise ValueError("state was given, but this model reads no state (config.state_dim is 0).")
        images = sample["images"]
        images = open_images(list(images) if isinstance(images, (list, tuple)) else [images])
        record = {"images": images, "instruction": sample["instruction"]}
        if state is not None:
            state = np.asarray(state.numpy(force=True) if isinstance(state, torch.Tensor) else state, dtype=np.float32)
            record["state"] = state[0] if state.shape == (1, config.state_dim) else state
        check_manipulation_record(record, config.chunk_size, config.action_dim, config.state_dim, with_actions=False)
        return self.collator([record])

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        inputs = {
            name: value.to(dtype) if value.is_floating_point() and name != "state" else value
            for name, value in model_inputs.items()
        }
        return {"actions": self.model.predict_actions(**inputs)}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The action chunk (chunk_size, action_dim) as a float32 NumPy array, in the data's units."""
        return {"actions": model_outputs["actions"][0].float().cpu().numpy()}
