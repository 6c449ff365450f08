"""Closed-loop driving in highway-env of the tiny Orion planners, beside the IDM/MOBIL expert, constant velocity and
the untrained model, with the open-loop L2 of each on held-out frames next to its closed-loop figures.

Stages (each kept once done, so that a run cut short resumes):

1. `collect`: expert demonstrations of every scenario, training seeds 0 .. `--train_episodes - 1` and validation
   seeds from 50000 (`vlmheads.closed_loop.driving`'s seed split); `--workers` processes;
2. `examples/train_orion.py --train_files ... --eval_files ...` (the Trainer) on these demonstrations, once with
   the MLP head and once with the flow head, on the tiny offline Qwen2-VL backbone with one trajectory mode per
   navigation command; the untrained model is the MLP model's initialisation (same seed), saved as it is;
3. with `--dart_episodes` or `--dagger_episodes`, the aggregated data and the planners trained on it:
   `--dart_episodes` more episodes per scenario from training seed `DART_SEEDS` with noise injected into the
   expert's action (DART), and `--dagger_episodes` from `DAGGER_SEEDS` driven by `--dagger_driver` (by default the
   MLP planner of stage 2: one round of DAgger's data aggregation), both labelled with the expert's plan from the
   states they visit; then the heads of `--aggregated_heads` trained as in stage 2 on all the training records
   (`OUT/models/<head>-aggregated`, their own table rows);
4. open-loop L2 at 1/2/3 s on the validation frames (`OUT/open_loop.json`, each model's once per set of files);
5. `evaluate`: `--eval_episodes` episodes per scenario on the evaluation seeds from `--eval_seed`, the same seeds for
   every policy (rows named in `--row_episodes`, by default the untrained model and the controller's ceiling, the
   expert's plan tracked by pure pursuit and PID, drive the first few of them), `--workers` processes. A row that
   drove the first N seeds in an earlier run drives only the seeds after them, and the two are joined
   (`driving.join_figures`: an episode depends only on the policy, the scenario and its seed);
6. the Markdown tables (printed and written to `OUT/results.md`), the plot `OUT/closed_loop_driving.png` and one GIF
   per scenario of the `--video_model` planner with its planned waypoints drawn (`OUT/videos/`).

    python benchmarks/bench_closed_loop_driving.py --epochs 6             # BENCHMARKS.md's clean models, then:
    python benchmarks/bench_closed_loop_driving.py --dart_episodes 8 --dagger_episodes 4 --max_steps 600 \
        --eval_episodes 50 --row_episodes expert-plan=10 --workers 1 --video_model mlp-aggregated  # its table
    python benchmarks/bench_closed_loop_driving.py --out /tmp/smoke --train_episodes 1 --validation_episodes 1 \\
        --eval_episodes 1 --epochs 1                                     # a smoke run
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
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
    join_figures,
    outcomes_of,
    parse_scenarios,
    save_video,
    write_figures,
)
from vlmheads.closed_loop.driving_metrics import AGGREGATES, aggregate
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
# The planners trained on the clean demonstrations and the DART and DAgger episodes: OUT/models/<head><suffix>.
AGGREGATED = "-aggregated"
# Table rows: policy key -> label.
POLICIES = {
    EXPERT: "expert (IDM + MOBIL)",
    EXPERT_PLAN: "expert's plan through the controller",
    CONSTANT_VELOCITY: "constant velocity (keep lane and speed)",
    "untrained": "Orion, untrained",
    "mlp": "Orion, MLP head",
    "flow": "Orion, flow head",
    f"mlp{AGGREGATED}": "Orion, MLP head, + DART and DAgger episodes",
    f"flow{AGGREGATED}": "Orion, flow head, + DART and DAgger episodes",
}
EVALUATION_ORDER = (EXPERT, CONSTANT_VELOCITY, *HEADS, "untrained", *(f"{head}{AGGREGATED}" for head in HEADS))
EVALUATION_ORDER += (EXPERT_PLAN,)
L2 = ("L2@1s", "L2@2s", "L2@3s")


@dataclass
class BenchmarkArguments:
    out: str = field(default="outputs/closed_loop_driving", metadata={"help": "Data, models, results, figures."})
    scenarios: str = field(default="all")
    train_episodes: int = field(default=16, metadata={"help": "Demonstrations per scenario (training seeds)."})
    dart_episodes: int = field(default=0, metadata={"help": "Noise-injected expert episodes per scenario (DART)."})
    dagger_driver: str | None = field(
        default=None,
        metadata={"help": "The trained planner whose visited states are labelled (DAgger); default OUT/models/mlp."},
    )
    dagger_episodes: int = field(default=0, metadata={"help": "Episodes per scenario driven by --dagger_driver."})
    aggregated_heads: str = field(
        default="mlp,flow", metadata={"help": "Heads trained on the clean, DART and DAgger records, if any."}
    )
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
    video_model: str = field(
        default="mlp", metadata={"help": "The planner filmed in each scenario: mlp, flow, mlp-aggregated, ..."}
    )


def collect_job(args: tuple[str, int, int, str, str]) -> None:
    """Collects (scenario, episodes, first seed, output folder, driver) on one thread."""
    torch.set_num_threads(1)
    collect(*args)


def evaluate_job(args: tuple[str, str, int, int, str, str | None, str]) -> None:
    """Evaluates (model, scenario, episodes, first seed, JSON path); with an earlier evaluation's JSON on the seeds
    before, joins both into the last path."""
    model, name, episodes, first, path, earlier, joined = args
    torch.set_num_threads(1)
    rest = evaluate(model, name, episodes, first, path)
    if earlier is not None:
        write_figures(join_figures([json.loads(Path(earlier).read_text()), rest]), joined)


def record_files(out: Path, split: str, names: list[str], first: int, episodes: int, tag: str = "") -> list[Path]:
    """The files `collect` writes for the scenarios `names` on seeds `first … first + episodes - 1`."""
    return [out / "records" / split / f"{name}{tag}-seeds-{first}-{first + episodes - 1}.parquet" for name in names]


def collect_sets(args: BenchmarkArguments, names: list[str], out: Path, sets: list[tuple]) -> list[Path]:
    """The records of `sets` ((split, driver, first seed, episodes per scenario, file tag), ...), collected where
    absent, `--workers` processes; returns the files."""
    files, jobs = [], []
    for split, driver, first, episodes, tag in sets:
        paths = record_files(out, split, names, first, episodes, tag)
        files += paths
        jobs += [
            (name, episodes, first, str(out / "records"), driver)
            for name, path in zip(names, paths, strict=True)
            if not path.exists()
        ]
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(collect_job, jobs))
    return files


def aggregated_sets(args: BenchmarkArguments, out: Path) -> list[tuple]:
    """The DART and DAgger record sets of `collect_sets` asked for (none without --dart/--dagger_episodes)."""
    sets = []
    if args.dart_episodes > 0:
        sets.append(("train", EXPERT_DART, DART_SEEDS.start, args.dart_episodes, f"-{EXPERT_DART}"))
    if args.dagger_episodes > 0:
        driver = Path(args.dagger_driver or out / "models" / "mlp")
        if not (driver / "config.json").is_file():
            raise ValueError(f"--dagger_driver {driver} is not a trained planner folder (no config.json).")
        sets.append(("train", str(driver), DAGGER_SEEDS.start, args.dagger_episodes, f"-{driver.name}"))
    return sets


def train(
    args: BenchmarkArguments, heads: list[str], train_files: list[Path], eval_files: list[Path], out: Path, suffix: str
) -> dict[str, Path]:
    """The `heads` through examples/train_orion.py, `--workers` at once, into OUT/models/<head><suffix>; returns
    {head<suffix>: folder}."""
    folders = {f"{head}{suffix}": out / "models" / f"{head}{suffix}" for head in heads}
    running = []
    for head, (key, folder) in zip(heads, folders.items(), strict=True):
        if (folder / "config.json").exists():
            continue
        command = [sys.executable, str(REPOSITORY / "examples" / "train_orion.py")]
        command += ["--train_files", *map(str, train_files), "--eval_files", *map(str, eval_files)]
        command += ["--num_scene_queries", str(NUM_SCENE_QUERIES), "--num_history_queries", str(NUM_HISTORY_QUERIES)]
        command += ["--num_modes", str(len(COMMANDS)), "--trajectory_head", head, "--compare_flow_planner", "false"]
        command += ["--num_train_epochs", str(args.epochs), "--per_device_train_batch_size", str(args.batch_size)]
        command += ["--max_steps", str(args.max_steps)]
        command += ["--seed", str(args.seed), "--report_to", "none", "--output_dir", str(folder)]
        print("$", " ".join(command), flush=True)
        log = (out / f"train_{key}.log").open("w")
        # A thread count the caller set wins; else the cores are shared among the workers.
        threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // args.workers)))}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **threads})
        running.append((process, log, key))
        if len(running) >= args.workers:  # no more trainings at once than workers
            running[-args.workers][0].wait()
    for process, log, key in running:
        code = process.wait()
        log.close()
        if code != 0:
            raise RuntimeError(f"Training the {key} planner failed: see {log.name}.")
    return folders


def save_untrained(args: BenchmarkArguments, out: Path) -> Path:
    """The untrained model (the MLP planner's initialisation, same seed), saved once; returns its folder."""
    folder = out / "models" / "untrained"
    if not (folder / "config.json").exists():
        processor = tiny_orion_processor(num_scene_queries=NUM_SCENE_QUERIES, num_history_queries=NUM_HISTORY_QUERIES)
        model = tiny_orion_model(processor, seed=args.seed, num_modes=len(COMMANDS), trajectory_head="mlp")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def open_loop(
    folders: dict[str, Path], validation: list[Path], path: Path, batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """L2 at 1/2/3 s on the validation frames: constant velocity (the CAN bus's speed and yaw rate) and each model,
    kept in the JSON file `path` with the names of the `validation` files, where only the rows it lacks are computed
    and added (all of them when it was computed on other files)."""
    files = sorted(file.name for file in validation)
    kept = json.loads(path.read_text()) if path.exists() else {}
    rows = kept["rows"] if kept.get("validation_files") == files else {}
    missing = {key: folder for key, folder in folders.items() if key not in rows}
    if CONSTANT_VELOCITY in rows and not missing:
        return rows
    records = load_driving_dataset([str(file) for file in validation])
    records = records.with_format("numpy", columns=list(ARRAY_FIELDS), output_all_columns=True)
    targets = np.stack(records["ego_waypoints"])
    metrics = TrajectoryMetrics()
    rows[CONSTANT_VELOCITY] = metrics.compute(constant_velocity_waypoints(np.stack(records["can_bus"])), targets)
    for key, folder in missing.items():
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
    path.write_text(json.dumps({"validation_files": files, "rows": rows}, indent=2) + "\n")
    return rows


def parse_row_episodes(args: BenchmarkArguments) -> dict[str, int]:
    """The rows of `--row_episodes` (`ROW=N,...`) and their episodes per scenario, checked."""
    counts = {}
    for item in filter(None, (item.strip() for item in args.row_episodes.split(","))):
        key, _, count = item.partition("=")
        if key not in POLICIES or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"--row_episodes takes ROW=N,... with ROW among {list(POLICIES)} and N a positive integer, "
                f"got {item!r}."
            )
        counts[key] = int(count)
    return counts


def episodes_of(args: BenchmarkArguments, key: str) -> int:
    """Closed-loop episodes per scenario of a table row: `--eval_episodes`, or the row's own in `--row_episodes`."""
    return parse_row_episodes(args).get(key, args.eval_episodes)


def result_path(out: Path, key: str, name: str, first: int, last: int) -> Path:
    """Where the figures of row `key` in scenario `name` on seeds `first … last` are kept."""
    return out / "results" / f"{key}-{name}-seeds-{first}-{last}.json"


def driven_before(out: Path, key: str, name: str, first: int, last: int) -> int:
    """How many of the seeds `first … last` an earlier run of the row drove from `first` (its longest such result
    file), 0 if none."""
    counts = [seed - first + 1 for seed in range(first, last) if result_path(out, key, name, first, seed).exists()]
    return max(counts, default=0)


def closed_loop(args: BenchmarkArguments, names: list[str], folders: dict[str, Path], out: Path) -> dict:
    """Per policy and scenario, the evaluation JSON (written by `evaluate`, kept between runs; a row that drove
    the first seeds before drives the rest, and both are joined)."""
    models = {key: key for key in (EXPERT, EXPERT_PLAN, CONSTANT_VELOCITY)}
    models.update((key, str(path)) for key, path in folders.items())
    paths, jobs = {}, []
    # The rows the goals are about first: a run stopped early has them.
    for key in sorted(models, key=EVALUATION_ORDER.index):
        last = args.eval_seed + episodes_of(args, key) - 1
        for name in names:
            paths[key, name] = result_path(out, key, name, args.eval_seed, last)
            if paths[key, name].exists():
                continue
            driven = driven_before(out, key, name, args.eval_seed, last)
            first = args.eval_seed + driven
            earlier = str(result_path(out, key, name, args.eval_seed, first - 1)) if driven else None
            rest = result_path(out, key, name, first, last)
            jobs.append((models[key], name, last + 1 - first, first, str(rest), earlier, str(paths[key, name])))
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(evaluate_job, jobs))
    return {pair: json.loads(path.read_text()) for pair, path in paths.items()}


