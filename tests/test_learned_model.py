"""The learned small world model: DCT autoencoder, checkpoint settings, stages 0-2 in miniature, the shipped weights."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import mirage_env  # noqa: E402,F401  (registers the ids)
from mirage_env.agents.evaluate import torch_threads  # noqa: E402
from mirage_env.backends.base import Segment, SegmentRequest  # noqa: E402
from mirage_env.backends.codec import PatchDCTCodec  # noqa: E402
from mirage_env.backends.dct_autoencoder import PatchDCTAutoencoder  # noqa: E402
from mirage_env.backends.depth import ConstantDepth  # noqa: E402
from mirage_env.backends.mini import MINI_NAME, build_mini_checkpoint, mini_transformer_config  # noqa: E402
from mirage_env.backends.wan_checkpoint import SHIPPED_DIR, read_world_defaults, write_world_defaults  # noqa: E402
from mirage_env.clip_samples import list_clips, prepare_clip_samples  # noqa: E402
from mirage_env.dataset import TEST_SEED_OFFSET, ExportConfig, export_dataset  # noqa: E402

SHIPPED = SHIPPED_DIR / MINI_NAME
TINY_DIT = mini_transformer_config(num_layers=2, heads=2, head_dim=24, ffn_dim=64)


@pytest.fixture(autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips") / "data"
    export_dataset(root, ExportConfig(train_clips=4, test_clips=2, batch=6), progress=False)
    return root


@pytest.fixture(scope="module")
def mini_checkpoint(tmp_path_factory):
    return build_mini_checkpoint(tmp_path_factory.mktemp("mini") / "ckpt", [0.0] * 48, [1.0] * 48,
                                 transformer_config=TINY_DIT, settings={"num_inference_steps": 2})


def _load(checkpoint, memory_dir="auto"):
    from mirage_env.backends.wan import WanWorldModel

    return WanWorldModel(checkpoint, memory_dir=memory_dir, depth_estimator=ConstantDepth(2.0))


# ----------------------------------------------------------------------------- the latent space


def test_dct_autoencoder_is_the_codec_and_reconstructs_procedural_frames(clips):
    vae = PatchDCTAutoencoder()
    frames = torch.from_numpy(np.load(sorted((clips / "test").iterdir())[0] / "frames.npz")["frames"])
    video = frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, F, H, W)
    z = vae.encode(video).latent_dist.mode()
    assert z.shape == (1, 48, 16, 8, 8)
    torch.testing.assert_close(z[0, :, 0], PatchDCTCodec().encode(video[0, :, 0] * 0.5 + 0.5))
    decoded = ((vae.decode(z).sample + 1) * 127.5).round().clamp(0, 255)
    error = (decoded[0].permute(1, 2, 3, 0) - frames.float()).abs()
    assert error.max() <= 1.0, "procedural frames are made by this codec: only rounding may differ"


def test_dct_autoencoder_saves_as_config_and_validates(tmp_path):
    PatchDCTAutoencoder(latents_std=[2.0] * 48).save_pretrained(tmp_path / "vae")
    loaded = PatchDCTAutoencoder.from_pretrained(tmp_path / "vae")
    assert loaded.config.z_dim == 48 and loaded.config.latents_std[0] == 2.0 and loaded.config.scale_factor_temporal == 1
    with pytest.raises(ValueError, match="z_dim=16 does not match"):
        PatchDCTAutoencoder(z_dim=16)
    with pytest.raises(ValueError, match="scale_factor_temporal must be 1"):
        PatchDCTAutoencoder(scale_factor_temporal=4)
    with pytest.raises(ValueError, match="latents_std has 3 values"):
        PatchDCTAutoencoder(latents_std=[1.0] * 3)
    with pytest.raises(ValueError, match="not divisible"):
        loaded.encode(torch.zeros(1, 3, 1, 60, 64))


# ----------------------------------------------------------------------------- checkpoint settings


def test_checkpoint_settings_are_used_and_explicit_arguments_win(mini_checkpoint):
    model = _load(mini_checkpoint)
    assert model.image_size == (64, 64) and model.latent_frames == 4 and model.context_frames == 2
    assert model.num_inference_steps == 2 and model.suggested_voxel_size == pytest.approx(0.28125)
    assert model.tokenizer is None and model.text_encoder is None
    from mirage_env.backends.wan import WanWorldModel

    other = WanWorldModel(mini_checkpoint, frames_per_segment=2, num_inference_steps=1, depth_estimator=ConstantDepth())
    assert other.latent_frames == 2 and other.num_inference_steps == 1


def test_bad_checkpoint_settings_name_the_field(tmp_path, mini_checkpoint):
    settings = json.loads((mini_checkpoint / "mirage_world.json").read_text())
    for change, message in ((dict(frames_per_segment=0), "frames_per_segment must be"),
                            (dict(colour="red"), "unknown fields"),
                            (dict(memory_dir="../elsewhere"), "inside the checkpoint"),
                            (dict(memory_dir="missing"), "does not exist")):
        (tmp_path / "mirage_world.json").write_text(json.dumps({**settings, **change}))
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            read_world_defaults(tmp_path)
    (tmp_path / "mirage_world.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_world_defaults(tmp_path)


# ----------------------------------------------------------------------------- samples and stages 0-2


def test_return_samples_read_long_term_memory_and_the_horizon_drops_it(clips, mini_checkpoint):
    model = _load(mini_checkpoint)
    test = list_clips(clips / "test")
    full = prepare_clip_samples(model, test, voxel_size=model.suggested_voxel_size, segments=[3], progress=False)
    short = prepare_clip_samples(model, test, voxel_size=model.suggested_voxel_size, segments=[3],
                                 memory_options={"horizon": 1}, progress=False)
    assert full.target.shape == (2, 4, 48, 8, 8) and full.context.shape == (2, 2, 48, 8, 8)
    assert full.memory_mask.float().mean() > 0.8, "the return views were all seen in the visit"
    assert short.memory_mask.float().mean() < 0.2, "the last segment looked away"
    # Where memory hits, it holds the visit's content: close to what the return really shows.
    hit = full.memory_mask[:, :, None].expand_as(full.target)
    assert (full.memory_latents - full.target)[hit].abs().mean() < 0.5 * full.target[hit].abs().mean()


def test_three_stages_train_what_they_should_and_the_trained_branch_reads_memory(tmp_path, clips, mini_checkpoint):
    import shutil

    from mirage_env.backends.mini import train_on_samples

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(mini_checkpoint, checkpoint)
    model = _load(checkpoint, memory_dir=None)
    samples = prepare_clip_samples(model, list_clips(clips / "train"), voxel_size=model.suggested_voxel_size, progress=False)
    assert len(samples) == 4 * 3

    # Stage 0: the whole DiT learns; the saved base reloads as a plain WanTransformer3DModel.
    losses, _ = train_on_samples(model, samples, stage=0, steps=24, learning_rate=3e-3, batch_size=4, progress=False)
    assert _learned(losses), losses
    from mirage_env.backends.wan_train import save_base_transformer

    save_base_transformer(model.transformer, checkpoint / "transformer")
    model = _load(checkpoint, memory_dir=None)

    request = _request(samples, model)
    changed = _request(samples, model, memory_scale=-1.0)
    untrained = [model.generate(r).latents for r in (request, changed)]
    assert torch.equal(*untrained), "an untrained (zero) branch must ignore memory"

    # Stage 1: only the branch learns, and then memory changes what is generated.
    base = {n: p.clone() for n, p in model.transformer.named_parameters() if n.startswith("blocks.")}
    losses, _ = train_on_samples(model, samples, stage=1, steps=24, learning_rate=3e-3, batch_size=4, progress=False)
    assert _learned(losses), losses
    assert all(torch.equal(p, base[n]) for n, p in model.transformer.named_parameters() if n in base)
    trained = [model.generate(r).latents for r in (request, changed)]
    assert not torch.allclose(*trained), "a trained branch must read the projected memory"

    # Stage 2: LoRA learns (its zero-initialised B matrices move), the branch stays.
    # (That LoRA lowers the loss is tested on a fixed batch in test_wan.py.)
    branch = {n: p.clone() for n, p in model.transformer.named_parameters() if n.startswith("vace_")}
    _, trainer = train_on_samples(model, samples, stage=2, steps=8, learning_rate=3e-3, batch_size=4, lora_rank=4, progress=False)
    assert all(torch.equal(p, branch[n]) for n, p in model.transformer.named_parameters() if n in branch)
    lora_b = [p for n, p in model.transformer.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b) and trainer.trainable_parameters > 0
    assert not torch.equal(model.generate(request).latents, trained[0])


def _learned(losses: list[float]) -> bool:
    """The last steps' mean loss is below the first steps' (minibatches and noise levels vary per step)."""
    return float(np.mean(losses[-6:])) < float(np.mean(losses[:6]))


def _request(samples, model, memory_scale: float = 1.0) -> SegmentRequest:
    n = 2
    context = samples.context[:n]
    return SegmentRequest(
        poses=samples.poses[:n], memory_latents=samples.memory_latents[:n] * memory_scale,
        memory_mask=samples.memory_mask[:n], memory_depth=samples.memory_depth[:n],
        generators=[torch.Generator().manual_seed(i) for i in range(n)],
        previous=Segment(latents=context, depth=torch.ones(context.shape[:2] + context.shape[3:]),
                         poses=samples.poses[:n, :1].expand(-1, context.shape[1], -1, -1)),
    )


# ----------------------------------------------------------------------------- the shipped weights


shipped = pytest.mark.skipif(not (SHIPPED / "memory").is_dir(),
                             reason=f"{MINI_NAME} is not in this checkout (remake it: python benchmarks/learned_memory.py)")


@shipped
def test_shipped_model_runs_an_episode_by_name():
    env = gym.make("Mirage/Explore-v0", backend="wan", checkpoint=MINI_NAME, max_episode_steps=3)
    observation, info = env.reset(seed=0)
    assert env.observation_space.contains(observation)
    truncated = False
    steps = 0
    while not truncated:
        observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(observation) and np.isfinite(reward)
        steps += 1
    assert steps == 3
    env.close()


@shipped
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shipped_model_runs_an_episode_on_gpu():
    env = gym.make("Mirage/Explore-v0", backend="wan", checkpoint=MINI_NAME, backend_options={"device": "cuda"},
                   max_episode_steps=3)
    observation, info = env.reset(seed=0)
    for _ in range(3):
        observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(observation) and np.isfinite(reward)
    assert truncated
    env.close()


@shipped
def test_shipped_model_remembers_held_out_scenes(tmp_path):
    """On fresh held-out scenes, the returning view is far closer to the first visit with memory."""
    from mirage_env.dataset import revisit_pairs
    from mirage_env.metrics import psnr

    root = tmp_path / "data"
    export_dataset(root, ExportConfig(train_clips=0, test_clips=2, batch=2), progress=False)
    clips = list_clips(root / "test")
    assert json.loads((clips[0] / "clip.json").read_text())["scene_seed"] >= TEST_SEED_OFFSET
    model = _load(SHIPPED)
    samples = prepare_clip_samples(model, clips, voxel_size=model.suggested_voxel_size, segments=[3], progress=False)
    scores = {}
    for use_memory in (True, False):
        request = SegmentRequest(**{**_request(samples, model).__dict__, "use_memory": use_memory})
        frames = model.generate(request).frames.numpy()
        values = []
        for i, clip in enumerate(clips):
            first = np.load(clip / "frames.npz")["frames"]
            returns, visits = revisit_pairs(clip)
            values += [psnr(frames[i, r - 12], first[v]) for r, v in zip(returns, visits)]
        scores[use_memory] = float(np.mean(values))
    assert scores[True] > scores[False] + 4.0, scores


def test_write_world_defaults_validates_what_it_writes(tmp_path):
    with pytest.raises(ValueError, match="flow_shift must be"):
        write_world_defaults(tmp_path, flow_shift=-1)


@shipped
def test_a_start_image_with_depth_is_the_memory_of_the_start_segment():
    """reset(options={"image", "depth"}): the frames after the given one are generated from it."""
    from mirage_env.backends.procedural import ProceduralWorldModel
    from mirage_env.metrics import psnr

    scene = ProceduralWorldModel(image_size=(64, 64))
    view = scene.start(torch.eye(4, dtype=torch.float64)[None, None], [torch.Generator().manual_seed(3)])
    image, depth = view.frames[0, 0].numpy(), view.image_depth[0, 0].numpy()
    model = _load(SHIPPED)
    poses = torch.eye(4, dtype=torch.float64).repeat(1, model.latent_frames, 1, 1)
    with_depth = model.start(poses, [torch.Generator().manual_seed(0)], [{"image": image, "depth": depth}])
    without = model.start(poses, [torch.Generator().manual_seed(0)], [{"image": image}])
    assert np.array_equal(with_depth.frames[0, 0].numpy(), image)
    remembered = np.mean([psnr(with_depth.frames[0, i].numpy(), image) for i in range(1, model.latent_frames)])
    generated = np.mean([psnr(without.frames[0, i].numpy(), image) for i in range(1, model.latent_frames)])
    assert remembered > generated + 3.0, (remembered, generated)
