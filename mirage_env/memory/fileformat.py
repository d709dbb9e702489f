"""The memory's file format: one safetensors file with JSON metadata, verified on load (no pickle).

``save_state`` / ``load_state`` write and read any mirage-env state file (a memory, a
world): tensors plus metadata ``{"format", "version", "kind", "config", "sha256", ...}``
in the safetensors header, written atomically and checked against a SHA-256 of the
tensors on load. A memory's tensors are named by :func:`memory_tensors`; on load
:func:`checked_memory_tensors` validates every one of them against the configuration
(an altered file is a :class:`MemoryFileError` that says so, never a crash later) and
:func:`restore_memory` puts them back in the memory's parts.

Versions: 2 entries carry the origin of the camera that wrote them; 3 entries in a pool;
4 per-world write clocks and each entry's last write (the memory horizon). Versions 3
and 4 are read; a version 3 file loads with its clocks derived.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .horizon import WriteClock, check_horizon
from .index import BrickIndex
from .keys import EMPTY
from .pool import EntryPool

FORMAT_NAME = "mirage_env.LatentSpatialMemory"
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)  # a version 3 file loads with its clocks derived (see checked_memory_tensors)


class MemoryFileError(ValueError):
    """A saved memory or world file is missing, truncated, tampered with or of another version."""


# ---------------------------------------------------------------------- any state file


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        hasher.update(name.encode())
        hasher.update(str(tensor.dtype).encode())
        hasher.update(str(tuple(tensor.shape)).encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def save_state(path: str | os.PathLike, kind: str, config: dict, tensors: dict[str, torch.Tensor], extra: dict | None = None) -> None:
    """Atomically write tensors + JSON metadata (with a checksum) to one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "config": config,
            "sha256": _digest(tensors), **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"mirage_env": json.dumps(meta)})
    # Replace only once the new file is complete, so a crash never destroys the old one.
    os.replace(tmp, path)


