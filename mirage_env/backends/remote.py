"""A world model served elsewhere: the client backend (``backend="remote"``) and its wire format.

The split follows what each part is. The generator is heavy and shareable (a 5B
Wan2.2 on a GPU node); a world's memory, its RNGs and the model's per-world state
(scene layouts, prompt embeddings) are the world's own state, saved with it. So the
server holds only the network, and everything that makes world ``i`` world ``i``
travels with each call:

    client (in the env)                         server (mirage_env.backends.model_server)
    memory read, filters, memory write          one WorldModel, no per-world state of its own
    per-world model state rows  ──────────────▶ load the rows of every call in the batch
    torch.Generator states      ──────────────▶ one generator per world, set from the state
    poses, projected memory, tail               one start / generate / blocked / decode call
                                ◀────────────── the Segment, the rows and generator states after it

Calls from many clients (env runners, vector envs) that are compatible (same kind,
same frames per world, ...) are concatenated along the world axis and run as one
batched model call. Because the procedural model renders world ``i`` of a batch
exactly as a batch of one (see ``backends/base.py``), a served world is bit-for-bit
the world a local model would make, and a world saved from a served env resumes
bit-for-bit (its ``state_dict`` is the rows the client holds).

The contract a served model must meet (both built-in backends do): every tensor of
``state_dict()`` is per-world, one row per world along dim 0, and a world without a
row behaves as a row of zeros (the procedural model grows its tables with zeros; Wan
marks unset prompt embeddings with a zero ``prompt_embeds_set``).

    from mirage_env.backends.model_server import serve_world_model
    serve_world_model("rooms-64", backend="procedural", image_size=64)     # a named Ray actor
    env = gym.make("Mirage/PointNav-v0", backend="remote", checkpoint="rooms-64")

``checkpoint`` names the served model for ``backend="remote"`` (the served model's
own settings are fixed where it is served). Ray is needed only to reach a Ray
actor; :class:`LocalTransport` serves a model in-process (tests, one machine).
"""

from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ..geometry import Camera
from .base import LatentSpec, Segment, SegmentRequest

__all__ = ["RemoteWorldModel", "ModelCall", "ModelReply", "LocalTransport", "RayTransport", "SERVER_NAMESPACE",
           "OPTIONAL_ATTRIBUTES", "connect", "serve_in_process", "stop_serving_in_process"]

#: Ray namespace the servers are registered in, so drivers and workers of any job find them.
SERVER_NAMESPACE = "mirage_env"
#: Optional model attributes the World and the envs read (see backends/base.py), mirrored by the client.
OPTIONAL_ATTRIBUTES = ("suggested_voxel_size", "context_frames", "latent_frames", "frames_per_segment")
KINDS = ("start", "generate", "blocked", "decode")
#: Served models whose collision geometry the client rebuilds from their config and its own state rows
#: (cheap: the procedural model's boxes, no rendering), so ``blocked`` needs no call to the server.
LOCAL_GEOMETRY = ("procedural",)


