"""Train an agent with Stable-Baselines3 PPO, save it, evaluate it.

    mirage-env train --task pointnav --algo ppo --timesteps 50000 --num-envs 4 --out pointnav --json out.json

``--engine rllib`` trains the same task with RLlib's PPO on Ray instead (``rllib_train``).

Reads top to bottom: arguments -> vectorised envs -> PPO on the Dict
observation (``MultiInputPolicy``: a CNN on ``rgb``, the vectors concatenated)
-> learn under a progress bar -> save (``NAME.safetensors`` weights + ``NAME.json``
with the network and env settings, no pickle; ``mirage-env evaluate --policy NAME``
reads them) -> evaluate over held-out seeds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mirage_env.cli_types import (non_negative_float, non_negative_int, output_file, positive_float,
                                  positive_int)
from mirage_env.config import add_env_arguments, options_from_args

from .evaluate import (AGENT_ENV_DEFAULTS, ModelPolicy, env_config, make_env, make_vector_env,
                       parse_task_options, report_training, torch_threads)
from .policy_file import save_policy

ALGOS = ("ppo",)
VEC_KINDS = ("native", "auto", "dummy", "subproc")


ENGINES = ("sb3", "rllib")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="pointnav", help="pointnav | returnhome | explore")
    parser.add_argument("--algo", default="ppo", choices=ALGOS)
    parser.add_argument("--engine", default="sb3", choices=ENGINES,
                        help="sb3: Stable-Baselines3 in this process; rllib: RLlib PPO on Ray with env runners "
                             "(pip install -e '.[ray]'; see --num-env-runners, --address)")
    parser.add_argument("--num-env-runners", type=non_negative_int, default=2,
                        help="rllib: Ray actors collecting samples, one CPU each (0: in this process); --num-envs "
                             "envs each")
    parser.add_argument("--address", default=None,
                        help="rllib: join this Ray cluster (e.g. auto, or HEAD_IP:6379); default: start a local "
                             "Ray for the run")
    parser.add_argument("--ray-cpus", type=positive_int, default=None,
                        help="rllib: CPUs of the local Ray started for the run (default: all)")
    parser.add_argument("--timesteps", type=positive_int, default=50_000)
    parser.add_argument("--num-envs", type=positive_int, default=4)
    parser.add_argument("--vec", default="native", choices=VEC_KINDS,
                        help="how envs run side by side: native = one batched world model call for all envs "
                             "(mirage_env.vector; auto means the same); dummy / subproc = SB3's loop / processes "
                             "over single envs")
    parser.add_argument("--task-option", action="append", metavar="KEY=VALUE",
                        help="task constructor argument, e.g. max_distance=1.5 (repeatable)")
    # Every env option (--image-size: >= 36 with rgb, NatureCNN's smallest input).
    add_env_arguments(parser, defaults=AGENT_ENV_DEFAULTS)
    parser.add_argument("--n-steps", type=positive_int, default=128, help="PPO rollout length per env")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--n-epochs", type=positive_int, default=4)
    parser.add_argument("--learning-rate", type=positive_float, default=3e-4)
    parser.add_argument("--gamma", type=non_negative_float, default=0.99)
    parser.add_argument("--ent-coef", type=non_negative_float, default=0.01)
    parser.add_argument("--net-arch", default="64,64", help="policy/value MLP widths after the feature extractor")
    parser.add_argument("--cnn-dim", type=positive_int, default=64, help="features NatureCNN makes of the image")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads; 1 is fastest for these small tensors and never oversubscribes the CPU")
    parser.add_argument("--out", type=output_file, default="policy",
                        help="policy NAME: writes NAME.safetensors (weights) + NAME.json (network and env settings)")
    parser.add_argument("--max-minutes", type=positive_float, default=None,
                        help="stop learning after this much wall time even if --timesteps is not reached")
    parser.add_argument("--eval-episodes", type=positive_int, default=100)
    parser.add_argument("--eval-seed", type=non_negative_int, default=10_000, help="evaluation episode i uses eval seed + i")
    parser.add_argument("--compare-random", action="store_true", help="also evaluate the random policy")
    parser.add_argument("--json", type=output_file, default=None, help="write settings, training time and evaluation here")
    parser.add_argument("--quiet", action="store_true")


def build_vec_env(settings: dict, num_envs: int, seed: int, kind: str = "native", threads: int = 1):
    """``num_envs`` envs as one SB3 VecEnv whose monitor records each episode's return and the task's success.

    Every kind seeds env i with ``seed + i``, so they produce the same episodes;
    ``native`` just does it with one batched generator call per step.
    """
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor

    if kind not in VEC_KINDS:
        raise ValueError(f"unknown --vec {kind!r}; choose from {VEC_KINDS}")
    keywords = episode_keywords(settings)
    if kind in ("native", "auto"):
        from .sb3 import MirageSB3VecEnv

        venv = MirageSB3VecEnv(make_vector_env(num_envs, **settings))
        venv.seed(seed)
        return VecMonitor(venv, info_keywords=keywords)

    def factory(rank: int):
        def make():
            torch.set_num_threads(threads)  # matters in subprocesses, which start with torch's default
            return Monitor(make_env(**settings), info_keywords=keywords)
        return make

    vec_class = SubprocVecEnv if kind == "subproc" else DummyVecEnv
    venv = vec_class([factory(rank) for rank in range(num_envs)])
    venv.seed(seed)  # env i draws its first world from seed + i
    return venv


def episode_keywords(settings: dict) -> tuple[str, ...]:
    """``("success",)`` when the task reports success (the monitors need it in every final info), else ``()``."""
    return ("success",) if "success" in env_config(**settings).make_task().measures else ()


def progress_callback(total: int, disable: bool = False, max_seconds: float | None = None):
    """A tqdm progress bar with the recent success rate and return (SB3's own bar needs ``rich``).

    With ``max_seconds`` it also ends training once that much wall time has passed.
    """
    from stable_baselines3.common.callbacks import BaseCallback
    from tqdm import tqdm

    class TqdmProgress(BaseCallback):
        def _on_training_start(self) -> None:
            # SB3 collects whole rollouts, so it runs up to the next multiple of one rollout.
            rollout = getattr(self.model, "n_steps", 1) * self.training_env.num_envs
            self.bar = tqdm(total=-(-total // rollout) * rollout, desc="train", unit="step", disable=disable)
            self.started = time.perf_counter()

        def _on_step(self) -> bool:
            self.bar.update(self.training_env.num_envs)
            return max_seconds is None or time.perf_counter() - self.started < max_seconds

        def _on_rollout_end(self) -> None:
            episodes = list(self.model.ep_info_buffer)
            if episodes:
                self.bar.set_postfix(success=f"{np.mean([e.get('success', 0.0) for e in episodes]):.2f}",
                                     ret=f"{np.mean([e['r'] for e in episodes]):.2f}", refresh=False)

        def _on_training_end(self) -> None:
            self.bar.close()

    return TqdmProgress()


def _sides(image_size) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def main(args) -> dict:
    if getattr(args, "engine", "sb3") == "rllib":
        from .rllib_train import main as rllib_main

        return rllib_main(args)
    with torch_threads(args.threads):
        return _main(args)


def _main(args) -> dict:
    from stable_baselines3 import PPO

    config = env_config(**options_from_args(args), task=args.task, task_options=parse_task_options(args.task_option))
    if "rgb" in config.agent.observations and min(_sides(config.world.image_size)) < 36:
        raise ValueError(f"--image-size {config.world.image_size} is too small for NatureCNN (needs >= 36); "
                         f"use a larger image or --observations pose")
    settings = config.options()
    venv = build_vec_env(settings, args.num_envs, args.seed, args.vec, args.threads)
    policy_kwargs = {"net_arch": [int(w) for w in args.net_arch.split(",") if w],
                     "features_extractor_kwargs": {"cnn_output_dim": args.cnn_dim}}

    model = PPO(
        "MultiInputPolicy", venv, n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.n_epochs,
        learning_rate=args.learning_rate, gamma=args.gamma, ent_coef=args.ent_coef, seed=args.seed, device="cpu",
        policy_kwargs=policy_kwargs,
    )
    start = time.perf_counter()
    max_seconds = None if args.max_minutes is None else 60.0 * args.max_minutes
    model.learn(args.timesteps, callback=progress_callback(args.timesteps, args.quiet, max_seconds))
    train_seconds = time.perf_counter() - start
    venv.close()

    weights, spec = save_policy(model, args.out, settings, policy_kwargs)
    out = spec.with_suffix("")

    results = {**settings, "algo": args.algo, "timesteps": int(model.num_timesteps), "num_envs": args.num_envs,
               "train_seconds": train_seconds, "model": str(out)}
    return report_training(args, settings, ModelPolicy(model), results,
                           f"trained {model.num_timesteps} steps in {train_seconds:.0f} s -> {out}")
