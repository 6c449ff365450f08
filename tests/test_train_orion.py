"""examples/train_orion.py end to end: learning, resuming, DDP on CPU, LoRA; and the training helpers."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    EvalPrediction,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from vlmheads.offline import (
    qwen2_vl_tokenizer,
    tiny_image_processor_kwargs,
    tiny_orion_model,
    tiny_orion_processor,
    tiny_qwen2_vl_kwargs,
)
from vlmheads.training.orion import DRIVING_MODULES, TrajectoryMetrics, add_lora, freeze_backbone

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_orion.py"
# bitsandbytes' warning when its optional `kernels` package is missing: vlmheads quiets it (peft imports bitsandbytes).
BITSANDBYTES_NOISE = "Failed to load CPU gemm_4bit_forward"
SHORT_RUN = ["--num_train_samples", "128", "--num_eval_samples", "32", "--max_steps", "4", "--disable_tqdm", "true"]
# For the runs that check nothing of the flow-planner twin the tiny models train by default (the demo's learning test
# checks its row; the DDP test keeps it, a second Trainer in the same process group).
NO_FLOW = ["--compare_flow_planner", "false"]


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def run_failing(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode != 0, result.stdout[-2000:]
    return result


def metrics_table(stdout: str) -> dict[str, list[float]]:
    rows = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", stdout, re.M)
    return {name: [float(value) for value in values] for name, *values in rows}


@pytest.mark.slow
def test_the_demo_learns_from_both_the_can_bus_and_the_scene(tmp_path):
    """The learning test: fixed seed, CPU, the script's own defaults (tiny model, synthetic set)."""
    result = run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--disable_tqdm", "true"])
    table = metrics_table(result.stdout)
    l2_3s = {name: values[2] for name, values in table.items()}
    assert set(l2_3s) == {
        "constant velocity (CAN bus)",
        "untrained model",
        "trained model",
        "trained model, scene queries zeroed",
        "trained flow planner (trajectory_head=flow)",
    }
    assert l2_3s["trained model"] <= 0.5 * l2_3s["constant velocity (CAN bus)"], table
    assert l2_3s["trained flow planner (trajectory_head=flow)"] <= 0.5 * l2_3s["constant velocity (CAN bus)"], table
    assert l2_3s["trained model, scene queries zeroed"] >= 1.5 * l2_3s["trained model"], table
    assert l2_3s["untrained model"] > l2_3s["constant velocity (CAN bus)"], table
    assert "reloaded with AutoModel: same plans" in result.stdout

    card = (tmp_path / "README.md").read_text()
    assert "| trained model | " in card and "| constant velocity (CAN bus) | " in card
    assert "![training_report.png](training_report.png)" in card
    assert (tmp_path / "training_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(reloaded).__name__ == "OrionQwenForTrajectory"


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_the_same_loss_curve(tmp_path):
    checkpointing = [*SHORT_RUN[:4], "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4"]
    checkpointing += ["--logging_steps", "1", "--disable_tqdm", "true", *NO_FLOW]
    run([sys.executable, str(SCRIPT), *checkpointing, "--output_dir", str(tmp_path / "full")])
    # The run as if it had stopped after step 4: its folder holds a model, which resuming may replace.
    shutil.copytree(tmp_path / "full", tmp_path / "resumed", ignore=shutil.ignore_patterns("checkpoint-8"))
    resume = ["--resume_from_checkpoint", "True"]
    run([sys.executable, str(SCRIPT), *checkpointing, *resume, "--output_dir", str(tmp_path / "resumed")])

    def losses(folder: str) -> dict[int, float]:
        state = json.loads((tmp_path / folder / "checkpoint-8" / "trainer_state.json").read_text())
        return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}

    full, resumed = losses("full"), losses("resumed")
    assert sorted(full) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), (step, full, resumed)
    # train_loss covers the whole run, not only the resumed steps.
    train_loss = {
        folder: json.loads((tmp_path / folder / "train_results.json").read_text())["train_loss"]
        for folder in ("full", "resumed")
    }
    assert train_loss["resumed"] == pytest.approx(train_loss["full"], rel=1e-5)
    assert train_loss["full"] == pytest.approx(np.mean(list(full.values())), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"],
    ],
    ids=["torchrun", "accelerate"],
)
def test_two_cpu_processes_train_with_ddp_over_gloo(tmp_path, launcher):
    """The README's `torchrun --standalone` and `accelerate launch --multi_gpu` commands (run here, not there)."""
    result = run([sys.executable, *launcher, str(SCRIPT), *SHORT_RUN, "--output_dir", str(tmp_path)])
    for rank in range(2):
        assert f"Process {rank} of 2 finished training (MULTI_CPU)." in result.stdout
    model, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.slow
