"""The `trajectory-prediction` pipeline of the driving models: camera images + driving features → waypoints.

One pipeline serves the Orion models (whose processor places the driving placeholders itself) and `VLMForTrajectory`
on any family (whose folder holds the family's processor, with the placeholder tokens in its tokenizer: the
pipeline places them with `DrivingPlaceholders`). It ships next to the model code in every saved folder and is
recorded in `config.custom_pipelines`, so that `pipeline("trajectory-prediction", model=folder,
trust_remote_code=True)` works where vlmheads is not installed.
"""

from typing import Any

import torch
from transformers import Pipeline

from .pipeline_inputs import ProcessorPipelineMixin, SampleInputsMixin, fetch_urls
from .processing_driving_placeholders import DRIVING_FEATURES
from .trajectory_request import TrajectoryRequests, trajectory_forward_options

SAMPLE_KEYS = ("images", *DRIVING_FEATURES, "command", "prompt")


class OrionTrajectoryPipeline(ProcessorPipelineMixin, SampleInputsMixin, Pipeline):
    """Plans the ego trajectory of one driving sample per call, with an Orion model or a `VLMForTrajectory`.

    ```python
    planner = pipeline("trajectory-prediction", model=folder, trust_remote_code=True)
    planner(camera_image, scene_queries=scene, history_queries=history, can_bus=can_bus, prompt="Turn left.")
    # {"waypoints": array (T, 2)}, plus "modes" (M, T, 2) when the model has M > 1 trajectory modes
    ```

    `scene_queries` (Ns, Ds), `history_queries` (Nh, Dh) and `can_bus` (Dc,) are tensors, arrays or nested lists (a
    leading batch dimension of 1 is accepted). `images` is a camera image (path, URL, PIL image, array), a list of
    them, or None. `prompt` is the instruction put into the processor's chat template after the driving
    placeholders (as plain text where the family's processor has no template), or a full prompt that already holds
    the `<ego_wp>` token. `command` (int) picks the mode of a multi-mode model.
    A list of dicts with these keys plans several samples.
    """

    sample_keys = SAMPLE_KEYS

    processor_needed = "The trajectory-prediction pipeline needs the model's processor"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.requests = TrajectoryRequests(self.model.config, self.processor)

    def _sanitize_parameters(self, timeout: float | None = None, **kwargs: Any) -> tuple[dict, dict, dict]:
        if kwargs:
            raise ValueError(f"Unknown arguments {sorted(kwargs)}; the pipeline takes {list(SAMPLE_KEYS)}.")
        return ({} if timeout is None else {"timeout": timeout}), {}, {}

    def preprocess(self, sample: dict[str, Any], timeout: float | None = None) -> dict[str, torch.Tensor]:
        unknown = sorted(set(sample) - set(SAMPLE_KEYS))
        if unknown:
            raise ValueError(f"Unknown sample keys {unknown}; a sample holds {list(SAMPLE_KEYS)}.")
        images = sample.get("images")
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        return self.requests(fetch_urls(images, timeout), sample, sample.get("prompt"), sample.get("command"))

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        inputs = {
            name: value.to(dtype) if value.is_floating_point() else value for name, value in model_inputs.items()
        }
        output = self.model(**inputs, **trajectory_forward_options(self.model))
        return {"trajectory": output.trajectory, "trajectory_modes": output.trajectory_modes}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Waypoints (T, waypoint_dim) as a NumPy array, and every mode (M, T, waypoint_dim) of a multi-mode model."""
        result = {"waypoints": model_outputs["trajectory"][0].float().cpu().numpy()}
        if self.model.config.num_modes > 1:
            result["modes"] = model_outputs["trajectory_modes"][0].float().cpu().numpy()
        return result
