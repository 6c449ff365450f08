"""Waypoints to highway-env continuous actions: pure pursuit for the steering, PID for the speed.

The planner's waypoints `(T, 2)` are ego-frame positions (x forward, y left) at 2 Hz. Pure pursuit aims at the
point of the path (the car, then the waypoints) `lookahead` metres along it and steers onto the arc through it:
curvature κ = 2 sin α / d, with α the angle between the car's direction of travel and the point. highway-env's
kinematic bicycle moves the car's centre (L / 2 from either axle, L its length) at the slip angle
β = atan(tan δ / 2) off its heading, on a circle of curvature 2 sin β / L: so α is measured from heading + β (β of
the previous steering angle) and δ = atan(2 tan(asin(L κ / 2))). The target speed is the mean speed to the first
waypoint; a PID turns its error into an acceleration. Both are scaled to highway-env's `ContinuousAction` range
[-1, 1] (its default ±5 m/s² and ±45°).
"""

from dataclasses import dataclass, field

import numpy as np

from ..data.driving import WAYPOINT_HZ

ACCELERATION_RANGE = 5.0  # m/s², ContinuousAction's default
STEERING_RANGE = np.pi / 4  # rad, ContinuousAction's default
CAR_LENGTH = 5.0  # m, highway-env's Vehicle.LENGTH


def point_along(path: np.ndarray, distance: float) -> np.ndarray:
    """The point `distance` metres along the polyline `path` (N, 2), extended past its last point along the last
    segment."""
    segments = np.diff(path, axis=0)
    lengths = np.linalg.norm(segments, axis=1)
    ends = np.cumsum(lengths)
    index = int(np.searchsorted(ends, distance))
    if index >= len(segments):
        index = len(segments) - 1
        while index > 0 and lengths[index] < 1e-6:
            index -= 1
    start = ends[index] - lengths[index]
    fraction = (distance - start) / max(lengths[index], 1e-6)
    return path[index] + fraction * segments[index]


@dataclass
class WaypointController:
    """Pure pursuit + PID; `dt` is the time between two calls (s). Call `reset()` at the start of an episode."""

    dt: float
    lookahead_time: float = 0.8
    min_lookahead: float = 5.0
    kp: float = 2.0
    ki: float = 0.2
    kd: float = 0.0
    _integral: float = field(default=0.0, init=False)
    _last_error: float | None = field(default=None, init=False)
    _last_steering: float = field(default=0.0, init=False)

    def reset(self) -> None:
        self._integral, self._last_error, self._last_steering = 0.0, None, 0.0

    def steering(self, waypoints: np.ndarray, speed: float) -> float:
        """Steering angle (rad) that pursues the waypoints `(T, 2)`."""
        path = np.concatenate([np.zeros((1, 2)), np.asarray(waypoints, dtype=np.float64)])
        if np.linalg.norm(path[-1]) < 1.0:
            return 0.0
        target = point_along(path, max(self.lookahead_time * speed, self.min_lookahead))
        slip = np.arctan(0.5 * np.tan(self._last_steering))
        alpha = np.arctan2(target[1], target[0]) - slip
        curvature = 2.0 * np.sin(alpha) / max(float(np.linalg.norm(target)), 1e-6)
        slip = np.arcsin(np.clip(0.5 * CAR_LENGTH * curvature, -0.99, 0.99))
        steering = float(np.clip(np.arctan(2.0 * np.tan(slip)), -STEERING_RANGE, STEERING_RANGE))
        self._last_steering = steering
        return steering

    def acceleration(self, waypoints: np.ndarray, speed: float) -> float:
        """Acceleration (m/s²) towards the mean speed to the first waypoint."""
        target_speed = float(np.linalg.norm(waypoints[0])) * WAYPOINT_HZ
        error = target_speed - speed
        self._integral = float(np.clip(self._integral + error * self.dt, -5.0, 5.0))
        derivative = 0.0 if self._last_error is None else (error - self._last_error) / self.dt
        self._last_error = error
        return self.kp * error + self.ki * self._integral + self.kd * derivative

    def __call__(self, waypoints: np.ndarray, speed: float) -> np.ndarray:
        """highway-env's continuous action `[acceleration, steering]`, each in [-1, 1]."""
        waypoints = np.asarray(waypoints, dtype=np.float64)
        if waypoints.ndim != 2 or waypoints.shape[1] != 2 or not np.isfinite(waypoints).all():
            raise ValueError(f"waypoints must be a finite (T, 2) array, got shape {waypoints.shape}.")
        action = [
            self.acceleration(waypoints, speed) / ACCELERATION_RANGE,
            self.steering(waypoints, speed) / STEERING_RANGE,
        ]
        return np.clip(action, -1.0, 1.0)
