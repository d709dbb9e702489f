"""Single-env speed: steps per second of MirageEnv on the default world, and where the time goes.

    python benchmarks/env.py [--json out.json] [--steps 2000] [--threads 1] [--rounds 3]

Each step is one action -> memory read -> procedural generation -> filters ->
memory write -> decoded frame. The rate times ``env.step`` alone (a random policy's
actions, drawn before the clock starts). The breakdown times those phases by wrapping
them, so its total is slightly above the plain run.

The compiled CPU kernels (mirage_env/compiled.py) are timed against the torch path
(``MIRAGE_ENV_KERNELS=0``) in alternating rounds in this one process, so a machine
whose load wanders still gives a fair ratio (``speedup_vs_torch_64``); the reported
rate is the median round. ``gymnasium_benchmark_step_64`` is Gymnasium's own
``gymnasium.utils.performance.benchmark_step`` on the same env (random actions from
the action space, resets included): the figure a user would measure. The JSON also
keeps every round's rate (``rounds_steps_per_s_*``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import numpy as np
import torch

from gymnasium.utils.performance import benchmark_step

from mirage_env.agents.scripted import RandomPolicy
from mirage_env import kernel_warmup
from mirage_env.benchreport import header, write_json
from mirage_env.compiled import KERNELS_ENV
from mirage_env.env import MirageEnv


def with_kernels(enabled: bool) -> None:
    os.environ[KERNELS_ENV] = "1" if enabled else "0"


def steps_per_second(image_size: int, steps: int, seed: int = 0) -> float:
    """Steps per second of ``env.step`` alone: the random policy's actions are drawn before the clock starts."""
    env = MirageEnv(image_size=image_size, max_episode_steps=10**9)
    env.reset(seed=seed)
    policy = RandomPolicy(seed)
    actions = [policy() for _ in range(20 + steps)]
    for action in actions[:20]:  # warm-up
        env.step(action)
    start = time.perf_counter()
    for action in actions[20:]:
        env.step(action)
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
    actions = [policy() for _ in range(steps)]
    start = time.perf_counter()
    for action in actions:
        env.step(action)
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
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of compiled and torch paths")
    parser.add_argument("--gym-seconds", type=int, default=5, help="duration of gymnasium's benchmark_step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = header(args)
    # First: what a user sees once per process. The kernels load from numba's cache (or compile, on a
    # machine's first run) in a background thread (mirage_env/kernel_warmup.py) while the first steps
    # take the torch path: the first reset + step never waits for them; `kernels_ready_s` says when
    # the compiled path took over.
    os.environ.pop(KERNELS_ENV, None)
    start = time.perf_counter()
    env = MirageEnv(image_size=64)
    env.reset(seed=0)
    env.step(0)
    results["first_reset_and_step_s"] = time.perf_counter() - start
    kernel_warmup.wait()
    results["kernels_ready_s"] = time.perf_counter() - start
    print(f"first reset + step in this process: {results['first_reset_and_step_s']:.2f} s; compiled kernels "
          f"ready (loaded or compiled in the background) after {results['kernels_ready_s']:.2f} s")
    print(f"MirageEnv (procedural, memory on, random policy), {args.threads} thread(s)")
    print(f"{'image':>9} {'path':>8} {'steps/s':>9} {'ms/step':>8}")
    for size in (64, 128):
        steps = args.steps if size == 64 else max(200, args.steps // 4)
        rates = {True: [], False: []}
        for _ in range(args.rounds):  # alternate: both paths see the same machine load
            for kernels in (True, False):
                with_kernels(kernels)
                rates[kernels].append(steps_per_second(size, steps))
        rate, torch_rate = statistics.median(rates[True]), statistics.median(rates[False])
        results[f"steps_per_s_{size}"] = rate
        results[f"torch_path_steps_per_s_{size}"] = torch_rate
        results[f"speedup_vs_torch_{size}"] = rate / torch_rate
        # every round, in order: the spread shows how much the machine wandered during the run
        results[f"rounds_steps_per_s_{size}"] = {"compiled": rates[True], "torch": rates[False]}
        for name, r in (("compiled", rate), ("torch", torch_rate)):
            print(f"{size:>4}x{size:<4} {name:>8} {r:>9.0f} {1e3 / r:>8.3f}")
    with_kernels(True)
    env = MirageEnv(image_size=64)
    env.action_space.seed(0)
    results["gymnasium_benchmark_step_64"] = benchmark_step(env, target_duration=args.gym_seconds, seed=0)
    print(f"\ngymnasium.utils.performance.benchmark_step, 64x64: {results['gymnasium_benchmark_step_64']:.0f} steps/s")
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
