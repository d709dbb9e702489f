"""Typed settings of an env and the one factory that builds from them.

Every way of making an env (``MirageEnv``, ``MirageVectorEnv``,
``MirageParallelEnv``, ``gym.make``, the CLI, training and evaluation) goes
through :class:`EnvConfig`, so an option is defined once: a field of one of the
dataclasses below. Its ``metadata`` says how the command line spells it, so a
new field reaches the three env classes, every CLI command that builds an env
and the settings saved beside a trained policy without another edit.

Gymnasium users keep passing flat keyword arguments (``gym.make(id,
image_size=96, memory_horizon=2)``); :meth:`EnvConfig.from_options` sorts them
into the sections and refuses a misspelt one by naming the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

from .cli_types import non_negative_float, positive_float, positive_int
from .geometry import MotionConfig

__all__ = ["MemoryConfig", "WorldConfig", "AgentConfig", "EnvConfig", "OBSERVATION_KEYS", "add_env_arguments",
           "closest_name_error"]

OBSERVATION_KEYS = ("rgb", "pose", "depth", "latent")
ACTION_TYPES = ("discrete", "continuous")
RENDER_MODES = ("rgb_array",)
# A frame side past this would ask for tens of GB (frames, depth, latents per step), never a usable env.
MAX_IMAGE_SIDE = 4096
# The registered ids' TimeLimit, and the limit of an env built without one.
DEFAULT_EPISODE_STEPS = 500


def _cli(help: str, flag: str | None = None, **argparse_options) -> dict:
    """Field metadata: how the command line spells the option (``flag`` None: derived from the name)."""
    return {"help": help, "flag": flag, "argparse": argparse_options}


def closest_name_error(kind: str, name: str, valid, where: str = "") -> ValueError:
    """A ValueError for an unknown ``name`` that suggests the closest valid one."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{where}{hint} Valid: {', '.join(valid)}")


def _check_names(kind: str, given: Mapping[str, Any], valid, where: str) -> None:
    for name in given:
        if name not in valid:
            raise closest_name_error(kind, str(name), valid, where)


