"""The policies the Meta-World evaluation runs: Meta-World's scripted expert, a uniform random policy, and a trained
model folder, `VLAForActionPrediction` or transformers' π0 (optionally blind, `BLINDS`).

A policy maps a batch of observations to action chunks: `act(observations)` -> (B, T, 4), executed one action per
step until the chunk is spent; `needs_images` says whether frames must be rendered for it.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor

from ..configuration.configuration_vla import POLICY_FAMILIES, VLAConfig
from ..data.manipulation import BACKGROUND
from ..processing.collator_vla import PI0DataCollator, VLADataCollator
from ..registry.vlms import create_vlm
from ._headless import import_simulator
from .manipulation_env import ACTION_DIM, IMAGE_SIZE, PROPRIOCEPTION, MetaWorldEpisode, observation_of_state_dim

# `evaluate(model=...)` names of the policies that are not a model folder.
EXPERT, RANDOM = "expert", "random"
# What a blind model is denied. "image": the camera frame is blanked (the state is whole: in the full setting it
# still holds the objects and the goal). "world": the frame is blanked and every state entry past the
# proprioception (hand xyz, gripper opening) is replaced by its training mean, so that nothing tells the policy
# where the objects and the goal are.
BLIND_IMAGE, BLIND_WORLD = "image", "world"
BLINDS = (BLIND_IMAGE, BLIND_WORLD)


@dataclass
class Observation:
    """What a policy gets at a decision point: the episode (the expert reads its simulator state) and the frame
    (None when the policy needs no image)."""

    episode: MetaWorldEpisode
    image: Image.Image | None


class ExpertPolicy:
    """Meta-World's scripted policy of each task, on the full simulator observation; chunks of one action."""

    needs_images = False
    observation = None

    def __init__(self):
        self.policies = import_simulator("metaworld.policies").ENV_POLICY_MAP
        self.instances: dict[str, object] = {}

    def act(self, observations: Sequence[Observation]) -> np.ndarray:
        """(B, 1, 4) clipped to [-1, 1]."""
        actions = []
        for observation in observations:
            task = observation.episode.task
            policy = self.instances.setdefault(task, self.policies[task]())
            actions.append(np.clip(policy.get_action(observation.episode.env_observation), -1.0, 1.0))
        return np.stack(actions)[:, None].astype(np.float32)


class RandomPolicy:
    """Uniform actions in [-1, 1]^4, one per chunk, from a seeded generator."""

    needs_images = False
    observation = None

    def __init__(self, seed: int):
        self.generator = np.random.default_rng(seed)

    def act(self, observations: Sequence[Observation]) -> np.ndarray:
        """(B, 1, 4)."""
        return self.generator.uniform(-1.0, 1.0, size=(len(observations), 1, ACTION_DIM)).astype(np.float32)


class ModelPolicy:
    """A trained model folder: frame, instruction and state in, the predicted chunk out (batched over the episodes
    deciding at the same step). `VLAForActionPrediction` predicts with `predict_actions`; transformers' π0 (a
    `POLICY_FAMILIES` folder, loaded as the registry loads it) samples with its processor's statistics. `blind`
    (one of `BLINDS`) hides the frame (a blank `IMAGE_SIZE` frame; none is rendered), or the frame and the world in
    the state. The observation setting is the one the model was trained in, read from its state width."""

    needs_images = True

    def __init__(self, folder: str | Path, blind: str | None = None, seed: int = 0):
        config = load_action_config(folder)
        if config.model_type in POLICY_FAMILIES:
            self.model = create_vlm(config.model_type, pretrained=str(folder)).eval()
            self.collator = PI0DataCollator.for_processor(AutoProcessor.from_pretrained(folder), with_actions=False)
            self.predict: Callable[[dict], torch.Tensor] = partial(self.collator.sample_actions, self.model)
            state_mean = self.collator.processor.state_mean
            if self.collator.action_dim != ACTION_DIM:
                raise ValueError(
                    f"{folder} predicts {self.collator.action_dim}-D actions; Meta-World takes {ACTION_DIM}-D actions."
                )
        else:
            self.model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            self.collator = VLADataCollator.for_model(processor, config, with_actions=False)
            self.predict = lambda batch: self.model.predict_actions(**batch)
            state_mean = config.state_mean
        self.observation = observation_of_state_dim(self.collator.state_dim)
        if blind is not None and blind not in BLINDS:
            raise ValueError(f"blind must be one of {BLINDS} or None, got {blind!r}.")
        self.blind = blind
        # A blind model's frame is blank whatever the scene: none is rendered for it.
        self.needs_images = blind is None
        self.world_mean = np.asarray(state_mean or [], dtype=np.float32)[PROPRIOCEPTION:]
        # The flow heads sample noise: seeded, so that a run repeats.
        self.generator_seed = seed

    def act(self, observations: Sequence[Observation]) -> np.ndarray:
        """(B, chunk_size, 4) in the data's units."""
        records = []
        for observation in observations:
            image = observation.image
            if self.blind is not None:
                image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
            record = {"images": [image], "instruction": observation.episode.instruction}
            if self.collator.state_dim:
                record["state"] = observation.episode.state.copy()
                if self.blind == BLIND_WORLD:
                    record["state"][PROPRIOCEPTION:] = self.world_mean
            records.append(record)
        batch = {name: value.to(self.model.device) for name, value in self.collator(records).items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.generator_seed)
            self.generator_seed += 1
            actions = self.predict(batch)
        return actions.float().cpu().numpy()


def load_action_config(folder: str | Path):
    """The configuration of a saved action model: a `VLAConfig` with 4-D actions, or a π0 configuration (its action
    width is its processor's); anything else raises a ValueError naming it."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {str(folder)!r} is not a model folder (no config.json), nor {EXPERT!r}/{RANDOM!r}.")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    if config.model_type in POLICY_FAMILIES:
        return config
    if config.model_type != VLAConfig.model_type:
        raise ValueError(
            f"{folder} holds a {config.model_type!r} model, not an action model (VLAForActionPrediction, "
            f"model_type {VLAConfig.model_type!r}, or one of {POLICY_FAMILIES})."
        )
    if config.action_dim != ACTION_DIM:
        raise ValueError(f"{folder} predicts {config.action_dim}-D actions; Meta-World takes {ACTION_DIM}-D actions.")
    observation_of_state_dim(config.state_dim)
    return config


def make_policy(model: str | Path, seed: int, blind: str | None = None):
    """ "expert", "random" or a model folder as a policy; `blind`: one of `BLINDS` or None."""
    if str(model) == EXPERT or str(model) == RANDOM:
        if blind is not None:
            raise ValueError(f"--blind blanks a model's image; the {model} policy reads none.")
        return ExpertPolicy() if str(model) == EXPERT else RandomPolicy(seed)
    return ModelPolicy(model, blind=blind, seed=seed)
