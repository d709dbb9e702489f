"""Soak: one long episode, does anything drift? RSS, step time and memory size over 100,000 steps.

    python benchmarks/soak.py [--steps 100000] [--window 5000] [--json benchmarks/results/soak.json]

A random policy walks one MirageEnv episode with no step limit on the default
procedural world (64x64, CPU). The first and last ``--window`` steps are
compared: process RSS growth and step-time drift (both should stay under 5%),
and memory entries against the memory's bound (``max_bricks_per_world``, evicted
least-recently-written first), so a long episode holds a bounded memory.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from tqdm import tqdm

from mirage_env.agents.scripted import RandomPolicy
from mirage_env.benchreport import header, write_json
from mirage_env.cli_types import positive_int
from mirage_env.env import MirageEnv


def rss_mib() -> float:
    """Resident set size now, from /proc (the peak from getrusage would hide a shrink)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=100_000)
    parser.add_argument("--window", type=positive_int, default=5_000)
    parser.add_argument("--image-size", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if 2 * args.window > args.steps:
        parser.error(f"--steps ({args.steps}) must be at least twice --window ({args.window})")

    import torch

    torch.set_num_threads(1)
    env = MirageEnv(image_size=args.image_size, max_episode_steps=None)
    env.reset(seed=args.seed)
    policy = RandomPolicy(args.seed)
    times = np.zeros(args.steps)
    rss = np.zeros(args.steps)
    entries = np.zeros(args.steps, dtype=np.int64)
    for step in tqdm(range(args.steps), desc="soak", unit="step", disable=args.quiet, mininterval=1.0):
        start = time.perf_counter()
        _, _, terminated, truncated, info = env.step(policy())
        times[step] = time.perf_counter() - start
        if terminated or truncated:
            raise RuntimeError(f"the episode ended at step {step}; the soak needs one unbroken episode")
        if step % 100 == 0 or step == args.steps - 1:
            rss[step] = rss_mib()
        entries[step] = info["memory_entries"]
    w = args.window
    sampled = np.flatnonzero(rss)
    first_rss, last_rss = rss[sampled[sampled < w]].mean(), rss[sampled[sampled >= args.steps - w]].mean()
    first_ms, last_ms = 1000 * times[:w].mean(), 1000 * times[-w:].mean()
    limit = env.world.memory.max_bricks_per_world * env.world.memory.brick_size ** 3
    result = {
        **header(args),
        "steps": args.steps, "window": w,
        "rss_mib_first": first_rss, "rss_mib_last": last_rss, "rss_growth": last_rss / first_rss - 1,
        "ms_per_step_first": first_ms, "ms_per_step_last": last_ms, "step_time_drift": last_ms / first_ms - 1,
        "memory_entries_max": int(entries.max()), "memory_entries_last": int(entries[-1]),
        "memory_entry_bound": int(limit), "memory_bytes_last": int(info["memory_bytes"]),
        "steps_per_s": args.steps / times.sum(),
    }
    print(f"{'':<22}{'first ' + str(w):>14}{'last ' + str(w):>14}{'change':>10}")
    print(f"{'RSS (MiB)':<22}{first_rss:>14.1f}{last_rss:>14.1f}{result['rss_growth']:>+10.1%}")
    print(f"{'step time (ms)':<22}{first_ms:>14.3f}{last_ms:>14.3f}{result['step_time_drift']:>+10.1%}")
    print(f"memory entries: max {entries.max():,}, last {entries[-1]:,} (bound {limit:,}); "
          f"{result['steps_per_s']:.0f} steps/s over {args.steps:,} steps (1 thread)")
    write_json(args.json, result, quiet=args.quiet)
    return result


if __name__ == "__main__":
    main()
