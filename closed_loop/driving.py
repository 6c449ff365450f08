"""Closed-loop driving in highway-env: expert demonstrations as Orion records, and evaluation of driving policies.

    vlmheads drive collect --scenario highway --episodes 20 --seed 0 --out data/highway_env
    vlmheads drive evaluate --model outputs/orion --scenario all --episodes 10 --seed 100000 --json drive.json

`collect` lets highway-env's IDM/MOBIL expert drive and writes one Orion record (schema in `vlmheads.data.driving`,
encoding in `vlmheads.closed_loop.driving_records`) every `RECORD_EVERY` policy steps to
`OUT/<split>/<scenario>-seeds-<first>-<last>.parquet`. With `--driver`, another policy drives and the states it
visits are labelled with the expert's plan from there (`driving_policies.expert_plan`): `expert-dart` (the expert
with noise injected, DART) or a trained model folder (DAgger's data aggregation), written to
`OUT/<split>/<scenario>-<driver>-seeds-<first>-<last>.parquet`. The split is named by the seeds: `TRAINING_SEEDS` go to
`train/`, `VALIDATION_SEEDS` to `validation/` (the held-out frames of the open-loop metrics). `evaluate` drives
`--episodes` episodes per scenario on `EVALUATION_SEEDS` only, which no collection may use, and writes the
aggregate figures (`driving_metrics`) as JSON. Scenarios: highway, merge, roundabout, intersection, or `all`.
"""

import argparse
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from itertools import pairwise
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .control import WaypointController
from .driving_env import (
    CAMERA_CENTRE,
    PIXELS_PER_METRE,
    POLICY_HZ,
    SCENARIOS,
    RouteProgress,
    get_scenario,
    make_env,
    reset_episode,
)
from .driving_metrics import AGGREGATES, COLLISION_PENALTY, OFF_ROAD_PENALTY, EpisodeOutcome, aggregate
from .driving_policies import EXPERT, expert_plan, make_policy
from .driving_records import (
    CAN_BUS_DIM,
    HISTORY_QUERY_DIM,
    NUM_HISTORY_QUERIES,
    NUM_SCENE_QUERIES,
    NUM_WAYPOINTS,
    SCENE_QUERY_DIM,
    STEPS_PER_WAYPOINT,
    DrivingObserver,
    future_waypoints,
)

# Seeds are split once and for all: demonstrations for training and for the open-loop validation frames, and the
# closed-loop evaluation seeds, which no demonstration uses.
TRAINING_SEEDS = range(0, 50_000)
VALIDATION_SEEDS = range(50_000, 100_000)
EVALUATION_SEEDS = range(100_000, 200_000)
SPLITS = {"train": TRAINING_SEEDS, "validation": VALIDATION_SEEDS}
# One record every 0.5 s of driving.
RECORD_EVERY = STEPS_PER_WAYPOINT
ALL_SCENARIOS = "all"

RECORD_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "scene_queries": datasets.Array2D((NUM_SCENE_QUERIES, SCENE_QUERY_DIM), "float32"),
        "history_queries": datasets.Array2D((NUM_HISTORY_QUERIES, HISTORY_QUERY_DIM), "float32"),
        "can_bus": datasets.List(datasets.Value("float32"), length=CAN_BUS_DIM),
        "prompt": datasets.Value("string"),
        "ego_waypoints": datasets.Array2D((NUM_WAYPOINTS, 2), "float32"),
        "command": datasets.Value("int64"),
        "images": datasets.List(datasets.Image()),
        "scenario": datasets.Value("string"),
        "seed": datasets.Value("int64"),
    }
)


@dataclass
class Rollout:
    """One episode: its outcome, and the records (collection) or annotated frames (video) asked for."""

    outcome: EpisodeOutcome
    records: list[dict[str, Any]] = field(default_factory=list)
    frames: list[Image.Image] = field(default_factory=list)


