"""Trained policies load without pickle; a foreign SB3 zip needs an explicit opt-in; tampering is caught."""

import json
import pickle
import zipfile

import numpy as np
import pytest
from gymnasium import spaces

from mirage_env.agents.evaluate import load_policy, make_env
from mirage_env.agents.policy_file import (PolicyFileError, load_policy_file, policy_paths, save_policy, space_from_json,
                                           space_to_json)
from mirage_env.cli import main

OPTIONS = {"task": "pointnav", "image_size": 40, "max_episode_steps": 5}
KWARGS = {"net_arch": [8], "features_extractor_kwargs": {"cnn_output_dim": 8}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from stable_baselines3 import PPO

    env = make_env(**OPTIONS)
    model = PPO("MultiInputPolicy", env, policy_kwargs=KWARGS, n_steps=8, batch_size=8, device="cpu", seed=0)
    path = tmp_path_factory.mktemp("policy") / "nav"
    save_policy(model, path, env.config.options(), KWARGS)
    return model, path, env


def test_a_saved_policy_acts_as_the_model_did(saved):
    model, path, env = saved
    policy, options = load_policy_file(path)
    assert options["image_size"] == 40 and options["task"] == "pointnav"
    observation, _ = env.reset(seed=3)
    for _ in range(4):
        expected = model.predict(observation, deterministic=True)[0]
        assert int(policy.predict(observation, deterministic=True)[0]) == int(expected)
        observation, *_ = env.step(int(expected))
    # NAME, NAME.json and NAME.safetensors name the same policy.
    for spec in (str(path), str(path) + ".json", str(path) + ".safetensors"):
        assert load_policy(spec)[1]["image_size"] == 40


def copy_policy(path, tmp_path):
    weights, spec = policy_paths(path)
    out = tmp_path / "copy"
    (tmp_path / "copy.safetensors").write_bytes(weights.read_bytes())
    (tmp_path / "copy.json").write_text(spec.read_text())
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(policy_class="os.system"), "policy_class"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d["policy_kwargs"].update(net_arch=[16]), "does not fit"),
    (lambda d: d["policy_kwargs"].update(activation_fn="torch.nn.ReLU"), "does not allow"),
    (lambda d: d["observation_space"]["spaces"]["rgb"].update(shape=[3, 36]), "does not fit|cannot build"),
    (lambda d: d["action_space"].update(n="nine"), "action_space"),
    (lambda d: d["weights"].update(sha256="0" * 64), "sha256"),
    (lambda d: d.pop("env"), "env"),
])
def test_a_tampered_policy_spec_is_refused_by_field(saved, tmp_path, edit, message):
    path = copy_policy(saved[1], tmp_path)
    document = json.loads(path.with_suffix(".json").read_text())
    edit(document)
    path.with_suffix(".json").write_text(json.dumps(document))
    with pytest.raises(PolicyFileError, match=message):
        load_policy_file(path)


def test_changed_weights_are_refused(saved, tmp_path):
    path = copy_policy(saved[1], tmp_path)
    blob = bytearray(path.with_suffix(".safetensors").read_bytes())
    blob[-5] ^= 0xFF
    path.with_suffix(".safetensors").write_bytes(bytes(blob))
    with pytest.raises(PolicyFileError, match="sha256"):
        load_policy_file(path)


class Payload:
    """Unpickling this writes a marker file: proof that a load ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_sb3_zip_is_not_unpickled_without_an_explicit_opt_in(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    crafted = tmp_path / "evil.zip"
    with zipfile.ZipFile(crafted, "w") as archive:
        archive.writestr("data", "{}")
        archive.writestr("policy.pth", pickle.dumps(Payload(str(marker))))
    for argv in (["evaluate", "--policy", str(crafted), "--episodes", "1"],
                 ["rollout", "--policy", str(crafted), "--steps", "1", "--out", str(tmp_path / "v.mp4")]):
        assert main(argv) == 2
        assert "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_spaces_round_trip_through_json():
    space = spaces.Dict({"rgb": spaces.Box(0, 255, (3, 8, 8), np.uint8),
                         "pose": spaces.Box(-np.inf, np.inf, (6,), np.float32),
                         "goal": spaces.Box(np.array([0.0, -1.0], np.float32), np.array([10.0, 1.0], np.float32), dtype=np.float32),
                         "phase": spaces.Discrete(2)})
    assert space_from_json(json.loads(json.dumps(space_to_json(space)))) == space
