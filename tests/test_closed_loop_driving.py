"""Closed-loop driving in highway-env: scenarios, records, controller, metrics, JSON contract and bad input."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from highway_env.road.road import Road, RoadNetwork
from highway_env.vehicle.kinematics import Vehicle
from PIL import Image
from transformers import Qwen2VLConfig

from vlmheads.closed_loop._headless import SIM_EXTRA_HINT, import_simulator
from vlmheads.closed_loop.control import WaypointController, point_along
from vlmheads.closed_loop.driving import (
    EVALUATION_SEEDS,
    TRAINING_SEEDS,
    VALIDATION_SEEDS,
    collect,
    drive_episode,
    evaluate,
    figures_of,
    join_figures,
    main,
    save_video,
)
from vlmheads.closed_loop.driving_env import (
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    SCENARIOS,
    DrivenVehicle,
    get_scenario,
    make_env,
)
from vlmheads.closed_loop.driving_metrics import (
    COLLISION_PENALTY,
    OFF_ROAD_PENALTY,
    EpisodeOutcome,
    aggregate,
)
from vlmheads.closed_loop.driving_policies import (
    EXPERT_DART,
    ConstantVelocityPolicy,
    ExpertPlanPolicy,
    ExpertPolicy,
    PerturbedExpertPolicy,
    TrajectoryModelPolicy,
    expert_plan,
)
from vlmheads.closed_loop.driving_records import (
    COMMANDS,
    NUM_HISTORY_QUERIES,
    NUM_SCENE_QUERIES,
    STEPS_PER_WAYPOINT,
    future_waypoints,
    to_ego_frame,
)
from vlmheads.data.driving import load_driving_dataset, synthetic_driving_dataset
from vlmheads.offline import tiny_orion_model, tiny_orion_processor
from vlmheads.processing.collator_orion_qwen import OrionDataCollator


class RecordingPolicy:
    """Constant velocity that also keeps what it was given, to check the observations."""

    name, needs_image = "recording", True

    def __init__(self):
        self.observations = []
        self.inner = ConstantVelocityPolicy()

    def reset(self, seed: int) -> None:
        self.observations.clear()

    def plan(self, observation, ego):
        self.observations.append(observation)
        return self.inner.plan(observation, ego)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_scenario_drives_a_few_steps(name):
    env, policy = make_env(get_scenario(name)), RecordingPolicy()
    rollout = drive_episode(env, name, EVALUATION_SEEDS.start, policy, max_steps=6)
    assert isinstance(env.vehicle, DrivenVehicle) and env.vehicle in env.road.vehicles
    assert len(policy.observations) == rollout.outcome.duration_s * 4 == 6
    observation = policy.observations[-1]
    frame = np.asarray(observation["images"][0])
    assert frame.shape == (IMAGE_HEIGHT, IMAGE_WIDTH, 3) and frame.std() > 5, "the frame must show the road"
    assert observation["scene_queries"].shape == (NUM_SCENE_QUERIES, 256)
    assert observation["scene_queries"][0, 1] == 1.0, "row 0 is the route"
    assert observation["history_queries"][0, 0] == 1.0, "0.5 s of history exists after 6 steps"
    assert observation["command"] in range(len(COMMANDS))
    assert rollout.outcome.distance_m > 5.0 and 0.0 < rollout.outcome.route_completion < 1.0


def test_the_merge_and_roundabout_rewards_do_not_stop_a_continuous_action():
    # Their own rewards raise ValueError under ContinuousAction; ours are replaced.
    for name in ("merge", "roundabout"):
        env = make_env(get_scenario(name))
        env.reset(seed=0)
        env.step(np.zeros(2))


def test_a_missing_simulator_names_the_sim_extra():
    with pytest.raises(ImportError, match="vlmheads\\[sim\\]") as error:
        import_simulator("no_such_simulator_package")
    assert SIM_EXTRA_HINT in str(error.value)


def test_ego_frame_and_future_waypoints():
    heading = np.pi / 2  # driving along +y
    assert np.allclose(to_ego_frame([[0.0, 5.0], [-3.0, 0.0]], np.zeros(2), heading), [[5.0, 0.0], [0.0, 3.0]])
    poses = [(np.array([0.0, 2.5 * step]), heading) for step in range(20)]  # 10 m/s at 4 Hz
    waypoints = future_waypoints(poses, step=3)
    assert np.allclose(waypoints, [[5.0 * k, 0.0] for k in range(1, 7)], atol=1e-5)
    assert future_waypoints(poses, step=8) is None, "the last waypoint would lie past the episode"


def test_point_along_a_path():
    path = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])
    assert np.allclose(point_along(path, 5.0), [3.0, 2.0])
    assert np.allclose(point_along(path, 9.0), [3.0, 6.0]), "extended past the end along the last segment"


def test_the_controller_tracks_a_circular_path():
    """Pure pursuit + PID drive a highway-env car onto a 40 m-radius circle at 12 m/s, from 1 m off it at 8 m/s."""
    radius, speed, dt = 40.0, 12.0, 0.25
    road = Road(RoadNetwork.straight_road_network(1), np_random=np.random.RandomState(0))
    car = Vehicle(road, [0.0, -1.0], heading=0.0, speed=8.0)
    controller = WaypointController(dt=dt)
    centre = np.array([0.0, radius])  # counter-clockwise: a left turn
    errors, speeds = [], []
    for _ in range(80):
        angle = np.arctan2(car.position[1] - centre[1], car.position[0] - centre[0])
        future = angle + speed * np.arange(1, 7) * 0.5 / radius
        path = centre + radius * np.stack([np.cos(future), np.sin(future)], axis=-1)
        acceleration, steering = controller(to_ego_frame(path, car.position, car.heading), car.speed)
        car.act({"acceleration": acceleration * 5.0, "steering": steering * np.pi / 4})
        for _ in range(2):
            car.step(dt / 2)
        errors.append(abs(np.linalg.norm(car.position - centre) - radius))
        speeds.append(car.speed)
    assert max(errors[40:]) < 0.3, f"cross-track error {max(errors[40:]):.2f} m"
    assert abs(np.mean(speeds[40:]) - speed) < 0.3
    assert errors[-1] < errors[0]


def test_the_controller_steers_towards_the_waypoints_and_refuses_bad_ones():
    controller = WaypointController(dt=0.25)
    left = np.stack([np.arange(1, 7) * 5.0, np.linspace(0.5, 4.0, 6)], axis=-1)
    assert controller(left, 10.0)[1] > 0 > controller(left * [1, -1], 10.0)[1]
    with pytest.raises(ValueError, match="waypoints must be a finite"):
        controller(np.full((6, 2), np.nan), 10.0)


def test_driving_score_and_aggregates_of_hand_made_outcomes():
    def outcome(collision=False, off_road=0, completion=1.0):
        return EpisodeOutcome("highway", 0, collision, off_road, completion, 100.0, 20.0, 10.0)

    clean, crash, wander = outcome(), outcome(collision=True, completion=0.5), outcome(off_road=2)
    assert clean.success and not crash.success and not wander.success
    assert crash.driving_score == pytest.approx(0.5 * COLLISION_PENALTY)
    assert wander.driving_score == pytest.approx(OFF_ROAD_PENALTY**2)
    figures = aggregate([clean, crash, wander, outcome(completion=0.8)])
    assert figures["collision_rate"] == pytest.approx(0.25)
    assert figures["success_rate"] == pytest.approx(0.25)
    assert figures["route_completion"] == pytest.approx((1 + 0.5 + 1 + 0.8) / 4)
    assert figures["driving_score"] == pytest.approx((1 + 0.3 + 0.4225 + 0.8) / 4)
    with pytest.raises(ValueError, match="route_completion"):
        outcome(completion=1.5)
    with pytest.raises(ValueError, match="No episodes"):
        aggregate([])


def test_evaluations_on_consecutive_seeds_join_into_one():
    def outcome(scenario, seed, collision):
        return EpisodeOutcome(scenario, seed, collision, 0, 0.5 if collision else 1.0, 80.0, 20.0, 4.0)

    names = ["merge", "highway"]
    seeds = {"first": [100000, 100001], "rest": [100002]}
    parts = {
        part: figures_of("mlp", names, [outcome(name, seed, seed % 2 == 1) for name in names for seed in chosen])
        for part, chosen in seeds.items()
    }
    whole = figures_of(
        "mlp", names, [outcome(name, seed, seed % 2 == 1) for name in names for seed in range(100000, 100003)]
    )
    joined = json.loads(json.dumps(join_figures([parts["first"], parts["rest"]])))
    assert joined == json.loads(json.dumps(whole))
    assert joined["seeds"] == [100000, 100002] and joined["num_episodes"] == 6
    assert joined["collision_rate"] == pytest.approx(2 / 6)
    assert [(e["scenario"], e["seed"]) for e in joined["episodes"]][:3] == [
        ("merge", s) for s in range(100000, 100003)
    ]
    with pytest.raises(ValueError, match="must follow on"):
        join_figures([parts["rest"], parts["first"]])
    with pytest.raises(ValueError, match="one model"):
        join_figures([parts["first"], {**parts["rest"], "model": "flow"}])


def test_figures_refuse_episodes_that_do_not_cover_the_same_seeds_in_every_scenario():
    def outcome(scenario, seed):
        return EpisodeOutcome(scenario, seed, False, 0, 1.0, 80.0, 20.0, 4.0)

    names = ["merge", "highway"]
    with pytest.raises(ValueError, match="No episodes of 'mlp'"):
        figures_of("mlp", names, [])
    with pytest.raises(ValueError, match=r"scenarios \['roundabout'\], which are not among"):
        figures_of("mlp", names, [outcome(name, 100000) for name in (*names, "roundabout")])
    with pytest.raises(ValueError, match=r"in merge must cover .* seeds \[100001\] are missing"):
        figures_of("mlp", names, [outcome("merge", 100000), outcome("highway", 100000), outcome("highway", 100001)])
    with pytest.raises(ValueError, match=r"in highway must cover .* seeds \[100000\] repeated"):
        figures_of("mlp", names, [outcome("merge", 100000), outcome("highway", 100000), outcome("highway", 100000)])
    shuffled = [outcome(name, seed) for seed in (100001, 100000) for name in ("highway", "merge")]
    listed = [(episode["scenario"], episode["seed"]) for episode in figures_of("mlp", names, shuffled)["episodes"]]
    assert listed == [(name, seed) for name in names for seed in (100000, 100001)]

    # A part whose header names both scenarios but which holds the episodes of one (a run cut short, a file edited)
    # does not join; nor does a part that drove seeds the one before it drove.
    first = figures_of("mlp", names, [outcome(name, seed) for name in names for seed in (100000, 100001)])
    rest = figures_of("mlp", names, [outcome(name, 100002) for name in names])
    cut = {**rest, "episodes": [episode for episode in rest["episodes"] if episode["scenario"] == "highway"]}
    with pytest.raises(ValueError, match=r"in merge must cover each of the seeds 100000…100002 once"):
        join_figures([first, cut])
    overlapping = {**rest, "episodes": rest["episodes"] + [first["episodes"][-1]]}
    with pytest.raises(ValueError, match=r"in highway .* seeds \[100001\] repeated"):
        join_figures([first, overlapping])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_an_episode_depends_on_its_seed_not_on_the_episodes_driven_before(name):
    # join_figures' premise: evaluating seeds a…b, then b+1…c, in two runs equals evaluating a…c in one.
    seed = EVALUATION_SEEDS.start
    used = make_env(get_scenario(name))
    drive_episode(used, name, seed, ExpertPolicy(), max_steps=15)
    after = drive_episode(used, name, seed + 1, ExpertPolicy(), max_steps=15).outcome
    fresh = drive_episode(make_env(get_scenario(name)), name, seed + 1, ExpertPolicy(), max_steps=15).outcome
    assert after == fresh and after.distance_m > 10.0


def test_an_episode_of_no_steps_is_refused():
    # Its mean speed would be NaN; the refusal comes before the simulator is touched.
    with pytest.raises(ValueError, match="max_steps must be a positive number of policy steps, got 0"):
        drive_episode(None, "highway", EVALUATION_SEEDS.start, ConstantVelocityPolicy(), max_steps=0)


def load_closed_loop_benchmark() -> dict:
    """The globals of benchmarks/bench_closed_loop_driving.py, run as a module (not as a script)."""
    return runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_closed_loop_driving.py"))


@pytest.mark.parametrize("rows", ["untrained", "untrained=0", "untrained=x", "expert-plan=2,ceiling=3"])
def test_the_closed_loop_benchmark_refuses_a_bad_row_episodes(rows):
    bench = load_closed_loop_benchmark()
    args = bench["BenchmarkArguments"](row_episodes=rows)
    with pytest.raises(ValueError, match=r"--row_episodes takes ROW=N,\.\.\. .* got '"):
        bench["episodes_of"](args, "untrained")
    good = bench["BenchmarkArguments"](row_episodes="untrained=3, expert-plan=2", eval_episodes=7)
    assert [bench["episodes_of"](good, key) for key in ("untrained", "expert-plan", "mlp")] == [3, 2, 7]


def test_the_closed_loop_benchmark_computes_open_loop_rows_afresh_on_other_validation_files(tmp_path):
    bench = load_closed_loop_benchmark()
    files = [tmp_path / "first.parquet", tmp_path / "second.parquet"]
    for seed, file in enumerate(files):
        synthetic_driving_dataset(8, seed=seed, with_answers=False).to_parquet(file)
    kept = tmp_path / "open_loop.json"
    first = bench["open_loop"]({}, files[:1], kept)
    assert bench["open_loop"]({}, files[:1], kept) == first
    second = bench["open_loop"]({}, files[1:], kept)
    constant_velocity = bench["CONSTANT_VELOCITY"]
    assert second[constant_velocity]["L2@3s"] != pytest.approx(first[constant_velocity]["L2@3s"])
    assert json.loads(kept.read_text())["validation_files"] == ["second.parquet"]


def test_the_closed_loop_demo_describes_itself(capsys, monkeypatch):
    script = Path(__file__).resolve().parents[1] / "examples" / "demo_closed_loop.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(script), run_name="__main__")
    text = " ".join(capsys.readouterr().out.split())
    assert "Closed-loop driving demo: does a tiny Orion planner drive?" in text and "Inputs:" in text


@pytest.mark.slow
def test_collected_records_follow_the_driving_schema_and_train_a_model(tmp_path):
    (path,) = collect("intersection", 1, VALIDATION_SEEDS.start, tmp_path)
    assert path.parent.name == "validation" and path.suffix == ".parquet"
    records = load_driving_dataset(str(path))  # checks every record against the schema
    assert len(records) >= 5
    record = records[0]
    assert np.shape(record["scene_queries"]) == (NUM_SCENE_QUERIES, 256)
    assert np.shape(record["history_queries"]) == (NUM_HISTORY_QUERIES, 256)
    assert len(record["can_bus"]) == 89 and record["can_bus"][0] > 1.0, "CAN bus 0 is the speed"
    assert record["images"][0].size == (IMAGE_WIDTH, IMAGE_HEIGHT)
    # The expert drives forwards: the waypoints lie ahead, further each half second.
    assert (np.diff(np.asarray(record["ego_waypoints"])[:, 0]) > 0).all()

    processor = tiny_orion_processor(num_scene_queries=NUM_SCENE_QUERIES, num_history_queries=NUM_HISTORY_QUERIES)
    model = tiny_orion_model(processor, num_modes=len(COMMANDS))
    batch = OrionDataCollator(processor, with_answers=False)([records[index] for index in range(3)])
    output = model.train()(**batch)
    assert output.trajectory.shape == (3, 6, 2) and torch.isfinite(output.loss)
    assert batch["command"].tolist() == [records[index]["command"] for index in range(3)]

    # The policy plans through the model's pipeline with the same prompt tokens the collator trained on.
    policy = TrajectoryModelPolicy(model.eval(), processor)
    sample = {name: record[name] for name in ("images", "scene_queries", "history_queries", "can_bus", "command")}
    piped = policy.planner.preprocess(sample)
    single = OrionDataCollator(processor, with_answers=False)([record])
    assert piped["input_ids"].tolist() == single["input_ids"].tolist()
    assert policy.plan(record, None).shape == (6, 2)


def test_collection_and_evaluation_seeds_are_disjoint(tmp_path):
    assert not set(TRAINING_SEEDS) & set(EVALUATION_SEEDS) and not set(VALIDATION_SEEDS) & set(EVALUATION_SEEDS)
    with pytest.raises(ValueError, match="Demonstration seeds"):
        collect("highway", 2, EVALUATION_SEEDS.start, tmp_path)
    with pytest.raises(ValueError, match="Evaluation seeds"):
        evaluate("expert", "highway", 1, TRAINING_SEEDS.start, tmp_path / "figures.json")
    with pytest.raises(ValueError, match="seeds"):
        collect("highway", 2, VALIDATION_SEEDS.start - 1, tmp_path)  # straddles two splits
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("scenario", "episodes", "message"),
    [("motorway", 1, "Unknown driving scenario 'motorway'"), ("highway", 0, "episodes must be a positive")],
)
def test_bad_scenario_or_episode_count_writes_nothing(tmp_path, scenario, episodes, message):
    with pytest.raises(ValueError, match=message):
        collect(scenario, episodes, 0, tmp_path / "records")
    with pytest.raises(ValueError, match=message):
        main(
            ["evaluate", "--model", "expert", "--scenario", scenario, "--episodes", str(episodes)]
            + ["--json", str(tmp_path / "figures.json")]
        )
    assert not any(tmp_path.iterdir())


def test_a_folder_that_is_not_a_trajectory_model_is_refused(tmp_path):
    Qwen2VLConfig().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a trajectory model"):
        evaluate(str(tmp_path / "plain"), "highway", 1, EVALUATION_SEEDS.start, tmp_path / "figures.json")
    with pytest.raises(ValueError, match="not a model folder"):
        evaluate(str(tmp_path / "nothing"), "highway", 1, EVALUATION_SEEDS.start, tmp_path / "figures.json")
    assert not (tmp_path / "figures.json").exists()


@pytest.mark.slow
def test_evaluate_writes_the_json_contract(tmp_path, capsys):
    path = tmp_path / "figures.json"
    main(["evaluate", "--model", "expert", "--scenario", "intersection", "--episodes", "1", "--json", str(path)])
    figures = json.loads(path.read_text())
    for name in ("collision_rate", "success_rate", "route_completion", "driving_score"):
        assert 0.0 <= figures[name] <= 1.0
    assert figures["num_episodes"] == len(figures["episodes"]) == 1
    episode = figures["episodes"][0]
    assert episode["seed"] == EVALUATION_SEEDS.start and episode["scenario"] == "intersection"
    assert {"collision", "off_road_events", "route_completion", "distance_m", "mean_speed"} <= set(episode)
    assert figures["driving_score"] == pytest.approx(episode["driving_score"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == "expert"


def test_the_expert_completes_an_intersection_route():
    env = make_env(get_scenario("intersection"))
    expert = drive_episode(env, "intersection", EVALUATION_SEEDS.start, ExpertPolicy()).outcome
    assert expert.route_completion == 1.0 and not expert.collision and expert.success


def assert_a_gif_with_red_plans(path):
    gif = Image.open(path)
    assert gif.n_frames > 1 and gif.size == (IMAGE_WIDTH * 4, IMAGE_HEIGHT * 4)
    assert np.all(np.asarray(gif.convert("RGB")) == (230, 30, 30), axis=-1).sum() > 0


def test_save_video_draws_each_plan_in_red(tmp_path):
    assert_a_gif_with_red_plans(
        save_video(ConstantVelocityPolicy(), "intersection", EVALUATION_SEEDS.start, tmp_path / "cv.gif")
    )


def test_evaluate_films_the_first_episode_of_each_scenario(tmp_path):
    videos, path = tmp_path / "videos", tmp_path / "figures.json"
    main(
        ["evaluate", "--model", "constant-velocity", "--scenario", "intersection", "--episodes", "2"]
        + ["--json", str(path), "--videos", str(videos)]
    )
    assert json.loads(path.read_text())["num_episodes"] == 2
    assert [file.name for file in videos.iterdir()] == ["intersection.gif"]
    assert_a_gif_with_red_plans(videos / "intersection.gif")


def test_the_expert_plan_is_the_future_the_expert_then_drives():
    """`expert_plan` simulates a copy of the road: the real road is untouched, and when the expert then drives, its
    next six poses (at 0.5 s) are the plan."""
    env = make_env(get_scenario("highway"))
    rollout = drive_episode(env, "highway", EVALUATION_SEEDS.start, ExpertPolicy(), max_steps=4)
    ego, before = env.vehicle, [vehicle.position.copy() for vehicle in env.road.vehicles]
    pose = (ego.position.copy(), ego.heading)
    plan = expert_plan(ego)
    after = [vehicle.position for vehicle in env.road.vehicles]
    assert all(np.array_equal(a, b) for a, b in zip(after, before, strict=True)), "the real road must not move"
    poses = [pose]
    for _ in range(6 * STEPS_PER_WAYPOINT):
        env.step(None)
        poses.append((ego.position.copy(), ego.heading))
    assert not rollout.outcome.collision and plan.shape == (6, 2) and plan[-1, 0] > 30.0
    assert np.allclose(plan, future_waypoints(poses, 0), atol=1e-3)


def test_dart_noise_perturbs_the_expert_reproducibly_and_refuses_bad_settings():
    def final_position(policy):
        env = make_env(get_scenario("highway"))
        drive_episode(env, "highway", EVALUATION_SEEDS.start, policy, max_steps=12)
        return env.vehicle.position.copy()

    clean, noisy = final_position(ExpertPolicy()), final_position(PerturbedExpertPolicy())
    assert not np.allclose(clean, noisy, atol=0.05), "the noise must move the car"
    assert np.array_equal(noisy, final_position(PerturbedExpertPolicy())), "the episode seed fixes the noise"
    with pytest.raises(ValueError, match="correlation"):
        PerturbedExpertPolicy(correlation=1.0)


@pytest.mark.parametrize("driver", [PerturbedExpertPolicy(), ExpertPlanPolicy()])
def test_records_of_another_driver_are_labelled_with_the_expert_plan(driver):
    env = make_env(get_scenario("merge"))
    rollout = drive_episode(env, "merge", TRAINING_SEEDS.start, driver, record=True, max_steps=5)
    assert [record["id"] for record in rollout.records] == [f"merge-0-{step}" for step in (0, 2, 4)]
    for record in rollout.records:
        waypoints = record["ego_waypoints"]
        assert waypoints.shape == (6, 2) and (np.diff(waypoints[:, 0]) > 0).all(), "the expert plans forwards"


def test_dagger_aggregation_labels_the_states_a_model_visits(tmp_path):
    """One DAgger step on two short episodes: an (untrained) planner drives, the expert's plans label its states,
    and the records train the model."""
    processor = tiny_orion_processor(num_scene_queries=NUM_SCENE_QUERIES, num_history_queries=NUM_HISTORY_QUERIES)
    model = tiny_orion_model(processor, num_modes=len(COMMANDS))
    policy, env = TrajectoryModelPolicy(model, processor, name="learner"), make_env(get_scenario("highway"))
    records = []
    for seed in (TRAINING_SEEDS.start, TRAINING_SEEDS.start + 1):
        records += drive_episode(env, "highway", seed, policy, record=True, max_steps=3).records
    assert len(records) == 4
    # The untrained planner crawls; the expert's plan from its states keeps the road's pace.
    assert all(record["ego_waypoints"][-1, 0] > 20.0 for record in records)
    batch = OrionDataCollator(processor, with_answers=False)(
        [{**record, "ego_waypoints": np.asarray(record["ego_waypoints"])} for record in records]
    )
    assert torch.isfinite(model.train()(**batch).loss)


@pytest.mark.slow
def test_collect_with_a_dart_driver_names_its_file_after_the_driver(tmp_path):
    (path,) = collect("intersection", 1, TRAINING_SEEDS.start, tmp_path, driver=EXPERT_DART)
    assert path.name == f"intersection-{EXPERT_DART}-seeds-0-0.parquet" and path.parent.name == "train"
    records = load_driving_dataset(str(path))
    assert len(records) >= 5 and (np.diff(np.asarray(records[0]["ego_waypoints"])[:, 0]) > 0).all()
