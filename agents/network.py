"""The actor-critic network of RLlib training, as a plain ``torch.nn.Module``.

RLlib wraps it in an RLModule (``mirage_env.rllib.MirageRLModule``); evaluation loads
it from ``NAME.safetensors`` + ``NAME.json`` without Ray (``policy_file``). One class,
so the network that trained is the network that is evaluated.

Each key of the ``Dict`` observation gets the encoder its space calls for:

| space | encoder |
|---|---|
| ``Box`` uint8 (H, W, C), C in 1..4 (``rgb``) | a small CNN; the uint8 image is scaled to [0, 1] inside the model |
| any other ``Box`` (``pose``, ``goal``, ``depth``, ...) | flattened; inf / NaN (sky depth) clamped to +-``clip`` |
| ``Discrete(n)`` (``phase``) | one-hot |

The image features and the vector keys (through one MLP layer) are concatenated
into the features that a policy MLP and a value MLP read. The CNN uses stride-2
convolutions with padding, so any image of at least 8x8 works (SB3's NatureCNN
needs 36x36).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

__all__ = ["DictActorCritic", "NETWORK_DEFAULTS"]

NETWORK_DEFAULTS = {"cnn_channels": [16, 32, 32], "cnn_dim": 64, "vector_dim": 64, "hiddens": [64, 64], "clip": 100.0}


def _is_image(space: spaces.Space) -> bool:
    return isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3 \
        and 1 <= space.shape[-1] <= 4


class DictActorCritic(nn.Module):
    """Policy logits (or Gaussian parameters) and a value from a Dict observation.

    Args:
        observation_space: a ``Dict`` (a single Box or Discrete is treated as ``{"obs": space}``).
        action_space: ``Discrete(n)`` (n logits) or a ``Box`` (mean and log-std per dimension).
        cnn_channels: channels of the stride-2 convolutions on each image key.
        cnn_dim: image features after the CNN's linear layer.
        vector_dim: features of the vector keys after their layer.
        hiddens: widths of the policy and value MLPs.
        clip: non-image values are clamped to [-clip, clip] (depth of sky is inf).
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, cnn_channels=None,
                 cnn_dim: int | None = None, vector_dim: int | None = None, hiddens=None, clip: float | None = None):
        super().__init__()
        settings = dict(NETWORK_DEFAULTS)
        given = {"cnn_channels": cnn_channels, "cnn_dim": cnn_dim, "vector_dim": vector_dim, "hiddens": hiddens,
                 "clip": clip}
        settings.update({k: v for k, v in given.items() if v is not None})
        self.settings = {"cnn_channels": [int(c) for c in settings["cnn_channels"]], "cnn_dim": int(settings["cnn_dim"]),
                         "vector_dim": int(settings["vector_dim"]), "hiddens": [int(h) for h in settings["hiddens"]],
                         "clip": float(settings["clip"])}
        if not isinstance(observation_space, spaces.Dict):
            observation_space = spaces.Dict({"obs": observation_space})
        self.observation_space, self.action_space = observation_space, action_space
        self.image_keys, self.vector_keys, self.discrete_keys = [], [], []
        vector_size = 0
        self.images = nn.ModuleDict()
        for key, space in observation_space.spaces.items():
            if _is_image(space):
                self.image_keys.append(key)
                self.images[key] = self._cnn(space.shape)
            elif isinstance(space, spaces.Box):
                self.vector_keys.append(key)
                vector_size += int(math.prod(space.shape))
            elif isinstance(space, spaces.Discrete):
                self.discrete_keys.append(key)
                vector_size += int(space.n)
            else:
                raise ValueError(f"observation {key!r} is a {type(space).__name__}; this network reads Box and "
                                 f"Discrete entries")
        features = self.settings["cnn_dim"] * len(self.image_keys)
        self.vector = None
        if vector_size:
            self.vector = nn.Sequential(nn.Linear(vector_size, self.settings["vector_dim"]), nn.Tanh())
            features += self.settings["vector_dim"]
        self.features_dim = features
        if isinstance(action_space, spaces.Discrete):
            outputs = int(action_space.n)
        elif isinstance(action_space, spaces.Box):
            outputs = 2 * int(math.prod(action_space.shape))
        else:
            raise ValueError(f"action space {action_space} is neither Discrete nor Box")
        self.pi = self._mlp(features, outputs, gain=0.01)
        self.vf = self._mlp(features, 1, gain=1.0)

    def _cnn(self, shape) -> nn.Module:
        height, width, channels = shape
        layers, c = [], channels
        for out in self.settings["cnn_channels"]:
            layers += [nn.Conv2d(c, out, kernel_size=3, stride=2, padding=1), nn.ReLU()]
            c = out
            height, width = (height + 1) // 2, (width + 1) // 2
        layers += [nn.Flatten(), nn.Linear(c * height * width, self.settings["cnn_dim"]), nn.ReLU()]
        return nn.Sequential(*layers)

    def _mlp(self, inputs: int, outputs: int, gain: float) -> nn.Module:
        layers, size = [], inputs
        for width in self.settings["hiddens"]:
            layers += [nn.Linear(size, width), nn.Tanh()]
            size = width
        last = nn.Linear(size, outputs)
        nn.init.orthogonal_(last.weight, gain=gain)
        nn.init.zeros_(last.bias)
        return nn.Sequential(*layers, last)

    # ------------------------------------------------------------------ forward

    def features(self, observation: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, features_dim) from a batch of observations (dict of (B, ...) tensors, any dtype)."""
        if not isinstance(observation, dict):
            observation = {"obs": observation}
        parts = []
        for key in self.image_keys:
            image = torch.as_tensor(observation[key])
            # uint8 HWC from the env; scaling here means the env and RLlib's connectors never see floats.
            image = image.permute(0, 3, 1, 2).float() / 255.0
            parts.append(self.images[key](image))
        if self.vector is not None:
            clip = self.settings["clip"]
            vectors = []
            for key in self.vector_keys:
                value = torch.as_tensor(observation[key]).float().flatten(1)
                vectors.append(torch.nan_to_num(value, nan=0.0, posinf=clip, neginf=-clip).clamp(-clip, clip))
            for key in self.discrete_keys:
                value = torch.as_tensor(observation[key]).long().reshape(-1)
                vectors.append(nn.functional.one_hot(value, int(self.observation_space[key].n)).float())
            parts.append(self.vector(torch.cat(vectors, dim=1)))
        return torch.cat(parts, dim=1)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Action-distribution inputs: logits (Discrete) or mean and log-std (Box), (B, outputs)."""
        return self.pi(features)

    def value(self, features: torch.Tensor) -> torch.Tensor:
        return self.vf(features).squeeze(-1)

    @torch.no_grad()
    def predict(self, observation: dict[str, Any], deterministic: bool = True):
        """SB3-style ``(action, None)`` for one observation (or a batch): what ``ModelPolicy`` calls."""
        single = not isinstance(observation, dict) or all(
            np.ndim(observation[k]) == len(self.observation_space[k].shape) for k in observation
            if k in self.observation_space.spaces)
        batch = {k: torch.as_tensor(np.asarray(v))[None] if single else torch.as_tensor(np.asarray(v))
                 for k, v in (observation.items() if isinstance(observation, dict) else {"obs": observation}.items())}
        out = self.logits(self.features(batch))
        if isinstance(self.action_space, spaces.Discrete):
            action = out.argmax(-1) if deterministic else torch.distributions.Categorical(logits=out).sample()
            action = action.numpy()
        else:
            mean, log_std = out.chunk(2, dim=-1)
            action = mean if deterministic else torch.normal(mean, log_std.exp())
            action = action.reshape(-1, *self.action_space.shape).numpy()
            action = np.clip(action, self.action_space.low, self.action_space.high)
        return (action[0] if single else action), None

    def constructor_arguments(self) -> dict[str, Any]:
        """The keyword arguments besides the spaces that rebuild this network (JSON)."""
        return dict(self.settings)
