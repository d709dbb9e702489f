"""The procedural world's busy scene: several moving things, with ground truth for evaluation."""

import json

import numpy as np
import pytest
import torch

from mirage_env.backends.movers import KEEP_CLEAR, MOVERS, check_movers_clear, draw_movers, mover_centres
from mirage_env.backends.procedural import ProceduralWorldModel


def _movers(seed: int = 0, half: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return draw_movers(lambda: float(torch.rand(1, generator=generator)), half, half)


def test_each_mover_has_its_own_kind_of_motion():
    parameters = _movers()
    t = torch.arange(200)
    centres = mover_centres(parameters[None], t[None])[0]  # (T, M, 2)
    step = (centres[1:] - centres[:-1]).norm(dim=-1)  # metres per frame
    slide, circle, stop_and_go = step[:, 0], step[:, 1], step[:, 2]
    # Sliding: constant speed, except at the two ends where it turns back.
    assert int((slide - parameters[0, 2]).abs().gt(1e-9).sum()) <= 8
    direction = torch.sign(centres[1:, 0, 0] - centres[:-1, 0, 0])
    assert (direction > 0).any() and (direction < 0).any()
    # Circling: constant speed along an arc, a turning velocity.
    assert float((circle - circle.mean()).abs().max()) < 1e-3
    assert float((centres[:, 1] - parameters[1, :2]).norm(dim=-1).sub(parameters[1, 3]).abs().max()) < 1e-9
    # Stop-and-go: frames standing still and frames moving.
    assert (stop_and_go < 1e-12).sum() > 20 and (stop_and_go > 0.05).sum() > 20


@pytest.mark.parametrize("half", [3.0, 4.5, 6.0])
def test_movers_keep_clear_of_the_start(half):
    for seed in range(5):
        check_movers_clear(_movers(seed, half))
        centres = mover_centres(_movers(seed, half)[None], torch.arange(400)[None])[0]
        assert float(centres.norm(dim=-1).min()) > KEEP_CLEAR


def test_a_busy_world_reports_ground_truth_ids_and_centres():
    model = ProceduralWorldModel(busy=True)
    pose = torch.eye(4, dtype=torch.float64)
    segment = model.start(pose[None, None], [torch.Generator().manual_seed(3)])
    info = segment.info
    assert info["object_ids"].shape == segment.depth.shape
    assert info["object_centres"].shape == (1, 1, MOVERS + 1, 3)
    assert set(info["object_ids"].unique().tolist()) <= set(range(-1, MOVERS + 1))
    # Ids mark moving content: every latent pixel whose centre shows a mover is a moving pixel.
    assert bool(info["moving"][info["object_ids"] >= 0].all())
    before = info["object_centres"].clone()
    later = model.generate(_request(model, pose))
    assert not torch.equal(later.info["object_centres"], before)  # they move
    # Standing on the floor, inside the room.
    assert torch.allclose(before[..., 1], torch.full_like(before[..., 1], 1.5 - 0.225), atol=0.3)


def _request(model, pose):
    from mirage_env.backends.base import SegmentRequest

    h, w = model.latent.latent_camera(model.camera).height, model.latent.latent_camera(model.camera).width
    return SegmentRequest(poses=pose[None, None], memory_latents=torch.zeros(1, 1, model.latent.channels, h, w),
                          memory_mask=torch.zeros(1, 1, h, w, dtype=torch.bool),
                          memory_depth=torch.full((1, 1, h, w), float("inf")),
                          generators=[torch.Generator().manual_seed(1)], previous=None, use_memory=True)


def test_busy_is_an_indoor_option_and_survives_a_config_round_trip():
    with pytest.raises(ValueError, match="busy"):
        ProceduralWorldModel(scene="outdoor", busy=True)
    model = ProceduralWorldModel(busy=True)
    assert ProceduralWorldModel.from_config(model.config()).busy
    assert "busy" not in ProceduralWorldModel().config()  # the default scene's config is unchanged


def test_the_motion_mask_reports_what_the_generator_animated_as_keep():
    masked = ProceduralWorldModel(busy=True, motion_mask=True)
    assert ProceduralWorldModel.from_config(masked.config()).motion_mask
    assert "motion_mask" not in ProceduralWorldModel().config()
    poses = torch.eye(4, dtype=torch.float64)[None, None]
    segment = masked.start(poses, [torch.Generator().manual_seed(3)])
    assert segment.info["moving"].any()  # the crates in front of the start
    assert torch.equal(segment.keep, ~segment.info["moving"])
    assert ProceduralWorldModel(busy=True).start(poses, [torch.Generator().manual_seed(3)]).keep is None


def test_eval_consistency_reports_dynamic_and_object_figures(tmp_path):
    from mirage_env.cli import main

    out = tmp_path / "c.json"
    assert main(["eval", "consistency", "--episodes", "1", "--side-steps", "1", "--scene", "busy",
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    for key in ("psnr_memory_on", "psnr_memory_off", "psnr_static_memory_on", "psnr_memory_on_no_objects",
                "psnr_dynamic_memory_on", "psnr_dynamic_memory_off", "object_position_error_m", "objects_shown",
                "psnr_moving_ceiling"):
        assert key in figures, key
    assert figures["scene"] == "busy" and figures["object_memory"] == "on" and figures["motion_mask"] == "off"
    assert np.isfinite(figures["psnr_moving_ceiling"])
    assert main(["eval", "consistency", "--episodes", "1", "--side-steps", "1", "--object-memory", "off",
                 "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert "psnr_memory_on_no_objects" not in figures and "object_position_error_m" not in figures
    assert np.isfinite(figures["psnr_memory_on"])


@pytest.mark.parametrize("motion_mask", [False, True])
def test_a_busy_world_with_the_object_layer_is_bit_exact_between_kernels_and_torch(monkeypatch, motion_mask):
    import mirage_env.compiled as compiled
    from mirage_env.agents.evaluate import torch_threads
    from mirage_env.env import MirageEnv

    def run(kernels: bool):
        monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
        env = MirageEnv(image_size=64, max_episode_steps=None,
                        backend_options={"busy": True, "motion_mask": motion_mask}, memory_options={"objects": True})
        env.reset(seed=4)
        rng = np.random.default_rng(0)
        frames, infos = [], []
        for _ in range(40):
            observation, *_ = env.step(int(rng.integers(0, 9)))
            info = env.batch.last_step.segment.info
            frames.append(observation["rgb"].copy())
            infos.append((info["moving"].clone(), info["object_ids"].clone(), info["object_centres"].clone()))
        return frames, infos, env.world.memory.objects.state_tensors("", copy=True)

    with torch_threads(1):
        fast, oracle = run(True), run(False)
    for a, b in zip(fast[0], oracle[0]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fast[1], oracle[1]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    for name, tensor in fast[2].items():
        assert torch.equal(tensor, oracle[2][name]), name


@pytest.mark.parametrize("motion_mask", [False, True])
def test_batched_busy_worlds_with_the_object_layer_equal_single_envs_through_an_autoreset(motion_mask):
    from test_vector import step_side_by_side

    from mirage_env.agents.evaluate import torch_threads
    from mirage_env.env import MirageEnv
    from mirage_env.vector import MirageVectorEnv

    settings = {"max_episode_steps": 8, "backend_options": {"busy": True, "motion_mask": motion_mask},
                "memory_options": {"objects": True},
                "observations": ("rgb", "pose", "depth", "latent")}
    with torch_threads(1):
        venv = MirageVectorEnv(3, **settings)
        envs = [MirageEnv(**settings) for _ in range(3)]
        assert step_side_by_side(venv, envs, [4, 9, 17], 20) >= 3


def test_with_the_motion_mask_a_crate_back_in_view_is_refound_and_the_world_regenerated_deterministically(monkeypatch):
    from mirage_env.agents.scripted import closed_loop_moves
    from mirage_env.env import MirageEnv
    from mirage_env.memory.objects import ObjectLayer

    recalled = []
    recall = ObjectLayer.recall

    def counting(self, *args, **kwargs):
        again = recall(self, *args, **kwargs)
        recalled.append(again is not None)
        return again

    monkeypatch.setattr(ObjectLayer, "recall", counting)

    def loop():
        env = MirageEnv(image_size=64, max_episode_steps=None, backend_options={"busy": True, "motion_mask": True},
                        memory_options={"objects": True})
        env.reset(seed=0)
        return [env.step(move)[0]["rgb"].copy() for move in closed_loop_moves(2)], env

    first, env = loop()
    assert any(recalled)  # crates came back after long out of view and were shown where they were found
    second, _ = loop()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # Movers never enter static memory: the layer holds them.
    assert env.world.memory.objects.count() > 0