def draw_plan(frame: np.ndarray, plan: np.ndarray | None, heading: float, zoom: int = 4) -> Image.Image:
    """The camera frame enlarged `zoom` times, with the planned ego-frame waypoints `(T, 2)` drawn as red dots."""
    height, width = frame.shape[:2]
    image = Image.fromarray(frame).resize((width * zoom, height * zoom), Image.NEAREST)
    if plan is not None:
        draw = ImageDraw.Draw(image)
        cos, sin = np.cos(heading), np.sin(heading)
        centre = np.array([CAMERA_CENTRE[0] * width, CAMERA_CENTRE[1] * height])
        for x, y in np.asarray(plan, dtype=np.float64):
            # Ego frame -> world offset -> pixels (the viewer draws the world's y downwards).
            pixel = (centre + PIXELS_PER_METRE * np.array([x * cos - y * sin, x * sin + y * cos])) * zoom
            draw.ellipse([*(pixel - zoom), *(pixel + zoom)], fill=(230, 30, 30))
    return image


def drive_episode(
    env: Any,
    scenario_name: str,
    seed: int,
    policy: Any,
    record: bool = False,
    video: bool = False,
    max_steps: int | None = None,
) -> Rollout:
    """Drives one episode with `policy` until a collision, the end of the route or the time limit (or `max_steps`
    policy steps).

    With `record`, a record is kept every `RECORD_EVERY` steps (the episode then runs on past the end of the route
    to the time limit, plus the 3 s of waypoints the last records need when the expert drives): labelled with the
    ego car's own next poses when the policy is the expert (`is_expert`), else with `expert_plan` from the state the
    policy reached. With `video`, annotated frames are kept.
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be a positive number of policy steps, got {max_steps}.")
    scenario = get_scenario(scenario_name)
    ego = reset_episode(env, scenario, seed)
    policy.reset(seed)
    controller = WaypointController(dt=1.0 / POLICY_HZ)
    observer, progress = DrivingObserver(), RouteProgress(env.road, ego, scenario)
    observer.step(ego)
    steps = int(scenario.time_limit_s * POLICY_HZ)
    own_future = record and policy.is_expert
    if own_future:
        steps += NUM_WAYPOINTS * STEPS_PER_WAYPOINT
    if max_steps is not None:
        steps = min(steps, max_steps)
    poses = [(np.array(ego.position, dtype=np.float64), float(ego.heading))]
    observations, frames, speeds = [], [], []
    distance, off_road_events, on_road = 0.0, 0, bool(ego.on_road)
    goal_reached_at = None
    for step in range(steps):
        recorded = record and step % RECORD_EVERY == 0
        frame = env.render() if policy.needs_image or recorded or video else None
        observation = observer.observe(ego, progress, frame)
        plan = policy.plan(observation, ego)
        ego.control = None if plan is None else env.action_type.get_action(controller(plan, ego.speed))
        if recorded:
            observations.append((step, observation, None if own_future else expert_plan(ego)))
        if video:
            frames.append(draw_plan(frame, plan, ego.heading))
        before = np.array(ego.position, dtype=np.float64)
        env.step(None)
        observer.step(ego)
        poses.append((np.array(ego.position, dtype=np.float64), float(ego.heading)))
        distance += float(np.linalg.norm(ego.position - before))
        speeds.append(float(ego.speed))
        if on_road and not ego.on_road:
            off_road_events += 1
        on_road = bool(ego.on_road)
        if progress.update(ego) >= 1.0 and goal_reached_at is None:
            goal_reached_at = step + 1
        if ego.crashed or (goal_reached_at is not None and not record):
            break
    outcome = EpisodeOutcome(
        scenario=scenario.name,
        seed=seed,
        collision=bool(ego.crashed),
        off_road_events=off_road_events,
        route_completion=progress.completion,
        distance_m=distance,
        mean_speed=float(np.mean(speeds)),
        duration_s=len(speeds) / POLICY_HZ,
    )
    records = []
    for step, observation, plan_label in observations:
        waypoints = future_waypoints(poses, step) if own_future else plan_label
        if waypoints is not None:
            records.append(
                {**observation, "ego_waypoints": waypoints, "id": f"{scenario.name}-{seed}-{step}", "seed": seed}
            )
    return Rollout(outcome, records, frames)


def save_gif(frames: list[Image.Image], path: str | Path, frame_ms: int = 250) -> Path:
    """Writes `frames` (`drive_episode(..., video=True).frames`) as a looping GIF at `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return path


def save_video(policy: Any, scenario_name: str, seed: int, path: str | Path) -> Path:
    """Drives one episode of `scenario_name` on `seed` with `policy` and saves it as a GIF at `path`: the camera
    frames enlarged, each with the waypoints planned at that step drawn in red (`draw_plan`); returns the path."""
    env = make_env(get_scenario(scenario_name))
    frames = drive_episode(env, scenario_name, seed, policy, video=True).frames
    env.close()
    return save_gif(frames, path)


def parse_scenarios(scenario: str) -> list[str]:
    """`all`, one scenario name, or several separated by commas: the checked list of names."""
    names = list(SCENARIOS) if scenario == ALL_SCENARIOS else [name.strip() for name in scenario.split(",")]
    for name in names:
        get_scenario(name)
    if len(set(names)) != len(names):
        raise ValueError(f"Scenarios are repeated in {scenario!r}.")
    return names


def episode_seeds(episodes: int, seed: int, allowed: Sequence[range], purpose: str) -> list[int]:
    """Seeds `seed … seed + episodes - 1`, which must all lie in one of the `allowed` ranges."""
    if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes < 1:
        raise ValueError(f"episodes must be a positive integer, got {episodes!r}.")
    seeds = list(range(seed, seed + episodes))
    if not any(seeds[0] in seed_range and seeds[-1] in seed_range for seed_range in allowed):
        spans = " or ".join(f"[{seed_range.start}, {seed_range.stop})" for seed_range in allowed)
        raise ValueError(f"{purpose} seeds {seeds[0]}…{seeds[-1]} must lie within {spans}.")
    return seeds


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Calls `write(temporary_path)`, then moves the file into place: an interrupted run leaves nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        # mkstemp makes the file private; give it the permissions of any new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def collect(scenario: str, episodes: int, seed: int, out: str | Path, driver: str | Path | Any = EXPERT) -> list[Path]:
    """Demonstrations: `episodes` episodes per scenario on seeds `seed …`, written as parquet records under
    `out/<split>/`; returns the files. Seeds in `TRAINING_SEEDS` make the `train` split, in `VALIDATION_SEEDS` the
    `validation` split. `driver` drives: the expert (its own next poses are the labels), or "expert-dart", a
    trajectory model folder or a policy object, whose visited states are labelled with the expert's plan (DART,
    DAgger) and written under a file name carrying the driver's name."""
    names = parse_scenarios(scenario)
    seeds = episode_seeds(episodes, seed, list(SPLITS.values()), "Demonstration")
    split = next(name for name, seed_range in SPLITS.items() if seeds[0] in seed_range)
    policy = make_policy(driver) if isinstance(driver, (str, Path)) else driver
    tag = "" if policy.is_expert else f"-{policy.name}"
    # Every scenario is driven before any file is written: a failure leaves no partial set of files.
    collected = {}
    for name in names:
        env, records = make_env(get_scenario(name)), []
        for episode_seed in tqdm(seeds, desc=f"Collecting {name} ({policy.name})", unit="episode"):
            records += drive_episode(env, name, episode_seed, policy, record=True).records
        env.close()
        for row in records:
            row["scenario"] = name
        collected[name] = datasets.Dataset.from_list(records, features=RECORD_FEATURES)
    paths = []
    for name, dataset in collected.items():
        path = Path(out) / split / f"{name}{tag}-seeds-{seeds[0]}-{seeds[-1]}.parquet"
        write_atomically(path, dataset.to_parquet)
        paths.append(path)
    return paths


def evaluate(
    model: str | Path | Any,
    scenario: str,
    episodes: int,
    seed: int,
    json_path: str | Path | None = None,
    video_folder: str | Path | None = None,
) -> dict[str, Any]:
    """Drives `episodes` episodes per scenario on `EVALUATION_SEEDS` from `seed` with `model` (a name of
    `NAMED_POLICIES`, a trajectory model folder, or a policy object) and returns the figures: the aggregates
    `collision_rate`, `success_rate`, `route_completion`, `driving_score` over all episodes, `episodes` (one dict
    per episode), `num_episodes`, `per_scenario` aggregates and the `penalties` used. Written as JSON to
    `json_path` when given. With `video_folder`, the first episode of each scenario is also saved there as
    `<scenario>.gif`, the plans drawn (`save_video`)."""
    names = parse_scenarios(scenario)
    seeds = episode_seeds(episodes, seed, [EVALUATION_SEEDS], "Evaluation")
    if json_path is not None and Path(json_path).is_dir():
        raise ValueError(f"--json {json_path} is a folder; give a file path.")
    policy = make_policy(model) if isinstance(model, (str, Path)) else model
    outcomes = []
    for name in names:
        env = make_env(get_scenario(name))
        for episode_seed in tqdm(seeds, desc=f"{policy.name} on {name}", unit="episode"):
            filmed = video_folder is not None and episode_seed == seeds[0]
            rollout = drive_episode(env, name, episode_seed, policy, video=filmed)
            if filmed:
                save_gif(rollout.frames, Path(video_folder) / f"{name}.gif")
            outcomes.append(rollout.outcome)
        env.close()
    figures = figures_of(policy.name, names, outcomes)
    if json_path is not None:
        write_figures(figures, json_path)
    return figures


def figures_of(model_name: str, names: Sequence[str], outcomes: Sequence[EpisodeOutcome]) -> dict[str, Any]:
    """`evaluate`'s figures of the episodes `outcomes` of `model_name` in the scenarios `names`, listed by scenario,
    then seed. Every scenario must have been driven once on each of the same consecutive seeds (a `ValueError` names
    the scenario that was not), so that the aggregates and `seeds` describe the same episodes."""
    if not outcomes:
        raise ValueError(f"No episodes of {model_name!r} to report.")
    strays = sorted({outcome.scenario for outcome in outcomes} - set(names))
    if strays:
        raise ValueError(f"Episodes of {model_name!r} in scenarios {strays}, which are not among {list(names)}.")
    first, last = min(outcome.seed for outcome in outcomes), max(outcome.seed for outcome in outcomes)
    for name in names:
        driven = Counter(outcome.seed for outcome in outcomes if outcome.scenario == name)
        missing = sorted(set(range(first, last + 1)) - set(driven))
        repeated = sorted(seed for seed, count in driven.items() if count > 1)
        if missing or repeated:
            raise ValueError(
                f"Episodes of {model_name!r} in {name} must cover each of the seeds {first}…{last} once: "
                f"seeds {missing} are missing, seeds {repeated} repeated."
            )
    outcomes = sorted(outcomes, key=lambda outcome: (list(names).index(outcome.scenario), outcome.seed))
    return {
        "model": model_name,
        "scenarios": list(names),
        "seeds": [first, last],
        **aggregate(outcomes),
        "num_episodes": len(outcomes),
        "per_scenario": {name: aggregate([o for o in outcomes if o.scenario == name]) for name in names},
        "penalties": {"collision": COLLISION_PENALTY, "off_road": OFF_ROAD_PENALTY},
        "episodes": [outcome.as_dict() for outcome in outcomes],
    }


def write_figures(figures: dict[str, Any], json_path: str | Path) -> None:
    """Writes `evaluate`'s figures as JSON to `json_path`, whole or not at all."""
    write_atomically(Path(json_path), lambda path: Path(path).write_text(json.dumps(figures, indent=2) + "\n"))


def outcomes_of(figures: dict[str, Any]) -> list[EpisodeOutcome]:
    """The episodes of `evaluate`'s figures (or their JSON) as `EpisodeOutcome`s."""
    names = [item.name for item in fields(EpisodeOutcome)]
    return [EpisodeOutcome(**{name: episode[name] for name in names}) for episode in figures["episodes"]]


def join_figures(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one model's evaluations on consecutive seeds (`evaluate`'s output for seeds a…b, then b+1…c,
    …, in the same scenarios) as those of one evaluation on a…c: the episodes of all, aggregated afresh. An episode
    depends only on the policy, the scenario and its seed, so this equals evaluating a…c at once."""
    if not parts:
        raise ValueError("No evaluations to join.")
    first = parts[0]
    for before, after in pairwise(parts):
        if (after["model"], after["scenarios"]) != (first["model"], first["scenarios"]):
            raise ValueError(
                f"Only evaluations of one model in the same scenarios join: {first['model']!r} in "
                f"{first['scenarios']} and {after['model']!r} in {after['scenarios']}."
            )
        if after["seeds"][0] != before["seeds"][1] + 1:
            raise ValueError(
                f"Joined evaluations must follow on: seeds {before['seeds']} are followed by {after['seeds']}."
            )
    return figures_of(first["model"], first["scenarios"], [outcome for part in parts for outcome in outcomes_of(part)])


def main(argv: list[str] | None = None) -> None:
    """`vlmheads drive collect|evaluate ...`."""
    parser = argparse.ArgumentParser(prog="vlmheads drive", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scenarios = f"{ALL_SCENARIOS}, one of {', '.join(SCENARIOS)}, or several separated by commas"
    gather = commands.add_parser("collect", help="write expert demonstrations as Orion records (parquet)")
    gather.add_argument("--scenario", required=True, help=scenarios)
    gather.add_argument("--episodes", type=int, required=True, help="episodes per scenario")
    gather.add_argument(
        "--seed",
        type=int,
        default=TRAINING_SEEDS.start,
        help=f"first seed: training in [{TRAINING_SEEDS.start}, {TRAINING_SEEDS.stop}), validation in "
        f"[{VALIDATION_SEEDS.start}, {VALIDATION_SEEDS.stop})",
    )
    gather.add_argument("--out", required=True, help="output folder; files go to OUT/train or OUT/validation")
    gather.add_argument(
        "--driver",
        default=EXPERT,
        help="who drives: 'expert' (labels: its own next poses), 'expert-dart' (the expert with noise injected) or "
        "a trajectory model folder (DAgger); the states of the latter two are labelled with the expert's plan",
    )
    judge = commands.add_parser("evaluate", help="drive episodes on held-out seeds and write the figures as JSON")
    judge.add_argument(
        "--model",
        required=True,
        help="a trajectory model folder, 'expert', 'expert-plan' (the expert's plan through the controller: its "
        "ceiling), 'expert-dart' or 'constant-velocity'",
    )
    judge.add_argument("--scenario", required=True, help=scenarios)
    judge.add_argument("--episodes", type=int, required=True, help="episodes per scenario")
    judge.add_argument(
        "--seed",
        type=int,
        default=EVALUATION_SEEDS.start,
        help=f"first seed, in [{EVALUATION_SEEDS.start}, {EVALUATION_SEEDS.stop})",
    )
    judge.add_argument("--json", required=True, help="where to write the figures")
    judge.add_argument("--videos", default=None, help="folder for a GIF of the first episode per scenario")
    args = parser.parse_args(argv)
    if args.command == "collect":
        for path in collect(args.scenario, args.episodes, args.seed, args.out, args.driver):
            print(f"Wrote {path}")
        return
    figures = evaluate(args.model, args.scenario, args.episodes, args.seed, args.json, args.videos)
    print(json.dumps({name: figures[name] for name in ("model", *AGGREGATES, "num_episodes")}))


if __name__ == "__main__":
    main()
