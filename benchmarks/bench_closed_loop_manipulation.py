"""Closed-loop success in Meta-World of the three VLA action heads and transformers' tiny π0, beside the scripted
expert, their blind ablations and a random policy, in two observation settings reported apart: the full state with
the goal, and the image carrying the goal (Meta-World's partially observable default).

Two blind ablations of every model (`vlmheads.closed_loop.manipulation_policies.BLINDS`): "image blanked" blanks
the camera frame and leaves the state whole, which in the full setting still says where the objects and the goal
are; "blind" blanks the frame and replaces the object and goal entries of the state by their training means, so
that the policy keeps only its proprioception (hand xyz, gripper opening). The "blind" row is the one a trained
model is measured against: it cannot succeed on the state alone.

The `"tokens"` head reads no state vector (RT-2 / OpenVLA), so it runs in the `"image"` setting (the camera image
alone) and is reported in the image-goal table; it trains on the image-goal demonstrations with their state column
dropped (same frames, actions and seeds).

Every stage goes through the package's own entry points, as a user would run them, one subprocess per worker:

1. `vlmheads manipulate collect`: expert demonstrations of `--tasks`, training seeds 0 .. `--train_episodes - 1`,
   validation seeds from 5000, once per collected setting;
2. `examples/train_vla.py --train_files ... --eval_files ...`: each head on the tiny offline `--family` backbone,
   and π0 (`--family pi0`, its tiny offline configuration), the same data, steps and batch size;
3. `vlmheads manipulate evaluate`: `--eval_episodes` held-out seeds per task from `HELD_OUT_SEED` (100000; the
   collection refuses seeds from there on), the same seeds for every policy.

Finished stages are kept (a folder with its `meta/info.json`, a model folder with its `config.json`, a result JSON)
and skipped when the script runs again, so that a run cut short resumes. The tables are printed in Markdown, with
the episodes per task each row ran.

    python benchmarks/bench_closed_loop_manipulation.py                 # the BENCHMARKS.md configuration
    python benchmarks/bench_closed_loop_manipulation.py --out outputs/metaworld-2000 --models full:regression \
        --tables_only --figure benchmarks/figures/closed_loop_manipulation_regression.png  # tables, README picture
    python benchmarks/bench_closed_loop_manipulation.py --train_episodes 2 --eval_episodes 2 --steps 10  # a smoke run
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import HfArgumentParser

from vlmheads.closed_loop.manipulation import HELD_OUT_SEED
from vlmheads.closed_loop.manipulation_env import DEFAULT_TASKS, OBSERVATIONS
from vlmheads.closed_loop.manipulation_policies import BLIND_IMAGE, BLIND_WORLD
from vlmheads.configuration.configuration_vla import ACTION_HEADS, POLICY_FAMILIES

# A head of ours, or a policy family trained whole (π0).
HEADS = (*ACTION_HEADS, *POLICY_FAMILIES)
# (observation setting, head) of every trained model; the tables group the settings as below.
MODELS = (
    "full:regression",
    "full:flow",
    "full:pi0",
    "image-goal:regression",
    "image-goal:flow",
    "image-goal:pi0",
    "image:tokens",
)
TABLES = {"full": ("full",), "image-goal": ("image-goal", "image")}
# The collected settings; "image" is derived from "image-goal" (its state column dropped).
COLLECTED = ("full", "image-goal")
REPOSITORY = Path(__file__).resolve().parents[1]
VALIDATION_SEED = 5000
# Training steps of every model: 800 left every head short of convergence (its loss still falling), see BENCHMARKS.md.
STEPS = 2000


@dataclass
class BenchmarkArguments:
    out: str = field(default="outputs/metaworld", metadata={"help": "Folder of the data, models and results."})
    tasks: str = field(default=",".join(DEFAULT_TASKS))
    models: str = field(default=",".join(MODELS), metadata={"help": "setting:head pairs to train and evaluate."})
    family: str = field(default="paligemma", metadata={"help": "Tiny offline backbone of the heads."})
    train_episodes: int = field(default=30, metadata={"help": "Expert demonstrations per task (seeds 0..N-1)."})
    validation_episodes: int = field(default=1, metadata={"help": "Per task, seeds from 5000."})
    eval_episodes: int = field(default=50, metadata={"help": "Held-out evaluation episodes per task."})
    steps: int = field(default=STEPS, metadata={"help": "Training steps of every model."})
    batch_size: int = field(default=32)
    chunk_size: int = field(default=4, metadata={"help": "Actions per chunk (executed before the next frame)."})
    workers: int = field(default=1, metadata={"help": "Subprocesses at a time (at most one per core)."})
    tables_only: bool = field(
        default=False, metadata={"help": "Print the tables of the results written so far; run no stage."}
    )
    figure: str | None = field(
        default=None, metadata={"help": "PNG of four frames of the first model's first episode of each task."}
    )


def run(command: list[str], log: Path) -> None:
    """Runs one stage with a single thread, its output in `log`; a failure stops the benchmark."""
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as stream:
        finished = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=environment, cwd=REPOSITORY)
    if finished.returncode:
        raise RuntimeError(f"{' '.join(command)} failed (exit {finished.returncode}); see {log}.")


def parallel(jobs: list[tuple[list[str], Path]], workers: int) -> None:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(run, command, log) for command, log in jobs]:
            future.result()


def check_seed_ranges(args: BenchmarkArguments) -> None:
    """Evaluation seeds never used in training or validation."""
    used = [(0, args.train_episodes), (VALIDATION_SEED, VALIDATION_SEED + args.validation_episodes)]
    evaluation = (HELD_OUT_SEED, HELD_OUT_SEED + args.eval_episodes)
    overlap = any(evaluation[0] < end and start < evaluation[1] for start, end in used)
    if args.train_episodes > VALIDATION_SEED or overlap:
        raise ValueError(f"Evaluation seeds {evaluation} overlap the training/validation seeds {used}.")


def parse_models(models: str) -> list[tuple[str, str]]:
    pairs = [tuple(model.split(":")) for model in models.split(",")]
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in OBSERVATIONS or pair[1] not in HEADS:
            raise ValueError(f"--models takes setting:head pairs ({list(OBSERVATIONS)} x {HEADS}), got {pair}.")
    return pairs


def manipulate(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "vlmheads.closed_loop.manipulation", *arguments]


def collect_jobs(args: BenchmarkArguments, out: Path, models: list[tuple[str, str]]) -> list:
    """The collections the models' settings need ("image" reads the image-goal data) that are not there yet."""
    needed = {"image-goal" if observation == "image" else observation for observation, _ in models}
    jobs = []
    for observation in (setting for setting in COLLECTED if setting in needed):
        for split, seed, episodes in (
            ("train", 0, args.train_episodes),
            ("val", VALIDATION_SEED, args.validation_episodes),
        ):
            folder = out / observation / split
            if not (folder / "meta" / "info.json").is_file():
                command = manipulate(
                    "collect", "--tasks", args.tasks, "--episodes", str(episodes), "--seed", str(seed)
                )
                command += ["--observation", observation, "--out", str(folder)]
                jobs.append((command, out / "logs" / f"collect-{observation}-{split}.log"))
    return jobs


