"""Trained policies on disk without pickle: weights in safetensors, everything else in JSON.

A Stable-Baselines3 ``.zip`` is a pickle: loading one runs whatever code it
carries. ``mirage-env train`` therefore saves a policy as two files that cannot
run code:

- ``NAME.safetensors``: the policy network's tensors (``policy.state_dict()``);
- ``NAME.json``: what rebuilds the network around them (algorithm, policy class,
  ``policy_kwargs``, observation and action spaces) and the env options it was
  trained with (an ``EnvConfig``'s flat options), plus a SHA-256 of the weights.

Loading validates the JSON field by field, checks the digest, builds the policy
class from SB3 with those arguments and loads the tensors with ``strict=True``
(every name and shape must match); anything off raises ``PolicyFileError``
naming the field. A foreign SB3 ``.zip`` loads only when the caller says it
trusts it (``trust_pickle=True``, CLI ``--trust-pickle``).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

__all__ = ["PolicyFileError", "save_policy", "save_network_policy", "load_policy_file", "policy_paths", "space_to_json", "space_from_json",
           "FORMAT", "VERSION"]

FORMAT = "mirage-env-policy"
VERSION = 1
# Policy classes a file may name; nothing else is ever instantiated.
_POLICY_CLASSES = ("MultiInputPolicy", "CnnPolicy", "MlpPolicy")
# The network RLlib training saves (mirage_env.agents.network), loaded without Ray.
_NETWORK_CLASS = "DictActorCritic"
_ALGOS = ("ppo",)
# A generous bound: the policies here are a few MB; a larger file is not ours.
_MAX_WEIGHT_BYTES = 1 << 30


class PolicyFileError(ValueError):
    """A policy file that is missing, malformed or does not match what it claims."""


def policy_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, spec) for ``path`` given as ``NAME``, ``NAME.json`` or ``NAME.safetensors``."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


# ---------------------------------------------------------------------- spaces as JSON


def _bound(values: np.ndarray) -> Any:
    """A Box bound: one number when uniform (an image's 0 and 255), else the nested list."""
    flat = values.reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return _number(flat[0])
    return [_number(v) for v in flat]


def _number(value) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def space_to_json(space: spaces.Space) -> dict:
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_json(v) for k, v in space.spaces.items()}}
    if isinstance(space, spaces.Box):
        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype), "low": _bound(space.low),
                "high": _bound(space.high)}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    raise PolicyFileError(f"cannot describe a {type(space).__name__} space in a policy file")


_DTYPES = ("uint8", "float32", "float64", "int64")


def space_from_json(data: Any, where: str = "observation_space") -> spaces.Space:
    if not isinstance(data, dict) or data.get("type") not in ("Dict", "Box", "Discrete"):
        raise PolicyFileError(f"{where} must be an object with type Dict, Box or Discrete, got {str(data)[:80]}")
    kind = data["type"]
    if kind == "Dict":
        items = data.get("spaces")
        if not isinstance(items, dict) or not items:
            raise PolicyFileError(f"{where}.spaces must be a non-empty object")
        return spaces.Dict({str(k): space_from_json(v, f"{where}.{k}") for k, v in items.items()})
    if kind == "Discrete":
        n, start = data.get("n"), data.get("start", 0)
        if not _is_int(n) or n < 1 or not _is_int(start):
            raise PolicyFileError(f"{where}: Discrete needs an integer n >= 1 and an integer start, got {data}")
        return spaces.Discrete(int(n), start=int(start))
    shape, dtype = data.get("shape"), data.get("dtype")
    if not isinstance(shape, list) or not shape or not all(_is_int(s) and 0 < s <= 1 << 16 for s in shape) \
            or math.prod(shape) > 1 << 24:
        raise PolicyFileError(f"{where}.shape must be a short list of positive sizes, got {shape!r}")
    if dtype not in _DTYPES:
        raise PolicyFileError(f"{where}.dtype must be one of {_DTYPES}, got {dtype!r}")
    low, high = (_bound_from_json(data.get(k), shape, f"{where}.{k}") for k in ("low", "high"))
    if np.any(low > high):
        raise PolicyFileError(f"{where}: low exceeds high")
    kind = np.dtype(dtype)
    if kind.kind in "iu" and not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise PolicyFileError(f"{where}: an integer Box needs finite bounds")
    return spaces.Box(low.astype(kind), high.astype(kind), shape=tuple(shape), dtype=kind)


