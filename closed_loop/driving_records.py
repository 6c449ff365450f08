"""What the ego car observes in highway-env, encoded as an Orion driving record (schema in `vlmheads.data.driving`).

Frames: x forward, y left (metres), as the driving schema has it; highway-env's world is the same right-handed frame
(its screen draws y downwards, so a left turn is drawn turning down).

Scene queries `(NUM_SCENE_QUERIES, SCENE_QUERY_DIM)`, zero-padded from the first entries:
- row 0, the route: `[0, 1, x_1/50, y_1/10, …, x_12/50, y_12/10, speed limit/30, remaining route/100]`, with the
  12 points every 5 m along the centre line of the target lane and the route's next lanes (`ROUTE_DISTANCES_M`);
- rows 1…, one per observed vehicle (the nearest within `OBSERVATION_RANGE_M`, nearest first; rows beyond are
  zero): `[1, 0, x/50, y/10, vx/10, vy/10, cos Δψ, sin Δψ, speed/30, same lane, lane offset, distance/50,
  length/5, width/2]`, position and velocity relative to the ego car in its frame, Δψ the heading difference.

History queries `(NUM_HISTORY_QUERIES, HISTORY_QUERY_DIM)`: the ego car's poses 0.5, 1, 1.5 and 2 s ago in its
present frame, `[present, x/20, y/5, cos Δψ, sin Δψ, speed/30]` (all zero before the episode began).

CAN bus (89,): `SPEED` m/s, `ACCELERATION` m/s², `YAW_RATE` deg/s (the synthetic set's layout, so
`constant_velocity_waypoints` reads it), then steering (rad), lane number, offset from and heading relative to the
lane centre (m, rad), speed limit (m/s), and the command one-hot; the rest is zero.

Command: `FOLLOW` (keep the lane, go straight), `LEFT` or `RIGHT`: the side of a lane change MOBIL has decided,
otherwise the side of the route 30 m ahead when it bends by more than 20 degrees.
"""

from collections import deque
from typing import Any

import numpy as np
from PIL import Image

from ..data.driving import ACCELERATION, PROMPT, SPEED, WAYPOINT_HZ, YAW_RATE
from .driving_env import POLICY_HZ, DrivenVehicle, RouteProgress, route_points

NUM_SCENE_QUERIES, NUM_HISTORY_QUERIES = 16, 4
SCENE_QUERY_DIM = HISTORY_QUERY_DIM = 256
CAN_BUS_DIM = 89
NUM_WAYPOINTS = 6
COMMANDS = ("follow", "left", "right")
FOLLOW, LEFT, RIGHT = range(len(COMMANDS))
ROUTE_DISTANCES_M = np.arange(5.0, 65.0, 5.0)
OBSERVATION_RANGE_M = 80.0
# CAN-bus entries after the synthetic layout's speed, acceleration and yaw rate.
STEERING, LANE, LANE_OFFSET, LANE_HEADING, SPEED_LIMIT, COMMAND = 3, 4, 5, 6, 7, 8
# Policy steps between two waypoints (0.5 s).
STEPS_PER_WAYPOINT = POLICY_HZ // WAYPOINT_HZ


def to_ego_frame(points: np.ndarray, position: np.ndarray, heading: float) -> np.ndarray:
    """World points `(..., 2)` in the frame of a car at `position` (2,) heading `heading` (rad): x forward, y left."""
    cos, sin = np.cos(heading), np.sin(heading)
    offset = np.asarray(points, dtype=np.float64) - position
    return np.stack([offset[..., 0] * cos + offset[..., 1] * sin, -offset[..., 0] * sin + offset[..., 1] * cos], -1)


def wrap_angle(angle: np.ndarray | float) -> np.ndarray | float:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def navigation_command(ego: DrivenVehicle) -> int:
    """The side of MOBIL's lane change in progress, else the side the route bends to 30 m ahead (> 20°)."""
    network = ego.road.network
    if ego.target_lane_index != ego.lane_index and ego.target_lane_index[:2] == ego.lane_index[:2]:
        centre = network.get_lane(ego.target_lane_index).position(
            network.get_lane(ego.target_lane_index).local_coordinates(ego.position)[0], 0.0
        )
        return LEFT if to_ego_frame(centre, ego.position, ego.heading)[1] > 0 else RIGHT
    ahead = route_points(network, ego.target_lane_index, ego.route, ego.position, [30.0])[0]
    x, y = to_ego_frame(ahead, ego.position, ego.heading)
    bend = np.arctan2(y, x)
    return LEFT if bend > np.radians(20) else RIGHT if bend < -np.radians(20) else FOLLOW


