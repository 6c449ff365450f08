"""The `trajectory-prediction` pipeline of the driving models: camera images + driving features → waypoints.

One pipeline serves the Orion models (whose processor places the driving placeholders itself) and `VLMForTrajectory`
on any family (whose folder holds the family's processor, with the placeholder tokens in its tokenizer: the
pipeline places them with `DrivingPlaceholders`). It ships next to the model code in every saved folder and is
recorded in `config.custom_pipelines`, so that `pipeline("trajectory-prediction", model=folder,
trust_remote_code=True)` works where vlmheads is not installed.
"""

import inspect
from typing import Any

import torch
from transformers import Pipeline

from .pipeline_inputs import SampleInputsMixin, fetch_urls, user_prompt
from .processing_driving_placeholders import DrivingPlaceholders

DRIVING_TENSORS = ("scene_queries", "history_queries", "can_bus")
SAMPLE_KEYS = ("images", *DRIVING_TENSORS, "command", "prompt")
DEFAULT_INSTRUCTION = "Plan a safe trajectory for the ego car."
PLACEHOLDERS = ("scene", "history", "can_bus", "ego")


class OrionTrajectoryPipeline(SampleInputsMixin, Pipeline):
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

    # None: a folder without a processor loads, and __init__ says what is missing.
    _load_processor = None
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        config = self.model.config
        if self.processor is None:
            raise ValueError(
                "The trajectory-prediction pipeline needs the model's processor: save it into the model folder "
                "(processor.save_pretrained(folder)) or pass processor=..."
            )
        if hasattr(self.processor, "placeholder_tokens"):
            # An Orion processor places the driving placeholders itself.
            self.driving_processor, self.placeholder_tokens = self.processor, self.processor.placeholder_tokens
            return
        tokenizer = self.processor.tokenizer
        added = tokenizer.get_added_vocab()
        ids = {kind: getattr(config, f"{kind}_token_id") for kind in PLACEHOLDERS}
        tokens = {kind: None if ids[kind] is None else tokenizer.convert_ids_to_tokens(ids[kind]) for kind in ids}
        missing = [f"{kind}_token_id" for kind, token in tokens.items() if token not in added]
        if missing:
            raise ValueError(
                f"config {missing} name no placeholder token of the folder's tokenizer: save the processor whose "
                "tokenizer DrivingPlaceholders extended next to the model (placeholders.processor.save_pretrained)."
            )
        self.driving_processor = DrivingPlaceholders(
            self.processor, config.num_scene_queries, config.num_history_queries, tokens=tokens
        )
        self.placeholder_tokens = self.driving_processor.tokens

    def _sanitize_parameters(self, timeout: float | None = None, **kwargs: Any) -> tuple[dict, dict, dict]:
        if kwargs:
            raise ValueError(f"Unknown arguments {sorted(kwargs)}; the pipeline takes {list(SAMPLE_KEYS)}.")
        return ({} if timeout is None else {"timeout": timeout}), {}, {}

    def preprocess(self, sample: dict[str, Any], timeout: float | None = None) -> dict[str, torch.Tensor]:
        unknown = sorted(set(sample) - set(SAMPLE_KEYS))
        if unknown:
            raise ValueError(f"Unknown sample keys {unknown}; a sample holds {list(SAMPLE_KEYS)}.")
        config = self.model.config
        shapes = {
            "scene_queries": (config.num_scene_queries, config.scene_query_dim),
            "history_queries": (config.num_history_queries, config.history_query_dim),
            "can_bus": (config.can_bus_dim,),
        }
        missing = [name for name in DRIVING_TENSORS if sample.get(name) is None]
        if missing:
            needed = ", ".join(f"{name} {shapes[name]}" for name in missing)
            raise ValueError(f"The trajectory-prediction pipeline needs the driving tensors; missing: {needed}.")
        features = {}
        for name, shape in shapes.items():
            value = torch.as_tensor(sample[name], dtype=torch.float32)
            if tuple(value.shape) == (1, *shape):
                value = value[0]
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} or (1, *{shape}), got {tuple(value.shape)}.")
            features[name] = value.unsqueeze(0)

        images = sample.get("images")
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        images = fetch_urls(images, timeout)
        inputs = dict(
            self.driving_processor(
                images=[images] if images else None,
                text=[self._prompt(sample.get("prompt"), len(images))],
                **features,
                return_tensors="pt",
            )
        )
        # PaliGemma's processor adds next-token labels of the prompt; the trajectory head takes none.
        inputs.pop("labels", None)
        command = sample.get("command")
        if config.num_modes > 1:
            if command is None or not 0 <= int(command) < config.num_modes:
                raise ValueError(
                    f"command must be a mode index in [0, {config.num_modes}) for this {config.num_modes}-mode "
                    f"model, got {command!r}."
                )
            inputs["command"] = torch.tensor([int(command)])
        elif command is not None:
            raise ValueError(f"command picks a trajectory mode, but this model has one mode; got {command!r}.")
        return inputs

    def _prompt(self, prompt: str | None, num_images: int) -> str:
        """The chat prompt with `num_images` images, the driving placeholders, the instruction and `<ego_wp>`."""
        tokens = self.placeholder_tokens
        if prompt is not None and tokens["ego"] in prompt:
            return prompt
        instruction = DEFAULT_INSTRUCTION if prompt is None else prompt
        text = f"{tokens['scene']}{tokens['history']}{tokens['can_bus']}{instruction}{tokens['ego']}"
        return user_prompt(self.processor, text, num_images)

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        inputs = {
            name: value.to(dtype) if value.is_floating_point() else value for name, value in model_inputs.items()
        }
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            # Only the planning token's hidden state is read: keep the language-model head to one position.
            inputs["logits_to_keep"] = 1
        output = self.model(**inputs)
        return {"trajectory": output.trajectory, "trajectory_modes": output.trajectory_modes}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Waypoints (T, waypoint_dim) as a NumPy array, and every mode (M, T, waypoint_dim) of a multi-mode model."""
        result = {"waypoints": model_outputs["trajectory"][0].float().cpu().numpy()}
        if self.model.config.num_modes > 1:
            result["modes"] = model_outputs["trajectory_modes"][0].float().cpu().numpy()
        return result
