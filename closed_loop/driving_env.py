"""highway-env scenarios for closed-loop driving: the environments, the ego car, its route and its progress.

Every scenario runs highway-env's `ContinuousAction` at `POLICY_HZ` decisions a second (one decision every 0.25 s, so
the 2 Hz waypoints of the driving schema fall on every second step) over `SIMULATION_HZ` physics steps a second.
The environments' rewards are replaced by zero: the metrics do not use them, and the merge and roundabout rewards
raise under a continuous action.

The ego car is a `DrivenVehicle`: highway-env's own navigation (route following and MOBIL lane-change decisions)
always runs on it and sets its target lane, which is the navigation command a planner receives; the IDM/MOBIL
expert drives it unless a planner's action is set (`vehicle.control`).
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._headless import import_simulator

import_simulator("highway_env")

from gymnasium import spaces  # noqa: E402
from highway_env.envs.common.abstract import AbstractEnv  # noqa: E402
from highway_env.envs.common.graphics import EnvViewer  # noqa: E402
from highway_env.envs.common.observation import ObservationType  # noqa: E402
from highway_env.road.road import LaneIndex, Road, RoadNetwork, Route  # noqa: E402
from highway_env.utils import class_from_path  # noqa: E402
from highway_env.vehicle.behavior import IDMVehicle  # noqa: E402
from highway_env.vehicle.graphics import VehicleGraphics  # noqa: E402
from highway_env.vehicle.kinematics import Vehicle  # noqa: E402

POLICY_HZ = 4
SIMULATION_HZ = 8
# Camera frames: small, to keep rendering and the vision tower cheap (56 x 112 pixels are 8 Qwen2-VL image tokens).
IMAGE_HEIGHT, IMAGE_WIDTH = 56, 112
PIXELS_PER_METRE = 2.0
# Where the ego car sits in the frame (fraction of width, height): 39 m of road ahead, 17 m behind, 14 m aside.
CAMERA_CENTRE = (0.3, 0.5)


@dataclass(frozen=True)
class Scenario:
    """One highway-env scenario: its environment class and settings, the route, and the time limit.

    The route ends `route_length_m` after the start when set (the highway, the merge), else `arrival_m` into the
    route's last road (the intersection: where highway-env counts arrival), else at the end of the route's last road.
    """

    name: str
    env_class: str
    time_limit_s: float
    config: dict[str, Any] = field(default_factory=dict)
    destinations: tuple[str, ...] = ()
    route_length_m: float | None = None
    arrival_m: float | None = None


SCENARIOS = {
    scenario.name: scenario
    for scenario in (
        # highway-fast-v0: 3 lanes, 20 other cars; a 400 m route.
        Scenario("highway", "highway_env.envs.highway_env.HighwayEnvFast", 30.0, route_length_m=400.0),
        # merge-v0: cars merging from the ramp; highway-env ends the episode 370 m down the road (340 m of route).
        Scenario("merge", "highway_env.envs.merge_env.MergeEnv", 20.0, destinations=("d",), route_length_m=340.0),
        # roundabout-v0: enter, drive half way round, leave by the north exit (arrive 12 m into it).
        Scenario(
            "roundabout", "highway_env.envs.roundabout_env.RoundaboutEnv", 15.0, destinations=("nxs",), arrival_m=12.0
        ),
        # intersection-v0: turn left, go straight or turn right (one destination per seed), arrive 25 m into the exit.
        Scenario(
            "intersection",
            "highway_env.envs.intersection_env.IntersectionEnv",
            15.0,
            destinations=("o1", "o2", "o3"),
            arrival_m=25.0,
        ),
    )
}


def get_scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise ValueError(f"Unknown driving scenario {name!r}; expected one of {sorted(SCENARIOS)}.")
    return SCENARIOS[name]


class Unobserved(ObservationType):
    """No observation from the environment: `DrivingObserver` makes ours (highway-env's kinematics table would
    cost as much as the physics)."""

    def space(self) -> spaces.Space:
        return spaces.Box(0.0, 0.0, shape=(0,))

    def observe(self) -> np.ndarray:
        return np.zeros(0)


class MetricsOnly:
    """Mixed in before a highway-env environment: no reward, no reward info and no observation (our metrics and
    observer do not use them, and the merge and roundabout rewards fail under a continuous action)."""

    def define_spaces(self) -> None:
        super().define_spaces()
        self.observation_type = Unobserved(self)
        self.observation_space = self.observation_type.space()

    def render(self) -> np.ndarray | None:
        if self.viewer is None:
            self.viewer = EnvViewer(self)
            # highway-env stops drawing under SDL's dummy video driver (black frames); the offscreen surfaces it
            # draws on need no display.
            self.viewer.enabled = True
        return super().render()

    def _reward(self, action: Any) -> float:
        return 0.0

    def _rewards(self, action: Any) -> dict[str, float]:
        return {}

    def _info(self, obs: Any, action: Any = None) -> dict[str, Any]:
        return {}


class DrivenVehicle(IDMVehicle):
    """The ego car. highway-env's navigation always runs (`follow_road` along the route, MOBIL's lane-change
    decision into `target_lane_index`); IDM and MOBIL drive it while `control` is None, otherwise `control`
    ({"acceleration": m/s², "steering": rad}) does. `perturbation` (same keys) is added to the expert's action:
    the noise of noise-injected demonstrations (DART)."""

    control: dict[str, float] | None = None
    perturbation: dict[str, float] | None = None
    # Drawn green like highway-env's own ego car, not blue like its IDM traffic.
    color = VehicleGraphics.EGO_COLOR

    def act(self, action: dict | str | None = None) -> None:
        if self.control is None:
            super().act()
            if self.perturbation is not None and not self.crashed:
                for name, value in self.perturbation.items():
                    self.action[name] += value
            return
        if self.crashed:
            return
        self.follow_road()
        if self.enable_lane_change:
            self.change_lane_policy()
        # As IDMVehicle.act does: skip ControlledVehicle.act, which would steer to the target lane itself.
        Vehicle.act(self, dict(self.control))


def make_env(scenario: Scenario) -> AbstractEnv:
    """The scenario's environment under `ContinuousAction`, rendering `(IMAGE_HEIGHT, IMAGE_WIDTH, 3)` frames."""
    env_class = class_from_path(scenario.env_class)
    metrics_only = type(f"MetricsOnly{env_class.__name__}", (MetricsOnly, env_class), {})
    config = {
        "action": {"type": "ContinuousAction"},
        "policy_frequency": POLICY_HZ,
        "simulation_frequency": SIMULATION_HZ,
        # The episode length is ours (scenario.time_limit_s), not the environment's.
        "duration": 10_000,
        "screen_width": IMAGE_WIDTH,
        "screen_height": IMAGE_HEIGHT,
        "scaling": PIXELS_PER_METRE,
        "centering_position": list(CAMERA_CENTRE),
        "offscreen_rendering": True,
        **scenario.config,
    }
    return metrics_only(config=config, render_mode="rgb_array")


