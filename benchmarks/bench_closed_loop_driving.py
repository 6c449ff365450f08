"""Closed-loop driving in highway-env of the tiny Orion planners, beside the IDM/MOBIL expert, constant velocity and
the untrained model, with the open-loop L2 of each on held-out frames next to its closed-loop figures.

Stages (each kept once done, so that a run cut short resumes):

1. `collect`: expert demonstrations of every scenario, training seeds 0 .. `--train_episodes - 1` and validation
   seeds from 50000 (`vlmheads.closed_loop.driving`'s seed split); `--dart_episodes` more from training seed
   `DART_SEEDS` with noise injected into the expert's action (DART), and `--dagger_episodes` from `DAGGER_SEEDS`
   driven by the trained planner `--dagger_driver` (one round of DAgger's data aggregation), both labelled with the
   expert's plan from the states they visit; `--workers` processes;
2. `examples/train_orion.py --train_files ... --eval_files ...` (the Trainer) on all the training records, once with
   the MLP head and once with the flow head, on the tiny offline Qwen2-VL backbone with one trajectory mode per
   navigation command, in parallel; the untrained model is the MLP model's initialisation (same seed), saved as it
   is;
3. open-loop L2 at 1/2/3 s on the validation frames (`OUT/open_loop.json`);
4. `evaluate`: `--eval_episodes` episodes per scenario on the evaluation seeds from `--eval_seed`, the same seeds for
   every policy (rows named in `--row_episodes`, by default the untrained model and the controller's ceiling, the
   expert's plan tracked by pure pursuit and PID, drive the first few of them), `--workers` processes;
5. the Markdown tables (printed and written to `OUT/results.md`), the plot `OUT/closed_loop_driving.png` and one GIF
   per scenario of the MLP planner with its planned waypoints drawn (`OUT/videos/`).

    python benchmarks/bench_closed_loop_driving.py                        # the BENCHMARKS.md configuration
    python benchmarks/bench_closed_loop_driving.py --out /tmp/smoke --train_episodes 1 --validation_episodes 1 \\
        --eval_episodes 1 --epochs 1                                     # a smoke run
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor, HfArgumentParser

from vlmheads.closed_loop.driving import (
    EVALUATION_SEEDS,
    TRAINING_SEEDS,
    VALIDATION_SEEDS,
    collect,
    evaluate,
    parse_scenarios,
    save_video,
)
from vlmheads.closed_loop.driving_metrics import AGGREGATES, EpisodeOutcome, aggregate
from vlmheads.closed_loop.driving_policies import (
    CONSTANT_VELOCITY,
    EXPERT,
    EXPERT_DART,
    EXPERT_PLAN,
    TrajectoryModelPolicy,
)
from vlmheads.closed_loop.driving_records import COMMANDS, NUM_HISTORY_QUERIES, NUM_SCENE_QUERIES
from vlmheads.data.driving import ARRAY_FIELDS, constant_velocity_waypoints, load_driving_dataset
from vlmheads.offline import tiny_orion_model, tiny_orion_processor
from vlmheads.processing.collator_orion_qwen import OrionDataCollator
from vlmheads.training.orion import TrajectoryMetrics

REPOSITORY = Path(__file__).resolve().parents[1]
HEADS = ("mlp", "flow")
# Training seeds of the noise-injected (DART) and the planner-driven (DAgger) episodes, apart from the clean ones.
DART_SEEDS = range(TRAINING_SEEDS.start + 10_000, TRAINING_SEEDS.start + 20_000)
DAGGER_SEEDS = range(TRAINING_SEEDS.start + 20_000, TRAINING_SEEDS.start + 30_000)
# Table rows: policy key -> label.
POLICIES = {
    EXPERT: "expert (IDM + MOBIL)",
    EXPERT_PLAN: "expert's plan through the controller",
    CONSTANT_VELOCITY: "constant velocity (keep lane and speed)",
    "untrained": "Orion, untrained",
    "mlp": "Orion, MLP head",
    "flow": "Orion, flow head",
}
EVALUATION_ORDER = (EXPERT, CONSTANT_VELOCITY, "mlp", "flow", "untrained", EXPERT_PLAN)
L2 = ("L2@1s", "L2@2s", "L2@3s")


@dataclass
class BenchmarkArguments:
    out: str = field(default="outputs/closed_loop_driving", metadata={"help": "Data, models, results, figures."})
    scenarios: str = field(default="all")
    train_episodes: int = field(default=16, metadata={"help": "Demonstrations per scenario (training seeds)."})
    dart_episodes: int = field(default=0, metadata={"help": "Noise-injected expert episodes per scenario (DART)."})
    dagger_driver: str | None = field(
        default=None, metadata={"help": "A trained planner folder whose visited states are labelled (DAgger)."}
    )
    dagger_episodes: int = field(default=0, metadata={"help": "Episodes per scenario driven by --dagger_driver."})
    validation_episodes: int = field(default=4, metadata={"help": "Per scenario, from the first validation seed."})
    eval_episodes: int = field(default=5, metadata={"help": "Closed-loop episodes per scenario and policy."})
    row_episodes: str = field(
        default="untrained=5,expert-plan=5",
        metadata={"help": "Rows driving fewer episodes per scenario (the first of the same seeds): ROW=N,..."},
    )
    eval_seed: int = field(default=EVALUATION_SEEDS.start)
    epochs: float = field(default=6, metadata={"help": "Training epochs of both heads."})
    max_steps: int = field(default=-1, metadata={"help": "Training steps of both heads, if positive."})
    batch_size: int = field(default=32)
    seed: int = field(default=42, metadata={"help": "Training seed (and the untrained model's initialisation)."})
    workers: int = field(default=2, metadata={"help": "Processes: one per core."})
    video_model: str = field(default="mlp", metadata={"help": "The trained head filmed in each scenario."})


def collect_job(args: tuple[str, int, int, str, str]) -> None:
    torch.set_num_threads(1)
    collect(*args)


def evaluate_job(args: tuple[str, str, int, int, str]) -> None:
    torch.set_num_threads(1)
    evaluate(*args)


def record_files(out: Path, split: str, names: list[str], first: int, episodes: int, tag: str = "") -> list[Path]:
    return [out / "records" / split / f"{name}{tag}-seeds-{first}-{first + episodes - 1}.parquet" for name in names]


def collect_all(args: BenchmarkArguments, names: list[str], out: Path) -> dict[str, list[Path]]:
    """The training records (clean, DART and DAgger episodes) and the validation records, collected where absent."""
    if args.dagger_episodes > 0 and not args.dagger_driver:
        raise ValueError("--dagger_episodes needs --dagger_driver, the trained planner that drives them.")
    sets = [("train", EXPERT, TRAINING_SEEDS.start, args.train_episodes, "")]
    if args.dart_episodes > 0:
        sets.append(("train", EXPERT_DART, DART_SEEDS.start, args.dart_episodes, f"-{EXPERT_DART}"))
    if args.dagger_episodes > 0:
        driver = Path(args.dagger_driver)
        sets.append(("train", str(driver), DAGGER_SEEDS.start, args.dagger_episodes, f"-{driver.name}"))
    sets.append(("validation", EXPERT, VALIDATION_SEEDS.start, args.validation_episodes, ""))
    files, jobs = {"train": [], "validation": []}, []
    for split, driver, first, episodes, tag in sets:
        paths = record_files(out, split, names, first, episodes, tag)
        files[split] += paths
        jobs += [
            (name, episodes, first, str(out / "records"), driver)
            for name, path in zip(names, paths, strict=True)
            if not path.exists()
        ]
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(collect_job, jobs))
    return files


def train(args: BenchmarkArguments, files: dict[str, list[Path]], out: Path) -> dict[str, Path]:
    """Both heads through examples/train_orion.py, `--workers` at once; the untrained model saved beside them."""
    folders = {head: out / "models" / head for head in HEADS}
    running = []
    for head, folder in folders.items():
        if (folder / "config.json").exists():
            continue
        command = [sys.executable, str(REPOSITORY / "examples" / "train_orion.py")]
        command += ["--train_files", *map(str, files["train"]), "--eval_files", *map(str, files["validation"])]
        command += ["--num_scene_queries", str(NUM_SCENE_QUERIES), "--num_history_queries", str(NUM_HISTORY_QUERIES)]
        command += ["--num_modes", str(len(COMMANDS)), "--trajectory_head", head, "--compare_flow_planner", "false"]
        command += ["--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size)]
        command += ["--max_steps", str(args.max_steps)]
        command += ["--seed", str(args.seed), "--report_to", "none", "--output_dir", str(folder)]
        print("$", " ".join(command), flush=True)
        log = (out / f"train_{head}.log").open("w")
        threads = {"OMP_NUM_THREADS": str(max(1, os.cpu_count() // args.workers))}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **threads})
        running.append((process, log, head))
        if len(running) >= args.workers:  # no more trainings at once than workers
            running[-args.workers][0].wait()
    for process, log, head in running:
        code = process.wait()
        log.close()
        if code != 0:
            raise RuntimeError(f"Training the {head} head failed: see {log.name}.")
    folders["untrained"] = out / "models" / "untrained"
    if not (folders["untrained"] / "config.json").exists():
        processor = tiny_orion_processor(num_scene_queries=NUM_SCENE_QUERIES, num_history_queries=NUM_HISTORY_QUERIES)
        model = tiny_orion_model(processor, seed=args.seed, num_modes=len(COMMANDS), trajectory_head="mlp")
        model.save_pretrained(folders["untrained"])
        processor.save_pretrained(folders["untrained"])
    return folders


def open_loop(folders: dict[str, Path], validation: list[Path], batch_size: int = 64) -> dict[str, dict[str, float]]:
    """L2 at 1/2/3 s on the validation frames: constant velocity (the CAN bus's speed and yaw rate) and each model."""
    records = load_driving_dataset([str(path) for path in validation])
    records = records.with_format("numpy", columns=list(ARRAY_FIELDS), output_all_columns=True)
    targets = np.stack(records["ego_waypoints"])
    metrics = TrajectoryMetrics()
    rows = {CONSTANT_VELOCITY: metrics.compute(constant_velocity_waypoints(np.stack(records["can_bus"])), targets)}
    for key, folder in folders.items():
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        collator = OrionDataCollator(processor, with_answers=False)
        torch.manual_seed(0)
        planned = []
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                batch = collator([records[index] for index in range(start, min(start + batch_size, len(records)))])
                batch.pop("ego_waypoints")
                planned.append(model(**batch).trajectory.float().numpy())
        rows[key] = metrics.compute(np.concatenate(planned), targets)
    return rows


def episodes_of(args: BenchmarkArguments, key: str) -> int:
    """Closed-loop episodes per scenario of a table row: `--eval_episodes`, or the row's own in `--row_episodes`."""
    fewer = dict(item.split("=") for item in args.row_episodes.split(",") if item)
    unknown = set(fewer) - set(POLICIES)
    if unknown:
        raise ValueError(f"--row_episodes names unknown rows {sorted(unknown)}; rows: {list(POLICIES)}.")
    return int(fewer.get(key, args.eval_episodes))


def closed_loop(args: BenchmarkArguments, names: list[str], folders: dict[str, Path], out: Path) -> dict:
    """Per policy and scenario, the evaluation JSON (written by `evaluate`, kept between runs)."""
    models = {key: key for key in (EXPERT, EXPERT_PLAN, CONSTANT_VELOCITY)}
    models.update((key, str(path)) for key, path in folders.items())
    paths = {}
    for key in POLICIES:
        last = args.eval_seed + episodes_of(args, key) - 1
        for name in names:
            paths[key, name] = out / "results" / f"{key}-{name}-seeds-{args.eval_seed}-{last}.json"
    # The rows the goals are about first: a run stopped early keeps them.
    order = sorted(paths, key=lambda pair: EVALUATION_ORDER.index(pair[0]))
    jobs = [
        (models[key], name, episodes_of(args, key), args.eval_seed, str(paths[key, name]))
        for key, name in order
        if not paths[key, name].exists()
    ]
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(evaluate_job, jobs))
    return {pair: json.loads(path.read_text()) for pair, path in paths.items()}