def test_an_fsdp_config_on_cpu_processes_is_a_clear_error(tmp_path):
    config = ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(SCRIPT)]
    result = subprocess.run(
        [*command, *SHORT_RUN, "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode != 0
    assert "FSDP was requested but accelerate runs this job as MULTI_CPU" in result.stderr


@pytest.mark.slow
def test_fsdp2_shards_the_model_over_two_cpu_processes(tmp_path):
    """torch's FSDP2 runs on gloo (accelerate does not enable it there): the sharded step matches the unsharded."""
    script = ROOT / "tests" / "fsdp2_step.py"
    run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path / "out.pt")]
    )
    result = torch.load(tmp_path / "out.pt")
    assert result["world_size"] == 2 and result["sharded_parameters"] == result["parameters"] > 0
    assert result["losses"][1] == pytest.approx(result["losses"][0], rel=1e-6)
    assert result["max_weight_change"] > 1e-4 and result["max_weight_difference"] < 1e-6


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP through accelerate needs two CUDA GPUs")
def test_fsdp_shards_the_model_over_two_gpus(tmp_path):
    config = ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(SCRIPT)]
    result = run([*command, *SHORT_RUN, "--output_dir", str(tmp_path)])
    for rank in range(2):
        assert f"Process {rank} of 2 finished training (FSDP)." in result.stdout
    assert AutoModel.from_pretrained(tmp_path).config.model_type == "orion_qwen2_vl"


@pytest.mark.slow
def test_lora_with_text_answers_and_activation_checkpointing_trains_and_saves_a_full_model(tmp_path):
    options = ["--lora", "--with_answers", "--activation_checkpointing", "true", "--base_model", "tiny-qwen2_5_vl"]
    result = run([sys.executable, str(SCRIPT), *SHORT_RUN, *NO_FLOW, *options, "--output_dir", str(tmp_path)])
    assert "| trained model |" in result.stdout
    model, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model).__name__ == "OrionQwen2_5ForTrajectory"
    assert not info["missing_keys"] and not any("lora" in key for key in model.state_dict())


@pytest.fixture(scope="module")
def processor():
    return tiny_orion_processor("qwen2_vl", num_scene_queries=4, num_history_queries=3)


def test_lora_adapts_only_the_language_model_and_trains_the_driving_modules(processor):
    model = add_lora(tiny_orion_model(processor))
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    adapters = [name for name in trainable if "lora_" in name]
    assert adapters and all(".language_model." in name for name in adapters)
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} == {re.search(r"\.(\w_proj)\.lora_", n).group(1) for n in adapters}
    others = [name for name in trainable if "lora_" not in name]
    assert others and all(any(module in name for module in DRIVING_MODULES) for name in others)
    assert not any("visual" in name for name in trainable)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "OrionQwenForTrajectory"
    assert set(merged.state_dict()) == set(tiny_orion_model(processor).state_dict())


def test_freezing_stops_gradients_into_the_chosen_parts(processor):
    model = tiny_orion_model(processor)
    freeze_backbone(model, vision_tower=True, language_model=False)
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    freeze_backbone(model, vision_tower=False, language_model=True)
    assert not any(p.requires_grad for p in model.model.language_model.parameters())
    assert all(p.requires_grad for p in model.driving_embeddings.parameters())
    assert all(p.requires_grad for p in model.trajectory_decoder.parameters())


def test_trainer_metrics_read_the_trajectory_among_the_outputs():
    targets = np.zeros((3, 6, 2))
    trajectories = np.ones((3, 6, 2))
    metrics = TrajectoryMetrics()(EvalPrediction(predictions=(np.zeros((3, 7)), trajectories), label_ids=targets))
    assert metrics["ADE"] == pytest.approx(np.sqrt(2))
    with pytest.raises(ValueError, match=r"one prediction shaped like the targets \(3, 6, 2\)"):
        TrajectoryMetrics()(EvalPrediction(predictions=np.zeros((3, 7)), label_ids=targets))


