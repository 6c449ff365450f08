"""Driving policies for the closed loop: the IDM/MOBIL expert (as it drives, perturbed, or as a plan tracked by the
controller), constant velocity, and a saved trajectory model.

A policy's `plan(observation, ego)` returns ego-frame waypoints `(T, 2)` at 2 Hz, which `WaypointController` turns
into highway-env actions, or None to let the expert (highway-env's IDM and MOBIL) drive. A policy's `is_expert`
says whether the ego car then drives exactly as the expert does: only then are its own future poses the expert's
waypoints; the records of any other driver are labelled with `expert_plan`.
"""

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, pipeline

from ..configuration.constants import HEAD_TRAJECTORY, TASK_TRAJECTORY_PREDICTION
from ..data.driving import WAYPOINT_HZ
from .driving_env import POLICY_HZ, SIMULATION_HZ, DrivenVehicle, route_points
from .driving_records import (
    CAN_BUS_DIM,
    HISTORY_QUERY_DIM,
    NUM_HISTORY_QUERIES,
    NUM_SCENE_QUERIES,
    NUM_WAYPOINTS,
    SCENE_QUERY_DIM,
    STEPS_PER_WAYPOINT,
    to_ego_frame,
)

EXPERT, CONSTANT_VELOCITY = "expert", "constant-velocity"
EXPERT_PLAN, EXPERT_DART = "expert-plan", "expert-dart"
WAYPOINT_TIMES = np.arange(1, NUM_WAYPOINTS + 1) / WAYPOINT_HZ
# DART noise on the expert's action, per policy step: standard deviations and the step-to-step correlation.
DART_STEERING_SIGMA = 0.03  # rad
DART_ACCELERATION_SIGMA = 1.5  # m/s²
DART_CORRELATION = 0.8


def expert_plan(ego: DrivenVehicle) -> np.ndarray:
    """The expert's waypoints from the present state: `(NUM_WAYPOINTS, 2)` ego-frame positions at 2 Hz, from a copy
    of the road (the map shared) on which IDM/MOBIL drive the ego car, unperturbed, for 3 s while the traffic
    reacts to it. The labels of states a non-expert driver visits (DAgger, DART)."""
    road = ego.road
    memo = {id(road.network): road.network}
    memo.update((id(lane), lane) for ends in road.network.graph.values() for lanes in ends.values() for lane in lanes)
    shadow_road = copy.deepcopy(road, memo)
    shadow = memo[id(ego)]
    shadow.control = shadow.perturbation = None
    frames, positions = SIMULATION_HZ // POLICY_HZ, []
    for _ in range(NUM_WAYPOINTS):
        for _ in range(STEPS_PER_WAYPOINT * frames):
            shadow_road.act()
            shadow_road.step(1.0 / SIMULATION_HZ)
        positions.append(np.array(shadow.position, dtype=np.float64))
    return to_ego_frame(np.stack(positions), ego.position, ego.heading).astype(np.float32)


class ExpertPolicy:
    """highway-env's IDM (speed) and MOBIL (lane changes) drive the ego car."""

    name = EXPERT
    needs_image = False
    is_expert = True

    def reset(self, seed: int) -> None:
        pass

    def plan(self, observation: dict[str, Any], ego: DrivenVehicle) -> None:
        return None


class PerturbedExpertPolicy:
    """The expert with noise injected into its action (DART, arXiv 1703.09327): a correlated Gaussian perturbation of
    its steering and acceleration, drawn anew each policy step from the episode seed, so that the demonstrations
    visit the drifts a learned planner makes. Label its states with `expert_plan`."""

    name = EXPERT_DART
    needs_image = False
    is_expert = False

    def __init__(
        self,
        steering_sigma: float = DART_STEERING_SIGMA,
        acceleration_sigma: float = DART_ACCELERATION_SIGMA,
        correlation: float = DART_CORRELATION,
    ):
        if steering_sigma < 0 or acceleration_sigma < 0 or not 0 <= correlation < 1:
            raise ValueError(
                f"DART noise needs sigmas >= 0 and a correlation in [0, 1), got steering_sigma={steering_sigma}, "
                f"acceleration_sigma={acceleration_sigma}, correlation={correlation}."
            )
        self.sigmas = np.array([steering_sigma, acceleration_sigma])
        self.correlation = correlation
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.noise = np.zeros(2)

    def plan(self, observation: dict[str, Any], ego: DrivenVehicle) -> None:
        innovation = self.rng.standard_normal(2) * self.sigmas * np.sqrt(1.0 - self.correlation**2)
        self.noise = self.correlation * self.noise + innovation
        ego.perturbation = {"steering": float(self.noise[0]), "acceleration": float(self.noise[1])}
        return None


class ExpertPlanPolicy:
    """The expert's plan (`expert_plan`) tracked by the waypoint controller: the ceiling of any planner driven
    through `WaypointController`, which a perfect imitation would reach."""

    name = EXPERT_PLAN
    needs_image = False
    is_expert = False

    def reset(self, seed: int) -> None:
        pass

    def plan(self, observation: dict[str, Any], ego: DrivenVehicle) -> np.ndarray:
        return expert_plan(ego)


class ConstantVelocityPolicy:
    """Keep the lane and the speed: waypoints on the centre line of the present lane (and the route's next lanes)
    at the present speed."""

    name = CONSTANT_VELOCITY
    needs_image = False
    is_expert = False

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
    is_expert = False

    def __init__(self, model: str | Path | Any, processor: Any = None, name: str | None = None):
        if isinstance(model, (str, Path)):
            folder = Path(model)
            if not (folder / "config.json").is_file():
                raise ValueError(
                    f"--model {str(model)!r} is not a model folder (no config.json), nor one of "
                    f"{sorted(NAMED_POLICIES)}."
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


NAMED_POLICIES = {
    EXPERT: ExpertPolicy,
    EXPERT_PLAN: ExpertPlanPolicy,
    EXPERT_DART: PerturbedExpertPolicy,
    CONSTANT_VELOCITY: ConstantVelocityPolicy,
}


def make_policy(
    model: str | Path,
) -> ExpertPolicy | ExpertPlanPolicy | PerturbedExpertPolicy | ConstantVelocityPolicy | TrajectoryModelPolicy:
    """One of `NAMED_POLICIES` ("expert", "expert-plan", "expert-dart", "constant-velocity") or a trajectory model
    folder as a policy."""
    if str(model) in NAMED_POLICIES:
        return NAMED_POLICIES[str(model)]()
    return TrajectoryModelPolicy(model)