class DrivingObserver:
    """Keeps the ego car's past poses and turns the simulator state into the inputs of a driving record.

    Call `step(ego)` once per policy step, after the simulator stepped (and once after the reset), then
    `observe(...)` for the record of that step.
    """

    def __init__(self):
        self.poses: deque[tuple[np.ndarray, float, float]] = deque(maxlen=NUM_HISTORY_QUERIES * STEPS_PER_WAYPOINT + 1)
        self.acceleration = self.yaw_rate = 0.0

    def step(self, ego: DrivenVehicle) -> None:
        pose = (np.array(ego.position, dtype=np.float64), float(ego.heading), float(ego.speed))
        if self.poses:
            _, heading, speed = self.poses[-1]
            self.acceleration = (pose[2] - speed) * POLICY_HZ
            self.yaw_rate = float(wrap_angle(pose[1] - heading)) * POLICY_HZ
        self.poses.append(pose)

    def observe(self, ego: DrivenVehicle, progress: RouteProgress, frame: np.ndarray | None = None) -> dict[str, Any]:
        """`scene_queries`, `history_queries`, `can_bus`, `command`, `prompt`, and `images` when a frame is given."""
        command = navigation_command(ego)
        record = {
            "scene_queries": self._scene(ego, progress),
            "history_queries": self._history(ego),
            "can_bus": self._can_bus(ego, command),
            "command": command,
            "prompt": PROMPT,
        }
        if frame is not None:
            record["images"] = [Image.fromarray(frame)]
        return record

    def _scene(self, ego: DrivenVehicle, progress: RouteProgress) -> np.ndarray:
        scene = np.zeros((NUM_SCENE_QUERIES, SCENE_QUERY_DIM), dtype=np.float32)
        network = ego.road.network
        route = route_points(network, ego.target_lane_index, ego.route, ego.position, ROUTE_DISTANCES_M)
        route = to_ego_frame(route, ego.position, ego.heading) / [50.0, 10.0]
        limit = network.get_lane(ego.target_lane_index).speed_limit or 30.0
        scene[0, : 2 + route.size + 2] = [0.0, 1.0, *route.ravel(), limit / 30.0, progress.remaining_m / 100.0]

        others = [
            vehicle
            for vehicle in ego.road.vehicles
            if vehicle is not ego and np.linalg.norm(vehicle.position - ego.position) < OBSERVATION_RANGE_M
        ]
        others.sort(key=lambda vehicle: np.linalg.norm(vehicle.position - ego.position))
        for row, vehicle in enumerate(others[: NUM_SCENE_QUERIES - 1], start=1):
            x, y = to_ego_frame(vehicle.position, ego.position, ego.heading)
            vx, vy = to_ego_frame(vehicle.velocity, ego.velocity, ego.heading)
            turn = wrap_angle(vehicle.heading - ego.heading)
            same_road = vehicle.lane_index[:2] == ego.lane_index[:2]
            scene[row, :14] = [
                1.0,
                0.0,
                x / 50.0,
                y / 10.0,
                vx / 10.0,
                vy / 10.0,
                np.cos(turn),
                np.sin(turn),
                vehicle.speed / 30.0,
                float(vehicle.lane_index == ego.lane_index),
                float(vehicle.lane_index[2] - ego.lane_index[2]) if same_road else 0.0,
                np.hypot(x, y) / 50.0,
                vehicle.LENGTH / 5.0,
                vehicle.WIDTH / 2.0,
            ]
        return scene

    def _history(self, ego: DrivenVehicle) -> np.ndarray:
        history = np.zeros((NUM_HISTORY_QUERIES, HISTORY_QUERY_DIM), dtype=np.float32)
        for row in range(NUM_HISTORY_QUERIES):
            back = (row + 1) * STEPS_PER_WAYPOINT
            if back >= len(self.poses):
                break
            position, heading, speed = self.poses[-1 - back]
            x, y = to_ego_frame(position, ego.position, ego.heading)
            turn = wrap_angle(heading - ego.heading)
            history[row, :6] = [1.0, x / 20.0, y / 5.0, np.cos(turn), np.sin(turn), speed / 30.0]
        return history

    def _can_bus(self, ego: DrivenVehicle, command: int) -> np.ndarray:
        can_bus = np.zeros(CAN_BUS_DIM, dtype=np.float32)
        lane = ego.road.network.get_lane(ego.lane_index)
        longitudinal, lateral = lane.local_coordinates(ego.position)
        can_bus[SPEED], can_bus[ACCELERATION], can_bus[YAW_RATE] = (
            ego.speed,
            self.acceleration,
            np.degrees(self.yaw_rate),
        )
        can_bus[STEERING] = (ego.action or {}).get("steering", 0.0)
        can_bus[LANE] = ego.lane_index[2]
        can_bus[LANE_OFFSET] = lateral
        can_bus[LANE_HEADING] = wrap_angle(ego.heading - lane.heading_at(longitudinal))
        can_bus[SPEED_LIMIT] = lane.speed_limit or 30.0
        can_bus[COMMAND + command] = 1.0
        return can_bus


def future_waypoints(poses: list[tuple[np.ndarray, float]], step: int) -> np.ndarray | None:
    """The ego car's positions 0.5, 1, …, 3 s after policy step `step`, in its frame at that step: `(6, 2)`, or None
    when the episode ended earlier. `poses` holds (position, heading) per policy step."""
    last = step + NUM_WAYPOINTS * STEPS_PER_WAYPOINT
    if last >= len(poses):
        return None
    future = np.stack([poses[step + (k + 1) * STEPS_PER_WAYPOINT][0] for k in range(NUM_WAYPOINTS)])
    return to_ego_frame(future, poses[step][0], poses[step][1]).astype(np.float32)