def _bound_from_json(value: Any, shape: list[int], where: str) -> np.ndarray:
    def number(v):
        if v in ("inf", "-inf"):
            return float(v)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise PolicyFileError(f"{where} holds {v!r}; expected numbers (or \"inf\" / \"-inf\")")
        return float(v)

    if isinstance(value, list):
        if len(value) != math.prod(shape):
            raise PolicyFileError(f"{where} has {len(value)} values for shape {shape}")
        return np.array([number(v) for v in value]).reshape(shape)
    return np.full(shape, number(value))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ---------------------------------------------------------------------- save / load


def save_policy(model, path: str | os.PathLike, env_options: dict, policy_kwargs: dict) -> tuple[Path, Path]:
    """Write ``model.policy`` as NAME.safetensors + NAME.json (atomically, each file whole or absent)."""
    return _save(model.policy, path, {
        "algo": "ppo", "policy_class": "MultiInputPolicy", "policy_kwargs": policy_kwargs,
        "observation_space": space_to_json(model.observation_space), "action_space": space_to_json(model.action_space),
        "env": env_options})


def save_network_policy(network, path: str | os.PathLike, env_options: dict, engine: str = "rllib") -> tuple[Path, Path]:
    """Write a :class:`~mirage_env.agents.network.DictActorCritic` (RLlib training) in the same two files, so
    ``mirage-env evaluate --policy NAME`` runs it without Ray."""
    return _save(network, path, {
        "algo": "ppo", "engine": engine, "policy_class": _NETWORK_CLASS, "policy_kwargs": network.constructor_arguments(),
        "observation_space": space_to_json(network.observation_space),
        "action_space": space_to_json(network.action_space), "env": env_options})