def load_state(path: str | os.PathLike, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify a file written by ``save_state``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MemoryFileError(f"no saved {kind} at {path}: the file does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises several types for a broken file
        raise MemoryFileError(
            f"{path} is not a readable mirage-env file ({type(error).__name__}: {error}); "
            f"it may be truncated or corrupted — restore it from a copy"
        ) from None
    if "mirage_env" not in header:
        raise MemoryFileError(f"{path} is a safetensors file but not one written by mirage-env (no metadata)")
    try:
        meta = json.loads(header["mirage_env"])
    except json.JSONDecodeError:
        raise MemoryFileError(f"{path} has corrupted metadata; restore it from a copy") from None
    if meta.get("format") != FORMAT_NAME:
        raise MemoryFileError(f"{path} has format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("version") not in READABLE_VERSIONS:
        raise MemoryFileError(
            f"{path} was written by format version {meta.get('version')}, this mirage-env reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; use the mirage-env release that wrote it"
        )
    if meta.get("kind") != kind:
        raise MemoryFileError(f"{path} holds a saved {meta.get('kind')!r}, not a {kind!r}")
    if _digest(tensors) != meta.get("sha256"):
        raise MemoryFileError(f"{path} failed its checksum: its tensors were changed after saving; restore it from a copy")
    return meta, tensors


# ---------------------------------------------------------------------- a memory


def config_from_file(config: dict) -> dict:
    """Keyword arguments for ``LatentSpatialMemory`` from a saved ``config()``; MemoryFileError if invalid."""
    config = dict(config)
    config["feature_dtype"] = getattr(torch, config["feature_dtype"])
    try:
        check_horizon(config.get("horizon"))
    except ValueError as error:
        raise MemoryFileError(f"saved memory configuration is invalid: {error}; the file was altered") from None
    return config


def memory_tensors(index: BrickIndex, pool: EntryPool, clock: WriteClock, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor needed to resume, trimmed to the bricks and entries in use (on the CPU)."""
    used, entries = index.in_use, pool.in_use
    tensors = {
        "features": pool.features[:entries],
        "points": pool.points[:entries],
        "observed_depth": pool.observed_depth[:entries],
        "origins": pool.origins[:entries],
        "entry_last_write": pool.last_write[:entries],
        "free_entries": pool.free,
        "entry_of": index.entry_of[:used],
        "brick_keys": index.keys[:used],
        "brick_world": index.world[:used],
        "brick_last_write": index.last_write[:used],
        "free": index.free,
        "bricks_per_world": index.bricks_per_world,
        "entries_per_world": pool.entries_per_world,
        "step": torch.tensor([index.step], dtype=torch.int64),
        "write_clock": clock.ticks,
        # Capacities, so a loaded memory holds (and reports) the same bytes.
        "capacity": torch.tensor([index.capacity, index.table.mask + 1, pool.capacity], dtype=torch.int64),
    }
    return {prefix + k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def checked_memory_tensors(tensors: dict[str, torch.Tensor], prefix: str, version: int, channels: int,
                           num_worlds: int, voxels_per_brick: int) -> dict[str, torch.Tensor]:
    """The tensors of a saved memory (``memory_tensors`` of format ``version``), validated against its configuration.

    Version 3 predates the horizon: its write clocks are derived, each world's set to the
    memory's write count and each entry's last write to its brick's (exact for one world
    written on every write; ages only matter under a horizon).
    """
    names = ["features", "points", "observed_depth", "origins", "free_entries", "entry_of", "brick_keys",
             "brick_world", "brick_last_write", "free", "bricks_per_world", "entries_per_world", "step", "capacity"]
    if version >= 4:
        names += ["entry_last_write", "write_clock"]
    try:
        part = {k: tensors[prefix + k] for k in names}
    except KeyError as missing:
        raise MemoryFileError(f"saved memory lacks tensor {missing}; the file is incomplete or not a memory") from None
    used, entries = part["brick_keys"].shape[0], part["features"].shape[0]
    shapes_ok = (
        part["features"].shape == (entries, channels)
        and part["points"].shape == (entries, 3)
        and part["observed_depth"].shape == (entries,)
        and part["origins"].shape == (entries, 3)
        and part["entry_of"].shape == (used, voxels_per_brick)
        and part["brick_world"].shape == (used,)
        and part["brick_last_write"].shape == (used,)
        and part["bricks_per_world"].shape == (num_worlds,)
        and part["capacity"].shape == (3,)
    )
    if not shapes_ok:
        raise MemoryFileError("saved memory tensors do not match its configuration; the file was altered")
    entry_of, free_entries = part["entry_of"], part["free_entries"]
    if (entry_of >= entries).any() or (entry_of < EMPTY).any() or (free_entries < 0).any() \
            or (free_entries >= entries).any():
        raise MemoryFileError("saved memory indexes entries it does not hold; the file was altered")
    capacity, table_size, entry_capacity = (int(v) for v in part["capacity"])
    if capacity < used or table_size < 2 * used or entry_capacity < entries:
        raise MemoryFileError("saved memory capacities are inconsistent with its contents; the file was altered")
    brick_world = part["brick_world"]
    if (brick_world < 0).any() or (brick_world >= num_worlds).any():
        raise MemoryFileError("saved memory assigns bricks to worlds it does not have; the file was altered")
    stored = entry_of >= 0
    world_of_stored = brick_world[:, None].expand_as(entry_of)[stored]
    if version < 4:  # derive what version 3 did not save (see the docstring)
        part["write_clock"] = torch.full((num_worlds,), int(part["step"][0]), dtype=torch.int64)
        part["entry_last_write"] = torch.zeros(entries, dtype=torch.int32)
        brick_of_stored = torch.arange(used)[:, None].expand_as(entry_of)[stored]
        part["entry_last_write"][entry_of[stored].long()] = part["brick_last_write"][brick_of_stored].to(torch.int32)
    clock, last_write = part["write_clock"], part["entry_last_write"]
    if clock.dtype != torch.int64 or clock.shape != (num_worlds,):
        raise MemoryFileError(f"saved memory's write_clock must be int64 of shape ({num_worlds},) (one per "
                              f"world), got {clock.dtype} {tuple(clock.shape)}; the file was altered")
    if last_write.dtype != torch.int32 or last_write.shape != (entries,):
        raise MemoryFileError(f"saved memory's entry_last_write must be int32 of shape ({entries},) (one per "
                              f"entry), got {last_write.dtype} {tuple(last_write.shape)}; the file was altered")
    if (clock < 0).any() or (last_write < 0).any():
        raise MemoryFileError("saved memory has negative write clocks or entry write indices; the file was altered")
    if (last_write[entry_of[stored].long()].to(torch.int64) > clock[world_of_stored]).any():
        raise MemoryFileError("saved memory has entries observed after their world's last write (entry_last_write "
                              "> write_clock); the file was altered")
    return part


def restore_memory(part: dict[str, torch.Tensor], index: BrickIndex, pool: EntryPool, clock: WriteClock) -> None:
    """Put ``checked_memory_tensors`` back into empty parts allocated with the saved capacities."""
    used, entries = part["brick_keys"].shape[0], part["features"].shape[0]
    device = index.device
    pool.features[:entries] = part["features"].to(device, pool.features.dtype)
    pool.points[:entries] = part["points"].to(device)
    pool.observed_depth[:entries] = part["observed_depth"].to(device)
    pool.origins[:entries] = part["origins"].to(device)
    pool.last_write[:entries] = part["entry_last_write"].to(device)
    pool.in_use = entries
    pool.free = part["free_entries"].to(device, torch.int64)
    pool.entries_per_world = part["entries_per_world"].to(device)
    index.entry_of[:used] = part["entry_of"].to(device, torch.int32)
    index.keys[:used] = part["brick_keys"].to(device)
    index.world[:used] = part["brick_world"].to(device)
    index.last_write[:used] = part["brick_last_write"].to(device)
    index.free = part["free"].to(device)
    index.bricks_per_world = part["bricks_per_world"].to(device)
    index.in_use = used
    index.step = int(part["step"][0])
    clock.ticks = part["write_clock"].to(device).clone()
    index.rebuild_table(int(part["capacity"][1]) // 2)
    index.rebuild_chunks()