def _positive_int(value, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _keyword_names(function, skip: tuple[str, ...]) -> tuple[str, ...]:
    parameters = inspect.signature(function).parameters.values()
    return tuple(p.name for p in parameters if p.name not in ("self", *skip) and p.kind != p.VAR_KEYWORD)


@dataclass(frozen=True)
class MemoryConfig:
    """What the world remembers: the latent spatial memory's settings."""

    use_memory: bool = field(default=True, metadata=_cli(
        "ablation: the generator ignores memory", flag="--no-memory", action="store_false"))
    voxel_size: float | None = field(default=None, metadata=_cli(
        "memory voxel edge in metres (default: the world model's suggestion)", type=positive_float))
    memory_horizon: int | None = field(default=None, metadata=_cli(
        "ablation: read only what the last K segments wrote or saw (default: full memory)", type=positive_int))
    memory_write: str = field(default="unseen", metadata=_cli(
        "what a segment writes back: unseen (only what memory did not supply) or all", choices=("unseen", "all")))
    # Any other LatentSpatialMemory argument (brick_size, max_bricks_per_world, merge, ...).
    memory_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from .memory import LatentSpatialMemory, check_horizon

        object.__setattr__(self, "memory_options", dict(self.memory_options or {}))
        owned = ("channels", "voxel_size", "num_worlds", "device")
        _check_names("memory option", self.memory_options, _keyword_names(LatentSpatialMemory.__init__, owned),
                     " (memory_options are LatentSpatialMemory arguments)")
        horizon = check_horizon(self.memory_horizon, "memory_horizon")
        if horizon is not None and self.memory_options.get("horizon", horizon) != horizon:
            raise ValueError(f"memory_horizon={horizon} contradicts memory_options['horizon']="
                             f"{self.memory_options['horizon']!r}; give the horizon once")
        if self.voxel_size is not None and not (isinstance(self.voxel_size, numbers.Real) and self.voxel_size > 0):
            raise ValueError(f"voxel_size must be a positive number of metres or None, got {self.voxel_size!r}")

    def memory_kwargs(self) -> dict[str, Any]:
        """``LatentSpatialMemory`` keyword arguments besides channels, voxel size and world count."""
        options = dict(self.memory_options)
        if self.memory_horizon is not None:
            options["horizon"] = int(self.memory_horizon)
        return options

    @property
    def horizon(self) -> int | None:
        return self.memory_kwargs().get("horizon")


@dataclass(frozen=True)
class WorldConfig:
    """Which world model makes the frames, at what size, remembering how."""

    backend: str = field(default="procedural", metadata=_cli("world model: procedural (default) or wan"))
    image_size: int | tuple[int, int] = field(default=64, metadata=_cli("frame side in pixels", type=positive_int))
    checkpoint: str | None = field(default=None, metadata=_cli(
        "backend wan: a local Wan2.2 diffusers directory, or procedural-wan-mini (shipped)"))
    # Arguments of the backend's class (ProceduralWorldModel / WanWorldModel), e.g. {"scene": "outdoor"}.
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self):
        from .backends import BACKENDS

        object.__setattr__(self, "backend_options", dict(self.backend_options or {}))
        if self.backend not in BACKENDS:
            raise closest_name_error("backend", str(self.backend), BACKENDS)
        size = self.image_size
        sides = (size, size) if isinstance(size, numbers.Integral) else tuple(size) if isinstance(size, (tuple, list)) else ()
        if len(sides) != 2 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in sides):
            raise ValueError(f"image_size must be a positive int or (height, width), got {size!r}")
        if max(sides) > MAX_IMAGE_SIDE:
            raise ValueError(f"image_size {size!r} is too large: sides up to {MAX_IMAGE_SIDE} pixels")
        _check_names("backend option", self.backend_options, _backend_option_names(self.backend),
                     f" for backend {self.backend!r}")

    @property
    def sides(self) -> tuple[int, int]:
        """(height, width) asked for."""
        size = self.image_size
        return (int(size), int(size)) if isinstance(size, numbers.Integral) else (int(size[0]), int(size[1]))

    def generated_sides(self) -> tuple[int, int]:
        """(height, width) the world model generates: the asked sides rounded up to what it can make
        (the env shows the centre crop of the asked size, so 84x84 works on an 8-pixel latent grid)."""
        from .backends import size_multiple

        multiple = max(1, size_multiple(self.backend, self.checkpoint, **self.backend_options))
        return tuple(-(-side // multiple) * multiple for side in self.sides)

    def build(self, num_worlds: int = 1):
        """A ``World`` of ``num_worlds`` worlds with these settings (generating at ``generated_sides()``)."""
        from .backends import make_model
        from .world import World

        model = make_model(self.backend, image_size=self.generated_sides(), checkpoint=self.checkpoint,
                           **self.backend_options)
        return World(model, num_worlds=num_worlds, use_memory=self.memory.use_memory,
                     voxel_size=self.memory.voxel_size, memory_options=self.memory.memory_kwargs(),
                     write=self.memory.memory_write)


def _backend_option_names(backend: str) -> tuple[str, ...]:
    if backend == "procedural":
        from .backends.procedural import ProceduralWorldModel as cls
    else:
        from .backends.wan import WanWorldModel as cls
    return _keyword_names(cls.__init__, ("image_size", "checkpoint_dir"))


@dataclass(frozen=True)
class AgentConfig:
    """How an agent acts and what it observes."""

    action_type: str = field(default="discrete", metadata=_cli(
        "discrete (9 moves) or continuous (6-DoF velocity)", choices=ACTION_TYPES))
    frames_per_step: int | None = field(default=None, metadata=_cli(
        "latent frames per step (default: the world model's segment length, else 1)", type=positive_int))
    motion: MotionConfig = field(default_factory=MotionConfig)
    # None: the env never truncates by itself (gym.make's TimeLimit, or the caller, ends episodes).
    max_episode_steps: int | None = field(default=DEFAULT_EPISODE_STEPS, metadata=_cli(
        "steps before an episode is truncated", type=positive_int))
    observations: tuple[str, ...] = field(default=("rgb", "pose"), metadata=_cli(
        f"comma-separated observation keys from {', '.join(OBSERVATION_KEYS)} (the task adds its own)",
        type=lambda text: tuple(k for k in text.split(",") if k)))
    # A translation is refused when its path comes nearer than this to the world's geometry
    # (a backend without geometry can only check the depth straight ahead).
    collision_distance: float = field(default=0.3, metadata=_cli(
        "metres kept between the camera and walls or objects", type=non_negative_float))
    start_spread: float = 0.5

    def __post_init__(self):
        if self.action_type not in ACTION_TYPES:
            raise closest_name_error("action_type", str(self.action_type), ACTION_TYPES)
        if isinstance(self.motion, Mapping):
            _check_names("motion field", self.motion, [f.name for f in dataclasses.fields(MotionConfig)], "")
            object.__setattr__(self, "motion", MotionConfig(**self.motion))
        elif not isinstance(self.motion, MotionConfig):
            raise ValueError(f"motion must be a MotionConfig or a dict of its fields, got {self.motion!r}")
        observations = (self.observations,) if isinstance(self.observations, str) else tuple(self.observations)
        unknown = [k for k in observations if k not in OBSERVATION_KEYS]
        if unknown or not observations:
            raise ValueError(f"observations must be a non-empty subset of {OBSERVATION_KEYS}, got {self.observations!r}")
        object.__setattr__(self, "observations", observations)
        object.__setattr__(self, "max_episode_steps",
                           _positive_int(self.max_episode_steps, "max_episode_steps", allow_none=True))
        object.__setattr__(self, "frames_per_step", _positive_int(self.frames_per_step, "frames_per_step", allow_none=True))
        for name in ("collision_distance", "start_spread"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a non-negative number of metres, got {value!r}")


@dataclass(frozen=True)
class EnvConfig:
    """Everything that makes an env: the task, the world and the agents' settings."""

    task: Any = "explore"
    # Keyword arguments of the task's class (used when ``task`` is a name).
    task_options: Mapping[str, Any] = field(default_factory=dict)
    render_mode: str | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)

    def __post_init__(self):
        object.__setattr__(self, "task_options", dict(self.task_options or {}))
        if self.render_mode is not None and self.render_mode not in RENDER_MODES:
            raise ValueError(f"render_mode must be one of {list(RENDER_MODES)} or None, got {self.render_mode!r}")
        if isinstance(self.task, str):
            from .tasks import TASKS

            if self.task not in TASKS:
                raise closest_name_error("task", self.task, TASKS)
            _check_names("task option", self.task_options, _keyword_names(TASKS[self.task].__init__, ()),
                         f" for task {self.task!r}")
        elif self.task_options:
            raise ValueError("task_options apply to a task given by name; configure a Task instance directly")

    # ------------------------------------------------------------------ flat options

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, base: "EnvConfig | None" = None) -> "EnvConfig":
        """A config from flat keyword arguments (``image_size=96, memory_horizon=2, ...``) over ``base``."""
        options = dict(options or {})
        _check_names("option", options, OPTION_SECTIONS, "")
        base = base or cls()
        sections = {"": {}, "world": {}, "memory": {}, "agent": {}}
        for name, value in options.items():
            sections[OPTION_SECTIONS[name]][name] = value
        memory = dataclasses.replace(base.world.memory, **sections["memory"])
        world = dataclasses.replace(base.world, memory=memory, **sections["world"])
        agent = dataclasses.replace(base.agent, **sections["agent"])
        return dataclasses.replace(base, world=world, agent=agent, **sections[""])

    def options(self) -> dict[str, Any]:
        """The flat keyword arguments that rebuild this config (JSON-serialisable for a task given by name)."""
        flat = {}
        for section, obj in (("", self), ("world", self.world), ("memory", self.world.memory), ("agent", self.agent)):
            for f in dataclasses.fields(obj):
                if OPTION_SECTIONS.get(f.name) == section:
                    value = getattr(obj, f.name)
                    flat[f.name] = dataclasses.asdict(value) if isinstance(value, MotionConfig) else value
        flat["observations"] = list(flat["observations"])
        return flat

    def to_json(self) -> str:
        if not isinstance(self.task, str):
            raise ValueError("a config with a Task instance cannot be saved as JSON; give the task by name")
        return json.dumps(self.options(), indent=2)

    def build(self, num_worlds: int = 1, agents_per_world: int = 1, world=None, team_slots=None):
        """The ``World``, the task and the ``AgentBatch`` of an env.

        A given ``world`` is used as it is: it must hold ``num_worlds`` worlds, and a
        ``memory_horizon`` in this config may only repeat the horizon its memory has.
        """
        from .batch import AgentBatch
        from .threads import limit_worker_threads

        limit_worker_threads()  # an env in a worker process: one torch thread, not one per core
        built = world is None
        if built:
            world = self.world.build(num_worlds)
        else:
            if world.num_worlds != num_worlds:
                raise ValueError(f"world holds {world.num_worlds} worlds but {num_worlds} are needed; they must match")
            horizon = self.world.memory.memory_horizon
            if horizon is not None and world.memory.horizon != horizon:
                raise ValueError(f"memory_horizon={horizon} but the given world's memory has horizon "
                                 f"{world.memory.horizon}; build the World with memory_options={{'horizon': "
                                 f"{horizon}}} or drop memory_horizon")
        task = self.make_task()
        # Every AgentConfig field is an AgentBatch argument of the same name.
        agent = {f.name: getattr(self.agent, f.name) for f in dataclasses.fields(AgentConfig)}
        # A given world shows its frames whole; a built one the asked size (a centre crop when
        # the model generates a larger multiple).
        shown = self.world.sides if built else None
        batch = AgentBatch(world, task, agents_per_world=agents_per_world, team_slots=team_slots,
                           image_size=shown, **agent)
        return world, task, batch

    def make_task(self):
        """A fresh task for one env (a task holds per-episode state, so envs never share one)."""
        if not isinstance(self.task, str):
            return self.task
        from .tasks import TASKS

        return TASKS[self.task](**self.task_options)


def _sections() -> dict[str, str]:
    owner = {"": EnvConfig, "world": WorldConfig, "memory": MemoryConfig, "agent": AgentConfig}
    nested = {"world", "memory", "agent"}
    return {f.name: section for section, cls in owner.items() for f in dataclasses.fields(cls) if f.name not in nested}


# Flat option name -> the section that owns it; names are unique across sections.
OPTION_SECTIONS: dict[str, str] = _sections()
# The options the command line spells (their fields carry help text).
CLI_OPTIONS = tuple(f.name for cls in (WorldConfig, MemoryConfig, AgentConfig) for f in dataclasses.fields(cls)
                    if "help" in f.metadata)


def add_env_arguments(parser, defaults: Mapping[str, Any] | None = None, suppress: bool = False) -> None:
    """Command-line flags for every option whose field says how the CLI spells it.

    ``defaults`` overrides config defaults for this command (e.g. training's shorter
    episodes); ``suppress``: flags not given leave no attribute, so they override
    nothing (evaluation keeps a saved model's settings). Read them back with
    :func:`options_from_args`.
    """
    import argparse

    defaults = dict(defaults or {})
    for cls in (WorldConfig, MemoryConfig, AgentConfig):
        for f in dataclasses.fields(cls):
            if f.name not in CLI_OPTIONS:
                continue
            flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
            default = argparse.SUPPRESS if suppress else defaults.get(f.name, f.default)
            parser.add_argument(flag, dest=f.name, default=default, help=f.metadata["help"],
                                **f.metadata["argparse"])


def options_from_args(args) -> dict[str, Any]:
    """The env options that :func:`add_env_arguments` put on ``args``."""
    return {name: getattr(args, name) for name in CLI_OPTIONS if hasattr(args, name)}
