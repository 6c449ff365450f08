"""The generative planner: `trajectory_head="flow"` on the Orion models, and its flow-matching decoder."""

import pytest
import torch
from orion_helpers import driving_batch, small_model

from vlmheads.modeling.heads import FlowTrajectoryDecoder


def test_the_flow_planner_samples_every_mode_and_the_command_picks_one(family):
    model = small_model(family, trajectory_head="flow", num_modes=3)
    assert isinstance(model.trajectory_decoder, FlowTrajectoryDecoder)
    batch = driving_batch(model.config, batch_size=3)
    command = torch.tensor([2, 0, 1])
    torch.manual_seed(0)
    out = model(**batch, command=command)
    torch.manual_seed(0)
    again = model(**batch, command=command)

    assert out.trajectory_modes.shape == (3, 3, 6, 2)
    torch.testing.assert_close(out.trajectory, out.trajectory_modes[torch.arange(3), command])
    torch.testing.assert_close(again.trajectory_modes, out.trajectory_modes)
    assert not torch.allclose(out.trajectory_modes[:, 0], out.trajectory_modes[:, 1])


def test_the_flow_loss_trains_the_planner_and_reaches_the_driving_modules(family):
    model = small_model(family, trajectory_head="flow", num_modes=2).train()
    batch = driving_batch(model.config)
    out = model(**batch, command=torch.tensor([1, 0]), ego_waypoints=torch.randn(2, 6, 2).cumsum(1))
    torch.testing.assert_close(out.loss, out.waypoint_loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trajectory_decoder.parameters())
    assert model.driving_embeddings.scene_projector.weight.grad.abs().sum() > 0


def test_the_flow_planner_round_trips_with_its_displacement_statistics(family, tmp_path):
    model = small_model(family, trajectory_head="flow", displacement_mean=[1.5, 0.0], displacement_std=[0.5, 0.2])
    model.save_pretrained(tmp_path)
    reloaded = family.model.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded.trajectory_decoder.displacement_std, torch.tensor([0.5, 0.2]))
    batch = driving_batch(model.config)
    torch.manual_seed(3)
    planned = model(**batch).trajectory
    torch.manual_seed(3)
    torch.testing.assert_close(reloaded(**batch).trajectory, planned)


@pytest.mark.slow
def test_the_flow_decoder_learns_a_conditional_plan():
    """Waypoints that depend on the condition: sampled plans land far closer than the mean plan."""
    torch.manual_seed(0)
    features = torch.randn(384, 8)
    speed = 2 + features[:, :1].abs()
    steer = 0.3 * features[:, 1:2]
    steps = torch.stack([speed.expand(-1, 6), steer.expand(-1, 6)], dim=-1)
    waypoints = steps.cumsum(dim=1)
    mean, std = steps.mean(dim=(0, 1)).tolist(), steps.std(dim=(0, 1)).tolist()
    decoder = FlowTrajectoryDecoder(8, [64, 64], 1, 6, 2, "silu", 10, mean, std)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    for _ in range(600):
        index = torch.randint(0, 320, (64,))
        loss = decoder.loss(features[index], waypoints[index], None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = slice(320, 384)
    planned = decoder(features[held_out])[:, 0]
    error = (planned - waypoints[held_out]).norm(dim=-1).mean()
    baseline = (waypoints[:320].mean(0) - waypoints[held_out]).norm(dim=-1).mean()
    assert error < 0.35 * baseline, (error, baseline)
