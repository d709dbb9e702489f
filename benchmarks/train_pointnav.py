"""PPO learns easy PointNav on a CPU: trained vs random success over 100 evaluation episodes.

    python benchmarks/train_pointnav.py [--json benchmarks/results/train_pointnav.json] [--minutes 15]

Easy setting: goals 1-2 m away within 40 degrees of the starting heading, 40
steps per episode, 64x64 images. The policy sees ``rgb`` (NatureCNN), ``pose``
and the task's ``goal`` vector; the goal vector is what makes PointNav quick to
learn, the CNN is kept small (64 features) so updates stay cheap on a CPU.
Training stops at ``--timesteps`` or after ``--minutes`` of wall time, whichever
comes first; both policies then meet the same 100 held-out worlds and goals.
The run is a pass when the trained success rate beats random by >= 30 points.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from mirage_env.agents import train

EASY = ["--task-option", "min_distance=1.0", "--task-option", "max_distance=2.0",
        "--task-option", "max_bearing_degrees=40", "--max-episode-steps", "40"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmarks/results/train_pointnav.json")
    parser.add_argument("--out", default="benchmarks/results/pointnav_ppo", help="policy NAME (.safetensors + .json)")
    parser.add_argument("--timesteps", type=int, default=150_000)
    parser.add_argument("--minutes", type=float, default=12.0, help="training wall-time cap (evaluation comes after)")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)

    train_parser = argparse.ArgumentParser()
    train.add_arguments(train_parser)
    args = train_parser.parse_args([
        "--task", "pointnav", "--timesteps", str(options.timesteps), "--num-envs", str(options.num_envs),
        "--max-minutes", str(options.minutes), "--n-steps", "128", "--batch-size", "256", "--n-epochs", "4",
        "--eval-episodes", str(options.episodes), "--compare-random", "--seed", str(options.seed),
        "--out", options.out, *EASY,
    ])
    results = train.main(args)
    results.update({"platform": platform.platform(), "python": sys.version.split()[0], "command": sys.argv,
                    "beats_random_by": results["success_trained"] - results["success_random"]})
    results["pass"] = results["beats_random_by"] >= 0.30
    print(f"PointNav PPO: success {results['success_trained']:.0%} trained vs {results['success_random']:.0%} random "
          f"({results['beats_random_by'] * 100:+.0f} points) after {results['timesteps']} steps, "
          f"{results['train_seconds'] / 60:.1f} min of training")
    Path(options.json).parent.mkdir(parents=True, exist_ok=True)
    Path(options.json).write_text(json.dumps(results, indent=2))
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