@pytest.mark.slow
def test_a_plain_qwen_folder_is_fine_tuned_and_then_fine_tuned_again(tmp_path):
    tokenizer = qwen2_vl_tokenizer()
    plain = Qwen2VLProcessor(
        Qwen2VLImageProcessor(**tiny_image_processor_kwargs()), tokenizer, Qwen2VLVideoProcessor()
    )
    plain.save_pretrained(tmp_path / "qwen")
    # The checkpoint's vocabulary ends with the Qwen tokens: the four placeholders need new embedding rows.
    Qwen2VLForConditionalGeneration(Qwen2VLConfig(**tiny_qwen2_vl_kwargs(len(tokenizer)))).save_pretrained(
        tmp_path / "qwen"
    )

    run(
        [
            sys.executable,
            str(SCRIPT),
            *SHORT_RUN,
            "--base_model",
            str(tmp_path / "qwen"),
            "--output_dir",
            str(tmp_path / "orion"),
        ]
    )
    model = AutoModel.from_pretrained(tmp_path / "orion")
    assert type(model).__name__ == "OrionQwenForTrajectory"
    assert (
        model.config.text_config.vocab_size == len(tokenizer) + 4 and model.config.ego_token_id == len(tokenizer) + 3
    )

    run(
        [
            sys.executable,
            str(SCRIPT),
            *SHORT_RUN,
            "--base_model",
            str(tmp_path / "orion"),
            "--output_dir",
            str(tmp_path / "again"),
        ]
    )
    again = AutoModel.from_pretrained(tmp_path / "again")
    assert again.config.to_dict()["num_scene_queries"] == model.config.num_scene_queries


@pytest.mark.slow
def test_train_orion_reads_query_counts_and_widths_from_the_records(tmp_path):
    """Collected records train with no size flags: `vlmheads train-orion --train_files DIR/*.parquet`."""
    from vlmheads.data.driving import synthetic_driving_dataset

    sizes = {"num_scene_queries": 6, "num_history_queries": 3, "query_dim": 32, "can_bus_dim": 16}
    (tmp_path / "records").mkdir()
    synthetic_driving_dataset(48, seed=0, **sizes).to_parquet(tmp_path / "records" / "train-0.parquet")
    synthetic_driving_dataset(16, seed=1, **sizes).to_parquet(tmp_path / "records" / "eval-0.parquet")
    files = ["--train_files", str(tmp_path / "records" / "train-0.parquet")]
    files += ["--eval_files", str(tmp_path / "records" / "eval-0.parquet")]
    short = ["--max_steps", "2", "--compare_flow_planner", "false", "--disable_tqdm", "true", "--report_to", "none"]
    run([sys.executable, "-m", "vlmheads", "train-orion", *files, *short, "--output_dir", str(tmp_path / "run")])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["num_scene_queries"], config["num_history_queries"]) == (6, 3)
    assert (config["scene_query_dim"], config["history_query_dim"], config["can_bus_dim"]) == (32, 32, 16)

    wrong = run_failing([sys.executable, "-m", "vlmheads", "train-orion", *files, "--num_scene_queries", "8"])
    assert "--num_scene_queries 8, but the records in --train_files hold 6." in wrong.stderr


@pytest.mark.slow
def test_bitsandbytes_warns_on_this_cpu_unless_vlmheads_is_imported_first():
    """The control for the checks below: without vlmheads, importing bitsandbytes (as peft does for every Trainer)
    prints its missing-kernels warning on this CPU."""
    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=300)
    if BITSANDBYTES_NOISE not in bare.stderr:
        pytest.skip("this CPU lacks AVX512-BF16, where bitsandbytes tries its kernels and warns")
    quiet = subprocess.run(
        [sys.executable, "-c", "import vlmheads, bitsandbytes"], capture_output=True, text=True, timeout=300
    )
    assert quiet.returncode == 0 and BITSANDBYTES_NOISE not in quiet.stderr, quiet.stderr[-2000:]


@pytest.mark.slow
def test_a_run_that_plots_no_sample_still_plots_the_loss_and_checks_the_reload(tmp_path):
    tiny = ["--num_train_samples", "16", "--num_eval_samples", "4", "--max_steps", "1", "--disable_tqdm", "true"]
    tiny += ["--compare_flow_planner", "false", "--report_to", "none"]
    result = run([sys.executable, str(SCRIPT), *tiny, "--num_plotted_samples", "0", "--output_dir", str(tmp_path)])
    assert "reloaded with AutoModel: same plans" in result.stdout
    assert (tmp_path / "training_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert BITSANDBYTES_NOISE not in result.stderr, result.stderr[-2000:]
    # A heading before each phase (the flow planner's phase is off here).
    assert [line for line in result.stdout.splitlines() if line.startswith("== ")] == [
        "== Data and model",
        "== Evaluating the untrained model",
        "== Training",
        "== Evaluating the trained model (and with the scene queries zeroed)",
        "== Saving, reloading with AutoModel, plotting",
    ]

    wrong = run_failing(
        [sys.executable, str(SCRIPT), *tiny, "--num_plotted_samples", "5", "--output_dir", str(tmp_path / "x")]
    )
    assert "--num_plotted_samples 5: expected 0 to 4, the number of evaluation samples." in wrong.stderr
