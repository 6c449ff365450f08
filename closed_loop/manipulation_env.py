"""Meta-World tasks as the VLA sees them: a 64-pixel camera frame, the task in words, and a proprioceptive state.

A `MetaWorldEpisode` is one seeded Meta-World (v3) environment: the seed places the objects and the goal, and the
same seed always gives the same scene. Its `state` is one of two observation settings:

| setting | `state` | the goal is seen |
|---|---|---|
| `"full"` | hand xyz, gripper opening, objects (xyz + quaternion, padded to 14), goal xyz: 21 values | in the state |
| `"image-goal"` | the same without the goal: 18 values (Meta-World's partially observable default) | image only |
| `"image"` | none: the camera image alone (the `"tokens"` head reads no state, as RT-2) | image only |

Frames are rendered without shadows, reflections or multisampling: through software EGL this takes a 64-pixel frame
from about 125 ms to about 11 ms, and it does not hide the goal marker.
"""

from typing import Any

import numpy as np
from PIL import Image

from ._headless import import_simulator

# The MT10 tasks and their instructions in words (Meta-World names its tasks but gives no instruction).
INSTRUCTIONS = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
# The five tasks trained and evaluated by default: each needs a different motion (move, press down, push an object,
# pull a handle, swing a door) and the scripted expert solves each in 40-100 steps.
DEFAULT_TASKS = ("reach-v3", "button-press-topdown-v3", "push-v3", "drawer-open-v3", "door-open-v3")
# Observation setting -> width of the state the policy reads.
OBSERVATIONS = {"full": 21, "image-goal": 18, "image": 0}
DEFAULT_OBSERVATION = "image-goal"
ACTION_DIM = 4
CAMERA = "corner"
IMAGE_SIZE = 64
# Meta-World's control rate: 5 MuJoCo steps of 2.5 ms per environment step.
FPS = 80
MAX_STEPS = 150
# The state's first entries are the robot's own (hand xyz, gripper opening); the rest locate the objects and the goal.
PROPRIOCEPTION = 4
# Widths of Meta-World's 39-value observation: hand and objects (18), the same one step earlier (18), goal (3).
_CURRENT, _GOAL = slice(0, 18), slice(36, 39)


def check_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """The task names as a list (a comma-separated string or a sequence); unknown or repeated names raise."""
    names = [name.strip() for name in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    unknown = [name for name in names if name not in INSTRUCTIONS]
    if not names or unknown:
        raise ValueError(f"Unknown Meta-World task(s) {unknown or names}: expected some of {sorted(INSTRUCTIONS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"Tasks are repeated in {names}.")
    return names


def check_observation(observation: str) -> str:
    if observation not in OBSERVATIONS:
        raise ValueError(f"Unknown observation setting {observation!r}: expected one of {list(OBSERVATIONS)}.")
    return observation


def observation_of_state_dim(state_dim: int) -> str:
    """The observation setting a model reading `state_dim` values was trained in."""
    for name, width in OBSERVATIONS.items():
        if width == state_dim:
            return name
    expected = ", ".join(f"{width} ({name})" for name, width in OBSERVATIONS.items())
    raise ValueError(f"The model reads a state of {state_dim} values; a Meta-World policy here reads {expected}.")


class MetaWorldEpisode:
    """One seeded Meta-World episode with the goal observable to the simulator (the expert needs it); what the
    policy sees is chosen by `observation` (`state`) and `frame`."""

    def __init__(self, task: str, seed: int, observation: str = DEFAULT_OBSERVATION, max_steps: int = MAX_STEPS):
        metaworld = import_simulator("metaworld")
        self.task, self.seed, self.observation = task, seed, check_observation(observation)
        self.instruction = INSTRUCTIONS[task]
        self.env = metaworld.ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"](seed=seed)
        self.env.max_path_length = max_steps
        self.env_observation, _ = self.env.reset()
        self.steps, self.success = 0, False

    @property
    def state(self) -> np.ndarray:
        """(S,) float32: S = 21 with the goal (`"full"`), 18 without (`"image-goal"`), 0 (`"image"`)."""
        if not OBSERVATIONS[self.observation]:
            return np.zeros(0, dtype=np.float32)
        parts = [self.env_observation[_CURRENT]]
        if self.observation == "full":
            parts.append(self.env_observation[_GOAL])
        return np.concatenate(parts).astype(np.float32)

    def step(self, action: np.ndarray) -> bool:
        """Takes one (4,) action, clipped to [-1, 1]; returns whether the task is solved now."""
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.env_observation, _, _, _, info = self.env.step(action)
        self.steps += 1
        self.success = self.success or bool(info["success"])
        return self.success

    def close(self) -> None:
        self.env.close()


class FrameRenderer:
    """Renders episodes of one task from the `CAMERA` view, (size, size) RGB, without shadows, reflections or
    multisampling. One GL context serves every episode of the task: they share the model's geometry and differ in
    the simulation state drawn."""

    def __init__(self, episode: MetaWorldEpisode, size: int = IMAGE_SIZE):
        mujoco = import_simulator("mujoco")
        episode.env.model.vis.quality.offsamples = 0
        self.renderer = mujoco.Renderer(episode.env.model, size, size)
        for flag in (
            mujoco.mjtRndFlag.mjRND_SHADOW,
            mujoco.mjtRndFlag.mjRND_REFLECTION,
            mujoco.mjtRndFlag.mjRND_SKYBOX,
        ):
            self.renderer.scene.flags[flag] = 0

    def frame(self, episode: MetaWorldEpisode) -> Image.Image:
        self.renderer.update_scene(episode.env.data, camera=CAMERA)
        # MuJoCo's image rows run bottom to top for this camera.
        return Image.fromarray(self.renderer.render()[::-1].copy())

    def close(self) -> None:
        self.renderer.close()

    def __enter__(self) -> "FrameRenderer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
