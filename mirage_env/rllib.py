"""RLlib on Mirage worlds: env creators, an RLModule for the Dict observation, PPO, training.

Needs the ``ray`` extra (``pip install -e ".[ray]"``). What RLlib does not do by
itself with these envs, and what this module does about it:

- RLlib's default encoders have none for a ``Dict`` observation, and its default CNN
  fails on a uint8 image inside the env runner. :class:`MirageRLModule` runs a CNN on
  ``rgb`` (uint8, scaled inside the model) beside an MLP on the vector keys
  (``mirage_env.agents.network.DictActorCritic``); no flattening connector is needed.
- RLlib builds an env as ``cls(env_config)``; ``MirageEnv`` itself and :func:`make_env`
  take ``env_config`` (the flat options of ``gym.make``).
- The multi-agent env goes through RLlib's ``ParallelPettingZooEnv``
  (:func:`make_multi_agent_env`), with one shared policy or one per agent.
- A run whose env runners collect no steps raises :class:`NoEnvStepsError`, and env
  runner failures are not silently restarted.

    import ray
    from mirage_env.rllib import ppo_config, train
    ray.init(num_cpus=2)
    algo, history = train(ppo_config({"task": "pointnav", "image_size": 32}, num_env_runners=2), iterations=3)
"""

from __future__ import annotations

import time
from typing import Any, Mapping

try:
    from ray.rllib.core.columns import Columns
    from ray.rllib.core.rl_module.apis import ValueFunctionAPI
    from ray.rllib.core.rl_module.torch import TorchRLModule
    from ray.tune.registry import register_env
except ImportError as _error:  # pragma: no cover - the extra is missing
    raise ImportError(f"mirage_env.rllib needs RLlib: pip install -e \".[ray]\" ({_error})") from None

from .agents.network import NETWORK_DEFAULTS, DictActorCritic
from .env import MirageEnv

__all__ = ["ENV_NAME", "MULTI_AGENT_ENV_NAME", "MirageRLModule", "NoEnvStepsError", "make_env",
           "make_multi_agent_env", "register_envs", "ppo_config", "train", "policy_network", "env_steps",
           "learner_stats"]

#: Names the env creators are registered under (``config.environment(ENV_NAME, env_config=...)``).
ENV_NAME = "mirage"
MULTI_AGENT_ENV_NAME = "mirage_team"


class NoEnvStepsError(RuntimeError):
    """A training iteration in which the env runners collected no env steps."""


def make_env(env_config: Mapping[str, Any] | None = None) -> MirageEnv:
    """A ``MirageEnv`` from RLlib's ``env_config``: the flat options of ``gym.make`` (``task``, ``image_size``, ...)."""
    return MirageEnv(**dict(env_config or {}))


def make_multi_agent_env(env_config: Mapping[str, Any] | None = None):
    """``MirageParallelEnv`` (its options, ``n_agents`` included) as an RLlib ``MultiAgentEnv``."""
    from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv

    from .multi_agent import MirageParallelEnv

    return ParallelPettingZooEnv(MirageParallelEnv(**dict(env_config or {})))


def register_envs() -> None:
    """Register :data:`ENV_NAME` and :data:`MULTI_AGENT_ENV_NAME` with Ray Tune's registry (idempotent)."""
    register_env(ENV_NAME, make_env)
    register_env(MULTI_AGENT_ENV_NAME, make_multi_agent_env)


class MirageRLModule(TorchRLModule, ValueFunctionAPI):
    """PPO's RLModule for Mirage observations: :class:`~mirage_env.agents.network.DictActorCritic`.

    ``model_config`` takes the network's arguments (``cnn_channels``, ``cnn_dim``,
    ``vector_dim``, ``hiddens``, ``clip``); the uint8 image is scaled inside the network.
    """

    def setup(self):
        # RLlib adds keys of its own (PPO: vf_share_layers); the network takes its own only.
        config = {k: v for k, v in dict(self.model_config or {}).items() if k in NETWORK_DEFAULTS}
        self.net = DictActorCritic(self.observation_space, self.action_space, **config)

    def _forward(self, batch, **kwargs):
        return {Columns.ACTION_DIST_INPUTS: self.net.logits(self.net.features(batch[Columns.OBS]))}

    def _forward_train(self, batch, **kwargs):
        features = self.net.features(batch[Columns.OBS])
        return {Columns.ACTION_DIST_INPUTS: self.net.logits(features), Columns.EMBEDDINGS: features}

    def compute_values(self, batch, embeddings=None):
        if embeddings is None:
            embeddings = self.net.features(batch[Columns.OBS])
        return self.net.value(embeddings)


