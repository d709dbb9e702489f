"""Snapshots for planning: time and bytes of snapshot / restore / fork, against save_world / load_world.

    python benchmarks/snapshot.py [--json out.json] [--entries 1000,100000] [--repeats 5] [--threads 1]

A ``MirageEnv`` (procedural, 64x64, memory on) is reset and stepped a few times, then
its memory is filled with synthetic entries up to each size: each write lifts a square
grid of latent pixels at 20 m from a camera 100 m along x from the last, so every pixel
lands in a voxel of its own. Then, each the median of ``--repeats`` runs:
``snapshot()``, ``restore(snapshot)`` (validated as a file is, then rebuilt), ``fork()``,
and for comparison ``save_world`` / ``load_world`` of the same state to a file on disk.
"bytes" is what the snapshot's tensors hold (the memory trimmed to what is stored);
"memory bytes" what the live memory holds. Each size also checks that a restore replays
the same frames.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mirage_env.benchreport import header, write_json
from mirage_env.env import MirageEnv
from mirage_env.geometry import Camera, Move

GRID = 64  # latent pixels per side of a synthetic write (64 x 64 = 4096 entries)


def filled_env(entries: int, image_size: int, seed: int = 0) -> MirageEnv:
    """A procedural env mid-episode whose memory holds at least ``entries`` entries."""
    env = MirageEnv(image_size=image_size, max_episode_steps=10_000)
    env.reset(seed=seed)
    for move in (Move.FORWARD, Move.TURN_LEFT, Move.FORWARD):
        env.step(move)
    memory = env.world.memory
    side = GRID if entries >= GRID * GRID else math.ceil(math.sqrt(entries))
    camera = Camera.from_fov(side, side, 90.0)
    generator = torch.Generator().manual_seed(seed)
    write = 0
    while int(memory.entries_per_world().sum()) < entries:
        write += 1
        pose = torch.eye(4, dtype=torch.float64)
        pose[0, 3] = 100.0 * write
        latents = torch.randn(1, memory.channels, side, side, generator=generator)
        memory.write(latents, torch.full((1, side, side), 20.0), camera, pose[None])
    return env


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def replays_exactly(env: MirageEnv) -> bool:
    snapshot = env.snapshot()
    moves = [Move.FORWARD, Move.TURN_RIGHT, Move.LOOK_DOWN]
    first = [env.step(move)[0]["rgb"] for move in moves]
    env.restore(snapshot)
    again = [env.step(move)[0]["rgb"] for move in moves]
    env.restore(snapshot)
    return all(np.array_equal(a, b) for a, b in zip(first, again))


def measure(entries: int, image_size: int, repeats: int, folder: Path) -> dict:
    env = filled_env(entries, image_size)
    snapshot = env.snapshot()
    path = folder / f"world-{entries}.safetensors"
    env.save_world(path)
    return {
        "entries": int(env.world.memory.entries_per_world().sum()),
        "memory_bytes": env.world.memory.stats(bounds=False)["bytes"],
        "snapshot_bytes": snapshot.nbytes,
        "file_bytes": path.stat().st_size,
        "snapshot_s": median_seconds(env.snapshot, repeats),
        "restore_s": median_seconds(lambda: env.restore(snapshot), repeats),
        "fork_s": median_seconds(env.fork, repeats),
        "save_world_s": median_seconds(lambda: env.save_world(path), repeats),
        "load_world_s": median_seconds(lambda: env.load_world(path), repeats),
        "restore_replays_exactly": replays_exactly(env),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--entries", default="1000,100000", help="memory sizes, comma-separated")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(n) for n in args.entries.split(",") if n]

    # What else ran on the machine meanwhile (the figures are wall-clock times).
    results = header(args) | {"load_average_1_5_15_min": list(os.getloadavg()), "sizes": []}
    print(f"MirageEnv (procedural {args.image_size}x{args.image_size}) with synthetic memory entries, "
          f"{args.threads} torch thread(s); median of {args.repeats}, ms")
    print(f"{'entries':>8} {'snapshot':>9} {'restore':>8} {'fork':>7} {'save':>7} {'load':>7} "
          f"{'snap MB':>8} {'file MB':>8} {'mem MB':>7} {'exact':>6}")
    with tempfile.TemporaryDirectory() as folder:
        for entries in sizes:
            row = measure(entries, args.image_size, args.repeats, Path(folder))
            results["sizes"].append(row)
            print(f"{row['entries']:>8} {1e3 * row['snapshot_s']:>9.2f} {1e3 * row['restore_s']:>8.2f} "
                  f"{1e3 * row['fork_s']:>7.2f} {1e3 * row['save_world_s']:>7.2f} {1e3 * row['load_world_s']:>7.2f} "
                  f"{row['snapshot_bytes'] / 1e6:>8.2f} {row['file_bytes'] / 1e6:>8.2f} "
                  f"{row['memory_bytes'] / 1e6:>7.2f} {str(row['restore_replays_exactly']):>6}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
