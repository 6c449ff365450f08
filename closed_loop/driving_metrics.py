"""Closed-loop driving metrics after the CARLA leaderboard and Bench2Drive.

Per episode: collision, off-road events, route completion (RC, the fraction of the route driven), distance and mean
speed. The driving score of an episode is RC × the product of the infraction penalties, one factor per infraction:
- `COLLISION_PENALTY` = 0.60, the leaderboard's penalty for a collision with a vehicle (the episode ends there);
- `OFF_ROAD_PENALTY` = 0.65, for each time the car leaves the road: the leaderboard's penalty for a collision with
  the static layout, since highway-env has no kerbs to hit.
An episode succeeds when it completes its route without any infraction. The aggregates are means over episodes.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

COLLISION_PENALTY = 0.60
OFF_ROAD_PENALTY = 0.65
AGGREGATES = ("collision_rate", "success_rate", "route_completion", "driving_score")


@dataclass(frozen=True)
class EpisodeOutcome:
    """What one closed-loop episode gave."""

    scenario: str
    seed: int
    collision: bool
    off_road_events: int
    route_completion: float
    distance_m: float
    mean_speed: float
    duration_s: float

    def __post_init__(self):
        if not 0.0 <= self.route_completion <= 1.0:
            raise ValueError(f"route_completion must lie in [0, 1], got {self.route_completion}.")
        if self.off_road_events < 0:
            raise ValueError(f"off_road_events must be >= 0, got {self.off_road_events}.")

    @property
    def infraction_penalty(self) -> float:
        return COLLISION_PENALTY ** int(self.collision) * OFF_ROAD_PENALTY**self.off_road_events

    @property
    def driving_score(self) -> float:
        return self.route_completion * self.infraction_penalty

    @property
    def success(self) -> bool:
        return self.route_completion >= 1.0 and not self.collision and self.off_road_events == 0

    def as_dict(self) -> dict:
        return {**asdict(self), "success": self.success, "driving_score": self.driving_score}


def aggregate(outcomes: Sequence[EpisodeOutcome]) -> dict[str, float]:
    """`collision_rate`, `success_rate`, `route_completion`, `driving_score` (means over the episodes), and the
    off-road rate, mean distance and mean speed."""
    if not outcomes:
        raise ValueError("No episodes to aggregate.")
    return {
        "collision_rate": float(np.mean([outcome.collision for outcome in outcomes])),
        "success_rate": float(np.mean([outcome.success for outcome in outcomes])),
        "route_completion": float(np.mean([outcome.route_completion for outcome in outcomes])),
        "driving_score": float(np.mean([outcome.driving_score for outcome in outcomes])),
        "off_road_rate": float(np.mean([outcome.off_road_events > 0 for outcome in outcomes])),
        "distance_m": float(np.mean([outcome.distance_m for outcome in outcomes])),
        "mean_speed": float(np.mean([outcome.mean_speed for outcome in outcomes])),
    }