def ppo_config(env_options: Mapping[str, Any] | None = None, *, multi_agent: bool = False,
               shared_policy: bool = True, num_env_runners: int = 2, num_envs_per_env_runner: int = 1,
               train_batch_size: int = 512, minibatch_size: int = 128, num_epochs: int = 4, lr: float = 3e-4,
               gamma: float = 0.99, entropy_coeff: float = 0.01, model: Mapping[str, Any] | None = None,
               seed: int | None = None):
    """A ``PPOConfig`` for Mirage envs with :class:`MirageRLModule`, ready for ``build_algo()``.

    Args:
        env_options: ``env_config``: the flat env options (``task``, ``image_size``, ``backend``, ...);
            with ``multi_agent``, ``MirageParallelEnv``'s (``n_agents``, ``task``, ...).
        multi_agent: train on ``MirageParallelEnv`` through RLlib's PettingZoo wrapper.
        shared_policy: one policy for every agent ("shared"), else one per agent (named as the agents).
        num_env_runners: Ray actors collecting samples (0: in the driver), one CPU each.
        num_envs_per_env_runner: envs each runner steps (gymnasium's sync vector env).
        train_batch_size, minibatch_size, num_epochs, lr, gamma, entropy_coeff: PPO's.
        model: :class:`MirageRLModule`'s ``model_config`` (the network's arguments).
        seed: seeds RLlib and, through it, every env's reset.
    """
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.multi_rl_module import MultiRLModuleSpec
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    register_envs()
    env_options = dict(env_options or {})
    module = RLModuleSpec(module_class=MirageRLModule, model_config=dict(model or {}))
    config = (
        PPOConfig()
        .framework("torch")
        .environment(MULTI_AGENT_ENV_NAME if multi_agent else ENV_NAME, env_config=env_options)
        .env_runners(num_env_runners=num_env_runners, num_envs_per_env_runner=num_envs_per_env_runner,
                     num_cpus_per_env_runner=1)
        .learners(num_learners=0)
        .training(train_batch_size_per_learner=train_batch_size, minibatch_size=minibatch_size,
                  num_epochs=num_epochs, lr=lr, gamma=gamma, entropy_coeff=entropy_coeff)
        # An env runner that fails must fail the run: restarted quietly, it returns no samples.
        .fault_tolerance(restart_failed_env_runners=False)
    )
    if seed is not None:
        config = config.debugging(seed=seed)
    if multi_agent:
        # MirageParallelEnv's agent names (possible_agents), which per-agent policies are named after.
        agents = [f"camera_{i}" for i in range(int(env_options.get("n_agents", 2)))]
        if shared_policy:
            config = config.multi_agent(policies={"shared"}, policy_mapping_fn=_shared_policy)
            specs = {"shared": module}
        else:
            config = config.multi_agent(policies=set(agents), policy_mapping_fn=_own_policy)
            specs = {agent: module for agent in agents}
        config = config.rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs=specs))
    else:
        config = config.rl_module(rl_module_spec=module)
    return config


def _shared_policy(agent_id, episode=None, **kwargs) -> str:
    return "shared"


def _own_policy(agent_id, episode=None, **kwargs) -> str:
    return agent_id


def env_steps(result: Mapping[str, Any]) -> int:
    """Env steps sampled so far (lifetime) according to a ``train()`` result."""
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    return int(result.get(ENV_RUNNER_RESULTS, {}).get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0) or 0)


def learner_stats(result: Mapping[str, Any], policy: str | None = None) -> dict[str, float]:
    """The learner's numbers for ``policy`` (default: the one trained) of a ``train()`` result (losses, ...)."""
    from ray.rllib.utils.metrics import LEARNER_RESULTS

    learners = result.get(LEARNER_RESULTS, {})
    names = [name for name in learners if name != "__all_modules__"]
    name = policy or (names[0] if names else None)
    stats = learners.get(name, {}) if name is not None else {}
    return {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}


def train(config, iterations: int | None = None, timesteps: int | None = None, max_seconds: float | None = None,
          progress: bool = False, algo=None):
    """Build the algorithm from ``config`` (or go on with ``algo``) and train; returns (algo, results).

    Stops after ``iterations`` iterations, ``timesteps`` sampled env steps or ``max_seconds``
    (whichever first; at least one iteration). An iteration after which no env step was
    ever sampled raises :class:`NoEnvStepsError`.
    """
    if iterations is None and timesteps is None and max_seconds is None:
        raise ValueError("train() needs iterations, timesteps or max_seconds")
    algo = algo or config.build_algo()
    results, started = [], time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=timesteps or iterations, desc="train (rllib)", unit="step" if timesteps else "iter")
    try:
        while True:
            result = algo.train()
            results.append(result)
            steps = env_steps(result)
            if steps == 0:
                raise NoEnvStepsError(
                    f"iteration {len(results)} ended with no env steps sampled: the env runners returned nothing "
                    f"(an env or model error in an env runner is logged above by Ray); not a result")
            if bar is not None:
                bar.n = min(steps, timesteps) if timesteps else len(results)
                stats = learner_stats(result)
                episodes = result.get("env_runners", {})
                bar.set_postfix(loss=f"{stats.get('total_loss', float('nan')):.3f}",
                                ret=f"{episodes.get('episode_return_mean', float('nan')):.2f}", refresh=True)
            if iterations is not None and len(results) >= iterations:
                break
            if timesteps is not None and steps >= timesteps:
                break
            if max_seconds is not None and time.perf_counter() - started >= max_seconds:
                break
    finally:
        if bar is not None:
            bar.close()
    return algo, results


def policy_network(algo, policy: str | None = None) -> DictActorCritic:
    """The trained network of ``policy`` (default: the single or shared one), on the CPU, for saving/evaluating."""
    from ray.rllib.core import DEFAULT_MODULE_ID

    module = algo.get_module(policy or DEFAULT_MODULE_ID)
    if module is None:
        raise ValueError(f"the algorithm has no module {policy or DEFAULT_MODULE_ID!r}")
    return module.net.cpu().eval()