def reset_episode(env: AbstractEnv, scenario: Scenario, seed: int) -> DrivenVehicle:
    """Resets the environment with `seed` and puts a `DrivenVehicle` in the ego car's place (same position, heading
    and speed; `IDMVehicle.create_from` needs a controlled vehicle, which the ego car under ContinuousAction is
    not), routed to the scenario's destination (chosen with the seed where there are several)."""
    env.reset(seed=seed)
    road, former = env.road, env.vehicle
    ego = DrivenVehicle(road, former.position, heading=former.heading, speed=former.speed)
    if scenario.destinations:
        choice = np.random.default_rng(seed).integers(len(scenario.destinations))
        ego.plan_route_to(scenario.destinations[choice])
    road.vehicles[road.vehicles.index(former)] = ego
    env.vehicle = ego
    return ego


def route_points(network: RoadNetwork, lane_index: LaneIndex, route: Route | None, position: np.ndarray, distances):
    """World points `(K, 2)` on the centre line of `lane_index` and the lanes after it along `route`, `distances`
    (K,) metres ahead of `position`'s projection on the lane."""
    route = list(route or [])
    lane = network.get_lane(lane_index)
    longitudinal = lane.local_coordinates(position)[0]
    points = []
    for distance in distances:
        target = longitudinal + distance
        while target > lane.length:
            following = network.next_lane(lane_index, route=route, position=lane.position(lane.length, 0.0))
            if following == lane_index:
                break
            target -= lane.length
            longitudinal -= lane.length
            lane_index, lane = following, network.get_lane(following)
        points.append(lane.position(target, 0.0))
    return np.asarray(points, dtype=np.float64)


class RouteProgress:
    """Distance driven along the planned route, as the fraction of the route completed (never decreasing)."""

    def __init__(self, road: Road, ego: DrivenVehicle, scenario: Scenario):
        network = road.network
        self.network = network
        self.roads = [tuple(step[:2]) for step in (ego.route or [ego.lane_index])]
        lengths = [network.get_lane((start, end, 0)).length for start, end in self.roads]
        self.offsets = np.concatenate([[0.0], np.cumsum(lengths)])
        self.index = 0
        self.start = self._along(ego.lane_index, ego.position)
        if scenario.route_length_m is not None:
            self.goal = self.start + scenario.route_length_m
        elif scenario.arrival_m is not None:
            self.goal = self.offsets[-2] + scenario.arrival_m
        else:
            self.goal = self.offsets[-1]
        self.best = self.start

    def _along(self, lane_index: LaneIndex, position: np.ndarray) -> float | None:
        road = tuple(lane_index[:2])
        if road not in self.roads[self.index :]:
            return None
        self.index = self.roads.index(road, self.index)
        lane = self.network.get_lane(lane_index)
        longitudinal = float(np.clip(lane.local_coordinates(position)[0], 0.0, lane.length))
        return self.offsets[self.index] + longitudinal

    def update(self, ego: Vehicle) -> float:
        """The route completion in [0, 1] after the ego car's latest step."""
        along = self._along(ego.lane_index, ego.position)
        if along is not None:
            self.best = max(self.best, along)
        return self.completion

    @property
    def completion(self) -> float:
        return float(np.clip((self.best - self.start) / (self.goal - self.start), 0.0, 1.0))

    @property
    def remaining_m(self) -> float:
        return float(max(self.goal - self.best, 0.0))