def tables(
    names: list[str], results: dict, l2: dict[str, dict[str, float]], rows: list[str]
) -> tuple[str, dict[str, dict]]:
    """The Markdown tables of the policies `rows` (all scenarios with the open-loop L2; driving score and collision
    rate per scenario) and the aggregated figures per policy."""
    overall = {key: aggregate([o for name in names for o in outcomes_of(results[key, name])]) for key in rows}
    header = ["policy", "episodes", "collision rate", "success rate", "route completion", "driving score"]
    header += ["off-road rate", *L2]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for key in rows:
        label = POLICIES[key]
        episodes = sum(results[key, name]["num_episodes"] for name in names)
        figures = [f"{overall[key][name]:.2f}" for name in (*AGGREGATES, "off_road_rate")]
        if key in l2:
            distances = [f"{l2[key][name]:.2f}" for name in L2]
        else:
            distances = ["0 (the labels)" if key == EXPERT else "–"] * len(L2)
        lines.append(f"| {label} | {episodes} | " + " | ".join(figures + distances) + " |")
    header = ["policy", *(f"{name}: DS / collisions / RC" for name in names)]
    lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for key in rows:
        cells = []
        for name in names:
            figures = results[key, name]
            cells.append(
                f"{figures['driving_score']:.2f} / {figures['collision_rate']:.2f} / {figures['route_completion']:.2f}"
            )
        lines.append(f"| {POLICIES[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines), overall


def plot(path: Path, names: list[str], results: dict, l2: dict[str, dict[str, float]], rows: list[str]) -> None:
    """Driving score and collision rate per scenario of the policies `rows`, and closed-loop driving score against
    open-loop L2@3s."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 5))
    width = 0.8 / len(rows)
    for index, key in enumerate(rows):
        positions = np.arange(len(names)) + (index - (len(rows) - 1) / 2) * width
        for axis, metric in zip(axes[:2], ("driving_score", "collision_rate"), strict=True):
            heights = [results[key, name][metric] for name in names]
            axis.bar(positions, heights, width, label=POLICIES[key], color=f"C{index}")
    for axis, title in zip(axes[:2], ("driving score", "collision rate"), strict=True):
        axis.set_xticks(np.arange(len(names)), names)
        axis.set_title(title)
        axis.set_ylim(0, 1.05)
    # One legend under the bars, where it hides none of them.
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    for index, key in enumerate(rows):
        if key in l2:
            scores = [results[key, name]["driving_score"] for name in names]
            axes[2].scatter(l2[key]["L2@3s"], np.mean(scores), label=POLICIES[key], s=50, color=f"C{index}")
    axes[2].set_xlabel("open-loop L2@3s on held-out frames [m]")
    axes[2].set_ylabel("closed-loop driving score")
    axes[2].set_title("open loop vs closed loop")
    axes[2].legend(fontsize=7)
    figure.tight_layout(rect=(0, 0.06 * ((len(rows) + 3) // 4), 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def videos(folder: Path, names: list[str], seed: int, out: Path) -> list[Path]:
    """One GIF per scenario of the model in `folder` driving the first evaluation seed, its plans drawn in red (kept
    from an earlier run where present)."""
    paths = [out / f"{folder.name}-{name}.gif" for name in names]
    if all(path.exists() for path in paths):
        return paths
    policy = TrajectoryModelPolicy(folder)
    return [save_video(policy, name, seed, path) for name, path in zip(names, paths, strict=True)]


def main() -> None:
    description = __doc__.split("\n\n")[0]
    (args,) = HfArgumentParser(BenchmarkArguments, description=description).parse_args_into_dataclasses()
    names, out = parse_scenarios(args.scenarios), Path(args.out)
    heads = [head.strip() for head in args.aggregated_heads.split(",") if head.strip()]
    if not set(heads) <= set(HEADS):
        raise ValueError(f"--aggregated_heads must name heads among {list(HEADS)}, got {args.aggregated_heads!r}.")
    parse_row_episodes(args)  # a bad --row_episodes fails before hours of collection and training
    started = time.perf_counter()
    clean = collect_sets(args, names, out, [("train", EXPERT, TRAINING_SEEDS.start, args.train_episodes, "")])
    validation_set = ("validation", EXPERT, VALIDATION_SEEDS.start, args.validation_episodes, "")
    validation = collect_sets(args, names, out, [validation_set])
    folders = train(args, list(HEADS), clean, validation, out, suffix="")
    folders["untrained"] = save_untrained(args, out)
    extra_sets = aggregated_sets(args, out)
    if extra_sets and heads:
        extra = collect_sets(args, names, out, extra_sets)
        folders.update(train(args, heads, clean + extra, validation, out, suffix=AGGREGATED))
    trained = time.perf_counter()
    l2 = open_loop(folders, validation, out / "open_loop.json")
    results = closed_loop(args, names, folders, out)
    evaluated = time.perf_counter()
    rows = [key for key in POLICIES if key in folders or key in (EXPERT, EXPERT_PLAN, CONSTANT_VELOCITY)]
    markdown, overall = tables(names, results, l2, rows)
    plot(out / "closed_loop_driving.png", names, results, l2, rows)
    if args.video_model not in folders:
        raise ValueError(f"--video_model must be one of the planners {sorted(folders)}, got {args.video_model!r}.")
    gifs = videos(folders[args.video_model], names, args.eval_seed, out / "videos")
    timings = (
        f"collection and training {trained - started:.0f} s, open and closed loop {evaluated - trained:.0f} s, "
        f"{args.workers} workers"
    )
    (out / "results.md").write_text(markdown + "\n\n" + timings + "\n")
    overall = {key: overall[key] for key in rows}
    (out / "results.json").write_text(json.dumps({"overall": overall, "open_loop": l2}, indent=2) + "\n")
    print(markdown)
    print(timings)
    print(f"Plot: {out / 'closed_loop_driving.png'}; videos: {', '.join(map(str, gifs))}")


if __name__ == "__main__":
    main()