def derive_stateless(out: Path) -> None:
    """The "image" setting's data: the image-goal episodes without their `observation.state` column."""
    for split in ("train", "val"):
        source, target = out / "image-goal" / split, out / "image" / split
        if (target / "meta" / "info.json").is_file():
            continue
        for path in sorted(source.glob("data/*/*.parquet")):
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_parquet(str(path)).remove_columns("observation.state").to_parquet(str(destination))
        info = json.loads((source / "meta" / "info.json").read_text())
        del info["features"]["observation.state"]
        info["metaworld"]["observation"] = "image"
        shutil.copytree(source / "meta", target / "meta")
        (target / "meta" / "info.json").write_text(json.dumps(info, indent=2))


def train_jobs(args: BenchmarkArguments, out: Path, models: list[tuple[str, str]]) -> list:
    jobs = []
    for observation, head in models:
        folder = out / observation / head
        if (folder / "config.json").is_file():
            continue
        files = {
            split: sorted(map(str, (out / observation / split).glob("data/*/*.parquet"))) for split in ("train", "val")
        }
        command = [sys.executable, str(REPOSITORY / "examples" / "train_vla.py")]
        command += ["--family", head] if head in POLICY_FAMILIES else ["--family", args.family, "--action_head", head]
        command += ["--chunk_size", str(args.chunk_size), "--max_steps", str(args.steps)]
        command += ["--per_device_train_batch_size", str(args.batch_size), "--output_dir", str(folder)]
        command += ["--logging_steps", "50", "--train_files", *files["train"], "--eval_files", *files["val"]]
        jobs.append((command, out / "logs" / f"train-{observation}-{head}.log"))
    return jobs


