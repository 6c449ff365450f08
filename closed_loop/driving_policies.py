"""Driving policies for the closed loop: the IDM/MOBIL expert, constant velocity, and a saved trajectory model.

A policy's `plan(observation, ego)` returns ego-frame waypoints `(T, 2)` at 2 Hz, which `WaypointController` turns
into highway-env actions, or None to let the expert (highway-env's IDM and MOBIL) drive.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, pipeline

from ..configuration.constants import HEAD_TRAJECTORY, TASK_TRAJECTORY_PREDICTION
from ..data.driving import WAYPOINT_HZ
from .driving_env import DrivenVehicle, route_points
from .driving_records import (
    CAN_BUS_DIM,
    HISTORY_QUERY_DIM,
    NUM_HISTORY_QUERIES,
    NUM_SCENE_QUERIES,
    NUM_WAYPOINTS,
    SCENE_QUERY_DIM,
    to_ego_frame,
)

EXPERT, CONSTANT_VELOCITY = "expert", "constant-velocity"
WAYPOINT_TIMES = np.arange(1, NUM_WAYPOINTS + 1) / WAYPOINT_HZ


class ExpertPolicy:
    """highway-env's IDM (speed) and MOBIL (lane changes) drive the ego car."""

    name = EXPERT
    needs_image = False

    def reset(self, seed: int) -> None:
        pass

    def plan(self, observation: dict[str, Any], ego: DrivenVehicle) -> None:
        return None


class ConstantVelocityPolicy:
    """Keep the lane and the speed: waypoints on the centre line of the present lane (and the route's next lanes)
    at the present speed."""

    name = CONSTANT_VELOCITY
    needs_image = False

    def reset(self, seed: int) -> None:
        pass

    def plan(self, observation: dict[str, Any], ego: DrivenVehicle) -> np.ndarray:
        distances = max(ego.speed, 0.0) * WAYPOINT_TIMES
        points = route_points(ego.road.network, ego.lane_index, ego.route, ego.position, distances)
        return to_ego_frame(points, ego.position, ego.heading)


def check_trajectory_config(config: Any, folder: str | Path) -> None:
    """Raises a ValueError unless `config` is a trajectory model's that reads the records of this harness."""
    if getattr(config, "head_kind", None) != HEAD_TRAJECTORY:
        raise ValueError(
            f"{folder} holds a {config.model_type!r} model, not a trajectory model (an Orion or VLMForTrajectory "
            f"folder, head_kind {HEAD_TRAJECTORY!r})."
        )
    expected = {
        "num_scene_queries": NUM_SCENE_QUERIES,
        "scene_query_dim": SCENE_QUERY_DIM,
        "num_history_queries": NUM_HISTORY_QUERIES,
        "history_query_dim": HISTORY_QUERY_DIM,
        "can_bus_dim": CAN_BUS_DIM,
        "num_waypoints": NUM_WAYPOINTS,
        "waypoint_dim": 2,
    }
    wrong = {name: getattr(config, name) for name, value in expected.items() if getattr(config, name) != value}
    if wrong:
        raise ValueError(
            f"{folder} was built for other driving inputs: {wrong}; the highway-env records have {expected}."
        )


class TrajectoryModelPolicy:
    """A trajectory model (saved folder, or a model and its processor) through its `trajectory-prediction`
    pipeline: the camera frame, the queries, the CAN bus and, for a model with one mode per command, the command."""

    needs_image = True

    def __init__(self, model: str | Path | Any, processor: Any = None, name: str | None = None):
        if isinstance(model, (str, Path)):
            folder = Path(model)
            if not (folder / "config.json").is_file():
                raise ValueError(
                    f"--model {str(model)!r} is not a model folder (no config.json), nor {EXPERT!r} or "
                    f"{CONSTANT_VELOCITY!r}."
                )
            check_trajectory_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), folder)
            self.planner = pipeline(TASK_TRAJECTORY_PREDICTION, model=str(folder), trust_remote_code=True)
            self.name = name or folder.name
        else:
            check_trajectory_config(model.config, type(model).__name__)
            self.planner = pipeline(TASK_TRAJECTORY_PREDICTION, model=model, processor=processor)
            self.name = name or type(model).__name__
        self.planner.model.eval()
        self.with_command = self.planner.model.config.num_modes > 1

    def reset(self, seed: int) -> None:
        # A flow planner samples from noise: the same episode seed gives the same plans.
        torch.manual_seed(seed)

    def plan(self, observation: dict[str, Any], ego: DrivenVehicle) -> np.ndarray:
        inputs = {name: observation[name] for name in ("scene_queries", "history_queries", "can_bus")}
        if self.with_command:
            inputs["command"] = observation["command"]
        with torch.no_grad():
            return self.planner(observation.get("images"), **inputs)["waypoints"]


def make_policy(model: str | Path) -> ExpertPolicy | ConstantVelocityPolicy | TrajectoryModelPolicy:
    """ "expert", "constant-velocity" or a trajectory model folder as a policy."""
    if str(model) == EXPERT:
        return ExpertPolicy()
    if str(model) == CONSTANT_VELOCITY:
        return ConstantVelocityPolicy()
    return TrajectoryModelPolicy(model)
