"""Latent spatial memory: per-step cost against what is stored, and bytes over repeated loops.

A camera walks a closed loop inside a box room (8 m x 3 m x 8 m); each step reads
the memory at the next pose and writes that pose's latent frame (48 channels, the
Wan2.2 width). Before timing, the memory is filled with extra entries elsewhere in
the explored world (rooms 100+ m away, beyond ``--max-read-depth``), so the table
shows how the step cost changes with what is stored, not with what is visible.

    python benchmarks/memory.py [--json out.json] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from mirage_env.geometry import Camera, CameraRig
from mirage_env.memory import LatentSpatialMemory

CHANNELS = 48
FACTOR = 8
ROOM = torch.tensor([4.0, 1.5, 4.0], dtype=torch.float64)  # half extents


def room_depth(camera: Camera, c2w: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Exact z-depth of an axis-aligned box room seen from inside (ray/box exit distance)."""
    v, u = torch.meshgrid(torch.arange(camera.height) + 0.5, torch.arange(camera.width) + 0.5, indexing="ij")
    rays_cam = torch.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, torch.ones_like(u)], -1).double()
    rays = rays_cam @ c2w[:3, :3].T
    origin = c2w[:3, 3] - centre
    bound = torch.where(rays > 0, ROOM, -ROOM)
    safe = torch.where(rays.abs() > 1e-12, rays, torch.full_like(rays, 1e-12))
    t = ((bound - origin) / safe).masked_fill(rays.abs() <= 1e-12, math.inf).amin(-1)
    return t.float()  # rays_cam has z = 1, so ray length parameter t is the z-depth


def loop_poses(steps: int, radius: float = 1.5) -> list[torch.Tensor]:
    poses = []
    for i in range(steps):
        angle = 2 * math.pi * i / steps
        rig = CameraRig(radius * math.sin(angle), 0.0, radius * math.cos(angle) - radius, yaw=angle + math.pi / 2)
        poses.append(torch.from_numpy(rig.c2w()))
    return poses


def fill(memory: LatentSpatialMemory, entries: int, generator: torch.Generator) -> None:
    """Write rooms far from the loop until ``entries`` are stored.

    Filling uses a wide 64x64 latent grid so a million entries take a few hundred writes.
    """
    latent = Camera.from_fov(64, 64, 90)
    room = 0
    while memory.stats(bounds=False)["entries"] < entries:
        before = memory.stats(bounds=False)["entries"]
        centre = torch.tensor([200.0 + 20.0 * (room % 40), 0.0, 200.0 + 20.0 * (room // 40)], dtype=torch.float64)
        for pose in loop_poses(24):
            pose = pose.clone()
            pose[:3, 3] += centre
            depth = room_depth(latent, pose, centre)
            latents = torch.randn(CHANNELS, latent.height, latent.width, generator=generator)
            memory.write(latents, depth, latent, pose)
            if memory.stats(bounds=False)["entries"] >= entries:
                break
        room += 1
        if memory.stats(bounds=False)["entries"] <= before:
            raise RuntimeError(f"memory stopped growing at {before:,} entries (capacity bound reached, evicting); "
                               f"raise max_bricks_per_world to hold {entries:,}")


def time_steps(memory: LatentSpatialMemory, camera: Camera, steps: int, generator: torch.Generator) -> float:
    latent = camera.scaled(1 / FACTOR)
    poses = loop_poses(steps)
    origin = torch.zeros(3, dtype=torch.float64)
    depths = [room_depth(latent, p, origin) for p in poses]
    latents = [torch.randn(CHANNELS, latent.height, latent.width, generator=generator) for _ in poses]
    for pose, depth, lat in zip(poses[:4], depths[:4], latents[:4]):  # warm-up
        memory.read(latent, pose)
        memory.write(lat, depth, latent, pose)
    start = time.perf_counter()
    for pose, depth, lat in zip(poses, depths, latents):
        memory.read(latent, pose)
        memory.write(lat, depth, latent, pose)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per setting")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--entries", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--voxel-size", type=float, default=0.05)
    parser.add_argument("--max-read-depth", type=float, default=50.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    results: dict = {"read_write_ms_by_size": {}, "config": vars(args) | {"channels": CHANNELS, "factor": FACTOR,
                                                                           "cpu": platform.processor() or platform.machine()}}
    print(f"read+write per step, {CHANNELS} channels, {args.threads} thread(s), voxel {args.voxel_size} m")
    print(f"{'image':>9} {'latent':>7} {'stored entries':>15} {'ms / step':>10} {'vs 1e3':>7}")
    for size in args.sizes:
        camera = Camera.from_fov(size, size, 90)
        per_size = {}
        for entries in args.entries:
            # Room for the largest fill: sparse far rooms use many bricks per entry.
            memory = LatentSpatialMemory(CHANNELS, voxel_size=args.voxel_size, max_read_depth=args.max_read_depth,
                                         max_bricks_per_world=1 << 20)
            fill(memory, entries, generator)
            stored = memory.stats(bounds=False)["entries"]
            ms = time_steps(memory, camera, args.steps, generator)
            per_size[entries] = {"ms": ms, "stored": stored}
            base = per_size[args.entries[0]]["ms"]
            print(f"{size:>4}x{size:<4} {size // FACTOR:>3}x{size // FACTOR:<3} {stored:>15,} {ms:>10.3f} {ms / base:>6.2f}x")
        results["read_write_ms_by_size"][size] = per_size
    if 64 in args.sizes:
        results["read_write_ms"] = {str(k): v["ms"] for k, v in results["read_write_ms_by_size"][64].items()}

    # Bytes over repeated passes of the same closed loop: memory grows with space, not time.
    camera = Camera.from_fov(64, 64, 90)
    latent = camera.scaled(1 / FACTOR)
    memory = LatentSpatialMemory(CHANNELS, voxel_size=args.voxel_size, max_read_depth=args.max_read_depth)
    origin = torch.zeros(3, dtype=torch.float64)
    poses = loop_poses(48)
    bytes_after = {}
    for loop in range(1, 11):
        for pose in poses:
            # Each pass generates fresh latents: only the geometry repeats.
            memory.write(torch.randn(CHANNELS, latent.height, latent.width, generator=generator),
                         room_depth(latent, pose, origin), latent, pose)
        bytes_after[loop] = memory.stats(bounds=False)["bytes"]
    results["bytes_one_loop"] = bytes_after[1]
    results["bytes_ten_loops"] = bytes_after[10]
    results["entries_ten_loops"] = memory.stats(bounds=False)["entries"]
    print(f"\nbytes after 1 loop: {bytes_after[1]:,}   after 10 loops: {bytes_after[10]:,} "
          f"({bytes_after[10] / bytes_after[1]:.3f}x)   entries: {results['entries_ten_loops']:,}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
