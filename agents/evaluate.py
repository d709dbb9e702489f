"""Evaluate a policy on a task: success rate, SPL and path length over K episodes.

    mirage-env evaluate --task pointnav --policy waypoint --episodes 100 --json out.json
    mirage-env evaluate --task pointnav --policy pointnav --episodes 100 --video eval.mp4

``--policy`` is a scripted policy name (random, waypoint, ...) or a policy saved
by ``mirage-env train`` (``pointnav.safetensors`` + ``pointnav.json``, loaded
without pickle; see ``policy_file``); its env settings come from its JSON
(flags given here override them). Episode ``i`` uses seed ``--seed + i``, so two
policies evaluated with the same flags meet the same worlds and goals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from mirage_env.cli_types import non_negative_int, output_file, positive_int, video_file
from mirage_env.config import add_env_arguments, options_from_args

# Where training and evaluation differ from the env's defaults (EnvConfig): a shorter
# episode and a task with a goal. Everything else is an EnvConfig option, spelt the same
# in Python, on the command line and in the JSON saved beside a trained model.
AGENT_ENV_DEFAULTS = {"task": "pointnav", "max_episode_steps": 50}


def env_config(**options):
    """The ``EnvConfig`` of training / evaluation: its defaults under ``options``."""
    from mirage_env.config import EnvConfig

    return EnvConfig.from_options({**AGENT_ENV_DEFAULTS, **options})


def make_env(**options):
    """A MirageEnv with its own task instance (tasks hold per-episode state)."""
    from mirage_env.env import MirageEnv

    return MirageEnv(config=env_config(**options))


def make_vector_env(num_envs: int, **options):
    """``num_envs`` worlds batched in one MirageVectorEnv, from the same options as ``make_env``.

    One task instance serves every world: tasks are batched over agents.
    """
    from mirage_env.vector import MirageVectorEnv

    return MirageVectorEnv(num_envs, config=env_config(**options))


def parse_task_options(pairs: list[str] | None) -> dict:
    """["min_distance=0.75", "max_bearing_degrees=30"] -> {"min_distance": 0.75, ...} (values parsed as JSON)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


class ModelPolicy:
    """A Stable-Baselines3 model as a ``policy(observation, info) -> action``."""

    def __init__(self, model, deterministic: bool = True):
        self.model, self.deterministic = model, deterministic

    def reset(self, seed: int | None = None) -> None:
        if seed is None:
            return
        if hasattr(self.model, "set_random_seed"):  # an SB3 algorithm
            self.model.set_random_seed(seed)
        else:  # a bare policy samples from torch's generator
            import torch

            torch.manual_seed(seed)

    def __call__(self, observation, info=None) -> int:
        return int(self.model.predict(observation, deterministic=self.deterministic)[0])


def model_settings(path: str | Path, model) -> dict:
    """Env options a saved model was trained with: its sidecar JSON (validated as an
    EnvConfig), then what its observation space implies."""
    from mirage_env.tasks import TASKS

    settings = env_config().options()
    sidecar = Path(path).with_suffix(".json")
    if sidecar.exists():
        saved = json.loads(sidecar.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"{sidecar} should hold the env options of the model as a JSON object")
        settings = env_config(**saved).options()
    keys = list(model.observation_space.spaces)
    if "rgb" in keys:
        # SB3 stores image spaces channel-first (it transposes them for its CNN).
        shape = model.observation_space["rgb"].shape
        settings["image_size"] = int(shape[1] if shape[0] in (1, 3) else shape[0])
    task_keys = set(TASKS[settings["task"]](**settings["task_options"]).observation_spaces())
    settings["observations"] = [k for k in keys if k not in task_keys]
    return settings


def load_policy(spec: str, seed: int = 0, deterministic: bool = True, trust_pickle: bool = False):
    """(policy, env options or None): a scripted policy by name, a policy saved by ``mirage-env
    train`` (NAME, NAME.json or NAME.safetensors: no pickle), or, only with ``trust_pickle``,
    an SB3 ``.zip``."""
    from .policy_file import load_policy_file, policy_paths

    if spec.endswith(".zip"):
        if not trust_pickle:
            raise ValueError(f"{spec} is a Stable-Baselines3 zip, a pickle: loading it runs any code it carries. "
                             "Load it only if you trust where it came from (--trust-pickle); mirage-env train saves "
                             "NAME.safetensors + NAME.json, which load without running code")
        from stable_baselines3 import PPO

        if not Path(spec).exists():
            raise FileNotFoundError(f"no model at {spec}; train one with `mirage-env train --out NAME`")
        model = PPO.load(spec, device="cpu")
        return ModelPolicy(model, deterministic), model_settings(spec, model)
    weights, document = policy_paths(spec)
    if spec.endswith((".json", ".safetensors")) or document.exists():
        policy, options = load_policy_file(spec)
        return ModelPolicy(policy, deterministic), env_config(**options).options()
    from mirage_env.agents.scripted import POLICIES, make_policy

    if spec not in POLICIES and ("/" in spec or os.sep in spec):
        raise FileNotFoundError(f"no policy at {spec} ({document.name} missing); train one with "
                                f"`mirage-env train --out {spec}`")
    return make_policy(spec, seed=seed), None


