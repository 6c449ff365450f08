"""Meta-World closed loop: expert demonstrations in the LeRobot layout, the evaluator's figures, its JSON contract,
short episodes of the expert, the random policy, tiny VLA and π0 folders, the blind ablations, and bad input."""

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image
from vla_helpers import FAST_FAMILY, make_model, processor_of

from vlmheads.closed_loop._headless import SIM_EXTRA_HINT, import_simulator
from vlmheads.closed_loop.manipulation import (
    HELD_OUT_SEED,
    VIDEO_SCALE,
    EpisodeOutcome,
    collect,
    evaluate,
    main,
    success_table,
    write_video,
)
from vlmheads.closed_loop.manipulation_env import INSTRUCTIONS, OBSERVATIONS, PROPRIOCEPTION, MetaWorldEpisode
from vlmheads.closed_loop.manipulation_policies import BLIND_IMAGE, BLIND_WORLD, Observation, make_policy
from vlmheads.data.manipulation import BACKGROUND, load_lerobot_episodes
from vlmheads.processing.collator_vla import PI0DataCollator, VLADataCollator
from vlmheads.registry.vlms import create_vlm, load_processor


def save_tiny_policy(folder: Path, action_head: str, observation: str, action_dim: int = 4) -> Path:
    """A tiny untrained VLA (or π0, `action_head="pi0"`) with 4-D actions in chunks of 4, reading the setting's
    state; the state statistics are not centred on zero, so that a blanked entry differs from a zero."""
    width = OBSERVATIONS[observation]
    state_mean = [0.1 * (index + 1) for index in range(width)]
    if action_head == "pi0":
        processor = load_processor("pi0", tiny=True)
        processor.state_mean, processor.state_std = state_mean, [1.0] * width
        processor.actions_mean, processor.actions_std = [0.0] * action_dim, [1.0] * action_dim
        create_vlm("pi0", tiny=True).save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder
    statistics = {"state_mean": state_mean, "state_std": [1.0] * width} if width else {}
    settings = {"action_dim": action_dim, "chunk_size": 4, "state_dim": width, **statistics}
    make_model(FAST_FAMILY, action_head, **settings).save_pretrained(folder)
    processor_of(FAST_FAMILY).save_pretrained(folder)
    return folder


