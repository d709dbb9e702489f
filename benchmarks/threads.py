"""Thread scaling: aggregate steps/s of MirageVectorEnv (compiled CPU kernels) at each thread count.

    python benchmarks/threads.py [--threads 1,2] [--sizes 64,256] [--seconds 2] [--json out.json]

N worlds of the default procedural model at 64x64, memory on, random moves, as
``benchmarks/vector.py`` times them. One process; each thread count is set with
``torch.set_num_threads``, which also bounds the kernels' numba threads
(:func:`mirage_env.compiled.parallel_kernels`). A count above the machine's cores is
left out. ``efficiency`` is the rate per thread over the one-thread rate.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from mirage_env.benchreport import header, write_json
from mirage_env.compiled import KERNELS_ENV

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the timing of benchmarks/vector.py, shared
from vector import steps_per_second  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--sizes", default="64,256", help="numbers of worlds N, comma-separated")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0, help="time each measurement at least this long")
    parser.add_argument("--max-episode-steps", type=int, default=500)
    args = parser.parse_args()
    os.environ[KERNELS_ENV] = "1"  # every timed step runs the compiled path
    cores = os.cpu_count() or 1
    counts = [t for t in (int(c) for c in args.threads.split(",") if c) if t <= cores]
    sizes = [int(n) for n in args.sizes.split(",") if n]

    results = header(args) | {"cores": cores, "steps_per_s": {}, "efficiency": {}}
    print(f"MirageVectorEnv, {args.image_size}x{args.image_size}, compiled kernels, {cores} cores; "
          "aggregate steps/s (efficiency: per-thread rate over the 1-thread rate)")
    print(f"{'threads':>7} " + " ".join(f"{'N=' + str(n):>9}" for n in sizes))
    for threads in counts:  # in the order given: rerun a count later in the list to see the machine drift
        torch.set_num_threads(threads)
        row = {str(n): steps_per_second("native", n, args.image_size, args.seconds, args.max_episode_steps)[0]
               for n in sizes}
        results["steps_per_s"][str(threads)] = row  # a repeated count keeps its last run
        print(f"{threads:>7} " + " ".join(f"{row[str(n)]:>9.0f}" for n in sizes), flush=True)
    base = results["steps_per_s"].get("1")
    if base:
        for threads, row in results["steps_per_s"].items():
            results["efficiency"][threads] = {n: rate / (int(threads) * base[n]) for n, rate in row.items()}
        print("efficiency: " + "; ".join(
            f"{t} threads " + " ".join(f"{e:.2f}" for e in row.values()) for t, row in results["efficiency"].items()))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
