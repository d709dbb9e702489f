"""Cameras driven by actions through a World, scored by a Task: the one implementation.

``AgentBatch`` moves N = worlds x agents_per_world cameras, asks the World for
one batched segment, and asks the Task for rewards. The Gymnasium env is a
batch of one, the VectorEnv a batch of N worlds, the PettingZoo env N agents in
one world: all three are thin façades over this class.
"""

from __future__ import annotations

import copy as copy_module
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces

from .actions import check_actions
from .geometry import MotionConfig, Move, apply_checked_moves, apply_checked_velocities, path_poses, poses_from_rigs
from .memory import FORMAT_VERSION
from .memory.fileformat import StateCheck
from .world import World, WorldStep, load_model_state
from .tasks.base import TaskView

OBSERVATION_KEYS = ("rgb", "pose", "depth", "latent")


class AgentBatch:
    """N cameras in W worlds, each agent with its own rig, step counter and RNG.

    Args:
        world: the World (its num_worlds is W).
        task: a tasks.base.Task.
        agents_per_world: A; agents of one world share its memory and reset together.
        action_type: "discrete" (mirage_env.geometry.Move) or "continuous" (6-DoF velocity in [-1, 1]).
        frames_per_step: latent frames (poses) generated per step along the interpolated path.
            None (default): the world model's segment length when it declares one
            (``latent_frames``, e.g. Wan's ``frames_per_segment``), else 1. A number that
            conflicts with the model's segment length is refused.
        motion: step lengths and angles (a MotionConfig, a dict of its fields, or None for the defaults).
        max_episode_steps: truncation horizon; None: the batch never truncates (a
            Gymnasium ``TimeLimit`` around the env, or the caller, ends episodes).
        observations: which of "rgb", "pose", "depth", "latent" to return.
        collision_distance: metres kept between the camera and the scene. A world model that
            knows its geometry (the procedural one; ``blocked``, see
            :class:`mirage_env.backends.base.KnowsGeometry`) refuses any translation, discrete or
            continuous, that comes nearer than this to a wall, the floor, the ceiling or an object.
            Any other model (Wan) falls back on what the camera sees: a move with a forward part is
            refused when the depth straight ahead is shorter than the step plus this margin, and
            backward, sideways and vertical moves go unchecked.
        start_spread: metres between the starting positions of agents of one team.
        team_slots: (N,) each agent's place in its team, which sets its starting offset
            (teams fan out sideways, ``start_spread`` apart, centred on the origin) and its
            RNG stream. Default: its index within its world, so a team is a world's agents.
            Agents of different worlds may form a team: the multi-agent env's ablation puts
            each agent of a team in its own copy of the world (separate memories).
    """

    def __init__(
        self,
        world: World,
        task,
        agents_per_world: int = 1,
        action_type: str = "discrete",
        frames_per_step: int | None = None,
        motion: MotionConfig | dict | None = None,
        max_episode_steps: int | None = 500,
        observations: tuple[str, ...] = ("rgb", "pose"),
        collision_distance: float = 0.3,
        start_spread: float = 0.5,
        team_slots=None,
        image_size: tuple[int, int] | None = None,
    ):
        if action_type not in ("discrete", "continuous"):
            raise ValueError(f"action_type must be 'discrete' or 'continuous', got {action_type!r}")
        unknown = set(observations) - set(OBSERVATION_KEYS)
        if unknown or not observations:
            raise ValueError(f"observations must be a non-empty subset of {OBSERVATION_KEYS}, got {observations}")
        frames_per_step = self._frames_per_step(world.model, frames_per_step)
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1 or None, got {max_episode_steps}")
        if agents_per_world > 1 and world.model.latent.temporal_factor > 1:
            raise ValueError(
                "several agents per world need a world model without temporal compression: a video VAE "
                "would mix frames of different agents; use the procedural model or one agent per world"
            )
        task.bind(self)
        self.world = world
        self.task = task
        # What the task may read; it never gets the batch itself.
        self.view = TaskView(self)
        self.num_worlds = world.num_worlds
        self.agents_per_world = agents_per_world
        self.num_agents = self.num_worlds * agents_per_world
        self.agent_world = np.repeat(np.arange(self.num_worlds), agents_per_world)
        self.action_type = action_type
        self.frames_per_step = frames_per_step
        # A model with a fixed segment length starts worlds with a segment of it too (the camera
        # standing still); any other model starts from one frame.
        self.start_frames = frames_per_step if getattr(world.model, "latent_frames", None) is not None else 1
        self.motion = MotionConfig(**motion) if isinstance(motion, dict) else (motion or MotionConfig())
        self.max_episode_steps = max_episode_steps
        self.observation_keys = tuple(observations)
        self.collision_distance = collision_distance
        self.start_spread = start_spread
        if team_slots is None:
            self.team_slots = np.arange(self.num_agents) % agents_per_world
        else:
            self.team_slots = np.asarray(team_slots)
            if self.team_slots.shape != (self.num_agents,) or self.team_slots.dtype.kind not in "iu" \
                    or (self.team_slots < 0).any():
                raise ValueError(f"team_slots must be {self.num_agents} non-negative integers (one per agent), "
                                 f"got {team_slots!r}")

        camera, latent, channels = world.camera, world.latent_camera, world.model.latent.channels
        # Frames are shown at ``image_size``: the centre of what the model generates (it can only
        # make multiples of its latent grid, e.g. 88 for an asked 84).
        shown = (camera.height, camera.width) if image_size is None else tuple(int(x) for x in image_size)
        if shown[0] > camera.height or shown[1] > camera.width:
            raise ValueError(f"image_size {shown} exceeds the {camera.height}x{camera.width} frames the world makes")
        top, left = (camera.height - shown[0]) // 2, (camera.width - shown[1]) // 2
        full = shown == (camera.height, camera.width)
        self._crop = None if full else (slice(top, top + shown[0]), slice(left, left + shown[1]))
        self.image_size = shown
        self.latent_pixels_per_frame = latent.height * latent.width
        self.action_space = (
            spaces.Discrete(len(Move)) if action_type == "discrete"
            else spaces.Box(-1.0, 1.0, shape=(6,), dtype=np.float32)
        )
        available = {
            "rgb": spaces.Box(0, 255, shape=(*shown, 3), dtype=np.uint8),
            # Bounded by what the memory can address and by the rig's angle ranges.
            "pose": spaces.Box(np.array([-1e4] * 3 + [-np.pi] * 3, dtype=np.float32),
                               np.array([1e4] * 3 + [np.pi] * 3, dtype=np.float32), dtype=np.float32),
            "depth": spaces.Box(0.0, np.inf, shape=(latent.height, latent.width), dtype=np.float32),
            "latent": spaces.Box(-np.inf, np.inf, shape=(channels, latent.height, latent.width), dtype=np.float32),
        }
        self.observation_space = spaces.Dict(
            {key: available[key] for key in self.observation_keys} | dict(task.observation_spaces())
        )

        n = self.num_agents
        self.rigs = np.zeros((n, 6))
        self.start_rigs = np.zeros((n, 6))
        self.steps = np.zeros(n, dtype=np.int64)
        self.path_length = np.zeros(n)
        self.collided = np.zeros(n, dtype=bool)
        self.last_frames = np.zeros((n, *shown, 3), dtype=np.uint8)
        self.first_frames = np.zeros_like(self.last_frames)
        self.last_depth = np.full((n, latent.height, latent.width), np.inf, dtype=np.float32)
        self.last_latents = np.zeros((n, channels, latent.height, latent.width), dtype=np.float32)
        self.last_memory_hit = np.zeros(n)
        self.last_new_entries = np.zeros(self.num_worlds, dtype=np.int64)
        self.last_step: WorldStep | None = None
        self._last_arrays_borrowed = False  # last_frames/latents/depth are views of last_step's arrays (_absorb)
        self._rngs = [np.random.default_rng() for _ in range(n)]

    @staticmethod
    def _frames_per_step(model, frames_per_step: int | None) -> int:
        """``frames_per_step`` checked against the segment length the model declares (if any)."""
        declared = getattr(model, "latent_frames", None)
        if frames_per_step is None:
            return int(declared) if declared is not None else 1
        if isinstance(frames_per_step, bool) or not isinstance(frames_per_step, (int, np.integer)) or frames_per_step < 1:
            raise ValueError(f"frames_per_step must be a positive integer or None, got {frames_per_step!r}")
        if declared is not None and frames_per_step != declared:
            segment = getattr(model, "frames_per_segment", None)
            made_of = f" (frames_per_segment={segment})" if segment is not None else ""
            raise ValueError(
                f"frames_per_step={frames_per_step} conflicts with the world model: {type(model).__name__} generates "
                f"{declared} latent frames per segment{made_of}; leave frames_per_step unset (it follows the model) "
                f"or build the model with a segment of {frames_per_step} latent frames"
            )
        return int(frames_per_step)

    # ------------------------------------------------------------------ helpers for tasks

    def rng(self, agent: int) -> np.random.Generator:
        """The agent's own generator, reseeded with its world at every reset."""
        return self._rngs[agent]

    def agents_of(self, worlds) -> np.ndarray:
        """Agents of ``worlds``, ascending (a mask over worlds: np.isin's sort costs more at these sizes)."""
        worlds = np.asarray(worlds, dtype=np.int64).reshape(-1)
        chosen = np.zeros(self.num_worlds, dtype=bool)
        chosen[worlds[(worlds >= 0) & (worlds < self.num_worlds)]] = True
        return np.flatnonzero(chosen[self.agent_world])

    # ------------------------------------------------------------------ reset / step

    def reset_worlds(self, worlds, seeds, conditioning: list[dict[str, Any]] | None = None) -> None:
        """Restart ``worlds`` (and all their agents) from integer ``seeds``."""
        worlds = [int(w) for w in worlds]
        agents = self.agents_of(worlds)
        for world, seed in zip(worlds, seeds):
            for agent in self.agents_of([world]):
                self._rngs[agent] = np.random.default_rng([int(seed), int(self.team_slots[agent])])
        # A team fans out sideways across the origin (a lone agent stands on it), all facing +z.
        team_size = int(self.team_slots.max()) + 1
        offsets = (self.team_slots[agents] - (team_size - 1) / 2) * self.start_spread
        self.rigs[agents] = 0.0
        self.rigs[agents, 0] = offsets
        self.start_rigs[agents] = self.rigs[agents]
        poses = torch.from_numpy(poses_from_rigs(self.rigs[agents])).reshape(len(worlds), self.agents_per_world, 1, 4, 4)
        poses = poses.expand(-1, -1, self.start_frames, -1, -1).reshape(len(worlds), -1, 4, 4)
        result = self.world.reset(poses, seeds=[int(s) for s in seeds], worlds=worlds, conditioning=conditioning,
                                  views=self.agents_per_world)
        self._absorb(result, worlds)
        self.first_frames[agents] = self.last_frames[agents]
        self.steps[agents] = 0
        self.path_length[agents] = 0.0
        self.collided[agents] = False
        self.task.reset(self.view, agents)

    def step(self, actions, labels: list[str] | str = "agent") -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, list[dict]]:
        """Move every agent, generate one segment for every world, score with the task.

        ``actions``: one per agent, checked by :func:`mirage_env.actions.check_actions`
        (the one action check of every env); ``labels`` name the agents in errors. Every
        translation is collision-checked (:meth:`_blocked`); a blocked agent turns but stays
        where it was, with ``info["collided"]`` True. Everything that can refuse a step (the
        actions, the new cameras' range, the World's checks of the poses) runs before any
        state changes, so a refused step leaves the batch, the World and the RNGs as they were.
        """
        actions = check_actions(actions, self.action_type, self.num_agents, labels)
        before = self.rigs
        if self.action_type == "discrete":
            after = apply_checked_moves(before, actions, self.motion)
        else:
            after = apply_checked_velocities(before, actions, self.motion)
        blocked = self._blocked(before, after, actions)
        np.copyto(after[:, :3], before[:, :3], where=blocked[:, None])  # a blocked agent stays where it was
        self._check_range(after, labels)

        poses = torch.from_numpy(path_poses(before, after, self.frames_per_step).reshape(
            self.num_worlds, self.agents_per_world * self.frames_per_step, 4, 4))
        # The poses come from finite rigs whose range _check_range checked: the World need not check them again.
        result = self.world._advance(poses, views=self.agents_per_world)
        # The World took the step: from here on nothing refuses it.
        self.collided = blocked
        self.rigs = after
        moved = after[:, :3] - before[:, :3]
        self.path_length += np.sqrt(np.add.reduce(moved * moved, axis=1))  # np.linalg.norm's maths, without its checks
        self.steps += 1
        self._absorb(result, list(range(self.num_worlds)))

        all_agents = np.arange(self.num_agents)
        scored = self.task.step(self.view, all_agents)
        limit = self.max_episode_steps if self.max_episode_steps is not None else _NO_LIMIT
        truncated = (self.steps >= limit) & ~scored.terminated
        infos = self._infos(all_agents, scored.metrics)
        return self.observe(all_agents), scored.reward.astype(np.float64), scored.terminated.astype(bool), truncated, infos

    def _blocked(self, before: np.ndarray, after: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """(N,) bool: which agents' translations from ``before`` to ``after`` rigs (N, 6) are refused.

        A world model that knows its geometry (``blocked``, see
        :class:`mirage_env.backends.base.KnowsGeometry`; the procedural model) decides every
        translation, discrete or continuous, in any direction, keeping ``collision_distance``
        between the camera and walls or objects. Any other model (Wan) is checked from what
        the camera saw: a move with a forward part (FORWARD, or a velocity with forward > 0)
        is refused when the depth straight ahead is shorter than a step plus
        ``collision_distance``; backward, sideways and vertical moves cannot be checked there.
        """
        translated = np.logical_or.reduce(after[:, :3] != before[:, :3], axis=1)
        query = getattr(self.world.model, "blocked", None)
        if query is not None and np.logical_and.reduce(translated):
            # every agent moved (one agent's moves mostly do): no subset copies
            answer = query(self.agent_world, before[:, :3], after[:, :3], float(self.collision_distance))
            return _bools(answer)
        moving = np.flatnonzero(translated)
        blocked = np.zeros(self.num_agents, dtype=bool)
        if query is not None:
            if moving.size:
                answer = query(self.agent_world[moving], before[moving, :3], after[moving, :3],
                               float(self.collision_distance))
                blocked[moving] = _bools(answer)
            return blocked
        wants_forward = actions == Move.FORWARD if self.action_type == "discrete" else actions[:, 0] > 0
        blocked[moving] = (wants_forward & (self._free_distance_ahead() < self.motion.step_metres
                                            + self.collision_distance))[moving]
        return blocked

    def _check_range(self, rigs: np.ndarray, labels: list[str] | str) -> None:
        """Refuse, before anything moves, a step that would take a camera outside the world's range."""
        limit = self.world.position_limit
        if np.maximum.reduce(np.abs(rigs[:, :3]), axis=None) < limit:  # one reduction when all is well
            return
        outside = (np.abs(rigs[:, :3]) >= limit).any(axis=1)
        if outside.any():
            agents = np.flatnonzero(outside)
            who = f"{labels}(s) {agents.tolist()}" if isinstance(labels, str) else ", ".join(labels[i] for i in agents)
            raise ValueError(
                f"{who} would move the camera to {np.round(rigs[agents, :3], 2).tolist()}, {limit:g} m or more from "
                f"the first camera on some axis, outside the world's range; the step was not taken (nothing "
                f"moved): choose another action or reset"
            )

    def _free_distance_ahead(self) -> np.ndarray:
        """Nearest depth in the central latent columns, middle rows (not floor or ceiling)."""
        h, w = self.last_depth.shape[1:]
        rows = slice(max(0, h // 2 - max(1, h // 8)), min(h, h // 2 + max(1, h // 8)))
        cols = slice(max(0, w // 2 - max(1, w // 8)), min(w, w // 2 + max(1, w // 8)))
        return self.last_depth[:, rows, cols].min(axis=(1, 2))

    def _absorb(self, result: WorldStep, worlds: list[int]) -> None:
        """Keep, per agent, the last frame / depth / latent of its views in ``result``."""
        if worlds == list(range(self.num_worlds)):
            world_rows = agent_rows = slice(None)  # every world, in order: a step (slices copy faster)
        else:
            world_rows = np.asarray(worlds)
            agent_rows = self.agents_of(world_rows)
        n, a = len(worlds), self.agents_per_world
        per_agent = result.latents.shape[1] // a
        def last(t):  # each agent's last view, (n * a, ...): in numpy on the host (a torch op costs several)
            on_host = t.is_cpu
            # a world's views are agent-major, per_agent each: every per_agent-th from the first one's last
            picked = (t.numpy() if on_host else t)[:, per_agent - 1 :: per_agent].reshape(n * a, *t.shape[2:])
            # Contiguous before it leaves a device: a GPU tensor keeps its strides on the host, and frames there
            # come channel-strided (movedim), which made each later read of them a byte-wise gather (0.4 GB/s).
            return picked if on_host else picked.contiguous()

        # one frame per latent frame (a video VAE decodes more: result.frames)
        frames, depth = self.crop(_host(last(result.pose_frames))), _host(last(_float32(result.depth)))
        latents = last(_float32(result.latents))
        if isinstance(world_rows, slice):
            # Every world stepped: views of this step's own arrays, which nothing writes to, instead of three
            # copies (0.18 ms at N = 64); an update of some worlds copies them first (_own_last_arrays).
            self.last_frames, self.last_depth = frames, depth
            if isinstance(latents, np.ndarray):
                self.last_latents = latents
            else:  # left on the device until something asks (the "latent" observation, a save): a GPU copy less
                self._last_latents, self._latents_on_device = None, latents
            self._last_arrays_borrowed = True
        else:
            self._own_last_arrays()
            self.last_frames[agent_rows] = frames
            self.last_latents[agent_rows] = _host(latents)
            self.last_depth[agent_rows] = depth
        hit = result.memory_hit if per_agent == 1 else result.memory_hit.reshape(n, a, per_agent).mean(-1)
        self.last_memory_hit[agent_rows] = _host(hit).reshape(-1)
        self.last_new_entries[world_rows] = _host(result.new_entries)
        self.last_step = result

    @property
    def last_latents(self) -> np.ndarray:
        """(agents, C, h, w) float32: each agent's last latent frame (on the host; taken there on first use)."""
        if self._latents_on_device is not None:
            self._last_latents, self._latents_on_device = _host(self._latents_on_device), None
        return self._last_latents

    @last_latents.setter
    def last_latents(self, value: np.ndarray) -> None:
        self._last_latents, self._latents_on_device = value, None

    def _own_last_arrays(self) -> None:
        """Copies of the last frames, latents and depth in place of views of a step's arrays (before a write)."""
        if self._last_arrays_borrowed:
            self.last_frames, self.last_latents, self.last_depth = (
                self.last_frames.copy(), self.last_latents.copy(), self.last_depth.copy())
            self._last_arrays_borrowed = False

    def crop(self, frames):
        """``frames`` (..., H, W, 3) as generated -> (..., h, w, 3) as shown (``image_size``)."""
        if self._crop is None:  # shown as generated
            return frames
        return frames[..., self._crop[0], self._crop[1], :]

    def observe(self, agents: np.ndarray) -> dict[str, np.ndarray]:
        """Observations of ``agents`` (an index array), arrays of their own: later steps leave them alone."""
        observation: dict[str, np.ndarray] = {}
        # np.take copies once; indexing then .copy() would copy the frames twice.
        if "rgb" in self.observation_keys:
            observation["rgb"] = np.take(self.last_frames, agents, axis=0)
        if "pose" in self.observation_keys:
            observation["pose"] = self.rigs[agents].astype(np.float32)
        if "depth" in self.observation_keys:
            observation["depth"] = np.take(self.last_depth, agents, axis=0)
        if "latent" in self.observation_keys:
            observation["latent"] = np.take(self.last_latents, agents, axis=0)
        observation.update(self.task.observe(self.view, agents))
        return observation

    def _infos(self, agents: np.ndarray, metrics: list[dict]) -> list[dict]:
        # Each column becomes Python scalars in one tolist, not a conversion per agent and key.
        entries = _host(self.world.memory.entries_per_world(copy=False))[self.agent_world[agents]].tolist()
        memory_bytes = int(self.world.memory.nbytes())
        columns = zip(entries, self.last_memory_hit[agents].tolist(), self.collided[agents].tolist(),
                      self.path_length[agents].tolist())
        infos = [{"memory_entries": entry, "memory_bytes": memory_bytes, "memory_hit": hit, "collided": collided,
                  "path_length": path} for entry, hit, collided, path in columns]
        for info, measures in zip(infos, metrics):
            info.update(measures)
        return infos

    # ------------------------------------------------------------------ persistence

    _ARRAYS = ("rigs", "start_rigs", "steps", "path_length", "collided", "last_frames", "first_frames",
               "last_depth", "last_latents", "last_memory_hit", "last_new_entries")
    STATE_KEYS = ("rngs", "task", "num_agents")  # of ``state()``'s JSON part

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """JSON-able state and tensors (copies) that resume this batch exactly (saved with the World)."""
        tensors = {"batch." + name: torch.from_numpy(np.array(getattr(self, name), copy=True)) for name in self._ARRAYS}
        for name, value in self.task.state().items():
            tensors["task." + name] = torch.from_numpy(np.array(value, copy=True))
        json_state = {"rngs": [rng.bit_generator.state for rng in self._rngs], "task": self.task.name,
                      "num_agents": self.num_agents}
        return json_state, tensors

    def load_state(self, state: dict, tensors: dict[str, torch.Tensor], check: StateCheck | None = None) -> None:
        """Restore ``state()``: every field is checked before any is set, so a refused state changes nothing."""
        self._adopt(self._checked_state(state, tensors, check or StateCheck("saved batch state"), prefix=""))

    def _checked_state(self, state: dict, tensors: dict[str, torch.Tensor], check: StateCheck,
                       prefix: str = "extra.") -> _BatchState:
        """``state()`` (its tensors under ``prefix``) checked against this batch; nothing is set."""
        json_field = prefix.rstrip(".") or "state"
        check.mapping(state, json_field)
        if state.get("num_agents") != self.num_agents or state.get("task") != self.task.name:
            check.fail(f"{json_field}.task", f"says the saved world was made for task {state.get('task')!r} with "
                                             f"{state.get('num_agents')} agent(s); this env has task {self.task.name!r} "
                                             f"with {self.num_agents}", "make a matching env first")
        rngs = state.get("rngs")
        if not isinstance(rngs, list) or len(rngs) != self.num_agents:
            check.fail(f"{json_field}.rngs", f"must list one generator state per agent ({self.num_agents})")
        generators = [generator_from_state(value, f"{json_field}.rngs[{i}]", check) for i, value in enumerate(rngs)]

        arrays = {}
        for name in self._ARRAYS:
            held = getattr(self, name)
            dtype = torch.from_numpy(np.empty(0, held.dtype)).dtype
            field = f"{prefix}batch.{name}"
            value = check.tensor(tensors, field, dtype, held.shape)
            if name in ("rigs", "start_rigs", "path_length", "last_latents", "last_memory_hit"):
                check.finite(value, field)
            if name == "last_depth":
                check.finite(value, field, allow_inf=True)
            if name in ("steps", "path_length"):
                check.within(value, field, 0)
            if name == "last_memory_hit":
                check.within(value, field, 0, 1, "fractions")
            arrays[name] = value.numpy().copy()

        task_state = {k[len(prefix + "task."):]: v for k, v in tensors.items() if k.startswith(prefix + "task.")}
        if task_state:
            fields = set(self.task.state_fields)
            missing, unknown = sorted(fields - set(task_state)), sorted(set(task_state) - fields)
            if missing or unknown:
                name = (missing or unknown)[0]
                check.fail(f"{prefix}task.{name}", "is missing" if missing else
                           f"is not state of task {self.task.name!r} (its fields: {sorted(fields)})")
            for name, value in task_state.items():
                field = f"{prefix}task.{name}"
                held = getattr(self.task, name, None)
                if held is not None and (value.dtype != torch.from_numpy(np.asarray(held)[:0]).dtype
                                         or tuple(value.shape) != np.shape(held)):
                    check.fail(field, f"must be {np.asarray(held).dtype} of shape {np.shape(held)} as the task's, "
                                      f"got {str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}")
                if value.dim() == 0 or value.shape[0] != self.num_agents:
                    check.fail(field, f"must hold one row per agent ({self.num_agents}), got shape {tuple(value.shape)}")
                if value.is_floating_point():
                    check.finite(value, field)
            task_state = {name: value.numpy().copy() for name, value in task_state.items()}
        return _BatchState(arrays, generators, task_state)

    def _adopt(self, checked: _BatchState) -> None:
        """Set a checked state: the task first (the one part that may still refuse), then everything else."""
        held = {name: getattr(self.task, name, None) for name in self.task.state_fields}
        try:
            self.task.load_state(checked.task_state)
        except Exception:
            for name, value in held.items():
                setattr(self.task, name, value)
            raise
        for name, value in checked.arrays.items():
            setattr(self, name, value)
        self._last_arrays_borrowed = False
        self._rngs = list(checked.rngs)

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, env_state: dict, copy: bool = True) -> Snapshot:
        """The World, the agents and the task, plus the env's own JSON ``env_state``, as one Snapshot.

        ``copy=False`` may share storage with the live state (to write a file at once).
        """
        tensors = self.world.state_tensors(copy=copy)
        json_state, batch_tensors = self.state()
        tensors.update({"extra." + name: value for name, value in batch_tensors.items()})
        config, extra = self.world.config(), {**json_state, **env_state}
        if copy:
            config, extra = copy_module.deepcopy(config), copy_module.deepcopy(extra)
        return Snapshot(config=config, extra=extra, tensors=tensors)

    def prepare_restore(self, snapshot: Snapshot, check: StateCheck) -> PendingRestore:
        """Check ``snapshot`` against this batch and build the World it holds; nothing changes until ``commit``."""
        saved_worlds = check.mapping(snapshot.config, "config").get("num_worlds")
        if saved_worlds != self.num_worlds:
            check.fail("config.num_worlds", f"is {saved_worlds!r}, this env has {self.num_worlds} world(s)",
                       "make a matching env first")
        batch_state = self._checked_state(snapshot.extra, snapshot.tensors, check)
        world, model_state = World.from_state(snapshot.config, snapshot.tensors, model=self.world.model,
                                              filters=self.world.filters, device=self.world.memory.device,
                                              version=snapshot.version, check=check)
        return PendingRestore(self, world, model_state, batch_state, check)

    def reset_infos(self, agents: np.ndarray) -> list[dict]:
        entries = _host(self.world.memory.entries_per_world())
        return [{"memory_entries": int(entries[self.agent_world[a]]), "memory_hit": 0.0} for a in agents]


def validate_options(options: dict | None, allowed: tuple[str, ...]) -> dict:
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"reset options must be a dict (keys: {sorted(allowed)}), got {type(options).__name__} "
                         f"{options!r:.60}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown reset option(s) {unknown}; allowed: {sorted(allowed)}")
    return options


class _BatchState(NamedTuple):
    """A batch state checked by ``AgentBatch._checked_state``, ready to set."""

    arrays: dict[str, np.ndarray]
    rngs: list[np.random.Generator]
    task_state: dict[str, np.ndarray]


@dataclass(frozen=True)
class Snapshot:
    """An env's whole state in memory: what its world file holds, without the file.

    Made by ``snapshot()`` of an env, taken back by its ``restore`` (any number of times:
    a restore copies what it takes), written as a world file by ``save_world``.

    Attributes:
        config: ``World.config()``: the world's, the memory's and the model's settings (JSON-able).
        extra: the env's JSON state: the agents' RNG states, the task's name, the env's own
            RNGs and flags.
        tensors: the World's tensors (``memory.*``, ``rng.*``, ``tail.*``, ``model.*``,
            ``started``, ``segments_generated``) and the agents' and task's arrays
            (``extra.batch.*``, ``extra.task.*``), each a copy of its own.
        version: the format version the state follows.
    """

    config: dict
    extra: dict
    tensors: dict[str, torch.Tensor]
    version: int = FORMAT_VERSION

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class PendingRestore:
    """A checked snapshot and the World built from it, waiting to replace an AgentBatch's (``commit``)."""

    def __init__(self, batch: AgentBatch, world: World, model_state: dict, batch_state: _BatchState,
                 check: StateCheck):
        self.batch, self.world, self.model_state, self.batch_state, self.check = \
            batch, world, model_state, batch_state, check

    def commit(self) -> World:
        """Swap the new state in: the model's per-world state, the task, the agents, then the World.

        The two steps that can still refuse (the model's and the task's own loaders) run
        first, and the model gets its old state back if the task refuses.
        """
        model = self.batch.world.model
        before = load_model_state(model, self.model_state, self.check)
        try:
            self.batch._adopt(self.batch_state)
        except Exception:
            model.load_state_dict(before)
            raise
        self.batch.world = self.world
        return self.world


_BIT_GENERATORS = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM, "Philox": np.random.Philox,
                   "SFC64": np.random.SFC64, "MT19937": np.random.MT19937}


def generator_from_state(state, field: str, check: StateCheck) -> np.random.Generator:
    """A new numpy Generator set to a saved ``bit_generator.state``; MemoryFileError naming ``field`` if invalid."""
    check.mapping(state, field)
    name = state.get("bit_generator")
    if name not in _BIT_GENERATORS:
        check.fail(f"{field}.bit_generator", f"must be one of {sorted(_BIT_GENERATORS)}, got {name!r}")
    if name == "PCG64":  # the one the envs use: its fields checked here, with messages numpy does not give
        inner = check.mapping(state.get("state"), f"{field}.state")
        for key in ("state", "inc"):
            check.integer(inner.get(key), f"{field}.state.{key}", 0, (1 << 128) - 1)
        check.integer(state.get("has_uint32"), f"{field}.has_uint32", 0, 1)
        check.integer(state.get("uinteger"), f"{field}.uinteger", 0, (1 << 32) - 1)
    bit_generator = _BIT_GENERATORS[name]()
    try:
        bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        check.fail(field, f"is not a valid {name} state ({type(error).__name__}: {error})")
    return np.random.Generator(bit_generator)


_NO_LIMIT = np.iinfo(np.int64).max  # the step count no episode reaches (np.iinfo costs microseconds a call)


def _bools(answer) -> np.ndarray:
    """A model's ``blocked`` answer (a tensor on any device, an array or a sequence) as a bool array of its own
    (the batch writes to it)."""
    if not isinstance(answer, (torch.Tensor, np.ndarray)):
        answer = torch.as_tensor(answer)
    return _host(answer).astype(bool)  # astype copies


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.float()``, without the call when it is float32 already (a torch call run once a step is a cold one)."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _host(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    """A tensor's values as a numpy array (a view when it is already on the host; an array as it is)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    return tensor.numpy() if tensor.is_cpu else tensor.cpu().numpy()
