"""Closed-loop driving demo: does a tiny Orion planner drive? It learns from highway-env's expert and drives held-out
episodes beside the expert and constant velocity (the `sim` extra), in about two minutes on 2 CPU cores.

1. highway-env's IDM/MOBIL expert drives a few episodes on training seeds (and one on a validation seed), written as
   Orion records (`vlmheads.closed_loop.driving.collect`);
2. `examples/train_orion.py` (the Trainer) fine-tunes a tiny Orion MLP planner on them, one trajectory mode per
   navigation command (follow, left, right);
3. the planner, the expert and constant velocity drive the same held-out evaluation seeds, never training seeds;
   the table gives collision rate, success rate, route completion and driving score;
4. a GIF of the planner's first evaluation episode, its planned waypoints drawn in red (`OUTPUT_DIR/videos/`).

    python examples/demo_closed_loop.py                       # outputs/closed_loop_demo
    python examples/demo_closed_loop.py --scenarios highway,merge --train_episodes 8 --eval_episodes 5

The figures of a few episodes are noisy; `benchmarks/bench_closed_loop_driving.py` is the larger run.
"""

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from vlmheads.closed_loop.driving import (
    EVALUATION_SEEDS,
    TRAINING_SEEDS,
    VALIDATION_SEEDS,
    collect,
    evaluate,
    parse_scenarios,
)
from vlmheads.closed_loop.driving_metrics import AGGREGATES
from vlmheads.closed_loop.driving_policies import CONSTANT_VELOCITY, EXPERT
from vlmheads.closed_loop.driving_records import COMMANDS

TRAIN_ORION = Path(__file__).resolve().parent / "train_orion.py"
LABELS = {EXPERT: "expert (IDM + MOBIL)", CONSTANT_VELOCITY: "constant velocity", "planner": "Orion, MLP head"}


@dataclass
class DemoArguments:
    output_dir: str = field(
        default="outputs/closed_loop_demo", metadata={"help": "Records, model, results.json, the GIF."}
    )
    scenarios: str = field(default="highway", metadata={"help": "all, or scenario names separated by commas."})
    train_episodes: int = field(default=4, metadata={"help": "Expert episodes per scenario, training seeds 0 …"})
    eval_episodes: int = field(default=3, metadata={"help": "Closed-loop episodes per scenario and policy."})
    eval_seed: int = field(default=EVALUATION_SEEDS.start, metadata={"help": "First evaluation seed."})
    epochs: float = field(default=5, metadata={"help": "Training epochs."})
    batch_size: int = field(default=8, metadata={"help": "Training batch size (small: more steps on few records)."})
    train_max_steps: int = field(default=-1, metadata={"help": "Training steps, if positive (overrides --epochs)."})
    video: bool = field(default=True, metadata={"help": "A GIF of the planner's first episode per scenario."})


def heading(title: str) -> None:
    print(f"\n== {title}", flush=True)


def train(args: DemoArguments, train_files: list[Path], eval_files: list[Path], folder: Path) -> None:
    """The tiny MLP planner through examples/train_orion.py, its output shown as it runs."""
    command = [sys.executable, str(TRAIN_ORION), "--train_files", *map(str, train_files)]
    command += ["--eval_files", *map(str, eval_files), "--num_modes", str(len(COMMANDS))]
    command += ["--trajectory_head", "mlp", "--compare_flow_planner", "false", "--num_train_epochs", str(args.epochs)]
    command += ["--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.train_max_steps)]
    command += ["--report_to", "none"]
    command += ["--output_dir", str(folder), "--overwrite_output_dir"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def table(results: dict[str, dict]) -> str:
    """The aggregate figures of each policy as a Markdown table."""
    lines = ["| policy | " + " | ".join(name.replace("_", " ") for name in AGGREGATES) + " |"]
    lines.append("|---" * (len(AGGREGATES) + 1) + "|")
    for key, figures in results.items():
        lines.append(f"| {LABELS[key]} | " + " | ".join(f"{figures[name]:.2f}" for name in AGGREGATES) + " |")
    return "\n".join(lines)


def main() -> None:
    description = __doc__.split("\n\n")[0] + " Inputs: none, the expert's records are collected here (schema: "
    description += "vlmheads.data.driving)."
    (args,) = HfArgumentParser(DemoArguments, description=description).parse_args_into_dataclasses()
    names, out = parse_scenarios(args.scenarios), Path(args.output_dir)
    scenarios = ",".join(names)
    heading(f"Closed loop: expert demonstrations in highway-env ({scenarios}; training and validation seeds)")
    train_files = collect(scenarios, args.train_episodes, TRAINING_SEEDS.start, out / "records")
    eval_files = collect(scenarios, 1, VALIDATION_SEEDS.start, out / "records")
    heading("Closed loop: training a tiny Orion MLP planner on them (examples/train_orion.py)")
    folder = out / "planner"
    train(args, train_files, eval_files, folder)
    heading(f"Closed loop: driving {args.eval_episodes} held-out episodes per scenario (seeds from {args.eval_seed})")
    models = {EXPERT: EXPERT, CONSTANT_VELOCITY: CONSTANT_VELOCITY, "planner": str(folder)}
    videos = {"planner": out / "videos"} if args.video else {}
    results = {
        key: evaluate(model, scenarios, args.eval_episodes, args.eval_seed, video_folder=videos.get(key))
        for key, model in models.items()
    }
    markdown = table(results)
    print(markdown)
    summary = {key: {name: result[name] for name in (*AGGREGATES, "num_episodes")} for key, result in results.items()}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown + "\n")
    if args.video:
        gifs = [str(videos["planner"] / f"{name}.gif") for name in names]
        print(f"The planner's first episode, its planned waypoints in red: {', '.join(gifs)}")
    print(f"Figures in {out / 'results.md'} and {out / 'results.json'}.")


if __name__ == "__main__":
    main()
