"""Batched worlds: aggregate steps/s of MirageVectorEnv against gymnasium's Sync- and AsyncVectorEnv of single envs.

    python benchmarks/vector.py [--json out.json] [--sizes 1,8,64] [--seconds 2] [--threads 1] [--async-envs 8] [--profile]
    python benchmarks/vector.py --device cuda --sizes 64,256,1024 [--json out.json]
    python benchmarks/vector.py --scaling 1,2,4,8 --sizes 64,256 [--json out.json]

Both run N worlds of the default procedural model at 64x64 with memory on and
random moves (episodes of ``--max-episode-steps``, autoresets included). The
native env makes one memory read, one generator call and one memory write per
step for all N worlds; SyncVectorEnv steps N ``MirageEnv``s one after another;
AsyncVectorEnv runs ``--async-envs`` single envs in as many worker processes (one
torch thread each, forkserver). Async is measured once, at that count rather than at
every N: its aggregate rate is bounded by the cores (each worker is a single env),
so more processes than cores add only contention, and 64 processes of torch do not
fit a small machine's memory; ``speedup_vs_async_64`` divides the native rate at
N = 64 by it.
``--profile`` prints where the native env spends its time at the largest N.

``--device cuda`` times the native env alone with the model and its memory on the GPU (the torch
path: the compiled kernels are CPU-only), synchronising the device before each clock reading; the
Sync and Async comparisons are skipped there (N single GPU envs measure Python dispatch, not the
GPU). The CPU figures are measured as without the option.

``--scaling`` times the native env alone at each thread count, in one process and in the order
given (repeat a count to see how far the machine drifted): ``torch.set_num_threads`` also bounds
the kernels' numba threads (:func:`mirage_env.compiled.parallel_kernels`). A count above the
machine's cores is left out; ``efficiency`` is the rate per thread over the one-thread rate.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import time

import gymnasium as gym
import numpy as np
import torch

import mirage_env  # noqa: F401  (registers the ids)
from mirage_env.benchreport import header, write_json
from mirage_env.compiled import KERNELS_ENV
from mirage_env.env import MirageEnv
from mirage_env.vector import MirageVectorEnv


def make(kind: str, num_envs: int, image_size: int, max_episode_steps: int, device: str = "cpu"):
    if kind == "native":
        on_device = {"backend_options": {"device": device}} if device != "cpu" else {}  # memory follows the model
        return MirageVectorEnv(num_envs, image_size=image_size, max_episode_steps=max_episode_steps, **on_device)
    if kind == "async":
        return gym.vector.AsyncVectorEnv(
            [functools.partial(MirageEnv, image_size=image_size, max_episode_steps=max_episode_steps)
             for _ in range(num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, context="forkserver",
        )
    return gym.vector.SyncVectorEnv(
        [lambda: MirageEnv(image_size=image_size, max_episode_steps=max_episode_steps) for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,  # as the native env: no step spent on a reset
    )


def steps_per_second(kind: str, num_envs: int, image_size: int, seconds: float, max_episode_steps: int,
                     seed: int = 0, device: str = "cpu") -> tuple[float, int]:
    """Aggregate sub-environment steps per second over at least ``seconds`` (and 3 batched steps)."""
    envs = make(kind, num_envs, image_size, max_episode_steps, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    envs.reset(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(3):  # warm-up: allocation of memory bricks, first-call overheads
        envs.step(rng.integers(0, 9, num_envs))
    sync()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        envs.step(rng.integers(0, 9, num_envs))
        steps += 1
        sync()
    elapsed = time.perf_counter() - start
    envs.close()
    return steps * num_envs / elapsed, steps


def profile(num_envs: int, image_size: int, steps: int, max_episode_steps: int, top: int = 18,
            device: str = "cpu") -> str:
    envs = make("native", num_envs, image_size, max_episode_steps, device)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    envs.step(rng.integers(0, 9, num_envs))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        envs.step(rng.integers(0, 9, num_envs))
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--sizes", default="1,8,64", help="numbers of worlds N, comma-separated")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0, help="time each measurement at least this long")
    parser.add_argument("--max-episode-steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    parser.add_argument("--async-envs", type=int, default=8,
                        help="worker processes of the AsyncVectorEnv comparison (0: skip it)")
    parser.add_argument("--profile", action="store_true", help="cProfile the native env at the largest N")
    parser.add_argument("--device", default="cpu", help="cpu (default), or cuda: the native env alone on the GPU")
    parser.add_argument("--scaling", help="thread counts, comma-separated: the native env alone at each")
    args = parser.parse_args()
    # Kernels on from the first call in this process and in the async workers it starts (they inherit
    # it), not warmed up in the background: every timed step runs the compiled path (on a GPU, the
    # host's camera motion), and no background compile competes with the timed steps.
    os.environ[KERNELS_ENV] = "1"
    if args.device != "cpu":
        gpu_main(args)
        return
    if args.scaling:
        scaling_main(args)
        return
    torch.set_num_threads(args.threads)
    sizes = [int(n) for n in args.sizes.split(",") if n]

    results = header(args) | {"steps_per_s": {}, "sync_steps_per_s": {}, "speedup_vs_sync": {}}
    print(f"N worlds at {args.image_size}x{args.image_size} (procedural, memory on, random moves), "
          f"{args.threads} torch thread(s); aggregate sub-environment steps per second")
    print(f"{'N':>4} {'native':>9} {'sync':>9} {'speed-up':>9} {'native ms/step':>15}")
    for n in sizes:
        native, _ = steps_per_second("native", n, args.image_size, args.seconds, args.max_episode_steps)
        sync, _ = steps_per_second("sync", n, args.image_size, args.seconds, args.max_episode_steps)
        results["steps_per_s"][str(n)] = native
        results["sync_steps_per_s"][str(n)] = sync
        results["speedup_vs_sync"][str(n)] = native / sync
        print(f"{n:>4} {native:>9.0f} {sync:>9.0f} {native / sync:>8.2f}x {1e3 * n / native:>15.2f}")
    if "64" in results["speedup_vs_sync"]:
        results["speedup_vs_sync_64"] = results["speedup_vs_sync"]["64"]
    if args.async_envs > 0:
        rate, _ = steps_per_second("async", args.async_envs, args.image_size, args.seconds, args.max_episode_steps)
        results["async_envs"] = args.async_envs
        results["async_steps_per_s"] = rate
        print(f"AsyncVectorEnv of {args.async_envs} single envs (one process each): {rate:.0f} steps/s")
        if "64" in results["steps_per_s"]:
            results["speedup_vs_async_64"] = results["steps_per_s"]["64"] / rate
            print(f"native N=64 vs async: {results['speedup_vs_async_64']:.2f}x")
    if args.profile:
        report = profile(max(sizes), args.image_size, steps=10, max_episode_steps=args.max_episode_steps)
        results["profile"] = report
        print(f"\nwhere the native env spends its time at N={max(sizes)} (cProfile, 10 steps):\n{report}")
    write_json(args.json, results)


def gpu_main(args) -> None:
    """Native env steps/s with the model and memory on ``args.device`` (no Sync/Async comparison)."""
    torch.set_num_threads(args.threads)
    sizes = [int(n) for n in args.sizes.split(",") if n]
    results = header(args) | {"steps_per_s": {}}
    print(f"N worlds at {args.image_size}x{args.image_size} (procedural, memory on, random moves) on "
          f"{torch.cuda.get_device_name(args.device)} (torch path); aggregate sub-environment steps per second")
    print(f"{'N':>5} {'native':>9} {'ms/step':>9}")
    for n in sizes:
        native, steps = steps_per_second("native", n, args.image_size, args.seconds, args.max_episode_steps,
                                         device=args.device)
        results["steps_per_s"][str(n)] = native
        print(f"{n:>5} {native:>9.0f} {1e3 * n / native:>9.2f}", flush=True)
    results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(args.device) / 2**30
    if args.profile:  # host-side: on a GPU the time lands on the calls that wait for it (nonzero, item, copies)
        report = profile(max(sizes), args.image_size, 10, args.max_episode_steps, device=args.device)
        results["profile"] = report
        print(f"\nwhere the native env spends its time at N={max(sizes)} (cProfile, 10 steps):\n{report}")
    write_json(args.json, results)


def scaling_main(args) -> None:
    """Native env steps/s at each thread count of ``args.scaling`` (no Sync/Async comparison)."""
    cores = os.cpu_count() or 1
    counts = [t for t in (int(c) for c in args.scaling.split(",") if c) if t <= cores]
    sizes = [int(n) for n in args.sizes.split(",") if n]
    results = header(args) | {"cores": cores, "steps_per_s": {}, "efficiency": {}}
    print(f"MirageVectorEnv, {args.image_size}x{args.image_size}, compiled kernels, {cores} cores; aggregate steps/s")
    print(f"{'threads':>7} " + " ".join(f"{'N=' + str(n):>9}" for n in sizes))
    for threads in counts:
        torch.set_num_threads(threads)
        row = {str(n): steps_per_second("native", n, args.image_size, args.seconds, args.max_episode_steps)[0]
               for n in sizes}
        results["steps_per_s"][str(threads)] = row  # a repeated count keeps its last run
        print(f"{threads:>7} " + " ".join(f"{row[str(n)]:>9.0f}" for n in sizes), flush=True)
    base = results["steps_per_s"].get("1")
    if base:
        for threads, row in results["steps_per_s"].items():
            results["efficiency"][threads] = {n: rate / (int(threads) * base[n]) for n, rate in row.items()}
        print("efficiency (per-thread rate over the 1-thread rate): " + "; ".join(
            f"{t} threads " + " ".join(f"{e:.2f}" for e in row.values()) for t, row in results["efficiency"].items()))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
