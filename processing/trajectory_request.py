"""One driving sample → a trajectory model's inputs, with the one set of checks every entry point shares.

The `trajectory-prediction` pipeline, the HTTP server's `POST /v1/trajectory` (in one process or through pipeline
parallelism) all turn a sample (camera images, `scene_queries` (Ns, Ds), `history_queries` (Nh, Dh), `can_bus`
(Dc,), an optional instruction and `command`) into model inputs here, so that they accept and refuse the same
requests with the same messages. Works for the Orion models (whose processor places the driving placeholders
itself) and `VLMForTrajectory` on any family (whose folder holds the family's processor, with the placeholder tokens
in its tokenizer: they are placed with `DrivingPlaceholders`).

Ships with the model code in saved folders: it imports only torch, transformers and the other model-side files.
"""

import contextlib
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..configuration.constants import DEFAULT_DRIVING_INSTRUCTION, PLACEHOLDER_TOKENS
from .pipeline_inputs import user_prompt
from .processing_driving_placeholders import DRIVING_FEATURES, DrivingPlaceholders


class TrajectoryRequestError(ValueError):
    """A driving sample that a trajectory model cannot take; `param` names the offending input."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def driving_shapes(config) -> dict[str, tuple[int, ...]]:
    """The shape of each driving tensor of one sample: `scene_queries` (Ns, Ds), `history_queries` (Nh, Dh),
    `can_bus` (Dc,), read from a trajectory model's configuration."""
    return {
        "scene_queries": (config.num_scene_queries, config.scene_query_dim),
        "history_queries": (config.num_history_queries, config.history_query_dim),
        "can_bus": (config.can_bus_dim,),
    }


def check_driving_tensors(config, sample: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The driving tensors of one sample as float32 batches of one: `scene_queries` (1, Ns, Ds), `history_queries`
    (1, Nh, Dh), `can_bus` (1, Dc). Each is given as a tensor, array or nested list of its shape (a leading batch
    dimension of 1 is accepted); a missing, ragged or misshapen one is a `TrajectoryRequestError` naming it."""
    shapes = driving_shapes(config)
    missing = [name for name in DRIVING_FEATURES if sample.get(name) is None]
    if missing:
        needed = ", ".join(f"{name} {shapes[name]}" for name in missing)
        raise TrajectoryRequestError(missing[0], f"A trajectory request needs the driving tensors; missing: {needed}.")
    tensors = {}
    for name, shape in shapes.items():
        try:
            value = torch.as_tensor(sample[name], dtype=torch.float32)
        except (ValueError, TypeError) as error:
            raise TrajectoryRequestError(
                name, f"{name} must be a rectangular array of numbers of shape {shape}: {error}"
            ) from error
        if tuple(value.shape) == (1, *shape):
            value = value[0]
        if tuple(value.shape) != shape:
            raise TrajectoryRequestError(
                name, f"{name} must have shape {shape} or (1, *{shape}), got {tuple(value.shape)}."
            )
        if not torch.isfinite(value).all():
            raise TrajectoryRequestError(name, f"{name} holds NaN or infinite values.")
        tensors[name] = value.unsqueeze(0)
    return tensors


def check_command(config, command: Any) -> torch.Tensor | None:
    """`command` (1,) for a model of `config.num_modes` > 1 trajectory modes, where it picks the mode and is
    required (an int, or anything `operator.index` takes); None for a one-mode model, which refuses a command."""
    if config.num_modes > 1:
        index = None
        if command is not None and not isinstance(command, bool):
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                index = operator.index(command)
        if index is None or not 0 <= index < config.num_modes:
            raise TrajectoryRequestError(
                "command",
                f"command must be a mode index in [0, {config.num_modes}) for this {config.num_modes}-mode model, "
                f"got {command!r}.",
            )
        return torch.tensor([index])
    if command is not None:
        raise TrajectoryRequestError(
            "command", f"command picks a trajectory mode, but this model has one mode; got {command!r}."
        )
    return None


def trajectory_forward_options(model) -> dict[str, Any]:
    """What a trajectory model's forward takes besides its inputs: a model that also generates text (Orion, which
    computes language-model logits) keeps them to one position, as only the planning token's state is read."""
    return {"logits_to_keep": 1} if model.can_generate() else {}


class TrajectoryRequests:
    """Turns driving samples into the inputs of one trajectory model, with its processor.

    Args:
        config: the trajectory model's configuration (query counts and widths, `num_modes`, and for
            `VLMForTrajectory` the placeholder token ids).
        processor: an Orion processor, or the family's processor whose tokenizer holds the placeholder tokens.
    """

    def __init__(self, config, processor: Any):
        if processor is None:
            raise ValueError("A trajectory model needs its processor: save it into the model folder.")
        self.config = config
        self.processor = processor
        if getattr(processor, "placeholder_tokens", None) is not None:
            # An Orion processor places the driving placeholders itself.
            self.driving_processor, self.placeholder_tokens = processor, processor.placeholder_tokens
            return
        tokenizer = processor.tokenizer
        added = tokenizer.get_added_vocab()
        ids = {kind: getattr(config, f"{kind}_token_id") for kind in PLACEHOLDER_TOKENS}
        tokens = {kind: None if ids[kind] is None else tokenizer.convert_ids_to_tokens(ids[kind]) for kind in ids}
        missing = [f"{kind}_token_id" for kind, token in tokens.items() if token not in added]
        if missing:
            raise ValueError(
                f"config {missing} name no placeholder token of the folder's tokenizer: save the processor whose "
                "tokenizer DrivingPlaceholders extended next to the model (placeholders.processor.save_pretrained)."
            )
        self.driving_processor = DrivingPlaceholders(
            processor, config.num_scene_queries, config.num_history_queries, tokens=tokens
        )
        self.placeholder_tokens = self.driving_processor.tokens

    def prompt(self, prompt: str | None, num_images: int) -> str:
        """The chat prompt with `num_images` images, the driving placeholders, the instruction (the default one
        when `prompt` is None) and `<ego_wp>`; a `prompt` that already holds `<ego_wp>` is taken as it is."""
        tokens = self.placeholder_tokens
        if prompt is not None and tokens["ego"] in prompt:
            return prompt
        instruction = DEFAULT_DRIVING_INSTRUCTION if prompt is None else prompt
        text = f"{tokens['scene']}{tokens['history']}{tokens['can_bus']}{instruction}{tokens['ego']}"
        return user_prompt(self.processor, text, num_images)

    def __call__(
        self, images: Sequence[Any], sample: Mapping[str, Any], prompt: str | None = None, command: Any = None
    ) -> dict[str, torch.Tensor]:
        """The model inputs (batch of 1) of one sample: `images` (PIL images, arrays, paths; may be empty), the
        driving tensors in `sample`, the instruction `prompt` and `command`. Bad input is a `TrajectoryRequestError`
        naming it; what the processor refuses is its own `ValueError`."""
        tensors = check_driving_tensors(self.config, sample)
        command_ids = check_command(self.config, command)
        if prompt is not None and not isinstance(prompt, str):
            raise TrajectoryRequestError("prompt", f"prompt must be a string, got {type(prompt).__name__}.")
        images = list(images)
        inputs = dict(
            self.driving_processor(
                images=[images] if images else None,
                text=[self.prompt(prompt, len(images))],
                **tensors,
                return_tensors="pt",
            )
        )
        # PaliGemma's processor adds next-token labels of the prompt; the trajectory head takes none.
        inputs.pop("labels", None)
        if command_ids is not None:
            inputs["command"] = command_ids
        return inputs
