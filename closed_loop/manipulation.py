"""Manipulation, closed loop, in Meta-World: expert demonstrations in the LeRobot format, and task success of a
policy over seeded episodes.

    vlmheads manipulate collect --tasks reach-v3,push-v3 --episodes 20 --seed 0 --out data/metaworld
    vlmheads manipulate evaluate --model outputs/vla --tasks reach-v3,push-v3 --episodes 50 --seed 100000 \
        --json results.json

`collect` runs Meta-World's scripted expert (`metaworld.policies`) and writes every step as a LeRobot frame
(`observation.images.corner`, `observation.state`, `action`, `task`, ...), one parquet file per episode under
`data/chunk-000/`, with `meta/info.json`, `meta/tasks.jsonl` and `meta/episodes.jsonl`;
`vlmheads.data.manipulation.load_lerobot_episodes` (and so `examples/train_vla.py --train_files`) reads it. Episode
`e` of every task uses the seed `seed + e`, which places the objects and the goal: demonstration seeds lie below
`HELD_OUT_SEED` (100000), evaluation seeds from it on.

`evaluate` runs a policy (a trained `VLAForActionPrediction` or π0 folder, "expert" or "random") on `episodes` seeds
per task and reports the success rate per task (Meta-World's `info["success"]` at any step within `max_steps`) and
its mean over tasks. `--blind image` blanks a model's camera frame; `--blind world` also hides where the objects and
the goal are in its state (`manipulation_policies.BLINDS`).
The episodes of a task run in lockstep, and a model decides for all the episodes whose action chunk is spent in
one batch; frames are rendered only at those decision points (and at every step of the episode a video shows).
"""

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from .manipulation_env import (
    ACTION_DIM,
    CAMERA,
    DEFAULT_OBSERVATION,
    DEFAULT_TASKS,
    FPS,
    IMAGE_SIZE,
    INSTRUCTIONS,
    MAX_STEPS,
    OBSERVATIONS,
    FrameRenderer,
    MetaWorldEpisode,
    check_observation,
    check_tasks,
)
from .manipulation_policies import BLINDS, ExpertPolicy, Observation, make_policy

IMAGE_KEY = f"observation.images.{CAMERA}"
DATA_FOLDER = "data/chunk-000"
# Videos are upscaled from the policy's frames by this factor (nearest pixel) so that they can be watched.
VIDEO_SCALE = 4
# The held-out range: evaluation seeds start here, and `collect` refuses any seed from here on, so that no held-out
# scene is ever a demonstration.
HELD_OUT_SEED = 100_000


@dataclass
class EpisodeOutcome:
    task: str
    seed: int
    success: bool
    # Steps taken: to the first success, or the step limit.
    steps: int


def success_table(outcomes: Sequence[EpisodeOutcome], tasks: Sequence[str]) -> dict:
    """Success rate per task (in `tasks` order), its mean over tasks, episodes per task and the mean steps of the
    successful episodes (None without one); every task must have at least one outcome."""
    rates, steps, counts = {}, {}, {}
    for task in tasks:
        mine = [outcome for outcome in outcomes if outcome.task == task]
        if not mine:
            raise ValueError(f"No episode of task {task!r} among the outcomes.")
        successes = [outcome.steps for outcome in mine if outcome.success]
        rates[task] = len(successes) / len(mine)
        steps[task] = float(np.mean(successes)) if successes else None
        counts[task] = len(mine)
    return {
        "success_rate": rates,
        "mean_success_rate": float(np.mean(list(rates.values()))),
        "episodes": counts,
        "mean_steps_to_success": steps,
    }


