"""Colour point-cloud memory (the baseline) and the latent-vs-colour benchmark."""

import argparse
import json
import math

import pytest
import torch

from mirage_env.baselines.colour_memory import ColourPointCloudMemory
from mirage_env.baselines.memory_bench import _add_memory_options, loop_poses, room_depth_and_colour, run_memory_bench
from mirage_env.geometry import Camera


def _scene(size=32, frames=1):
    camera = Camera.from_fov(size, size, 90.0)
    poses = loop_poses(1, frames)[0]
    depth, images = room_depth_and_colour(camera, poses)
    return camera, poses, depth, images


def test_render_from_the_writing_camera_returns_the_written_colours():
    camera, poses, depth, images = _scene()
    memory = ColourPointCloudMemory()
    assert memory.write(images, depth, camera, poses) == 32 * 32
    render = memory.render(camera, poses)
    assert render.coverage.all()
    rendered = (render.images[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    assert torch.equal(rendered, images[0])
    assert torch.allclose(render.depth[0], depth[0], rtol=1e-5)


def test_uncovered_pixels_are_black_and_masked():
    camera, poses, depth, images = _scene()
    keep = torch.zeros_like(depth, dtype=torch.bool)
    keep[:, :, :16] = True  # only the left half is written
    memory = ColourPointCloudMemory(encoder=lambda x: x.reshape(x.shape[0], 3, 4, 8, 4, 8).mean((3, 5)))
    memory.write(images, depth, camera, poses, keep=keep)
    render = memory.render(camera, poses)
    assert render.coverage[0, :, :16].all() and not render.coverage[0, :, 16:].any()
    assert (render.images[0, :, :, 16:] == 0).all()
    assert math.isinf(render.depth[0, 0, 31])
    read = memory.read(camera, poses)  # a stand-in 8x "encoder" (average pooling)
    assert read.latents.shape == (1, 3, 4, 4)
    assert read.mask[0, :, :2].all() and not read.mask[0, :, 2:].any()
    assert torch.isinf(read.depth[0, :, 2:]).all()


def test_nearest_point_wins_the_z_buffer():
    camera = Camera.from_fov(8, 8, 90.0)
    pose = torch.eye(4, dtype=torch.float64)
    memory = ColourPointCloudMemory()
    far = torch.full((1, 8, 8), 4.0)
    near = torch.full((1, 8, 8), 2.0)
    memory.write(torch.full((1, 8, 8, 3), 200, dtype=torch.uint8), far, camera, pose)
    memory.write(torch.full((1, 8, 8, 3), 50, dtype=torch.uint8), near, camera, pose)
    render = memory.render(camera, pose)
    assert torch.allclose(render.images, torch.full_like(render.images, 50 / 255))
    assert torch.allclose(render.depth, torch.full_like(render.depth, 2.0))


def test_memory_appends_so_bytes_grow_linearly_with_frames():
    camera, poses, depth, images = _scene(size=16, frames=6)
    memory = ColourPointCloudMemory()
    sizes = []
    for t in range(6):
        memory.write(images[t], depth[t], camera, poses[t])
        sizes.append(memory.stats()["bytes"])
    steps = [b - a for a, b in zip(sizes, sizes[1:])]
    assert steps == [16 * 16 * 15] * 5  # xyz float32 + RGB uint8 per pixel, nothing merged
    # The same frame written twice is stored twice.
    memory.write(images[0], depth[0], camera, poses[0])
    assert memory.stats()["entries"] == 7 * 16 * 16


def test_bad_inputs_raise_clear_errors():
    camera, poses, depth, images = _scene()
    memory = ColourPointCloudMemory()
    with pytest.raises(ValueError, match="image resolution"):
        memory.write(images, depth[:, ::2, ::2], camera, poses)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        memory.write(images.float(), depth, camera, poses)
    with pytest.raises(ValueError, match="camera is"):
        memory.write(images, depth, camera.scaled(0.5), poses)
    with pytest.raises(ValueError, match="no encoder"):
        memory.read(camera, poses)
    with pytest.raises(ValueError, match="one world"):
        memory.render(camera, poses[None, None])


def test_bench_runs_end_to_end_and_writes_json_and_plot(tmp_path):
    parser = argparse.ArgumentParser()
    _add_memory_options(parser)
    args = parser.parse_args([
        "--json", str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png"), "--vae", "tiny",
        "--image-size", "32", "--segments", "2", "--segment-frames", "5", "--read-frames", "5", "--steps", "1",
        "--fast-image-size", "16", "--fast-segment-frames", "3", "--loops", "2", "--quiet",
    ])
    run_memory_bench(args)
    data = json.loads((tmp_path / "bench.json").read_text())
    for key in ("speedup_time", "ratio_bytes", "segments", "latent_time_s", "colour_time_s", "latent_bytes", "colour_bytes"):
        assert key in data
    assert len(data["colour_time_s"]) == 2 and len(data["fast"]["colour_bytes"]) == 4
    assert data["colour_bytes"][1] > data["colour_bytes"][0]  # appends
    assert {"e2e_latent_s", "e2e_colour_s", "colour_encode_s", "colour_render_s"} <= set(data["wan"])
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_frame_counts_the_vae_would_crop(tmp_path):
    parser = argparse.ArgumentParser()
    _add_memory_options(parser)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        run_memory_bench(parser.parse_args(["--vae", "tiny", "--read-frames", "4"]))
