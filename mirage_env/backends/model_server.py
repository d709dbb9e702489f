"""One world model serving many worlds: batching server, Ray actor, ``mirage-env serve``.

:class:`ModelServer` is the part without Ray: given the calls of many clients
(:class:`~mirage_env.backends.remote.ModelCall`, each bringing its worlds' per-world
state and generator states), it groups the compatible ones, concatenates them along
the world axis, loads their rows into the one model, makes ONE model call per group,
and splits the result, the rows after it and the generator states back per call. The
model keeps nothing between calls, so any mix of clients can share a batch.

:func:`serve_world_model` puts it behind a named Ray actor. The actor is asynchronous:
it accepts calls while the model runs (in one worker thread), and when the model is
free it takes everything queued (up to ``max_batch_worlds`` worlds) as the next batch,
so the busier the server, the larger its batches. ``batch_wait_s`` makes it wait that
long for more calls before each batch (a latency for batch size trade).

    mirage-env serve --name rooms-64 --backend procedural --image-size 64 --address auto
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import torch

from .base import Segment, SegmentRequest
from .remote import KINDS, OPTIONAL_ATTRIBUTES, SERVER_NAMESPACE, ModelCall, ModelReply

__all__ = ["ModelServer", "serve_world_model", "server_stats", "add_arguments", "main"]


class ModelServer:
    """Runs the calls of many clients on one world model, one model call per compatible group.

    Args:
        model: a WorldModel whose per-world state is rows (see ``backends/remote.py``).
        size_multiple: the frame sides the model can make are multiples of this (told to clients;
            default: the latent grid's factor).
    """

    def __init__(self, model, size_multiple: int | None = None):
        self.model = model
        self.size_multiple = int(size_multiple or model.latent.spatial_factor)
        # Shapes and dtypes of the per-world state, before any world exists.
        self._template = {k: v[:0].detach().cpu().clone() for k, v in model.state_dict().items()}
        self.stats: dict[str, dict[str, int]] = {kind: {"model_calls": 0, "requests": 0, "worlds": 0}
                                                 for kind in KINDS}
        self.busy_seconds = 0.0

    def describe(self) -> dict[str, Any]:
        model = self.model
        return {
            "config": model.config(),
            "latent": {"channels": model.latent.channels, "spatial_factor": model.latent.spatial_factor,
                       "temporal_factor": model.latent.temporal_factor},
            "camera": model.camera.to_dict(),
            "size_multiple": self.size_multiple,
            "attributes": {name: getattr(model, name) for name in OPTIONAL_ATTRIBUTES
                           if getattr(model, name, None) is not None},
            "knows_geometry": callable(getattr(model, "blocked", None)),
            "empty_state": self._template,
        }

    def run(self, calls: list[ModelCall]) -> list[ModelReply | Exception]:
        """Replies in the order of ``calls``; a call that fails gets its exception in its place.

        A group that fails is retried call by call, so one client's bad request does not
        fail the others it was batched with (every call carries all its state: a retry
        starts from exactly what the first try started from).
        """
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, call in enumerate(calls):
            if call.kind not in KINDS:
                raise ValueError(f"unknown model call {call.kind!r}; expected one of {KINDS}")
            groups[call.group_key()].append(i)
        replies: list[ModelReply | Exception | None] = [None] * len(calls)
        for members in groups.values():
            group = [calls[i] for i in members]
            try:
                out = self._run_group(group)
            except Exception as error:  # noqa: BLE001 - isolate the failing call, answer the others
                if len(group) == 1:
                    out = [error]
                else:
                    out = []
                    for call in group:
                        try:
                            out.extend(self._run_group([call]))
                        except Exception as single:  # noqa: BLE001
                            out.append(single)
            for i, reply in zip(members, out):
                replies[i] = reply
        return replies

    # ------------------------------------------------------------------ one batched model call

    def _run_group(self, calls: list[ModelCall]) -> list[ModelReply]:
        kind = calls[0].kind
        started = time.perf_counter()
        if kind == "decode":
            latents = torch.cat([c.inputs["latents"] for c in calls])
            frames = self.model.decode(latents)
            outputs = list(torch.split(frames, [c.inputs["latents"].shape[0] for c in calls]))
            replies = [ModelReply({}, [], out) for out in outputs]
        else:
            counts = [c.worlds for c in calls]
            offsets = [sum(counts[:i]) for i in range(len(calls))]
            self.model.load_state_dict(self._merged_state(calls))
            generators = [_generator(state) for c in calls for state in c.rng]
            if kind == "start":
                output = self._start(calls, generators)
            elif kind == "generate":
                output = self.model.generate(self._request(calls, generators))
            else:
                output = self._blocked(calls, offsets)
            state = self.model.state_dict()
            replies = []
            for i, call in enumerate(calls):
                rows = slice(offsets[i], offsets[i] + counts[i])
                rng = [g.get_state() for g in generators[rows]] if call.rng else []
                if kind == "blocked":
                    part = output[i]
                else:
                    part = _segment_rows(output, rows)
                replies.append(ModelReply(_rows(state, rows, counts[i]), rng, part))
        stats = self.stats[kind]
        stats["model_calls"] += 1
        stats["requests"] += len(calls)
        stats["worlds"] += sum(c.worlds for c in calls)
        self.busy_seconds += time.perf_counter() - started
        return replies

    def _merged_state(self, calls: list[ModelCall]) -> dict[str, torch.Tensor]:
        """Every call's rows, one after another; a tensor a call left out is zeros for its worlds."""
        shapes = {k: (v.shape[1:], v.dtype) for k, v in self._template.items()}
        for call in calls:
            for k, v in call.state.items():
                shapes.setdefault(k, (v.shape[1:], v.dtype))
        merged = {}
        for name, (trailing, dtype) in shapes.items():
            parts = []
            for call in calls:
                rows = call.state.get(name)
                if rows is None:
                    rows = torch.zeros((call.worlds, *trailing), dtype=dtype)
                elif rows.shape[0] != call.worlds or rows.shape[1:] != trailing or rows.dtype != dtype:
                    raise ValueError(f"state {name!r} of a call must be {dtype} ({call.worlds}, "
                                     f"{', '.join(map(str, trailing))}), got {rows.dtype} {tuple(rows.shape)}")
                parts.append(rows)
            merged[name] = torch.cat(parts)
        return merged

    def _start(self, calls: list[ModelCall], generators) -> Segment:
        poses = torch.cat([c.inputs["poses"] for c in calls])
        conditioning = None
        if any(c.inputs["conditioning"] is not None for c in calls):
            conditioning = [item for c in calls for item in (c.inputs["conditioning"] or [{}] * c.worlds)]
        views = calls[0].inputs["views"]
        extra = {"views": views} if views != 1 else {}  # models that serve one camera need not know of views
        return self.model.start(poses, generators, conditioning, worlds=list(range(poses.shape[0])), **extra)

    def _request(self, calls: list[ModelCall], generators) -> SegmentRequest:
        cat = lambda name: torch.cat([c.inputs[name] for c in calls])  # noqa: E731
        previous = None
        if calls[0].inputs["previous"] is not None:
            tail = lambda name: torch.cat([c.inputs["previous"][name] for c in calls])  # noqa: E731
            previous = Segment(latents=tail("latents"), depth=tail("depth"), poses=tail("poses"))
        return SegmentRequest(poses=cat("poses"), memory_latents=cat("memory_latents"), memory_mask=cat("memory_mask"),
                              memory_depth=cat("memory_depth"), generators=generators, previous=previous,
                              use_memory=calls[0].inputs["use_memory"], views=calls[0].inputs["views"],
                              conditioning=calls[0].inputs["conditioning"])

    def _blocked(self, calls: list[ModelCall], offsets: list[int]) -> list[torch.Tensor]:
        worlds = torch.cat([c.inputs["worlds"] + offset for c, offset in zip(calls, offsets)])
        start = torch.cat([c.inputs["start"] for c in calls])
        end = torch.cat([c.inputs["end"] for c in calls])
        answer = torch.as_tensor(self.model.blocked(worlds, start, end, calls[0].inputs["clearance"]))
        return list(torch.split(answer.cpu(), [c.inputs["worlds"].numel() for c in calls]))


def _generator(state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(state)
    return generator


def _rows(state: dict[str, torch.Tensor], rows: slice, count: int) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of every state tensor, copied (a table shorter than the batch is zeros past its end)."""
    out = {}
    for name, table in state.items():
        part = table[rows].detach().cpu().clone()
        if part.shape[0] < count:
            part = torch.cat([part, torch.zeros((count - part.shape[0], *table.shape[1:]), dtype=table.dtype)])
        out[name] = part
    return out


def _segment_rows(segment: Segment, rows: slice) -> Segment:
    pick = lambda t: None if t is None else t[rows].clone()  # noqa: E731
    return Segment(
        latents=segment.latents[rows].clone(), depth=segment.depth[rows].clone(), poses=segment.poses[rows].clone(),
        image_depth=pick(segment.image_depth), keep=pick(segment.keep), frames=pick(segment.frames),
        info={k: (v[rows].clone() if isinstance(v, torch.Tensor) else v) for k, v in segment.info.items()},
    )


# ---------------------------------------------------------------------- the Ray actor


class _AsyncModelServer:
    """The body of the Ray actor: a queue in front of a ModelServer, drained batch by batch."""

    def __init__(self, spec: dict[str, Any], max_batch_worlds: int, batch_wait_s: float, threads: int | None):
        from concurrent.futures import ThreadPoolExecutor

        from . import make_model, size_multiple

        if threads:
            torch.set_num_threads(int(threads))
        model = make_model(spec["backend"], image_size=spec["image_size"], checkpoint=spec.get("checkpoint"),
                           **spec.get("backend_options", {}))
        self.server = ModelServer(model, size_multiple(spec["backend"], spec.get("checkpoint"),
                                                       **spec.get("backend_options", {})))
        self.max_batch_worlds = int(max_batch_worlds)
        self.batch_wait_s = float(batch_wait_s)
        self._queue: list = []
        self._draining = False
        # One thread runs the model: calls arriving meanwhile queue up and form the next batch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="world-model")

    async def describe(self) -> dict:
        return self.server.describe()

    async def stats(self) -> dict:
        return {"calls": {k: dict(v) for k, v in self.server.stats.items()}, "busy_seconds": self.server.busy_seconds}

    async def reset_stats(self) -> None:
        for counts in self.server.stats.values():
            for key in counts:
                counts[key] = 0
        self.server.busy_seconds = 0.0

    async def call(self, call: ModelCall) -> ModelReply:
        import asyncio

        future = asyncio.get_running_loop().create_future()
        self._queue.append((call, future))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        reply = await future
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _drain(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                if self.batch_wait_s > 0:
                    await asyncio.sleep(self.batch_wait_s)
                batch, worlds = [], 0
                while self._queue and (not batch or worlds + self._queue[0][0].worlds <= self.max_batch_worlds):
                    item = self._queue.pop(0)
                    batch.append(item)
                    worlds += item[0].worlds
                try:
                    replies = await loop.run_in_executor(self._executor, self.server.run, [c for c, _ in batch])
                except Exception as error:  # noqa: BLE001 - every waiting client hears of it
                    replies = [error] * len(batch)
                for (_, future), reply in zip(batch, replies):
                    if not future.done():
                        future.set_result(reply)
        finally:
            self._draining = False


def serve_world_model(name: str, backend: str = "procedural", *, image_size: int | tuple[int, int] = 64,
                      checkpoint: str | None = None, backend_options: dict | None = None, num_cpus: float = 1,
                      num_gpus: float = 0, max_batch_worlds: int = 256, batch_wait_s: float = 0.0,
                      threads: int | None = None, detached: bool = False, namespace: str = SERVER_NAMESPACE):
    """Start a named Ray actor that serves a world model; returns its handle once the model is built.

    Args:
        name: what clients ask for (``backend="remote", checkpoint=name``).
        backend, image_size, checkpoint, backend_options: the model, as ``make_model`` takes them.
        num_cpus, num_gpus: the actor's Ray resources (``num_gpus=1`` puts it on a GPU node;
            pass ``backend_options={"device": "cuda"}`` for a model that takes a device).
        max_batch_worlds: most worlds in one model call.
        batch_wait_s: seconds to wait for more calls before each batch (0: take what is queued).
        threads: torch threads in the actor (default: Ray's setting for the actor's CPUs).
        detached: outlive this driver (a server for many jobs; stop it with ``ray.kill``).
        namespace: Ray namespace to register the name in.

    Needs ``ray`` (``pip install 'mirage-env[ray]'``) and a connected or auto-started Ray.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("serve_world_model needs Ray: call ray.init(...) (or ray.init(address='auto') to join a "
                           "cluster) first")
    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    spec = {"backend": backend, "image_size": sides, "checkpoint": checkpoint,
            "backend_options": dict(backend_options or {})}
    actor = ray.remote(_AsyncModelServer).options(
        name=name, namespace=namespace, num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=1000,
        lifetime="detached" if detached else None)
    handle = actor.remote(spec, max_batch_worlds, batch_wait_s, threads)
    ray.get(handle.describe.remote())  # the model is built (or its error raised) before anyone uses it
    return handle


def server_stats(name: str, namespace: str = SERVER_NAMESPACE, reset: bool = False) -> dict:
    """Per kind of call: model calls, client requests and worlds served so far (``reset``: then zero them)."""
    import ray

    handle = ray.get_actor(name, namespace=namespace)
    stats = ray.get(handle.stats.remote())
    if reset:
        ray.get(handle.reset_stats.remote())
    return stats


# ---------------------------------------------------------------------- mirage-env serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli_types import non_negative_float, positive_int

    parser.add_argument("--name", required=True, help="the name clients use: backend=remote, checkpoint=NAME")
    parser.add_argument("--backend", default="procedural", help="procedural | wan")
    parser.add_argument("--image-size", type=positive_int, default=64)
    parser.add_argument("--checkpoint", default=None, help="backend wan: a local Wan2.2 diffusers directory")
    parser.add_argument("--device", default=None, help="backend wan: the model's device, e.g. cuda")
    parser.add_argument("--address", default="auto", help="Ray cluster to join (default: the one on this node)")
    parser.add_argument("--num-cpus", type=non_negative_float, default=1)
    parser.add_argument("--num-gpus", type=non_negative_float, default=0)
    parser.add_argument("--max-batch-worlds", type=positive_int, default=256)
    parser.add_argument("--batch-wait-s", type=non_negative_float, default=0.0)


def main(args) -> dict:
    """Start a detached server in a running cluster and return (it keeps serving until ``ray.kill``)."""
    import ray

    ray.init(address=args.address, namespace=SERVER_NAMESPACE)
    options = {"device": args.device} if args.device else {}
    handle = serve_world_model(args.name, args.backend, image_size=args.image_size, checkpoint=args.checkpoint,
                               backend_options=options, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                               max_batch_worlds=args.max_batch_worlds, batch_wait_s=args.batch_wait_s, detached=True)
    info = ray.get(handle.describe.remote())
    print(f"serving {info['config']['name']} {info['camera']['width']}x{info['camera']['height']} as {args.name!r} "
          f"(Ray namespace {SERVER_NAMESPACE!r}); envs use backend='remote', checkpoint={args.name!r}")
    return info
