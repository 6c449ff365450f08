"""The policies the Meta-World evaluation runs: Meta-World's scripted expert, a uniform random policy, and a trained
VLA folder (optionally blind: its camera image blanked).

A policy maps a batch of observations to action chunks: `act(observations)` -> (B, T, 4), executed one action per
step until the chunk is spent; `needs_images` says whether frames must be rendered for it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor

from ..data.manipulation import BACKGROUND
from ..processing.collator_vla import VLADataCollator
from ._headless import import_simulator
from .manipulation_env import ACTION_DIM, MetaWorldEpisode, observation_of_state_dim

# `evaluate(model=...)` names of the policies that are not a model folder.
EXPERT, RANDOM = "expert", "random"


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
    """A trained `VLAForActionPrediction` folder: frame, instruction and state in, the predicted chunk out (batched
    over the episodes deciding at the same step). `blind` blanks the frame (the image ablation). The observation
    setting is the one the model was trained in, read from its state width."""

    needs_images = True

    def __init__(self, folder: str | Path, blind: bool = False, seed: int = 0):
        config = load_action_config(folder)
        self.observation = observation_of_state_dim(config.state_dim)
        self.model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        self.collator = VLADataCollator.for_model(processor, config, with_actions=False)
        self.blind = blind
        # The flow head samples noise: seeded, so that a run repeats.
        self.generator_seed = seed

    def act(self, observations: Sequence[Observation]) -> np.ndarray:
        """(B, chunk_size, 4) in the data's units."""
        records = []
        for observation in observations:
            image = observation.image
            if self.blind:
                image = Image.new("RGB", image.size, BACKGROUND)
            record = {"images": [image], "instruction": observation.episode.instruction}
            if self.collator.state_dim:
                record["state"] = observation.episode.state
            records.append(record)
        batch = {name: value.to(self.model.device) for name, value in self.collator(records).items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.generator_seed)
            self.generator_seed += 1
            actions = self.model.predict_actions(**batch)
        return actions.float().cpu().numpy()


def load_action_config(folder: str | Path):
    """The `VLAConfig` of a saved action model with 4-D actions; anything else raises a ValueError naming it."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {str(folder)!r} is not a model folder (no config.json), nor {EXPERT!r}/{RANDOM!r}.")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    if config.model_type != "vla":
        raise ValueError(
            f"{folder} holds a {config.model_type!r} model, not an action model (VLAForActionPrediction, "
            "model_type 'vla')."
        )
    if config.action_dim != ACTION_DIM:
        raise ValueError(f"{folder} predicts {config.action_dim}-D actions; Meta-World takes {ACTION_DIM}-D actions.")
    observation_of_state_dim(config.state_dim)
    return config


def make_policy(model: str | Path, seed: int, blind: bool = False):
    """ "expert", "random" or a model folder as a policy."""
    if str(model) == EXPERT or str(model) == RANDOM:
        if blind:
            raise ValueError(f"--blind blanks a model's image; the {model} policy reads none.")
        return ExpertPolicy() if str(model) == EXPERT else RandomPolicy(seed)
    return ModelPolicy(model, blind=blind, seed=seed)
