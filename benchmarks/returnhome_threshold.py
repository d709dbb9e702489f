"""Where ReturnHome's success threshold comes from: revisit PSNR of exact returns, memory on vs off.

    python benchmarks/returnhome_threshold.py [--episodes 40] [--threshold 21] [--json F]

The waypoint policy walks to ReturnHome's waypoint and back to the exact start
pose and heading, so every return is geometrically perfect; what differs is
the world model's memory. The revisit PSNR (the frame at home vs the episode's
first frame) is collected over ``--episodes`` held-out episodes with memory on
and off, on the default procedural world (64x64, CPU). A threshold separates
them when most returns pass with memory and few without; the table says how
many pass at ``--threshold`` (the task's default, ``ReturnHomeTask``).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from mirage_env.agents.evaluate import evaluate, make_env
from mirage_env.agents.scripted import make_policy
from mirage_env.tasks import ReturnHomeTask

from mirage_env.benchreport import header, write_json


def revisit_psnrs(use_memory: bool, episodes: int, seed: int) -> np.ndarray:
    env = make_env(task="returnhome", use_memory=use_memory)
    summary = evaluate(env, make_policy("waypoint", seed=seed), episodes, seed=seed)
    return np.array([m["revisit_psnr"] for m in summary["per_episode"] if not math.isnan(m.get("revisit_psnr", math.nan))])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--threshold", type=float, default=ReturnHomeTask().revisit_psnr_threshold)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    result = {**header(args), "episodes": args.episodes, "threshold": args.threshold}
    print(f"{'memory':<8}{'returns':>9}{'median dB':>11}{'min dB':>8}{'max dB':>8}{'pass':>8}")
    for use_memory in (True, False):
        values = revisit_psnrs(use_memory, args.episodes, args.seed)
        tag = "on" if use_memory else "off"
        passing = float(np.mean(values >= args.threshold)) if len(values) else float("nan")
        result[f"memory_{tag}"] = {"returns": len(values), "median": float(np.median(values)), "min": float(values.min()),
                                   "max": float(values.max()), "pass_fraction": passing}
        print(f"{tag:<8}{len(values):>9}{np.median(values):>11.1f}{values.min():>8.1f}{values.max():>8.1f}{passing:>8.0%}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
