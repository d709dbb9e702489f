"""Stable-Baselines3 on the batched worlds: an SB3 ``VecEnv`` over ``MirageVectorEnv``.

SB3 has its own vectorised-env API (``reset()`` without arguments, ``step_async``
/ ``step_wait``, a list of info dicts, the last observation of an ended episode
in ``info["terminal_observation"]``). Its autoreset is the same as
``MirageVectorEnv``'s (SAME_STEP), so the adapter only reshapes: no extra
generator calls, one batched step per SB3 step.

    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor
    from mirage_env.agents.sb3 import MirageSB3VecEnv
    from mirage_env.vector import MirageVectorEnv

    venv = VecMonitor(MirageSB3VecEnv(MirageVectorEnv(num_envs=16, task="explore")))
    PPO("MultiInputPolicy", venv).learn(10_000)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvObs, VecEnvStepReturn

from mirage_env.vector import MirageVectorEnv

__all__ = ["MirageSB3VecEnv", "unbatch_info"]


def unbatch_info(infos: dict[str, Any], index: int) -> dict[str, Any]:
    """Sub-environment ``index``'s info from Gymnasium's dict of arrays (keys whose ``_key`` mask is set)."""
    info = {}
    for key, value in infos.items():
        if key.startswith("_") and key[1:] in infos:
            continue
        mask = infos.get("_" + key)
        if mask is not None and not mask[index]:
            continue
        item = unbatch_info(value, index) if isinstance(value, dict) else value[index]
        info[key] = item.item() if isinstance(item, np.generic) else item
    return info


class MirageSB3VecEnv(VecEnv):
    """A ``MirageVectorEnv`` behind SB3's ``VecEnv`` API.

    Seeding follows ``DummyVecEnv``: ``seed(s)`` makes the next ``reset()`` seed
    sub-environment ``i`` with ``s + i``, so training data match a DummyVecEnv of
    ``MirageEnv``s seeded the same way. ``get_attr`` / ``set_attr`` / ``env_method``
    address the vector env as a whole (its sub-environments are worlds, not
    objects): one identical answer per requested index.

    Args:
        venv: the vector env to adapt.
    """

    def __init__(self, venv: MirageVectorEnv):
        if not isinstance(venv, MirageVectorEnv):
            raise TypeError(f"MirageSB3VecEnv wraps a mirage_env.vector.MirageVectorEnv, got {type(venv).__name__}")
        self.venv = venv  # before super().__init__, which asks get_attr("render_mode")
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> VecEnvObs:
        seeds = None if all(s is None for s in self._seeds) else list(self._seeds)
        options = self._options[0] if self._options else {}
        if any(o != options for o in self._options):
            raise ValueError("MirageSB3VecEnv resets every world with the same options; "
                             f"got different ones per env: {self._options}")
        observations, infos = self.venv.reset(seed=seeds, options=options or None)
        self.reset_infos = [unbatch_info(infos, i) for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return observations

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() without step_async(): call step(actions)")
        observations, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        self._actions = None
        dones = terminated | truncated
        final_info = infos.get("final_info", {})
        info_list = []
        for i in range(self.num_envs):
            if dones[i]:
                # SB3 reads episode measures (and VecMonitor its keywords) from the ended episode's info.
                info = unbatch_info(final_info, i)
                info["terminal_observation"] = infos["final_obs"][i]
                self.reset_infos[i] = unbatch_info(infos, i)
                self.reset_infos[i].pop("final_obs", None)
                self.reset_infos[i].pop("final_info", None)
            else:
                info = unbatch_info(infos, i)
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            info_list.append(info)
        return observations, rewards.astype(np.float32), dones, info_list

    def close(self) -> None:
        self.venv.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        frames = self.venv.render()
        return [None] * self.num_envs if frames is None else list(frames)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]