def run_episodes(
    policy,
    task: str,
    seeds: Sequence[int],
    observation: str,
    max_steps: int = MAX_STEPS,
    video: Path | None = None,
    progress: tqdm | None = None,
) -> list[EpisodeOutcome]:
    """Runs `policy` on one episode per seed of `task`, in lockstep, until success or `max_steps`; the first
    episode is written as a video to `video` (.mp4 or .gif) when given."""
    episodes = [MetaWorldEpisode(task, seed, observation, max_steps) for seed in seeds]
    renderer = FrameRenderer(episodes[0]) if policy.needs_images or video else None
    chunks: list[list[np.ndarray]] = [[] for _ in episodes]
    outcomes: dict[int, EpisodeOutcome] = {}
    frames = []
    try:
        for _ in range(max_steps):
            running = [index for index in range(len(episodes)) if index not in outcomes]
            if not running:
                break
            if video and 0 in running:
                frames.append(renderer.frame(episodes[0]))
            deciding = [index for index in running if not chunks[index]]
            if deciding:
                observed = [
                    Observation(episodes[index], renderer.frame(episodes[index]) if policy.needs_images else None)
                    for index in deciding
                ]
                for index, chunk in zip(deciding, policy.act(observed), strict=True):
                    chunks[index] = list(chunk)
            for index in running:
                episode = episodes[index]
                if episode.step(chunks[index].pop(0)) or episode.steps == max_steps:
                    outcomes[index] = EpisodeOutcome(task, episode.seed, episode.success, episode.steps)
                    if progress is not None:
                        progress.update()
        if video:
            frames.append(renderer.frame(episodes[0]))
            write_video(frames, video)
    finally:
        if renderer is not None:
            renderer.close()
        for episode in episodes:
            episode.close()
    return [outcomes[index] for index in range(len(episodes))]


def write_video(frames: Sequence, path: Path) -> None:
    """Frames (PIL) as an MP4 or GIF at Meta-World's control rate, each pixel `VIDEO_SCALE` x `VIDEO_SCALE`."""
    import imageio.v2 as imageio

    scaled = [np.asarray(frame).repeat(VIDEO_SCALE, axis=0).repeat(VIDEO_SCALE, axis=1) for frame in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, scaled, duration=1000 / FPS * 2, loop=0)
    else:
        imageio.mimsave(path, scaled, fps=FPS // 2, macro_block_size=1)


def _check_episodes(episodes: int) -> None:
    if not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be a positive integer, got {episodes!r}.")


def _check_empty_output(path: Path) -> None:
    if path.exists() and (path.is_file() or any(path.iterdir())):
        raise ValueError(f"{path} exists and is not empty: give a new output path.")


def _episode_frames(task: str, seed: int, observation: str, max_steps: int, action_noise: float) -> dict:
    """One expert episode, every step as a LeRobot frame: the columns (images, state, action, success)."""
    expert = ExpertPolicy()
    episode = MetaWorldEpisode(task, seed, observation, max_steps)
    generator = np.random.default_rng(seed)
    columns = {IMAGE_KEY: [], "action": [], "next.success": []}
    with FrameRenderer(episode) as renderer:
        try:
            while episode.steps < max_steps and not episode.success:
                columns[IMAGE_KEY].append(renderer.frame(episode))
                if OBSERVATIONS[observation]:
                    columns.setdefault("observation.state", []).append(episode.state.tolist())
                action = expert.act([Observation(episode, None)])[0, 0]
                columns["action"].append(action.tolist())
                noisy = action + generator.normal(0.0, action_noise, size=ACTION_DIM) if action_noise else action
                columns["next.success"].append(episode.step(noisy))
        finally:
            episode.close()
    return columns


def collect(
    tasks: str | Sequence[str],
    episodes: int,
    seed: int,
    out: str | Path,
    observation: str = DEFAULT_OBSERVATION,
    action_noise: float = 0.1,
    max_steps: int = MAX_STEPS,
) -> dict:
    """Writes `episodes` expert demonstrations per task, seeds `seed` .. `seed + episodes - 1`, as a LeRobot
    dataset under `out` (which must be new or empty; nothing is left there on failure).

    The recorded action is the expert's (clipped to [-1, 1]); the executed one adds Gaussian noise of std
    `action_noise` (DART), so that the demonstrations visit, and correct, states off the expert's own path. The
    state is the `observation` setting's. Returns the counts and the expert's success rate on the noisy episodes.
    """
    names = check_tasks(tasks)
    _check_episodes(episodes)
    check_observation(observation)
    if seed < 0 or seed + episodes > HELD_OUT_SEED:
        raise ValueError(
            f"Demonstration seeds {seed}..{seed + episodes - 1} must lie in 0..{HELD_OUT_SEED - 1}: seeds from "
            f"{HELD_OUT_SEED} on are held out for evaluation."
        )
    if action_noise < 0:
        raise ValueError(f"action_noise must be at least 0, got {action_noise}.")
    out = Path(out)
    _check_empty_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    features = datasets.Features(
        {
            IMAGE_KEY: datasets.Image(),
            "action": datasets.List(datasets.Value("float32"), length=ACTION_DIM),
            "next.success": datasets.Value("bool"),
            "timestamp": datasets.Value("float32"),
            "frame_index": datasets.Value("int64"),
            "episode_index": datasets.Value("int64"),
            "index": datasets.Value("int64"),
            "task_index": datasets.Value("int64"),
            "task": datasets.Value("string"),
        }
    )
    if OBSERVATIONS[observation]:
        features["observation.state"] = datasets.List(datasets.Value("float32"), length=OBSERVATIONS[observation])
    listed, total, successes = [], 0, 0
    try:
        (staging / DATA_FOLDER).mkdir(parents=True)
        with tqdm(total=len(names) * episodes, desc="expert demonstrations", unit="episode") as progress:
            for task_index, task in enumerate(names):
                for offset in range(episodes):
                    episode_index = task_index * episodes + offset
                    columns = _episode_frames(task, seed + offset, observation, max_steps, action_noise)
                    length = len(columns["action"])
                    columns |= {
                        "timestamp": [frame / FPS for frame in range(length)],
                        "frame_index": list(range(length)),
                        "episode_index": [episode_index] * length,
                        "index": list(range(total, total + length)),
                        "task_index": [task_index] * length,
                        "task": [INSTRUCTIONS[task]] * length,
                    }
                    path = staging / DATA_FOLDER / f"episode_{episode_index:06d}.parquet"
                    _write_parquet(datasets.Dataset.from_dict(columns, features=features), path)
                    success = bool(columns["next.success"][-1])
                    listed.append({"episode_index": episode_index, "tasks": [INSTRUCTIONS[task]], "length": length})
                    listed[-1] |= {"metaworld_task": task, "seed": seed + offset, "success": success}
                    total, successes = total + length, successes + success
                    progress.update()
        _write_meta(staging, names, listed, total, observation, action_noise, seed)
        if out.exists():
            _move_into(staging, out)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"episodes": len(listed), "frames": total, "expert_success_rate": successes / len(listed)}


