"""PPO learns easy PointNav on a CPU: trained vs random success over 100 evaluation episodes.

    python benchmarks/train_pointnav.py [--json benchmarks/results/train_pointnav.json] [--minutes 15] [--kernels on]

Easy setting: goals 1-2 m away within 40 degrees of the starting heading, 40
steps per episode, 64x64 images. The policy sees ``rgb`` (NatureCNN), ``pose``
and the task's ``goal`` vector; the goal vector is what makes PointNav quick to
learn, the CNN is kept small (64 features) so updates stay cheap on a CPU.
Training stops at ``--timesteps`` or after ``--minutes`` of wall time, whichever
comes first; both policies then meet the same 100 held-out worlds and goals.
The run is a pass when the trained success rate beats random by >= 30 points.

It also splits the training wall time between env steps (``MirageVectorEnv.step``
while PPO collects rollouts) and the rest (PPO's forward passes and updates, SB3's
bookkeeping): ``env_seconds`` / ``ppo_seconds``. ``--kernels off`` runs the envs on
the torch path (``MIRAGE_ENV_KERNELS=0``), for the split before the compiled kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from mirage_env.agents import train
from mirage_env.compiled import KERNELS_ENV
from mirage_env.vector import MirageVectorEnv

EASY = ["--task-option", "min_distance=1.0", "--task-option", "max_distance=2.0",
        "--task-option", "max_bearing_degrees=40", "--max-episode-steps", "40"]


@contextmanager
def env_step_timer():
    """Seconds spent in ``MirageVectorEnv.step`` while PPO learns (not while it is evaluated)."""
    from stable_baselines3 import PPO

    spent = {"env": 0.0, "learning": False}
    step, learn = MirageVectorEnv.step, PPO.learn

    def timed_step(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return step(self, *args, **kwargs)
        finally:
            if spent["learning"]:
                spent["env"] += time.perf_counter() - start

    def flagged_learn(self, *args, **kwargs):
        spent["learning"] = True
        try:
            return learn(self, *args, **kwargs)
        finally:
            spent["learning"] = False

    MirageVectorEnv.step, PPO.learn = timed_step, flagged_learn
    try:
        yield spent
    finally:
        MirageVectorEnv.step, PPO.learn = step, learn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmarks/results/train_pointnav.json")
    parser.add_argument("--out", default="benchmarks/results/pointnav_ppo", help="policy NAME (.safetensors + .json)")
    parser.add_argument("--timesteps", type=int, default=150_000)
    parser.add_argument("--minutes", type=float, default=12.0, help="training wall-time cap (evaluation comes after)")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", choices=("on", "off"), default="on",
                        help="compiled CPU kernels for the envs (off: the torch path, as before them)")
    options = parser.parse_args(argv)
    os.environ[KERNELS_ENV] = "1" if options.kernels == "on" else "0"

    train_parser = argparse.ArgumentParser()
    train.add_arguments(train_parser)
    args = train_parser.parse_args([
        "--task", "pointnav", "--timesteps", str(options.timesteps), "--num-envs", str(options.num_envs),
        "--max-minutes", str(options.minutes), "--n-steps", "128", "--batch-size", "256", "--n-epochs", "4",
        "--eval-episodes", str(options.episodes), "--compare-random", "--seed", str(options.seed),
        "--out", options.out, *EASY,
    ])
    with env_step_timer() as spent:
        results = train.main(args)
    results["kernels"] = options.kernels
    results["env_seconds"] = spent["env"]
    results["ppo_seconds"] = results["train_seconds"] - spent["env"]
    results["env_fraction"] = spent["env"] / results["train_seconds"]
    results.update({"platform": platform.platform(), "python": sys.version.split()[0], "command": sys.argv,
                    "beats_random_by": results["success_trained"] - results["success_random"]})
    results["pass"] = results["beats_random_by"] >= 0.30
    print(f"PointNav PPO: success {results['success_trained']:.0%} trained vs {results['success_random']:.0%} random "
          f"({results['beats_random_by'] * 100:+.0f} points) after {results['timesteps']} steps, "
          f"{results['train_seconds'] / 60:.1f} min of training; env steps {results['env_seconds']:.0f} s "
          f"({results['env_fraction']:.0%}), PPO {results['ppo_seconds']:.0f} s (kernels {options.kernels})")
    Path(options.json).parent.mkdir(parents=True, exist_ok=True)
    Path(options.json).write_text(json.dumps(results, indent=2))
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