def test_success_table_on_hand_made_outcomes():
    outcomes = [
        EpisodeOutcome("reach-v3", 1, True, 40),
        EpisodeOutcome("reach-v3", 2, True, 60),
        EpisodeOutcome("reach-v3", 3, False, 150),
        EpisodeOutcome("push-v3", 1, False, 150),
        EpisodeOutcome("push-v3", 2, True, 90),
        EpisodeOutcome("drawer-open-v3", 1, False, 150),
    ]
    table = success_table(outcomes, ["reach-v3", "push-v3", "drawer-open-v3"])
    assert table["success_rate"] == {"reach-v3": pytest.approx(2 / 3), "push-v3": 0.5, "drawer-open-v3": 0.0}
    assert table["mean_success_rate"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert table["episodes"] == {"reach-v3": 3, "push-v3": 2, "drawer-open-v3": 1}
    assert table["mean_steps_to_success"] == {"reach-v3": 50.0, "push-v3": 90.0, "drawer-open-v3": None}
    with pytest.raises(ValueError, match="door-open-v3"):
        success_table(outcomes, ["reach-v3", "door-open-v3"])


@pytest.mark.slow
@pytest.mark.parametrize("observation", list(OBSERVATIONS))
def test_collected_demonstrations_read_back_as_lerobot_episodes(observation, tmp_path):
    out = tmp_path / "demos"
    summary = collect("reach-v3,push-v3", episodes=1, seed=3, out=out, observation=observation, max_steps=12)
    assert summary == {"episodes": 2, "frames": 24, "expert_success_rate": 0.0}
    files = sorted(str(path) for path in out.glob("data/chunk-000/*.parquet"))
    assert len(files) == 2
    records = load_lerobot_episodes(files, chunk_size=4)
    assert len(records) == 24
    assert {record["instruction"] for record in records} == {INSTRUCTIONS["reach-v3"], INSTRUCTIONS["push-v3"]}
    first = records[0]
    assert first["images"][0].size == (64, 64)
    assert len(first.get("state") or []) == OBSERVATIONS[observation]
    actions = np.asarray(first["actions"])
    assert actions.shape == (4, 4) and np.abs(actions).max() <= 1.0
    # The last frame's chunk repeats its action past the episode's end.
    last = np.asarray(records[11]["actions"])
    assert np.allclose(last, last[0])
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 2 and info["total_frames"] == 24
    assert info["features"].get("observation.state", {"shape": [0]})["shape"] == [OBSERVATIONS[observation]]
    episodes = [json.loads(line) for line in (out / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert [(episode["metaworld_task"], episode["seed"], episode["length"]) for episode in episodes] == [
        ("reach-v3", 3, 12),
        ("push-v3", 3, 12),
    ]


@pytest.mark.slow
def test_the_expert_succeeds_where_the_random_policy_fails_and_the_json_holds_the_contract(tmp_path):
    path = tmp_path / "results" / "expert.json"
    expert = evaluate("expert", "reach-v3,push-v3", episodes=2, seed=100_000, json_path=path)
    written = json.loads(path.read_text())
    assert written["success_rate"] == {"reach-v3": 1.0, "push-v3": 1.0} == expert["success_rate"]
    assert written["mean_success_rate"] == 1.0
    assert [outcome["seed"] for outcome in written["outcomes"]] == [100_000, 100_001] * 2
    assert all(outcome["steps"] < 150 for outcome in written["outcomes"])
    random = evaluate("random", "push-v3", episodes=2, seed=100_000)
    assert random["success_rate"] == {"push-v3": 0.0} and random["mean_success_rate"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("action_head", "observation"),
    [("regression", "image-goal"), ("flow", "full"), ("tokens", "image"), ("pi0", "full")],
)
def test_a_model_folder_runs_closed_loop_with_and_without_its_image(action_head, observation, tmp_path):
    folder = save_tiny_policy(tmp_path / "policy", action_head, observation)
    videos = tmp_path / "videos"
    for blind in (None, BLIND_WORLD):
        json_path = tmp_path / f"blind-{blind}.json"
        result = evaluate(folder, ["reach-v3"], 2, 100_000, json_path, blind=blind, max_steps=6, video_folder=videos)
        assert result["observation"] == observation and result["blind"] == blind
        # An untrained model does not reach the goal in 6 steps: every episode runs to the limit.
        assert [outcome["steps"] for outcome in result["outcomes"]] == [6, 6]
        assert json.loads(json_path.read_text())["success_rate"] == {"reach-v3": 0.0}
    assert (videos / "reach-v3.mp4").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("action_head", ["regression", "pi0"])
def test_blind_policies_see_a_blank_frame_and_world_blind_ones_only_proprioception(action_head, tmp_path, monkeypatch):
    folder = save_tiny_policy(tmp_path / "policy", action_head, "full")
    collator = PI0DataCollator if action_head == "pi0" else VLADataCollator
    seen = []
    collate = collator.__call__
    monkeypatch.setattr(collator, "__call__", lambda self, records: seen.append(records) or collate(self, records))
    episode = MetaWorldEpisode("push-v3", HELD_OUT_SEED, "full")
    frame = Image.new("RGB", (64, 64), (200, 10, 10))
    try:
        for blind in (None, BLIND_IMAGE, BLIND_WORLD):
            policy = make_policy(folder, 0, blind=blind)
            # No frame is rendered for a blind policy: it is handed none.
            assert policy.needs_images == (blind is None)
            actions = policy.act([Observation(episode, frame if policy.needs_images else None)])
            assert actions.shape == (1, 4, 4) and np.isfinite(actions).all()
    finally:
        episode.close()
    (seeing,), (image_blind,), (world_blind,) = seen
    assert np.asarray(seeing["images"][0]).tolist() == np.asarray(frame).tolist()
    assert np.array_equal(seeing["state"], episode.state) and np.array_equal(image_blind["state"], episode.state)
    for record in (image_blind, world_blind):
        assert (np.asarray(record["images"][0]) == BACKGROUND).all()
    state_mean = np.asarray([0.1 * (index + 1) for index in range(OBSERVATIONS["full"])], dtype=np.float32)
    assert np.array_equal(world_blind["state"][:PROPRIOCEPTION], episode.state[:PROPRIOCEPTION])
    assert np.allclose(world_blind["state"][PROPRIOCEPTION:], state_mean[PROPRIOCEPTION:])
    assert not np.allclose(episode.state[PROPRIOCEPTION:], state_mean[PROPRIOCEPTION:])


@pytest.mark.slow
def test_the_command_line_collects_and_evaluates(tmp_path, capsys):
    main(["collect", "--tasks", "reach-v3", "--episodes", "1", "--seed", "0", "--out", str(tmp_path / "d")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["episodes"] == 1
    json_path = tmp_path / "expert.json"
    main(
        ["evaluate", "--model", "expert", "--tasks", "reach-v3", "--episodes", "1", "--seed", "9"]
        + ["--json", str(json_path)]
    )
    assert "| reach-v3 | 1.00 |" in capsys.readouterr().out
    assert json.loads(json_path.read_text())["mean_success_rate"] == 1.0


def test_episode_videos_hold_every_frame_enlarged(tmp_path):
    # The fast test that reaches the sim extra's imageio (and imageio-ffmpeg for MP4) in the lowest-versions job.
    frames = [Image.new("RGB", (8, 6), (40 * index + 20, 0, 0)) for index in range(3)]
    for suffix in (".gif", ".mp4"):
        write_video(frames, tmp_path / f"episode{suffix}")
        read = imageio.mimread(tmp_path / f"episode{suffix}")
        assert [frame.shape[:2] for frame in read] == [(6 * VIDEO_SCALE, 8 * VIDEO_SCALE)] * 3
        np.testing.assert_allclose([frame[0, 0, 0] for frame in read], [20, 60, 100], atol=3)


def test_bad_input_raises_and_writes_nothing(tmp_path):
    out, json_path = tmp_path / "demos", tmp_path / "result.json"
    with pytest.raises(ValueError, match="Unknown Meta-World task.*'stack-v3'"):
        collect("reach-v3,stack-v3", 1, 0, out)
    with pytest.raises(ValueError, match="Unknown Meta-World task.*'stack-v3'"):
        evaluate("expert", "stack-v3", 1, 0, json_path)
    with pytest.raises(ValueError, match="episodes must be a positive integer, got 0"):
        collect("reach-v3", 0, 0, out)
    with pytest.raises(ValueError, match="episodes must be a positive integer, got 0"):
        evaluate("random", "reach-v3", 0, 0, json_path)
    with pytest.raises(ValueError, match="Unknown observation setting 'goal'"):
        collect("reach-v3", 1, 0, out, observation="goal")
    with pytest.raises(ValueError, match="is not a model folder"):
        evaluate(tmp_path / "missing", "reach-v3", 1, 0, json_path)
    backbone_folder = tmp_path / "backbone"
    create_vlm(FAST_FAMILY, tiny=True).save_pretrained(backbone_folder)
    with pytest.raises(ValueError, match="holds a 'paligemma' model, not an action model"):
        evaluate(backbone_folder, "reach-v3", 1, 0, json_path)
    with pytest.raises(ValueError, match="the expert policy reads none"):
        evaluate("expert", "reach-v3", 1, 0, json_path, blind=BLIND_IMAGE)
    with pytest.raises(ValueError, match="seeds from 100000 on are held out for evaluation"):
        collect("reach-v3", 2, HELD_OUT_SEED - 1, out)
    assert not out.exists() and not json_path.exists()
    (out / "old").mkdir(parents=True)
    with pytest.raises(ValueError, match="exists and is not empty"):
        collect("reach-v3", 1, 0, out)
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_a_model_with_another_state_width_is_refused(tmp_path):
    folder = tmp_path / "policy"
    make_model(FAST_FAMILY, "regression", action_dim=4, chunk_size=4, state_dim=7).save_pretrained(folder)
    with pytest.raises(ValueError, match="reads a state of 7 values; a Meta-World policy here reads 21 \\(full\\)"):
        evaluate(folder, "reach-v3", 1, 0)
    seven_d = tmp_path / "seven"
    make_model(FAST_FAMILY, "regression", action_dim=7, state_dim=18).save_pretrained(seven_d)
    with pytest.raises(ValueError, match="predicts 7-D actions; Meta-World takes 4-D actions"):
        evaluate(seven_d, "reach-v3", 1, 0)
    seven_d_pi0 = save_tiny_policy(tmp_path / "pi0", "pi0", "full", action_dim=7)
    with pytest.raises(ValueError, match="predicts 7-D actions; Meta-World takes 4-D actions"):
        evaluate(seven_d_pi0, "reach-v3", 1, 0)


def test_a_missing_simulator_names_the_sim_extra():
    with pytest.raises(ImportError, match=SIM_EXTRA_HINT.replace("[", "\\[").replace("]", "\\]")):
        import_simulator("vlmheads_no_such_simulator")


def test_a_collection_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    import vlmheads.closed_loop.manipulation as manipulation

    calls = []

    def failing_episode(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("simulator crashed")
        return {
            "observation.images.corner": [np.zeros((64, 64, 3), dtype=np.uint8)],
            "observation.state": [[0.0] * 18],
            "action": [[0.0] * 4],
            "next.success": [False],
        }

    monkeypatch.setattr(manipulation, "_episode_frames", failing_episode)
    with pytest.raises(RuntimeError, match="simulator crashed"):
        collect("reach-v3", 2, 0, tmp_path / "demos")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []
