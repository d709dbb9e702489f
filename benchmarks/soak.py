"""Soak: one long episode, does anything drift? RSS, step time and memory size over 100,000 steps.

    python benchmarks/soak.py [--steps 100000] [--window 5000] [--json benchmarks/results/soak.json]

A random policy walks one MirageEnv episode with no step limit on the default
procedural world (64x64, CPU). The first and last ``--window`` steps are
compared: process RSS growth and step-time drift (medians; both should stay under 5%).
Then the long episode and a fresh env of the same seed are timed in alternating blocks,
which cancels the machine's own drift (a shared VM wanders by about 10% over minutes, more
than the effect looked for). Memory entries are reported against the memory's bound
(``max_bricks_per_world``, least recently written evicted first).
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
    # The same machine drifts by +-10% over minutes (shared VM), more than a 5% effect. So the
    # long episode is also timed against a fresh env of the same seed in alternating blocks:
    # machine drift then hits both alike, and only a cost that grows with the episode remains.
    fresh = MirageEnv(image_size=args.image_size, max_episode_steps=None)
    fresh.reset(seed=args.seed)
    fresh_policy = RandomPolicy(args.seed + 1)
    block, blocks = 250, max(2, args.window // 250)
    long_times, fresh_times = [], []
    for _ in range(blocks):
        for target, pick, sink in ((env, policy, long_times), (fresh, fresh_policy, fresh_times)):
            for _ in range(block):
                start = time.perf_counter()
                target.step(pick())
                sink.append(time.perf_counter() - start)
    interleaved = {"long_median_ms": 1000 * float(np.median(long_times)),
                   "fresh_median_ms": 1000 * float(np.median(fresh_times))}
    interleaved["long_vs_fresh"] = interleaved["long_median_ms"] / interleaved["fresh_median_ms"] - 1
    w = args.window
    sampled = np.flatnonzero(rss)
    first_rss, last_rss = rss[sampled[sampled < w]].mean(), rss[sampled[sampled >= args.steps - w]].mean()
    # Medians: this shared VM has bursts of 10% either way that a mean over a window would carry.
    first_ms, last_ms = 1000 * np.median(times[:w]), 1000 * np.median(times[-w:])
    first_mean, last_mean = 1000 * times[:w].mean(), 1000 * times[-w:].mean()
    limit = env.world.memory.max_bricks_per_world * env.world.memory.brick_size ** 3
    result = {
        **header(args),
        "steps": args.steps, "window": w,
        "rss_mib_first": first_rss, "rss_mib_last": last_rss, "rss_growth": last_rss / first_rss - 1,
        "median_ms_per_step_first": first_ms, "median_ms_per_step_last": last_ms, "step_time_drift": last_ms / first_ms - 1,
        "mean_ms_per_step_first": first_mean, "mean_ms_per_step_last": last_mean,
        "memory_entries_max": int(entries.max()), "memory_entries_last": int(entries[-1]),
        "memory_entry_bound": int(limit), "memory_bytes_last": int(info["memory_bytes"]),
        "steps_per_s": args.steps / times.sum(),
        "interleaved": {**interleaved, "steps_each": len(long_times), "block": block},
    }
    print(f"{'':<22}{'first ' + str(w):>14}{'last ' + str(w):>14}{'change':>10}")
    print(f"{'RSS (MiB)':<22}{first_rss:>14.1f}{last_rss:>14.1f}{result['rss_growth']:>+10.1%}")
    print(f"{'step time, median (ms)':<22}{first_ms:>14.3f}{last_ms:>14.3f}{result['step_time_drift']:>+10.1%}")
    print(f"{'step time, mean (ms)':<22}{first_mean:>14.3f}{last_mean:>14.3f}{last_mean / first_mean - 1:>+10.1%}")
    print(f"{'after ' + format(args.steps, ',') + ' steps vs a fresh env, interleaved (median ms)':<22} "
          f"{interleaved['long_median_ms']:.3f} vs {interleaved['fresh_median_ms']:.3f} "
          f"({interleaved['long_vs_fresh']:+.1%})")
    print(f"memory entries: max {entries.max():,}, last {entries[-1]:,} (bound {limit:,}); "
          f"{result['steps_per_s']:.0f} steps/s over {args.steps:,} steps (1 thread)")
    write_json(args.json, result, quiet=args.quiet)
    return result


if __name__ == "__main__":
    main()