def policies(out: Path, models: list[tuple[str, str]], table: str) -> dict[str, tuple[Path, list[str]]]:
    """Row name -> (result JSON, evaluate flags) of one table."""
    shared = out / "results"
    rows = {
        "scripted expert": (shared / "expert.json", ["--model", "expert"]),
        "random": (shared / "random.json", ["--model", "random"]),
    }
    for observation, head in models:
        if observation not in TABLES[table]:
            continue
        folder, results = out / observation / head, out / observation / "results"
        label = "π0 (tiny)" if head in POLICY_FAMILIES else f"`{head}` head"
        label += " (no state)" if not OBSERVATIONS[observation] else ""
        rows[label] = (results / f"{head}.json", ["--model", str(folder)])
        rows[f"{label}, image blanked"] = (
            results / f"{head}-blind.json",
            ["--model", str(folder), "--blind", BLIND_IMAGE],
        )
        if OBSERVATIONS[observation]:
            rows[f"{label}, blind"] = (
                results / f"{head}-blind-world.json",
                ["--model", str(folder), "--blind", BLIND_WORLD],
            )
    return rows


def evaluate_jobs(args: BenchmarkArguments, out: Path, models: list[tuple[str, str]]) -> list:
    """One job per result JSON not yet written (the expert and the random policy read the simulator, not an
    observation setting: they run once)."""
    jobs = {}
    common = ["--tasks", args.tasks, "--episodes", str(args.eval_episodes), "--seed", str(HELD_OUT_SEED)]
    for table in TABLES:
        for result, flags in policies(out, models, table).values():
            if not result.is_file() and result not in jobs:
                name = f"{result.parent.parent.name}-{result.stem}"
                videos = ["--videos", str(out / "videos" / name)]
                command = manipulate("evaluate", *flags, *common, "--json", str(result), *videos)
                jobs[result] = (command, out / "logs" / f"evaluate-{name}.log")
    return list(jobs.values())


def tables(out: Path, models: list[tuple[str, str]], tasks: list[str]) -> str:
    """The Markdown tables of the results written so far (a row not yet run is left out), with the episodes per
    task each row ran."""
    lines = []
    for table in TABLES:
        lines += [f"\n**{table}** observation setting\n"]
        lines += ["| policy | " + " | ".join(tasks) + " | mean | episodes / task |", "|---" * (len(tasks) + 3) + "|"]
        for row, (path, _) in policies(out, models, table).items():
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            rates = " | ".join(f"{result['success_rate'][task]:.2f}" for task in tasks)
            episodes = sorted(set(result["episodes"].values()))
            lines.append(
                f"| {row} | {rates} | **{result['mean_success_rate']:.2f}** | {'/'.join(map(str, episodes))} |"
            )
    return "\n".join(lines)


def video_sheet(videos: Path, tasks: list[str], path: Path, size: int = 128, label: int = 170) -> None:
    """One row per task: four frames, start to end, of the task's video in `videos`, its name at the left."""
    import imageio.v2 as imageio
    import numpy as np
    from PIL import Image, ImageDraw

    sheet = Image.new("RGB", (label + 4 * size, len(tasks) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for row, task in enumerate(tasks):
        frames = imageio.mimread(videos / f"{task}.mp4", memtest=False)
        for column, index in enumerate(np.linspace(0, len(frames) - 1, 4).round().astype(int)):
            sheet.paste(Image.fromarray(frames[index]).resize((size, size)), (label + column * size, row * size))
        draw.text((6, row * size + size // 2 - 6), task, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    check_seed_ranges(args)
    out, models, tasks = Path(args.out).resolve(), parse_models(args.models), args.tasks.split(",")
    if not args.tables_only:
        parallel(collect_jobs(args, out, models), args.workers)
        if any(observation == "image" for observation, _ in models):
            derive_stateless(out)
        parallel(train_jobs(args, out, models), args.workers)
        parallel(evaluate_jobs(args, out, models), args.workers)
    print(
        f"Success rates over {args.eval_episodes} held-out seeds per task ({HELD_OUT_SEED}.."
        f"{HELD_OUT_SEED + args.eval_episodes - 1}); {args.train_episodes} expert demonstrations per task; "
        f"{args.steps} steps of batch {args.batch_size}, chunks of {args.chunk_size}, tiny {args.family} backbone "
        "and tiny π0."
    )
    print(tables(out, models, tasks))
    if args.figure:
        observation, head = models[0]
        video_sheet(out / "videos" / f"{observation}-{head}", tasks, Path(args.figure))


if __name__ == "__main__":
    main()
