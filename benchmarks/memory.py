"""Latent spatial memory: per-step cost against what is stored, and bytes over repeated loops.

A camera walks a closed loop inside a box room (8 m x 3 m x 8 m); each step reads
the memory at the next pose and writes that pose's latent frame (48 channels, the
Wan2.2 width). Before timing, the memory is filled with extra entries elsewhere in
the explored world (rooms 100+ m away, beyond ``--max-read-depth``), so the table
shows how the step cost changes with what is stored, not with what is visible.

    python benchmarks/memory.py [--json out.json] [--threads 1] [--rounds 5]

The compiled CPU kernels (mirage_env/compiled.py) and the torch path
(``MIRAGE_ENV_KERNELS=0``) are timed in alternating rounds on the same memory (both
write it identically), and the fills alternate too, so a machine whose load wanders
still gives fair ratios (kernels vs torch, 1e6 vs 1e3 entries). The
first round walks the loop for the first time (its writes allocate bricks); later ones
revisit it, and the median of the rounds is reported. "ms / step" is the mean of a
round's steps; "median" the median step's read + write in that round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mirage_env.baselines.memory_bench import loop_poses, room_depth
from mirage_env.benchreport import header, write_json
from mirage_env.compiled import KERNELS_ENV
from mirage_env.geometry import Camera
from mirage_env.memory import LatentSpatialMemory

CHANNELS = 48
FACTOR = 8
ROOM_CENTRE = (0.0, 0.0, 0.0)  # the timed loop's room is centred on the first camera


def loop(steps: int) -> torch.Tensor:
    """(steps, 4, 4) poses around the closed loop (radius 1.5 m through the origin), one per step."""
    return loop_poses(steps, 1)[:, 0]


def fill(memory: LatentSpatialMemory, entries: int, generator: torch.Generator) -> None:
    """Write rooms far from the loop until ``entries`` are stored.

    Filling uses a wide 64x64 latent grid so a million entries take a few hundred writes.
    """
    latent = Camera.from_fov(64, 64, 90)
    room = 0
    while memory.stats(bounds=False)["entries"] < entries:
        before = memory.stats(bounds=False)["entries"]
        centre = (200.0 + 20.0 * (room % 40), 0.0, 200.0 + 20.0 * (room // 40))
        poses = loop(24)
        poses[:, :3, 3] += torch.tensor(centre, dtype=torch.float64)
        for pose, depth in zip(poses, room_depth(latent, poses, centre)):
            latents = torch.randn(CHANNELS, latent.height, latent.width, generator=generator)
            memory.write(latents, depth, latent, pose)
            if memory.stats(bounds=False)["entries"] >= entries:
                break
        room += 1
        if memory.stats(bounds=False)["entries"] <= before:
            raise RuntimeError(f"memory stopped growing at {before:,} entries (capacity bound reached, evicting); "
                               f"raise max_bricks_per_world to hold {entries:,}")


def time_steps(memory: LatentSpatialMemory, camera: Camera, steps: int, generator: torch.Generator) -> dict[str, float]:
    """Milliseconds per step: read + write, and each alone (means), and the median step's read + write.

    The mean is the figure (what a run of steps costs); the median shows what a step costs when
    the machine lets it run, since on a shared machine a step that loses the core takes several ms.
    """
    latent = camera.scaled(1 / FACTOR)
    poses = loop(steps)
    depths = room_depth(latent, poses, ROOM_CENTRE)
    latents = [torch.randn(CHANNELS, latent.height, latent.width, generator=generator) for _ in poses]
    for pose, depth, lat in zip(poses[:4], depths[:4], latents[:4]):  # warm-up
        memory.read(latent, pose)
        memory.write(lat, depth, latent, pose)
    reads, writes = [], []
    for pose, depth, lat in zip(poses, depths, latents):
        start = time.perf_counter()
        memory.read(latent, pose)
        middle = time.perf_counter()
        memory.write(lat, depth, latent, pose)
        reads.append(middle - start)
        writes.append(time.perf_counter() - middle)
    read, write = sum(reads), sum(writes)
    return {"ms": (read + write) / steps * 1e3, "read_ms": read / steps * 1e3, "write_ms": write / steps * 1e3,
            "median_step_ms": statistics.median(r + w for r, w in zip(reads, writes)) * 1e3}


def with_kernels(enabled: bool) -> None:
    os.environ[KERNELS_ENV] = "1" if enabled else "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per setting")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of compiled and torch paths")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--entries", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--voxel-size", type=float, default=0.05)
    parser.add_argument("--max-read-depth", type=float, default=50.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    results = header(args)
    results["config"].update(channels=CHANNELS, factor=FACTOR)
    results["load_average_at_start"] = list(os.getloadavg())  # other jobs on the machine inflate every figure
    results["read_write_ms_by_size"] = {}
    print(f"read+write per step, {CHANNELS} channels, {args.threads} thread(s), voxel {args.voxel_size} m; "
          f"compiled kernels and the torch path in {args.rounds} alternating rounds (median)")
    print(f"{'image':>9} {'latent':>7} {'stored entries':>15} {'ms / step':>10} {'read':>7} {'write':>7} "
          f"{'median':>7} {'vs 1e3':>7} {'torch ms':>9}")
    for size in args.sizes:
        camera = Camera.from_fov(size, size, 90)
        memories, stored = {}, {}
        for entries in args.entries:
            # Room for the largest fill: sparse far rooms use many bricks per entry.
            memories[entries] = LatentSpatialMemory(CHANNELS, voxel_size=args.voxel_size,
                                                    max_read_depth=args.max_read_depth, max_bricks_per_world=1 << 20)
            with_kernels(True)
            fill(memories[entries], entries, generator)
            stored[entries] = memories[entries].stats(bounds=False)["entries"]
        rounds = {(entries, kernels): [] for entries in args.entries for kernels in (True, False)}
        # Fill sizes and paths alternate within each round, so load that comes and goes falls on all of them.
        for _ in range(args.rounds):  # both paths write the same memory the same way, so they can share it
            for entries in args.entries:
                for kernels in (True, False):
                    with_kernels(kernels)
                    rounds[entries, kernels].append(time_steps(memories[entries], camera, args.steps, generator))
        with_kernels(True)
        per_size = {}
        for entries in args.entries:
            median = {kernels: {key: statistics.median(r[key] for r in rounds[entries, kernels])
                                for key in rounds[entries, kernels][0]} for kernels in (True, False)}
            per_size[entries] = {**median[True], "stored": stored[entries], "torch_path_ms": median[False]["ms"]}
            base = per_size[args.entries[0]]["ms"]
            ms = per_size[entries]["ms"]
            print(f"{size:>4}x{size:<4} {size // FACTOR:>3}x{size // FACTOR:<3} {stored[entries]:>15,} {ms:>10.3f} "
                  f"{median[True]['read_ms']:>7.3f} {median[True]['write_ms']:>7.3f} "
                  f"{median[True]['median_step_ms']:>7.3f} {ms / base:>6.2f}x {median[False]['ms']:>9.3f}")
        results["read_write_ms_by_size"][size] = per_size
        del memories
    if 64 in args.sizes:
        results["read_write_ms"] = {str(k): v["ms"] for k, v in results["read_write_ms_by_size"][64].items()}
        results["torch_path_read_write_ms"] = {str(k): v["torch_path_ms"]
                                               for k, v in results["read_write_ms_by_size"][64].items()}
        results["median_step_read_write_ms"] = {str(k): v["median_step_ms"]
                                                for k, v in results["read_write_ms_by_size"][64].items()}

    # Bytes over repeated passes of the same closed loop: memory grows with space, not time.
    camera = Camera.from_fov(64, 64, 90)
    latent = camera.scaled(1 / FACTOR)
    memory = LatentSpatialMemory(CHANNELS, voxel_size=args.voxel_size, max_read_depth=args.max_read_depth)
    poses = loop(48)
    depths = room_depth(latent, poses, ROOM_CENTRE)
    bytes_after = {}
    for lap in range(1, 11):
        for pose, depth in zip(poses, depths):
            # Each pass generates fresh latents: only the geometry repeats.
            memory.write(torch.randn(CHANNELS, latent.height, latent.width, generator=generator), depth, latent, pose)
        bytes_after[lap] = memory.stats(bounds=False)["bytes"]
    results["bytes_one_loop"] = bytes_after[1]
    results["bytes_ten_loops"] = bytes_after[10]
    results["entries_ten_loops"] = memory.stats(bounds=False)["entries"]
    print(f"\nbytes after 1 loop: {bytes_after[1]:,}   after 10 loops: {bytes_after[10]:,} "
          f"({bytes_after[10] / bytes_after[1]:.3f}x)   entries: {results['entries_ten_loops']:,}")
    results["load_average_at_end"] = list(os.getloadavg())
    write_json(args.json, results)


if __name__ == "__main__":
    main()
