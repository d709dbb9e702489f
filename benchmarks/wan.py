"""Speed and memory of the Wan backend over consecutive segments, through a World.

    python benchmarks/wan.py --checkpoint DIR [--memory-dir DIR] [--depth-model DIR] [--json out.json]

With a checkpoint and a GPU it runs the real model (bf16); without one it builds
the tiny random-weight config and runs on the CPU (a smoke test of the loop,
not a measurement of Wan). Each segment is one ``World.reset`` (the first) or
``World.step``: the envs' loop, memory read -> generate -> filters -> memory
write -> frames, with the latent memory on the CPU as in the envs. Per segment
it reports seconds per generated frame, and memory held:
``torch.cuda.max_memory_allocated`` on GPU, process RSS on CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mirage_env.backends import make_model
from mirage_env.benchreport import header, write_json
from mirage_env.world import World


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _poses(batch: int, frames: int, start: int, step: float = 0.05) -> torch.Tensor:
    poses = torch.eye(4, dtype=torch.float64).repeat(batch, frames, 1, 1)
    poses[..., 2, 3] = (start + torch.arange(frames, dtype=torch.float64)) * step
    return poses


def run(args) -> list[dict]:
    from mirage_env.backends.depth import ConstantDepth

    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = "cuda" if cuda else "cpu"
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        image_size = tuple(args.image_size)
        options = dict(frames_per_segment=args.frames, num_inference_steps=args.steps)
    else:
        from mirage_env.backends.tiny import build_tiny_checkpoint

        checkpoint = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
        image_size = (64, 64)
        options = dict(frames_per_segment=9, num_inference_steps=4, max_sequence_length=16)
        print("no --checkpoint: tiny random-weight config (loop smoke test, not Wan's speed)")
    depth = args.depth_model or ConstantDepth(2.0)
    model = make_model("wan", image_size=image_size, checkpoint=checkpoint, memory_dir=args.memory_dir, device=device,
                       offload=args.offload, depth_estimator=depth, progress=False, **options)
    batch, frames = args.batch, model.latent_frames
    world = World(model, num_worlds=batch)  # as the envs build it: the model's voxel size, the default filters
    image = np.random.default_rng(0).integers(0, 255, (*model.image_size, 3), dtype=np.uint8)
    rows = []
    for index in range(args.segments):
        poses = _poses(batch, frames, index * (frames - 1))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        if index == 0:
            step = world.reset(poses, seeds=list(range(batch)), conditioning=[{"image": image, "prompt": args.prompt}] * batch)
        else:
            step = world.step(poses)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        video_frames = step.frames.shape[1]
        rows.append({
            "segment": index,
            "seconds": seconds,
            "seconds_per_frame": seconds / (video_frames * batch),
            "frames": video_frames * batch,
            "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "rss_mib": _rss_mib(),
            "memory_entries": int(world.memory.entries_per_world().sum()),
            "memory_hit": float(step.memory_hit.mean()),
        })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="local Wan2.2-TI2V-5B-Diffusers directory")
    parser.add_argument("--memory-dir")
    parser.add_argument("--depth-model", help="local transformers depth-estimation model directory")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--image-size", type=int, nargs=2, default=(704, 1280), metavar=("H", "W"))
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--segments", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = run(args)
    print(f"{'segment':>7} {'s':>8} {'s/frame':>9} {'frames':>6} {'gpu MiB':>9} {'rss MiB':>9} {'entries':>9} {'hit':>5}")
    for r in rows:
        gpu = "-" if r["gpu_peak_mib"] is None else f"{r['gpu_peak_mib']:.0f}"
        print(f"{r['segment']:>7} {r['seconds']:>8.3f} {r['seconds_per_frame']:>9.4f} {r['frames']:>6} {gpu:>9} "
              f"{r['rss_mib']:>9.0f} {r['memory_entries']:>9} {r['memory_hit']:>5.2f}")
    write_json(args.json, header(args) | {"rows": rows})


if __name__ == "__main__":
    main()
