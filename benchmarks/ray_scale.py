"""Past one machine, measured on one: RLlib env runners and a shared world-model server.

    python benchmarks/ray_scale.py --json benchmarks/results/ray_scale.json

Needs the ray extra (``pip install -e ".[ray]"``, its own venv). Two tables:

1. **Env runners.** Aggregate env steps/s that RLlib's env runners sample (PPO's
   RLModule choosing the actions, as in training; no learning) with 1 and 2 runners,
   one CPU each, on a local Ray of ``--cpus`` CPUs, in alternating rounds.
2. **The model server.** ``--clients`` client worlds (1, 4, 16), each a MirageEnv in
   its own Ray actor with ``backend="remote"``, step against ONE served procedural
   model; the server counts how many client requests each ``generate`` call
   batched (its batches form from what queued while the model was busy).

On a 2-core machine both tables measure contention as much as scale: more processes
than cores share them. What a cluster gives (a runner per core, the server on its own
GPU node) is not measured here; see the README's "Past one machine".
"""

from __future__ import annotations

import argparse
import time

from mirage_env.benchreport import header, write_json


def runner_throughput(counts: list[int], args) -> list[dict]:
    """Env steps/s sampled by 1..N env runners in parallel, the counts measured in alternating rounds.

    One algorithm with ``max(counts)`` runners; "n runners" samples on the first n of them.
    Alternating the counts round by round on the same processes keeps a change in the
    machine's load (other jobs) from favouring one count.
    """
    from mirage_env.rllib import ppo_config

    config = ppo_config({"task": "pointnav", "image_size": args.image_size, "max_episode_steps": 50},
                        num_env_runners=max(counts), seed=0, train_batch_size=256, minibatch_size=64)
    algo = config.build_algo()
    group = algo.env_runner_group
    ids = group.healthy_worker_ids()

    def sample(runner):
        cpu = time.process_time()
        episodes = runner.sample(num_timesteps=args.steps_per_round, random_actions=False)
        return sum(len(e) for e in episodes), time.process_time() - cpu

    totals = {n: [0, 0.0, 0.0] for n in counts}
    try:
        group.foreach_env_runner(sample, local_env_runner=False)  # warm-up: envs built, kernels loaded
        for _ in range(args.rounds):
            for n in counts:
                started = time.perf_counter()
                done = group.foreach_env_runner(sample, local_env_runner=False, remote_worker_ids=ids[:n])
                totals[n][0] += sum(steps for steps, _ in done)
                totals[n][1] += time.perf_counter() - started
                totals[n][2] += sum(cpu for _, cpu in done)
    finally:
        algo.stop()
    # Steps per CPU-second of the runners: what each runner does with the CPU it gets, so it does not
    # depend on how much of the machine other jobs take (wall steps/s does).
    return [{"env_runners": n, "env_steps": steps, "seconds": seconds, "env_steps_per_s": steps / seconds,
             "runner_cpu_seconds": cpu, "env_steps_per_runner_cpu_s": steps / cpu}
            for n, (steps, seconds, cpu) in totals.items()]


def server_batching(clients: int, args) -> dict:
    """``clients`` envs in their own actors stepping one served model: requests per generator call."""
    import ray

    from mirage_env.backends.model_server import serve_world_model, server_stats

    name = f"ray-scale-{clients}"
    handle = serve_world_model(name, image_size=args.image_size, num_cpus=0, batch_wait_s=args.batch_wait_s)

    @ray.remote(num_cpus=0)
    class Client:
        def __init__(self, seed: int):
            import numpy as np

            from mirage_env.env import MirageEnv

            self.env = MirageEnv(task="explore", image_size=args.image_size, backend="remote", checkpoint=name,
                                 max_episode_steps=None)
            self.env.reset(seed=seed)
            self.rng = np.random.default_rng(seed)

        def run(self, steps: int) -> float:
            started = time.perf_counter()
            for _ in range(steps):
                self.env.step(int(self.rng.integers(0, 9)))
            return time.perf_counter() - started

    workers = []
    try:
        workers = [Client.remote(seed) for seed in range(clients)]
        ray.get([w.run.remote(3) for w in workers])  # warm-up
        server_stats(name, reset=True)
        started = time.perf_counter()
        ray.get([w.run.remote(args.client_steps) for w in workers])
        seconds = time.perf_counter() - started
        stats = server_stats(name)
    finally:
        for worker in workers:
            ray.kill(worker)
        ray.kill(handle)
    generate = stats["calls"]["generate"]
    return {"client_worlds": clients, "steps_per_client": args.client_steps, "seconds": seconds,
            "env_steps_per_s": clients * args.client_steps / seconds, "generate_calls": generate["model_calls"],
            "requests": generate["requests"], "requests_per_generate_call": generate["requests"] / generate["model_calls"],
            "max_possible": clients, "server_busy_fraction": stats["busy_seconds"] / seconds,
            "blocked_requests_per_call": (stats["calls"]["blocked"]["requests"]
                                          / max(1, stats["calls"]["blocked"]["model_calls"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--runners", default="1,2")
    parser.add_argument("--steps-per-round", type=int, default=200, help="env steps each runner samples per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--client-steps", type=int, default=100)
    parser.add_argument("--batch-wait-s", type=float, default=0.0, help="the server's wait for more calls per batch")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import os

    import ray

    # Other work on the machine changes these figures more than anything here: record it.
    load_before = os.getloadavg()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        runners = runner_throughput([int(n) for n in args.runners.split(",") if n], args)
        print("RLlib env runners (PointNav, PPO RLModule acting, no learning):")
        print("| env runners | env steps/s | vs 1 runner | steps per runner CPU-second |")
        print("|---|---|---|---|")
        for row in runners:
            print(f"| {row['env_runners']} | {row['env_steps_per_s']:.0f} | "
                  f"{row['env_steps_per_s'] / runners[0]['env_steps_per_s']:.2f}x | "
                  f"{row['env_steps_per_runner_cpu_s']:.0f} |")
        served = [server_batching(int(n), args) for n in args.clients.split(",") if n]
        print("\nOne served model, client worlds in their own actors (Explore, random actions):")
        print("| client worlds | requests per generate call | aggregate env steps/s | server busy |")
        print("|---|---|---|---|")
        for row in served:
            print(f"| {row['client_worlds']} | {row['requests_per_generate_call']:.2f} | "
                  f"{row['env_steps_per_s']:.0f} | {row['server_busy_fraction']:.0%} |")
    finally:
        ray.shutdown()
    write_json(args.json, {**header(args), "ray": ray.__version__, "load_average_before": load_before,
                           "load_average_after": os.getloadavg(), "env_runners": runners, "server": served})


if __name__ == "__main__":
    main()
