"""``mirage-env train --engine rllib``: PPO with RLlib on Ray, saved and evaluated as SB3's.

    mirage-env train --engine rllib --task pointnav --num-env-runners 2 --timesteps 20000 --out pointnav
    mirage-env train --engine rllib --address auto --num-env-runners 16 ...   # on a running cluster

Reads top to bottom: arguments (``train.add_arguments``, shared with SB3) -> Ray
(a local one for the run, or ``--address``) -> ``PPOConfig`` with the Mirage RLModule
-> train until ``--timesteps`` env steps -> save the network as ``NAME.safetensors`` +
``NAME.json`` (no pickle; ``mirage-env evaluate --policy NAME`` runs it without Ray) ->
the same evaluation as SB3's, over held-out seeds, in this process.

The flags mean what they mean for SB3: ``--num-envs`` envs per env runner, ``--n-steps``
steps per env per update (RLlib's train batch is n-steps x envs x runners), ``--batch-size``
the minibatch, ``--n-epochs``, ``--learning-rate``, ``--gamma``, ``--ent-coef``; ``--net-arch``
and ``--cnn-dim`` size the network (``mirage_env.agents.network``).
"""

from __future__ import annotations

import time

from mirage_env.config import options_from_args

from .evaluate import ModelPolicy, env_config, parse_task_options, report_training, torch_threads
from .policy_file import save_network_policy


def main(args) -> dict:
    try:
        import ray
    except ImportError:
        raise ImportError("--engine rllib needs Ray and RLlib: pip install -e '.[ray]' (in its own venv: "
                          "ray[rllib] pins gymnasium 1.2.2)") from None
    from mirage_env.rllib import env_steps, learner_stats, policy_network, ppo_config, train

    config = env_config(**options_from_args(args), task=args.task, task_options=parse_task_options(args.task_option))
    settings = config.options()
    started_ray = not ray.is_initialized()
    if started_ray:
        if args.address:
            ray.init(address=args.address)
        else:
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    try:
        with torch_threads(args.threads):
            return _train_and_evaluate(args, settings, ppo_config, train, env_steps, learner_stats, policy_network)
    finally:
        if started_ray:
            ray.shutdown()


def _train_and_evaluate(args, settings, ppo_config, train, env_steps, learner_stats, policy_network) -> dict:
    runners = args.num_env_runners
    ppo = ppo_config(
        settings, num_env_runners=runners, num_envs_per_env_runner=args.num_envs,
        train_batch_size=args.n_steps * args.num_envs * max(1, runners), minibatch_size=args.batch_size,
        num_epochs=args.n_epochs, lr=args.learning_rate, gamma=args.gamma, entropy_coeff=args.ent_coef,
        model={"cnn_dim": args.cnn_dim, "hiddens": [int(w) for w in args.net_arch.split(",") if w]}, seed=args.seed)
    start = time.perf_counter()
    max_seconds = None if args.max_minutes is None else 60.0 * args.max_minutes
    algo, history = train(ppo, timesteps=args.timesteps, max_seconds=max_seconds, progress=not args.quiet)
    train_seconds = time.perf_counter() - start
    steps = env_steps(history[-1])
    network = policy_network(algo)
    algo.stop()

    weights, spec = save_network_policy(network, args.out, settings)
    out = spec.with_suffix("")
    results = {**settings, "algo": args.algo, "engine": "rllib", "timesteps": steps, "num_env_runners": runners,
               "num_envs_per_env_runner": args.num_envs, "iterations": len(history), "train_seconds": train_seconds,
               "env_steps_per_s": steps / train_seconds if train_seconds > 0 else None, "model": str(out),
               "final_total_loss": learner_stats(history[-1]).get("total_loss")}
    return report_training(args, settings, ModelPolicy(network), results,
                           f"trained {steps} steps ({len(history)} RLlib iterations, {runners} env runners) "
                           f"in {train_seconds:.0f} s -> {out}")
