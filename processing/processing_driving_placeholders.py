"""Driving placeholders for any VLM family's processor: the `<scene>`, `<history>`, `<can_bus>` and `<ego_wp>` tokens
that `VLMForTrajectory` fills with projected driving features, as the Orion processors place them for Qwen.

`DrivingPlaceholders(processor)` adds the tokens to the processor's tokenizer; calling it with prompts, images and
driving features expands `<scene>` into `num_scene_queries` tokens and `<history>` into `num_history_queries`
tokens, runs the family's processor and returns its outputs with the feature tensors next to them.

This file ships with the model code: it imports only numpy, tokenizers, transformers, `image_inputs` and the
constants.
"""

import numpy as np
from tokenizers import AddedToken
from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from ..configuration.constants import PLACEHOLDER_TOKENS
from .image_inputs import open_images

DRIVING_FEATURES = ("scene_queries", "history_queries", "can_bus")


def check_query_counts(num_scene_queries: int, num_history_queries: int) -> None:
    """Raises a `ValueError` unless both counts of placeholder tokens are positive integers."""
    for name, count in (("num_scene_queries", num_scene_queries), ("num_history_queries", num_history_queries)):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{name} must be a positive integer, got {count!r}.")


def add_placeholder_tokens(tokenizer, tokens: dict[str, str]) -> dict[str, int]:
    """Adds the placeholder `tokens` (`scene`, `history`, `can_bus`, `ego` → string) that `tokenizer` lacks, as
    special tokens; returns their ids by kind."""
    if set(tokens) != set(PLACEHOLDER_TOKENS):
        raise ValueError(f"tokens must name exactly {sorted(PLACEHOLDER_TOKENS)}, got {sorted(tokens)}.")
    if len(set(tokens.values())) != len(tokens) or not all(tokens.values()):
        raise ValueError(f"The placeholder tokens must be distinct, non-empty strings, got {tokens}.")
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens.values() if token not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
    return {kind: tokenizer.convert_tokens_to_ids(token) for kind, token in tokens.items()}


def expand_driving_placeholders(
    prompts: list[str], features: dict, tokens: dict[str, str], num_scene_queries: int, num_history_queries: int
) -> list[str]:
    """Checks the driving placeholders of each prompt and expands `<scene>` and `<history>` into one token per row.

    `tokens` maps `scene`, `history`, `can_bus` and `ego` to their strings; `features` maps `scene_queries`
    (B, num_scene_queries, Ds), `history_queries` (B, num_history_queries, Dh) and `can_bus` (B, Dc) to arrays or
    None. Every prompt holds one placeholder per given feature (none for a missing one) and at most one `<ego_wp>`,
    where the trajectory is read: a prompt without one is a plain question, answered without a trajectory.
    """
    ego = tokens["ego"]
    for index, prompt in enumerate(prompts):
        if prompt.count(ego) > 1:
            raise ValueError(
                f"Prompt {index} holds {prompt.count(ego)} {ego} tokens; a prompt holds at most one, where the "
                "trajectory is read (none for a plain question)."
            )
    for name, kind, rows in (
        ("scene_queries", "scene", num_scene_queries),
        ("history_queries", "history", num_history_queries),
        ("can_bus", "can_bus", None),
    ):
        token, given = tokens[kind], features.get(name) is not None
        counts = [prompt.count(token) for prompt in prompts]
        index = next((i for i, count in enumerate(counts) if count != int(given)), None)
        if index is not None:
            expected = f"exactly one, as {name} were given" if given else f"none, as no {name} were given"
            raise ValueError(f"Prompt {index} holds {counts[index]} {token} placeholders; expected {expected}.")
        if given:
            leading = (len(prompts),) if rows is None else (len(prompts), rows)
            shape = np.shape(features[name])
            if len(shape) != len(leading) + 1 or shape[: len(leading)] != leading:
                layout = "(B, width)" if rows is None else f"(B, {rows}, width)"
                raise ValueError(f"{name} must have shape {layout} with B={len(prompts)} prompts, got {shape}.")
    scene, history = tokens["scene"], tokens["history"]
    return [
        prompt.replace(scene, scene * num_scene_queries).replace(history, history * num_history_queries)
        for prompt in prompts
    ]


class DrivingPlaceholders:
    """Adds the driving placeholder tokens to a family's processor and expands them in prompts.

    `processor` is any registered family's processor (its tokenizer gains the tokens, once); `tokens` maps `scene`,
    `history`, `can_bus` and `ego` to their strings.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        num_scene_queries: int = 256,
        num_history_queries: int = 256,
        tokens: dict[str, str] | None = None,
    ):
        check_query_counts(num_scene_queries, num_history_queries)
        tokens = {**PLACEHOLDER_TOKENS, **(tokens or {})}
        self.processor = processor
        self.num_scene_queries = num_scene_queries
        self.num_history_queries = num_history_queries
        self.tokens = tokens
        self.token_ids = add_placeholder_tokens(processor.tokenizer, tokens)

    def model_config_kwargs(self) -> dict[str, int]:
        """The settings a `VLMTrajectoryConfig` must share with these placeholders: query counts and token ids."""
        return {
            "num_scene_queries": self.num_scene_queries,
            "num_history_queries": self.num_history_queries,
            **{f"{kind}_token_id": token_id for kind, token_id in self.token_ids.items()},
        }

    def expand(self, prompts: list[str], features: dict) -> list[str]:
        """Checks each prompt's placeholders against the given `features` and expands the query placeholders
        (`expand_driving_placeholders`)."""
        return expand_driving_placeholders(
            prompts, features, self.tokens, self.num_scene_queries, self.num_history_queries
        )

    def __call__(
        self,
        text: str | list[str],
        images=None,
        scene_queries=None,
        history_queries=None,
        can_bus=None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        """The family processor's outputs for the expanded prompts and `images`, plus the driving features as
        tensors: `scene_queries` (B, num_scene_queries, Ds), `history_queries` (B, num_history_queries, Dh),
        `can_bus` (B, Dc). Each prompt holds at most one `<ego_wp>` (none: a plain question, no trajectory).
        `images` (paths, URLs, PIL images, arrays, tensors; a list per prompt) are read upright and as RGB by
        `open_images`. `kwargs` go to the family's processor (e.g. `padding=True`)."""
        if text is None:
            raise ValueError("text is required: the prompts hold the driving placeholders.")
        prompts = [text] if isinstance(text, str) else list(text)
        features = dict(zip(DRIVING_FEATURES, (scene_queries, history_queries, can_bus), strict=True))
        expanded = self.expand(prompts, features)
        if images is not None:
            images = open_images(images)
        outputs = self.processor(images=images, text=expanded, return_tensors=return_tensors, **kwargs)
        driving = {name: value for name, value in features.items() if value is not None}
        return BatchFeature({**outputs, **driving}, tensor_type=return_tensors)