def _save(module, path: str | os.PathLike, fields: dict) -> tuple[Path, Path]:
    from safetensors.torch import save_model

    weights, spec = policy_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}.tmp")
    try:
        # save_model stores a tensor shared by several names (SB3's shared feature extractor) once.
        save_model(module, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, weights)
    finally:
        tmp.unlink(missing_ok=True)
    document = {"format": FORMAT, "version": VERSION, **fields, "weights": {"file": weights.name, "sha256": digest}}
    tmp = spec.with_name(f".{spec.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(tmp, spec)
    finally:
        tmp.unlink(missing_ok=True)
    return weights, spec


def _network_kwargs(data: Any) -> dict:
    """DictActorCritic's arguments, each checked (a file names sizes, never code)."""
    from .network import NETWORK_DEFAULTS

    if not isinstance(data, dict):
        raise PolicyFileError("policy_kwargs must be an object")
    unknown = sorted(set(data) - set(NETWORK_DEFAULTS))
    if unknown:
        raise PolicyFileError(f"policy_kwargs has fields {_NETWORK_CLASS} does not take: {unknown}")
    out = {}
    for name in ("cnn_channels", "hiddens"):
        if name in data:
            widths = data[name]
            if not isinstance(widths, list) or len(widths) > 16 or not all(_is_int(w) and 0 < w <= 1 << 14 for w in widths):
                raise PolicyFileError(f"policy_kwargs.{name} must be a short list of layer widths, got {widths!r}")
            out[name] = [int(w) for w in widths]
    for name in ("cnn_dim", "vector_dim"):
        if name in data:
            if not _is_int(data[name]) or not 0 < data[name] <= 1 << 14:
                raise PolicyFileError(f"policy_kwargs.{name} must be a width, got {data[name]!r}")
            out[name] = int(data[name])
    if "clip" in data:
        clip = data["clip"]
        if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not 0 < clip < math.inf:
            raise PolicyFileError(f"policy_kwargs.clip must be a positive number, got {clip!r}")
        out["clip"] = float(clip)
    return out


def _policy_kwargs(data: Any) -> dict:
    """Only the policy arguments mirage-env's training sets, each checked."""
    if not isinstance(data, dict):
        raise PolicyFileError("policy_kwargs must be an object")
    unknown = sorted(set(data) - {"net_arch", "features_extractor_kwargs"})
    if unknown:
        raise PolicyFileError(f"policy_kwargs has fields this format does not allow: {unknown}")
    out = {}
    if "net_arch" in data:
        arch = data["net_arch"]
        if not isinstance(arch, list) or not all(_is_int(w) and 0 < w <= 1 << 14 for w in arch):
            raise PolicyFileError(f"policy_kwargs.net_arch must be a list of layer widths, got {arch!r}")
        out["net_arch"] = [int(w) for w in arch]
    if "features_extractor_kwargs" in data:
        extractor = data["features_extractor_kwargs"]
        if not isinstance(extractor, dict) or set(extractor) - {"cnn_output_dim"} \
                or not all(_is_int(v) and 0 < v <= 1 << 14 for v in extractor.values()):
            raise PolicyFileError(f"policy_kwargs.features_extractor_kwargs allows only cnn_output_dim, got {extractor!r}")
        out["features_extractor_kwargs"] = {k: int(v) for k, v in extractor.items()}
    return out


def _shared_aliases(policy) -> set[str]:
    """Names of ``policy``'s tensors that share storage with another name (saved once, under one of them)."""
    state = policy.state_dict()
    owners: dict[int, int] = {}
    for tensor in state.values():
        owners[tensor.data_ptr()] = owners.get(tensor.data_ptr(), 0) + 1
    return {name for name, tensor in state.items() if owners[tensor.data_ptr()] > 1}


def load_policy_file(path: str | os.PathLike):
    """(policy, env options) from NAME.safetensors + NAME.json; never unpickles.

    The policy is an SB3 ``BasePolicy`` (or, for a policy RLlib trained, a
    :class:`~mirage_env.agents.network.DictActorCritic`) on the CPU in eval mode:
    ``policy.predict(obs, deterministic=True)`` as a model's ``predict``.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model
    from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy, MultiInputActorCriticPolicy

    weights, spec = policy_paths(path)
    for file in (spec, weights):
        if not file.is_file():
            raise PolicyFileError(f"no policy file {file}; train one with `mirage-env train --out {spec.with_suffix('')}`")
    try:
        document = json.loads(spec.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PolicyFileError(f"{spec} is not valid JSON: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise PolicyFileError(f"{spec} is not a {FORMAT} file (its 'format' field)")
    if document.get("version") != VERSION:
        raise PolicyFileError(f"{spec} has version {document.get('version')!r}; this mirage-env reads version {VERSION}")
    if document.get("algo") not in _ALGOS:
        raise PolicyFileError(f"{spec}: algo must be one of {_ALGOS}, got {document.get('algo')!r}")
    policy_class = document.get("policy_class")
    if policy_class not in (*_POLICY_CLASSES, _NETWORK_CLASS):
        raise PolicyFileError(f"{spec}: policy_class must be one of {(*_POLICY_CLASSES, _NETWORK_CLASS)}, "
                              f"got {policy_class!r}")
    network = policy_class == _NETWORK_CLASS
    kwargs = (_network_kwargs if network else _policy_kwargs)(document.get("policy_kwargs", {}))
    observation_space = space_from_json(document.get("observation_space"), "observation_space")
    action_space = space_from_json(document.get("action_space"), "action_space")
    env_options = document.get("env")
    if not isinstance(env_options, dict):
        raise PolicyFileError(f"{spec}: env must be an object of env options")
    record = document.get("weights")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise PolicyFileError(f"{spec}: weights.sha256 is missing")
    if weights.stat().st_size > _MAX_WEIGHT_BYTES:
        raise PolicyFileError(f"{weights} is {weights.stat().st_size:,} bytes, more than a policy here can be")
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != record["sha256"]:
        raise PolicyFileError(f"{weights} does not match the sha256 in {spec}: the files were changed or mixed up")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise PolicyFileError(f"{weights} is not a readable safetensors file: {error}") from None
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise PolicyFileError(f"{weights} holds NaN or inf in {bad[:3]}")
    try:
        if network:
            from .network import DictActorCritic

            policy = DictActorCritic(observation_space, action_space, **kwargs)
        else:
            cls = {"MultiInputPolicy": MultiInputActorCriticPolicy, "CnnPolicy": ActorCriticCnnPolicy,
                   "MlpPolicy": ActorCriticPolicy}[policy_class]
            policy = cls(observation_space, action_space, lr_schedule=lambda _: 0.0, **kwargs)
    except (AssertionError, ValueError, KeyError) as error:
        raise PolicyFileError(f"{spec}: cannot build {policy_class} for these spaces: {error}") from None
    try:
        # Every tensor of the network must be in the file with its shape (names that share
        # storage were saved once, under one of them).
        missing, unexpected = load_model(policy, str(weights), strict=False)
    except (RuntimeError, SafetensorError) as error:
        raise PolicyFileError(f"{weights} does not fit the network {spec} describes: {str(error).strip()[:300]}") from None
    if unexpected or set(missing) - _shared_aliases(policy):
        raise PolicyFileError(f"{weights} does not fit the network {spec} describes: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    return policy.eval(), env_options