def _write_parquet(table: datasets.Dataset, path: Path) -> None:
    """Writes one episode's table without datasets' per-file progress bar (the episodes have one)."""
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        table.to_parquet(str(path))
    finally:
        if not quiet:
            datasets.utils.enable_progress_bars()


def _move_into(staging: Path, out: Path) -> None:
    for child in staging.iterdir():
        child.rename(out / child.name)
    staging.rmdir()


def _write_meta(
    folder: Path, tasks: list[str], listed: list[dict], frames: int, observation: str, noise: float, seed: int
) -> None:
    meta = folder / "meta"
    meta.mkdir()
    info = {
        "codebase_version": "v2.1",
        "robot_type": "sawyer",
        "fps": FPS,
        "total_episodes": len(listed),
        "total_frames": frames,
        "total_tasks": len(tasks),
        "total_chunks": 1,
        "chunks_size": 1000,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "features": {
            IMAGE_KEY: {"dtype": "image", "shape": [IMAGE_SIZE, IMAGE_SIZE, 3], "names": ["height", "width", "rgb"]},
            "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": ["dx", "dy", "dz", "gripper"]},
        },
        "metaworld": {"tasks": tasks, "observation": observation, "action_noise": noise, "first_seed": seed},
    }
    if OBSERVATIONS[observation]:
        info["features"]["observation.state"] = {"dtype": "float32", "shape": [OBSERVATIONS[observation]]}
    (meta / "info.json").write_text(json.dumps(info, indent=2))
    lines = [json.dumps({"task_index": index, "task": INSTRUCTIONS[task]}) for index, task in enumerate(tasks)]
    (meta / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    (meta / "episodes.jsonl").write_text("\n".join(json.dumps(episode) for episode in listed) + "\n")


def evaluate(
    model: str | Path,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    episodes: int = 50,
    seed: int = HELD_OUT_SEED,
    json_path: str | Path | None = None,
    blind: str | None = None,
    observation: str | None = None,
    max_steps: int = MAX_STEPS,
    video_folder: str | Path | None = None,
) -> dict:
    """Success rates of `model` (a VLA folder, "expert" or "random") on `episodes` seeds per task, `seed` ..
    `seed + episodes - 1`; written as JSON to `json_path` when given (only once every episode has run).

    A model runs in the observation setting it was trained in (its state width); "expert" and "random" read the
    simulator directly, `observation` only sets the state they would be shown. `blind` (one of `BLINDS`) hides the
    model's image ("image"), or its image and the objects and goal in its state ("world").
    `video_folder` gets one video of the first episode per task.
    """
    names = check_tasks(tasks)
    _check_episodes(episodes)
    policy = make_policy(model, seed, blind=blind)
    setting = policy.observation or check_observation(observation or DEFAULT_OBSERVATION)
    if observation is not None and check_observation(observation) != setting:
        raise ValueError(f"The model was trained in the {setting!r} setting, not {observation!r}.")
    if json_path is not None and Path(json_path).is_dir():
        raise ValueError(f"--json {json_path} is a folder; give a file path.")
    outcomes = []
    seeds = list(range(seed, seed + episodes))
    with tqdm(
        total=len(names) * episodes, desc=f"evaluating {model}{f' (blind: {blind})' if blind else ''}", unit="episode"
    ) as progress:
        for task in names:
            video = Path(video_folder) / f"{task}.mp4" if video_folder else None
            outcomes += run_episodes(policy, task, seeds, setting, max_steps, video, progress)
    result = {
        "model": str(model),
        "blind": blind,
        "observation": setting,
        "seeds": [seed, seed + episodes - 1],
        **success_table(outcomes, names),
        "outcomes": [asdict(outcome) for outcome in outcomes],
    }
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        staging = json_path.with_name(f".{json_path.name}.partial")
        staging.write_text(json.dumps(result, indent=2))
        staging.replace(json_path)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmheads manipulate", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tasks_help = f"comma-separated Meta-World tasks (default: {','.join(DEFAULT_TASKS)})"
    collecting = commands.add_parser("collect", help="write expert demonstrations as a LeRobot dataset")
    evaluating = commands.add_parser("evaluate", help="success rates of a policy over seeded episodes")
    for command in (collecting, evaluating):
        command.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=tasks_help)
        command.add_argument("--episodes", type=int, required=True, help="episodes (seeds) per task")
        command.add_argument(
            "--seed",
            type=int,
            required=True,
            help=f"first seed; episode e uses seed + e (held out from {HELD_OUT_SEED})",
        )
        command.add_argument("--max_steps", type=int, default=MAX_STEPS, help="step limit of an episode")
    collecting.add_argument("--out", required=True, help="new or empty output folder")
    collecting.add_argument(
        "--observation",
        choices=list(OBSERVATIONS),
        default=DEFAULT_OBSERVATION,
        help="the state each frame records as observation.state beside the camera image: 'full' (hand xyz, "
        f"gripper opening, the objects' xyz and quaternions, the goal xyz: {OBSERVATIONS['full']} values), "
        f"'image-goal' (the same without the goal, which only the image shows: {OBSERVATIONS['image-goal']} values; "
        "Meta-World's partially observable default), 'image' (no state: the camera image alone); default: "
        "%(default)s",
    )
    collecting.add_argument("--action_noise", type=float, default=0.1, help="std of the executed actions' noise")
    evaluating.add_argument("--model", required=True, help="a trained VLA folder, 'expert' or 'random'")
    evaluating.add_argument("--json", required=True, help="where to write the success rates")
    evaluating.add_argument(
        "--blind",
        nargs="?",
        const=BLINDS[0],
        choices=BLINDS,
        help="blank the model's camera image ('image', the default), or the image and the objects and goal in its "
        "state ('world': proprioception only)",
    )
    evaluating.add_argument("--videos", default=None, help="folder for one video of the first episode per task")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """`vlmheads manipulate collect|evaluate ...`; prints the figures."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "collect":
        summary = collect(
            args.tasks, args.episodes, args.seed, args.out, args.observation, args.action_noise, args.max_steps
        )
        print(json.dumps(summary))
        return
    result = evaluate(
        args.model,
        args.tasks,
        args.episodes,
        args.seed,
        args.json,
        blind=args.blind,
        max_steps=args.max_steps,
        video_folder=args.videos,
    )
    print("| task | success rate |\n|---|---|")
    for task, rate in result["success_rate"].items():
        print(f"| {task} | {rate:.2f} |")
    print(f"| mean | {result['mean_success_rate']:.2f} |")


if __name__ == "__main__":
    main()
