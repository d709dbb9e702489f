"""The Wan backend on tiny random-weight configs of the real diffusers classes (CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from mirage_env.backends.base import Segment, SegmentRequest, WorldModel  # noqa: E402
from mirage_env.backends.depth import ConstantDepth, KnownDepth, TransformersDepth, align_depth_scale  # noqa: E402
from mirage_env.backends.tiny import build_tiny_checkpoint, build_tiny_depth_model  # noqa: E402

SIZE = (64, 64)
FRAMES = 5  # 2 latent frames


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("wan") / "ckpt", z_dim=16, num_layers=4)


@pytest.fixture(scope="module")
def depth_dir(tmp_path_factory) -> Path:
    return build_tiny_depth_model(tmp_path_factory.mktemp("depth") / "model")


@pytest.fixture(scope="module")
def model(checkpoint):
    from mirage_env.backends.wan import WanWorldModel

    return WanWorldModel(checkpoint, image_size=SIZE, frames_per_segment=FRAMES, num_inference_steps=2,
                         max_sequence_length=8, depth_estimator=ConstantDepth(2.0))


def _poses(batch, frames):
    poses = torch.eye(4, dtype=torch.float64).repeat(batch, frames, 1, 1)
    poses[..., 2, 3] = torch.arange(frames, dtype=torch.float64) * 0.1
    return poses


# ----------------------------------------------------------------------------- loading


def test_missing_checkpoint_says_what_and_how(tmp_path, checkpoint):
    from mirage_env.backends.wan import WanWorldModel
    from mirage_env.backends.wan_checkpoint import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError, match="huggingface-cli download Wan-AI/Wan2.2-TI2V-5B-Diffusers"):
        WanWorldModel(tmp_path / "nothing")
    partial = build_tiny_checkpoint(tmp_path / "partial", tokenizer=False)
    with pytest.raises(FileNotFoundError, match="tokenizer/tokenizer_config.json"):
        WanWorldModel(partial, image_size=SIZE, frames_per_segment=FRAMES)
    # Without a tokenizer it loads when prompts are not needed.
    m = WanWorldModel(partial, image_size=SIZE, frames_per_segment=FRAMES, tokenizer=None, text_encoder=None,
                      max_sequence_length=8, depth_estimator=ConstantDepth())
    assert m.prompt_embeds([""]).shape == (1, 8, 32)
    with pytest.raises(ValueError, match="tokenizer"):
        m.prompt_embeds(["a room"])


def test_sizes_are_validated(checkpoint, model):
    from mirage_env.backends.wan import WanWorldModel

    with pytest.raises(ValueError, match="multiples of 32"):
        WanWorldModel(checkpoint, image_size=(48, 64), depth_estimator=ConstantDepth())
    with pytest.raises(ValueError, match="1 \\+ 4"):
        WanWorldModel(checkpoint, image_size=SIZE, frames_per_segment=8, depth_estimator=ConstantDepth())
    with pytest.raises(ValueError, match="H, W"):
        model.encode(torch.zeros(1, 5, 32, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 \\+ 4"):
        model.encode(torch.zeros(1, 4, 64, 64, 3, dtype=torch.uint8))


# ----------------------------------------------------------------------------- memory branch


def test_zero_branch_equals_base_and_saves(tmp_path, checkpoint):
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan_vace import WanVACETransformer3DModel

    from mirage_env.backends.wan_memory import build_memory_transformer, load_memory_branch, save_memory_branch

    base = WanTransformer3DModel.from_pretrained(checkpoint / "transformer").eval()
    memory = build_memory_transformer(base, vace_every=2).eval()
    assert isinstance(memory, WanVACETransformer3DModel)
    assert list(memory.config.vace_layers) == [0, 2] and memory.config.vace_in_channels == 32
    x, e = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 8, 32)
    control = torch.randn(2, 32, 3, 4, 4)
    with torch.no_grad():
        t = torch.tensor([700.0, 20.0])
        assert torch.equal(base(x, t, e).sample, memory(x, t, e, control_hidden_states=control).sample)
        per_token = t[:, None].repeat(1, 12)
        per_token[:, :4] = 0  # first frame clean, as with Wan2.2-TI2V
        assert torch.equal(base(x, per_token, e).sample, memory(x, per_token, e, control_hidden_states=control).sample)
        # A trained branch changes the output; it survives a save/load round trip.
        for block in memory.vace_blocks:
            torch.nn.init.normal_(block.proj_out.weight, std=0.02)
        out = memory(x, per_token, e, control_hidden_states=control).sample
        assert not torch.allclose(out, base(x, per_token, e).sample)
        save_memory_branch(memory, tmp_path / "branch")
        reloaded = load_memory_branch(base, tmp_path / "branch").eval()
        assert torch.equal(reloaded(x, per_token, e, control_hidden_states=control).sample, out)
        memory.save_pretrained(tmp_path / "full")
        full = type(memory).from_pretrained(tmp_path / "full").eval()
        assert torch.equal(full(x, t, e, control_hidden_states=control).sample, memory(x, t, e, control_hidden_states=control).sample)


# ----------------------------------------------------------------------------- depth


def test_depth_estimator_from_local_dir_and_alignment(tmp_path, depth_dir):
    from mirage_env.backends.depth import DepthEstimator, DepthModelNotFoundError

    with pytest.raises(DepthModelNotFoundError, match="huggingface-cli download"):
        TransformersDepth(tmp_path / "none")
    estimator = TransformersDepth(depth_dir)
    assert isinstance(estimator, DepthEstimator) and estimator.kind == "disparity"
    out = estimator(np.random.default_rng(0).integers(0, 255, (3, 64, 48, 3), dtype=np.uint8))
    assert out.shape == (3, 64, 48) and out.dtype == torch.float32

    known = KnownDepth(np.full((2, 8, 8), 3.0))
    assert torch.equal(known(np.zeros((2, 8, 8, 3), np.uint8)), torch.full((2, 8, 8), 3.0))

    truth = torch.rand(2, 3, 8, 8) * 4 + 1
    truth[0, 0, 0, 0] = math.inf
    aligned, info = align_depth_scale(truth * 0.25, truth, kind="metric")
    assert torch.allclose(aligned[torch.isfinite(truth)], truth[torch.isfinite(truth)], rtol=1e-4)
    disparity = 7.0 / truth + 0.3  # relative model: unknown scale and shift
    mask = torch.rand(2, 3, 8, 8) > 0.3
    aligned, info = align_depth_scale(disparity, torch.where(mask, truth, torch.full_like(truth, math.inf)), mask, kind="disparity")
    finite = torch.isfinite(truth)
    assert torch.allclose(aligned[finite], truth[finite], rtol=1e-3)


# ----------------------------------------------------------------------------- generation


def test_start_and_generate_follow_the_protocol(model):
    from mirage_env.backends.wan import WanWorldModel

    assert isinstance(model, WorldModel)
    assert model.latent.channels == 16 and model.latent.spatial_factor == 16 and model.latent.temporal_factor == 4
    batch, frames = 2, 2
    image = np.random.default_rng(1).integers(0, 255, (*SIZE, 3), dtype=np.uint8)
    generators = [torch.Generator().manual_seed(i) for i in range(batch)]
    first = model.start(_poses(batch, frames), generators,
                        [{"image": image, "prompt": "a room", "depth": np.full(SIZE, 5.0)}, {"prompt": "a street"}])
    assert first.latents.shape == (batch, frames, 16, 4, 4)
    assert first.depth.shape == (batch, frames, 4, 4)
    assert first.frames.shape == (batch, FRAMES, *SIZE, 3) and first.frames.dtype == torch.uint8
    assert torch.equal(first.frames[0, 0], torch.from_numpy(image))
    # The given first frame stays clean: its latent is the VAE encoding of the image.
    assert torch.allclose(first.latents[0, 0], model.encode(torch.from_numpy(image)[None, None])[0, 0], atol=1e-5)
    # The known depth of the start image sets the scale (a constant estimator -> 5 everywhere).
    assert torch.allclose(first.depth[0], torch.full((frames, 4, 4), 5.0))
    assert "a room" in model._prompt_cache and "a street" in model._prompt_cache

    h = w = 4
    request = SegmentRequest(
        poses=_poses(batch, frames), memory_latents=torch.randn(batch, frames, 16, h, w),
        memory_mask=torch.rand(batch, frames, h, w) > 0.5, memory_depth=torch.full((batch, frames, h, w), 3.0),
        generators=[torch.Generator().manual_seed(10 + i) for i in range(batch)], previous=first,
    )
    second = model.generate(request)
    assert second.latents.shape == (batch, frames, 16, 4, 4) and torch.isfinite(second.latents).all()
    assert torch.allclose(second.depth, torch.full_like(second.depth, 3.0))  # aligned to memory's scale
    # World 1 alone with the same generator state makes the same segment as inside the batch.
    alone = model.generate(SegmentRequest(
        poses=request.poses[1:], memory_latents=request.memory_latents[1:], memory_mask=request.memory_mask[1:],
        memory_depth=request.memory_depth[1:], generators=[torch.Generator().manual_seed(11)], previous=first.select([1]),
        conditioning={"prompts": ["a street"]},
    ))
    assert torch.allclose(alone.latents[0], second.latents[1], atol=1e-4)
    assert model.decode(second.latents).shape == (batch, FRAMES, *SIZE, 3)
    with pytest.raises(ValueError, match="memory_latents"):
        model.generate(SegmentRequest(poses=request.poses, memory_latents=torch.zeros(batch, frames, 8, h, w),
                                      memory_mask=request.memory_mask, memory_depth=request.memory_depth,
                                      generators=request.generators))
    config = model.config()
    assert config["name"] == "wan" and config["latent"]["channels"] == 16
    state = model.state_dict()
    assert state["prompt_embeds"].shape == (batch, 8, 32)
    model.load_state_dict(state)
    assert torch.equal(model.state_dict()["prompt_embeds"], state["prompt_embeds"])


# ----------------------------------------------------------------------------- training


def _tiny_dataset(root: Path, camera, clips: int = 1, frames: int = 10):
    from mirage_env.backends.posed_clips import write_posed_clip

    rng = np.random.default_rng(0)
    for c in range(clips):
        images = rng.integers(0, 255, (frames, *SIZE, 3), dtype=np.uint8)
        poses = np.tile(np.eye(4), (frames, 1, 1))
        poses[:, 0, 3] = np.linspace(0, 0.3, frames)
        write_posed_clip(root, f"clip{c}", images, poses, camera, depth=np.full((frames, *SIZE), 2.0, np.float32))


def test_camera_file_round_trip(tmp_path):
    from mirage_env.backends.posed_clips import read_camera_file, write_camera_file
    from mirage_env.geometry import Camera

    camera = Camera(50.0, 60.0, 32.0, 30.0, 64, 64)
    c2w = np.tile(np.eye(4), (3, 1, 1))
    c2w[:, :3, 3] = np.arange(9).reshape(3, 3)
    write_camera_file(tmp_path / "c.txt", c2w, camera, url="https://www.youtube.com/watch?v=x")
    track = read_camera_file(tmp_path / "c.txt")
    assert track.url.startswith("https://") and len(track) == 3
    assert np.allclose(track.c2w, c2w)
    assert track.camera(0, 64, 64) == camera
    (tmp_path / "bad.txt").write_text("1 2 3\n4 5 6\n")
    with pytest.raises(ValueError, match="19 numbers"):
        read_camera_file(tmp_path / "bad.txt")


def test_training_stages_lower_loss_save_load_and_resume(tmp_path, checkpoint):
    from mirage_env.backends.posed_clips import PosedClipDataset
    from mirage_env.backends.wan import WanWorldModel
    from mirage_env.backends.wan_train import MemoryBranchTrainer, TrainArgs

    def make_model(memory_dir=None):
        return WanWorldModel(checkpoint, memory_dir=memory_dir, image_size=SIZE, frames_per_segment=FRAMES,
                             num_inference_steps=2, max_sequence_length=8, depth_estimator=ConstantDepth(2.0))

    model = make_model()
    _tiny_dataset(tmp_path / "data", model.camera)
    args = TrainArgs(checkpoint_dir=str(checkpoint), image_size=SIZE, past_frames=5, segment_frames=5,
                     learning_rate=3e-3, lora_rank=4, lora_alpha=4, max_sequence_length=8, progress=False)
    data = PosedClipDataset(tmp_path / "data", args.past_frames + args.segment_frames, SIZE)
    clips = torch.utils.data.default_collate([data[0]])
    assert clips["frames"].shape == (1, 10, *SIZE, 3) and torch.allclose(clips["poses"][0, 0], torch.eye(4, dtype=torch.float64))

    stage1 = MemoryBranchTrainer(model, args)
    batch = stage1.prepare_batch(clips)
    assert batch["memory_mask"].any(), "memory written from the past frames must be read at the target cameras"
    fixed = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - same noise every step
    base_params = {n: p.clone() for n, p in model.transformer.named_parameters() if n.startswith("blocks.")}
    losses = [stage1.train_step(batch, fixed()) for _ in range(6)]
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, base_params[n]) for n, p in model.transformer.named_parameters() if n in base_params)
    stage1.save(tmp_path / "stage1")

    # Resume restores step and optimizer: the next step matches an uninterrupted run.
    resumed = MemoryBranchTrainer(make_model(), args)
    resumed.load(tmp_path / "stage1")
    assert resumed.step == 6
    assert torch.allclose(torch.tensor(resumed.train_step(batch, fixed())), torch.tensor(stage1.train_step(batch, fixed())), atol=1e-6)

    args2 = TrainArgs(**{**args.__dict__, "stage": 2, "memory_dir": str(tmp_path / "stage1")})
    model2 = make_model(tmp_path / "stage1")
    stage2 = MemoryBranchTrainer(model2, args2)
    branch = {n: p.clone() for n, p in model2.transformer.named_parameters() if n.startswith("vace_")}
    losses = [stage2.train_step(batch, fixed()) for _ in range(6)]
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, branch[n]) for n, p in model2.transformer.named_parameters() if n in branch)
    stage2.save(tmp_path / "stage2")

    # The checkpoint is a memory_dir: branch + LoRA reload to the same outputs.
    reloaded = make_model(tmp_path / "stage2")
    x, e = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 8, 32)
    control = torch.randn(1, 32, 3, 4, 4)
    t = torch.full((1, 12), 300.0)
    model2.transformer.eval()
    with torch.no_grad():
        a = model2.transformer(x, t, e, control_hidden_states=control).sample
        b = reloaded.transformer(x, t, e, control_hidden_states=control).sample
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_tiny_model_on_gpu(checkpoint):
    from mirage_env.backends.wan import WanWorldModel

    m = WanWorldModel(checkpoint, device="cuda", image_size=SIZE, frames_per_segment=FRAMES, num_inference_steps=2,
                      max_sequence_length=8, depth_estimator=ConstantDepth())
    seg = m.start(_poses(1, 2).cuda(), [torch.Generator("cuda").manual_seed(0)])
    assert seg.latents.shape == (1, 2, 16, 4, 4) and torch.isfinite(seg.latents).all()


@pytest.mark.skipif("MIRAGE_WAN_CHECKPOINT" not in __import__("os").environ, reason="set MIRAGE_WAN_CHECKPOINT to a local Wan2.2-TI2V-5B-Diffusers dir")
def test_real_checkpoint_loads():
    import os

    from mirage_env.backends.wan import WanWorldModel

    m = WanWorldModel(os.environ["MIRAGE_WAN_CHECKPOINT"], device="cuda" if torch.cuda.is_available() else "cpu",
                      depth_estimator=ConstantDepth())
    assert m.latent.channels == 48 and m.latent.spatial_factor == 16