class _Packed:
    """A torch tensor on the wire, as a numpy array: pickling numpy is ~25x faster than pickling
    torch tensors (2.7 ms against 0.11 ms for one 64x64 generate call, measured), and a call is
    pickled twice and its reply twice per step."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    def __getstate__(self):
        return self.array

    def __setstate__(self, array):
        self.array = array


def _pack(value):
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16) or tensor.is_quantized:
            return tensor  # no numpy twin (float16 has one, but keep every dtype exact and simple)
        return _Packed(tensor.numpy())
    if isinstance(value, Segment):
        return ("__segment__", {name: _pack(getattr(value, name)) for name in _SEGMENT_FIELDS})
    if isinstance(value, dict):
        return {k: _pack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_pack(v) for v in value]
    return value


def _unpack(value):
    if isinstance(value, _Packed):
        # Ray hands over arrays read-only (zero-copy from its object store); a tensor is writable.
        array = value.array
        return torch.from_numpy(array if array.flags.writeable else array.copy())
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__segment__":
        return Segment(**{name: _unpack(v) for name, v in value[1].items()})
    if isinstance(value, dict):
        return {k: _unpack(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v) for v in value]
    return value


_SEGMENT_FIELDS = ("latents", "depth", "poses", "image_depth", "keep", "frames", "info")


@dataclass
class ModelCall:
    """One client's request: ``worlds`` worlds of one kind of model call.

    Attributes:
        kind: "start", "generate", "blocked" or "decode".
        worlds: how many worlds (rows) the call brings; 0 for decode.
        state: the model's per-world state of those worlds, ``(worlds, ...)`` per tensor; a
            tensor left out is zeros for every one of them.
        rng: ``torch.Generator.get_state()`` of each world (start, generate).
        inputs: the kind's own arguments (tensors and options; see ``RemoteWorldModel``).
    """

    kind: str
    worlds: int
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    rng: list[torch.Tensor] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)

    def __getstate__(self):
        return _pack(dict(vars(self)))

    def __setstate__(self, state):
        vars(self).update(_unpack(state))

    def group_key(self) -> tuple:
        """Calls with equal keys can run as one batched model call."""
        x = self.inputs
        if self.kind == "start":
            return ("start", x["views"], tuple(x["poses"].shape[1:]))
        if self.kind == "generate":
            previous = x["previous"]
            tail = None if previous is None else tuple(previous["latents"].shape[1:])
            # A request-wide conditioning dict cannot be split by world: such a call runs alone.
            alone = id(self) if x["conditioning"] else None
            return ("generate", x["views"], tuple(x["poses"].shape[1:]), x["use_memory"], tail, alone)
        if self.kind == "blocked":
            return ("blocked", x["clearance"])
        return ("decode", tuple(x["latents"].shape[1:]))


@dataclass
class ModelReply:
    """What a call gets back: the per-world state and generator states after it, and its output."""

    state: dict[str, torch.Tensor]
    rng: list[torch.Tensor]
    output: Any

    def __getstate__(self):
        return _pack(dict(vars(self)))

    def __setstate__(self, state):
        vars(self).update(_unpack(state))


class LocalTransport:
    """A :class:`~mirage_env.backends.model_server.ModelServer` in this process (one machine, tests).

    ``serialize=True`` sends every call and reply through ``pickle``, as a Ray actor would,
    so nothing the client keeps can alias the server's tensors.
    """

    def __init__(self, server, serialize: bool = True, name: str | None = None):
        self.server, self.serialize, self.name = server, serialize, name
        self._lock = threading.Lock()

    def describe(self) -> dict:
        return self._wire(self.server.describe())

    def call(self, call: ModelCall) -> ModelReply:
        with self._lock:
            return self._wire(self.server.run([self._wire(call)])[0])

    def _wire(self, value):
        return pickle.loads(pickle.dumps(value)) if self.serialize else value


class RayTransport:
    """A served model behind a Ray actor handle (see ``model_server.serve_world_model``)."""

    def __init__(self, handle, name: str | None = None, namespace: str = "mirage_env"):
        self.handle, self.name, self.namespace = handle, name, namespace

    def describe(self) -> dict:
        import ray

        return ray.get(self.handle.describe.remote())

    def call(self, call: ModelCall) -> ModelReply:
        import ray

        try:
            return ray.get(self.handle.call.remote(call))
        except ray.exceptions.RayActorError:
            if self.name is None:
                raise
            # The server died or was restarted under its name: find it again and retry once. A call
            # carries everything it needs (state rows, generator states), so a retry repeats it exactly.
            self.handle = ray.get_actor(self.name, namespace=self.namespace)
            return ray.get(self.handle.call.remote(call))


# Per process: a served model is looked up (and described) once, however many envs use it.
_connections: dict[tuple[str, str], "RayTransport | LocalTransport"] = {}


def connect(name: str, namespace: str = SERVER_NAMESPACE) -> "RayTransport | LocalTransport":
    """The served model registered as ``name`` in the Ray cluster this process is connected to."""
    key = (name, namespace)
    if key in _connections:
        return _connections[key]
    try:
        import ray
    except ImportError:
        raise ImportError("backend='remote' reaches its model server through Ray, which is not installed: "
                          "pip install 'mirage-env[ray]'") from None
    if not ray.is_initialized():
        raise RuntimeError(f"backend='remote' needs this process connected to the Ray cluster that serves "
                           f"{name!r}: call ray.init(address=...) first (RLlib's env runners already are)")
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise ValueError(f"no world model is served as {name!r} (Ray namespace {namespace!r}); start one with "
                         f"mirage_env.backends.model_server.serve_world_model({name!r}, ...) or "
                         f"`mirage-env serve --name {name}`") from None
    _connections[key] = RayTransport(handle, name, namespace)
    return _connections[key]


def serve_in_process(name: str, model, namespace: str = SERVER_NAMESPACE) -> LocalTransport:
    """Serve ``model`` to the envs of this process under ``name`` (no Ray): ``backend="remote",
    checkpoint=name`` then shares this one model among them (one call at a time; a vector env's
    worlds go in one call)."""
    from .model_server import ModelServer

    transport = LocalTransport(ModelServer(model), name=name)
    _connections[(name, namespace)] = transport
    return transport


def stop_serving_in_process(name: str, namespace: str = SERVER_NAMESPACE) -> None:
    _connections.pop((name, namespace), None)


class RemoteWorldModel:
    """The ``WorldModel`` protocol, answered by a model served elsewhere.

    Args:
        server: the served model's name (a Ray actor in :data:`SERVER_NAMESPACE`) or a
            transport (:class:`LocalTransport`, :class:`RayTransport`).
        image_size: (height, width) the env will ask for; must be what the served model makes.
        namespace: Ray namespace of a server given by name.
        local_geometry: answer collision queries here when the served model's geometry is a cheap
            function of the state rows the client holds (:data:`LOCAL_GEOMETRY`: the procedural
            model's boxes), saving a round trip per step; otherwise (or False) the server answers.

    The client holds the model's per-world state (``state_dict``: saved with the world)
    and sends it, with each world's generator state, in every call; the optional
    attributes of the served model (``latent_frames``, ``context_frames``, ...) and its
    collision queries (``blocked``, when the served model knows its geometry) are mirrored.
    """

    name = "remote"

    def __init__(self, server, image_size: int | tuple[int, int] | None = None, namespace: str = SERVER_NAMESPACE,
                 local_geometry: bool = True):
        self.server_name = server if isinstance(server, str) else getattr(server, "name", None)
        self.namespace = namespace
        self.transport = connect(server, namespace) if isinstance(server, str) else server
        info = self.transport.describe()
        self.served = info["config"]
        self.latent = LatentSpec(**info["latent"])
        self.camera = Camera.from_dict(info["camera"])
        self.size_multiple = int(info["size_multiple"])
        if image_size is not None:
            sides = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
            if sides != (self.camera.height, self.camera.width):
                raise ValueError(f"the served model {self.server_name!r} makes {self.camera.height}x{self.camera.width} "
                                 f"frames, but image_size {sides[0]}x{sides[1]} was asked; ask for "
                                 f"image_size=({self.camera.height}, {self.camera.width}) or serve another model")
        for attribute, value in info["attributes"].items():
            setattr(self, attribute, value)
        self._geometry = None
        if info["knows_geometry"]:
            # An instance attribute: the envs look for ``blocked`` with getattr (KnowsGeometry).
            self.blocked = self._blocked
            if local_geometry and self.served.get("name") in LOCAL_GEOMETRY:
                from . import build_model

                self._geometry = build_model(self.served)
        self._template = {k: v[:0].clone() for k, v in info["empty_state"].items()}
        self._rows = {k: v.clone() for k, v in self._template.items()}

    # ------------------------------------------------------------------ protocol

    def start(self, poses, generators, conditioning=None, worlds=None, views: int = 1) -> Segment:
        poses = torch.as_tensor(poses, dtype=torch.float64)
        n = poses.shape[0]
        worlds = list(range(n)) if worlds is None else [int(w) for w in worlds]
        if len(worlds) != n or len(generators) != n:
            raise ValueError(f"start() needs one world index and one generator per pose row: {len(worlds)} worlds, "
                             f"{len(generators)} generators for {n} rows")
        if conditioning is not None and len(conditioning) != n:
            raise ValueError(f"conditioning has {len(conditioning)} entries for {n} worlds")
        call = ModelCall("start", n, self._rows_of(worlds), _rng_states(generators),
                         {"poses": poses, "conditioning": None if conditioning is None else list(conditioning),
                          "views": int(views)})
        reply = self.transport.call(call)
        self._keep(worlds, reply, generators)
        return reply.output

    def generate(self, request: SegmentRequest) -> Segment:
        n = request.batch_size
        if len(request.generators) != n:
            raise ValueError(f"need one generator per world: {len(request.generators)} for {n} worlds")
        previous = request.previous
        tail = None if previous is None else {"latents": previous.latents, "depth": previous.depth,
                                              "poses": previous.poses}
        call = ModelCall("generate", n, self._rows_of(range(n)), _rng_states(request.generators), {
            "poses": torch.as_tensor(request.poses, dtype=torch.float64), "memory_latents": request.memory_latents,
            "memory_mask": request.memory_mask, "memory_depth": request.memory_depth, "previous": tail,
            "use_memory": bool(request.use_memory), "views": int(request.views),
            "conditioning": dict(request.conditioning or {}),
        })
        reply = self.transport.call(call)
        self._keep(list(range(n)), reply, request.generators)
        return reply.output

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.transport.call(ModelCall("decode", 0, inputs={"latents": latents})).output

    def _blocked(self, worlds, start, end, clearance: float) -> torch.Tensor:
        """Collision queries answered by the served model's geometry (see ``KnowsGeometry``)."""
        worlds = torch.as_tensor(worlds, dtype=torch.int64).reshape(-1)
        rows = self._count()
        if worlds.numel() and (int(worlds.min()) < 0 or int(worlds.max()) >= rows):
            raise ValueError(f"worlds {worlds.tolist()} include one that was never started ({rows} started)")
        if self._geometry is not None:
            self._geometry.load_state_dict(self._rows)
            return self._geometry.blocked(worlds, start, end, clearance)
        call = ModelCall("blocked", rows, self._rows_of(range(rows)), inputs={
            "worlds": worlds, "start": torch.as_tensor(start, dtype=torch.float64).reshape(-1, 3),
            "end": torch.as_tensor(end, dtype=torch.float64).reshape(-1, 3), "clearance": float(clearance)})
        return self.transport.call(call).output

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "server": self.server_name, "namespace": self.namespace, "served": self.served}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RemoteWorldModel":
        """Reconnect to the server a saved world was made with; refuses a server that now serves another model."""
        server = config.get("server")
        if not isinstance(server, str):
            raise ValueError("a remote world model's config must name its server ('server'); pass model= explicitly")
        model = cls(server, namespace=config.get("namespace", SERVER_NAMESPACE))
        if config.get("served") is not None and model.served != config["served"]:
            raise ValueError(f"the server {server!r} now serves {model.served}, not the model the world was saved "
                             f"with ({config['served']}); serve that model again under this name")
        return model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._rows

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self._template:
            missing = sorted(set(self._template) - set(state))
            unknown = sorted(set(state) - set(self._template))
            if missing or unknown:
                raise ValueError(f"the served model's per-world state has {sorted(self._template)}; got missing "
                                 f"{missing}, unknown {unknown}")
        rows = {k: v.detach().cpu().clone() for k, v in state.items()}
        counts = {int(v.shape[0]) for v in rows.values() if v.dim()}
        if len(counts) > 1 or any(v.dim() == 0 for v in rows.values()):
            raise ValueError(f"per-world state tensors must all have one row per world, got shapes "
                             f"{ {k: tuple(v.shape) for k, v in rows.items()} }")
        for name, value in rows.items():
            held = self._template.get(name)
            if held is not None and (value.dtype != held.dtype or value.shape[1:] != held.shape[1:]):
                raise ValueError(f"state {name!r} must be {held.dtype} (rows, {', '.join(map(str, held.shape[1:]))}) "
                                 f"for the served model, got {value.dtype} {tuple(value.shape)}")
        self._rows = rows

    # ------------------------------------------------------------------ per-world rows

    def _count(self) -> int:
        return max((int(v.shape[0]) for v in self._rows.values()), default=0)

    def _rows_of(self, worlds) -> dict[str, torch.Tensor]:
        """The state rows of ``worlds``; a world with no row yet gets zeros (as a model growing its tables)."""
        worlds = list(worlds)
        count = self._count()
        out = {}
        for name, table in self._rows.items():
            rows = torch.zeros((len(worlds), *table.shape[1:]), dtype=table.dtype)
            have = [i for i, w in enumerate(worlds) if w < count]
            if have:
                rows[have] = table[[worlds[i] for i in have]]
            out[name] = rows
        return out

    def _keep(self, worlds: list[int], reply: ModelReply, generators) -> None:
        """Take the rows and generator states a call returned as this client's own."""
        count = max(self._count(), max(worlds, default=-1) + 1)
        for name, rows in reply.state.items():
            table = self._rows.get(name)
            if table is None:
                table = torch.zeros((0, *rows.shape[1:]), dtype=rows.dtype)
            if table.shape[0] < count:
                table = torch.cat([table, torch.zeros((count - table.shape[0], *table.shape[1:]), dtype=table.dtype)])
            table[worlds] = rows.to(table.dtype)
            self._rows[name] = table
        for name, table in self._rows.items():  # a table the reply left out still gets its new worlds' rows
            if table.shape[0] < count:
                self._rows[name] = torch.cat([table, torch.zeros((count - table.shape[0], *table.shape[1:]),
                                                                 dtype=table.dtype)])
        for generator, state in zip(generators, reply.rng):
            generator.set_state(state)


def _rng_states(generators) -> list[torch.Tensor]:
    for generator in generators:
        if generator.device.type != "cpu":
            raise ValueError(f"a served world model takes CPU torch.Generators (their state travels with the "
                             f"request), got one on {generator.device}")
    return [generator.get_state() for generator in generators]