def evaluate(env, policy, episodes: int, seed: int = 0, video_episodes: int = 0, progress: bool = True) -> dict:
    """Run ``episodes`` episodes; mean measures plus the per-episode lists, and frames of the first few."""
    from tqdm import tqdm

    episode_measures, frames = [], []
    start = time.perf_counter()
    for episode in tqdm(range(episodes), desc="evaluate", unit="episode", disable=not progress):
        observation, info = env.reset(seed=seed + episode)
        policy.reset(seed + episode)
        record = episode < video_episodes
        if record:
            frames.append(env.batch.last_frames[0].copy())
        total, steps, done = 0.0, 0, False
        while not done:
            observation, reward, terminated, truncated, info = env.step(policy(observation, info))
            total, steps, done = total + reward, steps + 1, terminated or truncated
            if record:
                frames.extend(env.step_frames())
        episode_measures.append({
            "success": float(info.get("success", False)), "spl": float(info.get("spl", 0.0)),
            "path_length": float(info["path_length"]), "return": total, "steps": steps,
            **({"revisit_psnr": info["revisit_psnr"]} if "revisit_psnr" in info else {}),
        })
    elapsed = time.perf_counter() - start
    summary = {key: float(np.mean([m[key] for m in episode_measures if key in m]))
               for key in ("success", "spl", "path_length", "return", "steps", "revisit_psnr")
               if any(key in m for m in episode_measures)}
    summary.update({"episodes": episodes, "seconds": elapsed, "per_episode": episode_measures})
    return summary | {"frames": frames}


def report_training(args, settings: dict, policy, results: dict, line: str) -> dict:
    """The end of every training run: evaluate ``policy`` (and a random one with
    ``--compare-random``) on ``--eval-episodes``, print one line, write ``--json``.

    Args:
        results: what the engine measured (steps, seconds, model path...); evaluation adds to it.
        line: the run's summary so far ("trained N steps in S s -> PATH").
    """
    env = make_env(**settings)
    trained = evaluate(env, policy, args.eval_episodes, seed=args.eval_seed, progress=not args.quiet)
    results = {**results, "success_trained": trained["success"], "spl_trained": trained["spl"],
               "eval_episodes": args.eval_episodes}
    line += f"; over {args.eval_episodes} episodes: success {trained['success']:.1%}, SPL {trained['spl']:.3f}"
    if args.compare_random:
        from .scripted import RandomPolicy

        baseline = evaluate(env, RandomPolicy(), args.eval_episodes, seed=args.eval_seed, progress=not args.quiet)
        results.update({"success_random": baseline["success"], "spl_random": baseline["spl"]})
        line += f" | random: success {baseline['success']:.1%}, SPL {baseline['spl']:.3f}"
    print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=None, help="pointnav (default) | returnhome | explore")
    parser.add_argument("--policy", default="waypoint",
                        help="random | waypoint | ... | NAME of a policy saved by mirage-env train")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow --policy X.zip (a Stable-Baselines3 pickle: loading it can run code)")
    parser.add_argument("--episodes", type=positive_int, default=20)
    parser.add_argument("--seed", type=non_negative_int, default=10_000, help="episode i uses seed + i")
    parser.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                        help="task constructor argument, e.g. max_distance=1.5 (repeatable)")
    # Env flags given here override the settings saved beside a model; others keep them.
    add_env_arguments(parser, suppress=True)
    parser.add_argument("--stochastic", action="store_true", help="sample a model's actions instead of argmax")
    parser.add_argument("--video", type=video_file, default=None, help="write the first --video-episodes episodes here (.mp4/.gif)")
    parser.add_argument("--video-episodes", type=positive_int, default=3)
    parser.add_argument("--json", type=output_file, default=None, help="write the summary here")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (1 is fastest for these small tensors)")
    parser.add_argument("--quiet", action="store_true")


@contextlib.contextmanager
def torch_threads(count: int):
    """Run with ``count`` torch threads, then restore: the CLI may be called in-process (tests, notebooks)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def main(args) -> dict:
    with torch_threads(args.threads):
        return _main(args)


def _main(args) -> dict:
    from mirage_env.cli import _upscale, _write_video

    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    policy, settings = load_policy(args.policy, seed=args.seed, deterministic=not args.stochastic,
                                   trust_pickle=args.trust_pickle)
    settings = dict(settings or env_config().options())
    settings.update(options_from_args(args))
    if args.task is not None:
        settings["task"] = args.task
    settings["task_options"] = {**settings["task_options"], **parse_task_options(args.task_option)}
    env = make_env(**settings)
    results = evaluate(env, policy, args.episodes, seed=args.seed,
                       video_episodes=args.video_episodes if args.video else 0, progress=not args.quiet)
    frames = results.pop("frames")
    if args.video:
        _write_video(args.video, [_upscale(f, 4) for f in frames], fps=15)
    results = {"policy": args.policy, **env.config.options(), **results}
    line = (f"{args.policy} on {settings['task']}: success {results['success']:.1%}, SPL {results['spl']:.3f}, "
            f"path {results['path_length']:.2f} m over {args.episodes} episodes")
    if "revisit_psnr" in results and not math.isnan(results["revisit_psnr"]):
        line += f", revisit PSNR {results['revisit_psnr']:.1f} dB"
    print(line + (f", video {args.video}" if args.video else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results