def outcomes_of(figures: dict) -> list[EpisodeOutcome]:
    names = [item.name for item in fields(EpisodeOutcome)]
    return [EpisodeOutcome(**{name: episode[name] for name in names}) for episode in figures["episodes"]]


def tables(names: list[str], results: dict, l2: dict[str, dict[str, float]]) -> tuple[str, dict[str, dict]]:
    """The Markdown tables (all scenarios with the open-loop L2; driving score and collision rate per scenario)
    and the aggregated figures per policy."""
    overall = {key: aggregate([o for name in names for o in outcomes_of(results[key, name])]) for key in POLICIES}
    header = ["policy", "episodes", "collision rate", "success rate", "route completion", "driving score"]
    header += ["off-road rate", *L2]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for key, label in POLICIES.items():
        episodes = sum(results[key, name]["num_episodes"] for name in names)
        figures = [f"{overall[key][name]:.2f}" for name in (*AGGREGATES, "off_road_rate")]
        if key in l2:
            distances = [f"{l2[key][name]:.2f}" for name in L2]
        else:
            distances = ["0 (the labels)" if key == EXPERT else "–"] * len(L2)
        lines.append(f"| {label} | {episodes} | " + " | ".join(figures + distances) + " |")
    header = ["policy", *(f"{name}: DS / collisions / RC" for name in names)]
    lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for key, label in POLICIES.items():
        cells = []
        for name in names:
            figures = results[key, name]
            cells.append(
                f"{figures['driving_score']:.2f} / {figures['collision_rate']:.2f} / {figures['route_completion']:.2f}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines), overall


def plot(path: Path, names: list[str], results: dict, l2: dict[str, dict[str, float]]) -> None:
    """Driving score and collision rate per scenario and policy, and closed-loop driving score against open-loop
    L2@3s."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / len(POLICIES)
    for index, (key, label) in enumerate(POLICIES.items()):
        positions = np.arange(len(names)) + (index - (len(POLICIES) - 1) / 2) * width
        for axis, metric in zip(axes[:2], ("driving_score", "collision_rate"), strict=True):
            axis.bar(positions, [results[key, name][metric] for name in names], width, label=label, color=f"C{index}")
    for axis, title in zip(axes[:2], ("driving score", "collision rate"), strict=True):
        axis.set_xticks(np.arange(len(names)), names)
        axis.set_title(title)
        axis.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    for index, (key, label) in enumerate(POLICIES.items()):
        if key in l2:
            scores = [results[key, name]["driving_score"] for name in names]
            axes[2].scatter(l2[key]["L2@3s"], np.mean(scores), label=label, s=50, color=f"C{index}")
    axes[2].set_xlabel("open-loop L2@3s on held-out frames [m]")
    axes[2].set_ylabel("closed-loop driving score")
    axes[2].set_title("open loop vs closed loop")
    axes[2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def videos(folder: Path, names: list[str], seed: int, out: Path) -> list[Path]:
    """One GIF per scenario of the model in `folder` driving the first evaluation seed, its plans drawn in red."""
    policy = TrajectoryModelPolicy(folder)
    return [save_video(policy, name, seed, out / f"{folder.name}-{name}.gif") for name in names]


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    names, out = parse_scenarios(args.scenarios), Path(args.out)
    started = time.perf_counter()
    files = collect_all(args, names, out)
    collected = time.perf_counter()
    folders = train(args, files, out)
    trained = time.perf_counter()
    l2_path = out / "open_loop.json"
    if not l2_path.exists():
        l2_path.write_text(json.dumps(open_loop(folders, files["validation"]), indent=2) + "\n")
    l2 = json.loads(l2_path.read_text())
    results = closed_loop(args, names, folders, out)
    evaluated = time.perf_counter()
    markdown, overall = tables(names, results, l2)
    plot(out / "closed_loop_driving.png", names, results, l2)
    gifs = videos(folders[args.video_model], names, args.eval_seed, out / "videos")
    timings = (
        f"collection {collected - started:.0f} s, training {trained - collected:.0f} s, open and closed loop "
        f"{evaluated - trained:.0f} s, {args.workers} workers"
    )
    (out / "results.md").write_text(markdown + "\n\n" + timings + "\n")
    (out / "results.json").write_text(json.dumps({"overall": overall, "open_loop": l2}, indent=2) + "\n")
    print(markdown)
    print(timings)
    print(f"Plot: {out / 'closed_loop_driving.png'}; videos: {', '.join(map(str, gifs))}")


if __name__ == "__main__":
    main()
