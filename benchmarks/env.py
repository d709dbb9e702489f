"""Single-env speed: steps per second of MirageEnv on the default world, and where the time goes.

    python benchmarks/env.py [--json out.json] [--steps 2000] [--threads 1]

Each step is one action -> memory read -> procedural generation -> filters ->
memory write -> decoded frame. The breakdown times those phases by wrapping them,
so its total is slightly above the plain run.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from mirage_env.agents.scripted import RandomPolicy
from mirage_env.benchreport import header, write_json
from mirage_env.env import MirageEnv


def steps_per_second(image_size: int, steps: int, seed: int = 0) -> float:
    env = MirageEnv(image_size=image_size, max_episode_steps=10**9)
    env.reset(seed=seed)
    policy = RandomPolicy(seed)
    for _ in range(20):  # warm-up
        env.step(policy())
    start = time.perf_counter()
    for _ in range(steps):
        env.step(policy())
    return steps / (time.perf_counter() - start)


def breakdown(image_size: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds per step spent in each phase of the segment loop."""
    env = MirageEnv(image_size=image_size, max_episode_steps=10**9)
    env.reset(seed=seed)
    totals: dict[str, float] = defaultdict(float)

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            totals[name] += time.perf_counter() - start
            return result
        return wrapper

    world = env.world
    world.memory.read = timed("memory read", world.memory.read)
    world.memory.write = timed("memory write", world.memory.write)
    world.model.generate = timed("generate", world.model.generate)
    world.filters = timed("filters", world.filters)
    env.batch.task.step = timed("task", env.batch.task.step)
    policy = RandomPolicy(seed)
    start = time.perf_counter()
    for _ in range(steps):
        env.step(policy())
    total = time.perf_counter() - start
    result = {name: seconds / steps * 1e3 for name, seconds in totals.items()}
    result["rest (motion, env, info)"] = (total - sum(totals.values())) / steps * 1e3
    result["total"] = total / steps * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = header(args)
    print(f"MirageEnv (procedural, memory on, random policy), {args.threads} thread(s)")
    print(f"{'image':>9} {'steps/s':>9} {'ms/step':>8}")
    for size in (64, 128):
        rate = steps_per_second(size, args.steps if size == 64 else max(200, args.steps // 4))
        results[f"steps_per_s_{size}"] = rate
        print(f"{size:>4}x{size:<4} {rate:>9.0f} {1e3 / rate:>8.3f}")
    for size in (64, 128):
        phases = breakdown(size, max(200, args.steps // 4))
        results[f"breakdown_ms_{size}"] = phases
        print(f"\nwhere the time goes at {size}x{size} (ms per step):")
        for name, ms in sorted(phases.items(), key=lambda item: -item[1]):
            print(f"  {name:<26} {ms:7.3f}")
    write_json(args.json, results)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
