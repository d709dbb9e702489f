"""Scripted policies, `mirage-env train` and `mirage-env evaluate` on the default world."""

import json

import numpy as np
import pytest

from mirage_env.agents.scripted import POLICIES, WaypointPolicy, make_policy
from mirage_env.cli import main
from mirage_env.geometry import Move


def observation(distance, bearing_degrees, home_turn_degrees=None):
    bearing = np.radians(bearing_degrees)
    obs = {"goal": np.array([distance, np.cos(bearing), np.sin(bearing)], dtype=np.float32)}
    if home_turn_degrees is not None:
        turn = np.radians(home_turn_degrees)
        obs["home_heading"] = np.array([np.cos(turn), np.sin(turn)], dtype=np.float32)
    return obs


def test_waypoint_policy_turns_towards_the_goal_then_walks():
    policy = WaypointPolicy()
    assert policy(observation(2.0, 40.0)) == Move.TURN_RIGHT
    assert policy(observation(2.0, -40.0)) == Move.TURN_LEFT
    assert policy(observation(2.0, 5.0)) == Move.FORWARD
    assert policy(observation(0.05, 90.0)) == Move.STAY  # arrived: nothing left to do in PointNav
    assert policy(observation(0.05, 90.0, home_turn_degrees=-60.0)) == Move.TURN_LEFT  # home: face the start
    assert policy(observation(0.05, 90.0, home_turn_degrees=0.0)) == Move.STAY


def test_waypoint_policy_sidesteps_after_a_collision_and_falls_back_to_random_without_a_goal():
    policy = WaypointPolicy(seed=0)
    escape = [policy(observation(2.0, 0.0), {"collided": True}) for _ in range(5)]
    assert escape[:3] in ([Move.TURN_LEFT] * 3, [Move.TURN_RIGHT] * 3) and escape[3:] == [Move.FORWARD] * 2
    no_goal = [policy({"rgb": None}, {}) for _ in range(50)]
    assert len(set(no_goal)) > 3
    assert "waypoint" in POLICIES and isinstance(make_policy("waypoint", seed=1), WaypointPolicy)


def test_rollout_accepts_the_waypoint_policy(tmp_path):
    assert main(["rollout", "--env", "Mirage/PointNav-v0", "--policy", "waypoint", "--steps", "8", "--out", "",
                 "--quiet"]) == 0


def test_waypoint_beats_random_on_pointnav(tmp_path):
    results = {}
    for policy in ("waypoint", "random"):
        out = tmp_path / f"{policy}.json"
        assert main(["evaluate", "--task", "pointnav", "--policy", policy, "--episodes", "6", "--json", str(out),
                     "--task-option", "max_distance=1.5", "--max-episode-steps", "30", "--quiet"]) == 0
        results[policy] = json.loads(out.read_text())
    assert results["waypoint"]["success"] >= 0.8
    assert results["waypoint"]["success"] > results["random"]["success"]
    assert 0.0 <= results["random"]["spl"] <= results["waypoint"]["spl"] <= 1.0


def test_returning_home_succeeds_more_often_with_memory(tmp_path):
    results = {}
    for flags in ([], ["--no-memory"]):
        out = tmp_path / "home.json"
        assert main(["evaluate", "--task", "returnhome", "--policy", "waypoint", "--episodes", "6", "--json", str(out),
                     "--max-episode-steps", "60", "--seed", "1000", "--quiet", *flags]) == 0
        results[bool(flags)] = json.loads(out.read_text())
    with_memory, without = results[False], results[True]
    assert with_memory["success"] >= 0.8 and with_memory["success"] > without["success"]
    assert with_memory["revisit_psnr"] > without["revisit_psnr"]


@pytest.mark.slow
def test_train_smoke_then_evaluate_the_saved_model(tmp_path):
    model, report = tmp_path / "pointnav", tmp_path / "train.json"
    assert main(["train", "--task", "pointnav", "--timesteps", "256", "--num-envs", "2", "--n-steps", "64",
                 "--batch-size", "64", "--n-epochs", "1", "--out", str(model), "--eval-episodes", "2",
                 "--max-episode-steps", "20", "--json", str(report), "--quiet"]) == 0
    assert model.with_suffix(".safetensors").exists() and model.with_suffix(".json").exists()
    results = json.loads(report.read_text())
    assert results["timesteps"] == 256 and 0.0 <= results["success_trained"] <= 1.0
    video, evaluation = tmp_path / "eval.mp4", tmp_path / "eval.json"
    assert main(["evaluate", "--policy", str(model), "--episodes", "1", "--video", str(video),
                 "--json", str(evaluation), "--quiet"]) == 0
    assert video.exists() and json.loads(evaluation.read_text())["max_episode_steps"] == 20


def test_evaluate_reports_a_missing_model_clearly(capsys):
    assert main(["evaluate", "--policy", "nowhere/model", "--episodes", "1"]) == 2
    assert "mirage-env train" in capsys.readouterr().err
