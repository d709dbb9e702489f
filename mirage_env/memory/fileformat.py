"""The memory's file format: one safetensors file with JSON metadata, verified on load (no pickle).

``save_state`` / ``load_state`` write and read any mirage-env state file (a memory, a
world): tensors plus metadata ``{"format", "version", "kind", "config", "sha256", ...}``
in the safetensors header. A save writes a temporary file of its own beside the target,
fsyncs it and renames it over the target, so a reader sees the old file or the new one,
never a torn one, and two processes saving to one path leave one whole save (the last).
Why it is long: every field of a file is checked on its own here (the schema with its
limits), in one place, so a new field cannot be loaded without a check beside it.
A load checks the SHA-256 (over the metadata and the tensors since version 5).

The checksum catches corruption, not edits: anyone can recompute it. So nothing in a
file is trusted because the checksum matched; every field is validated on its own
(:class:`StateCheck`): a memory's configuration against a schema with limits
(:func:`config_from_file`), its tensors' dtypes and shapes, finiteness, key ranges and
uniqueness and their consistency with each other and with the voxel size
(:func:`checked_memory_tensors`), and capacities against what the file holds, so no load
allocates more than its contents justify. An inconsistent file is a
:class:`MemoryFileError` that names the field and the fix, never a crash (or a silently
wrong memory) later. :func:`restore_memory` puts checked tensors back in the memory's parts.

Versions: 2 entries carry the origin of the camera that wrote them; 3 entries in a pool;
4 per-world write clocks and each entry's last write (the memory horizon); 5 the checksum
covers the metadata too. Versions 3 to 5 are read; a version 3 file loads with its clocks
derived, a version 3 or 4 file is checksummed on its tensors only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import socket
import tempfile
from pathlib import Path
from typing import NoReturn

import torch

from .horizon import WriteClock, check_horizon
from .index import BrickIndex
from .keys import AXIS_OFFSET, EMPTY, WORLD_BITS, unpack, world_of
from .merge import MERGE_POLICIES
from .objects import object_layer_options
from .pool import EntryPool

FORMAT_NAME = "mirage_env.LatentSpatialMemory"
FORMAT_VERSION = 5
READABLE_VERSIONS = (3, 4, 5)  # a version 3 file loads with its clocks derived (see checked_memory_tensors)
METADATA_CHECKSUM_SINCE = 5

# Limits of the configuration a file may ask for: each bounds what a load allocates before
# the file's contents can vouch for it (a memory allocates 64 bricks of brick_size^3 voxels
# and their entries, 16 chunks of chunk_size^3 bricks, features of ``channels``).
MAX_CHANNELS = 4096
MAX_BRICK_SIZE = 32
MAX_CHUNK_SIZE = 64
MAX_WORLDS = (1 << WORLD_BITS) - 1
FEATURE_DTYPES = ("float16", "bfloat16", "float32", "float64")
INITIAL_BRICKS = 64  # what a new memory allocates (LatentSpatialMemory._allocate)
OBJECTS_PREFIX = "objects."  # the object layer's tensors, within a memory's prefix (checked by the layer)

ALTERED = "the file was altered or corrupted after saving: restore it from a copy or save it again"


class MemoryFileError(ValueError):
    """A saved memory or world file is missing, truncated, tampered with or of another version."""


class StateCheck:
    """Validates the fields of a saved state (a file or an in-memory snapshot) one by one.

    Every failure is a :class:`MemoryFileError` that names the source, the field (as
    ``config.memory.voxel_size`` or ``memory.features``) and what to do about it.

    Args:
        source: what is being loaded, e.g. the file's path or ``"snapshot"``.
        fix: the advice appended to every error.
    """

    def __init__(self, source: str | os.PathLike, fix: str = ALTERED):
        self.source = str(source)
        self.fix = fix

    def fail(self, field: str, problem: str, fix: str | None = None) -> NoReturn:
        raise MemoryFileError(f"{self.source}: {field} {problem}; {fix or self.fix}")

    # ------------------------------------------------------------------ JSON fields

    def mapping(self, value, field: str) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"must be a JSON object, got {type(value).__name__}")
        return value

    def fields(self, mapping: dict, field: str, required: set[str], optional: set[str] = frozenset()) -> None:
        """``mapping`` (at ``field``) has every ``required`` key and no key outside ``required | optional``."""
        self.mapping(mapping, field)
        missing = sorted(required - set(mapping))
        if missing:
            self.fail(f"{field}.{missing[0]}", "is missing")
        unknown = sorted(set(mapping) - required - optional)
        if unknown:
            self.fail(f"{field}.{unknown[0]}", "is not a field of this format")

    def integer(self, value, field: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
            self.fail(field, f"must be an integer in [{low}, {high}], got {value!r}")
        return int(value)

    def real(self, value, field: str, low: float = 0.0, positive: bool = False) -> float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value >= low
        if not ok or (positive and value <= 0):
            bound = f"> {low:g}" if positive else f">= {low:g}"
            self.fail(field, f"must be a finite number {bound}, got {value!r}")
        return float(value)

    def boolean(self, value, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false, got {value!r}")
        return value

    def choice(self, value, field: str, allowed: tuple) -> str:
        if not isinstance(value, str) or value not in allowed:
            self.fail(field, f"must be one of {list(allowed)}, got {value!r}")
        return value

    # ------------------------------------------------------------------ tensors

    def tensor(self, tensors: dict, name: str, dtype: torch.dtype | None, shape: tuple) -> torch.Tensor:
        """``tensors[name]``, present, of ``dtype`` (None: any floating dtype) and ``shape`` (None: any size there)."""
        if name not in tensors:
            self.fail(name, "is missing (the saved state lacks tensor " + repr(name) + ")")
        tensor = tensors[name]
        dtype_ok = tensor.is_floating_point() if dtype is None else tensor.dtype == dtype
        shape_ok = tensor.dim() == len(shape) and all(want is None or got == want for got, want in zip(tensor.shape, shape))
        if not (dtype_ok and shape_ok):
            wanted = "a float tensor" if dtype is None else str(dtype).removeprefix("torch.")
            dims = ", ".join("any" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "")
            self.fail(name, f"must be {wanted} of shape ({dims}), got {str(tensor.dtype).removeprefix('torch.')} "
                            f"{tuple(tensor.shape)}")
        return tensor

    def finite(self, tensor: torch.Tensor, name: str, allow_inf: bool = False) -> None:
        if tensor.numel() == 0:
            return
        # Fast path: a sum is finite (not NaN) only if every element is (up to overflow, which the
        # exact check below then settles); 10x faster than isfinite on half-precision features.
        total = tensor.sum(dtype=torch.float32 if tensor.element_size() <= 2 else torch.float64)
        if bool(~torch.isnan(total)) if allow_inf else bool(torch.isfinite(total)):
            return
        bad = torch.isnan(tensor) if allow_inf else ~torch.isfinite(tensor)
        if bool(bad.any()):
            what = "NaN" if allow_inf or bool(torch.isnan(tensor).any()) else "inf"
            self.fail(name, f"holds {what} at {int(bad.sum())} place(s)")

    def within(self, tensor: torch.Tensor, name: str, low: int | float | None = None, high: int | float | None = None,
               what: str = "values") -> None:
        """Every element in [low, high] (either bound may be None)."""
        if tensor.numel() == 0:
            return
        if low is not None and bool((tensor < low).any()):
            below = f"negative {what}" if low == 0 else f"{what} below {low}"
            self.fail(name, f"holds {below} (min {tensor.min().item()})")
        if high is not None and bool((tensor > high).any()):
            self.fail(name, f"holds {what} above {high} (max {tensor.max().item()})")

    def unique(self, tensor: torch.Tensor, name: str, what: str = "values") -> None:
        if tensor.numel() and torch.unique(tensor).numel() != tensor.numel():
            self.fail(name, f"holds duplicate {what}")


# ---------------------------------------------------------------------- any state file


def _canonical(meta: dict) -> bytes:
    """The metadata (without its checksum) as canonical JSON, the same after a JSON round trip."""
    plain = json.loads(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    return json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()


def _digest(tensors: dict[str, torch.Tensor], meta: dict | None = None, version: int = FORMAT_VERSION) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes, bytes) and, from version 5, of the metadata."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        hasher.update(name.encode())
        hasher.update(str(tensor.dtype).encode())
        hasher.update(str(tuple(tensor.shape)).encode())
        if tensor.numel():
            hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())
    if version >= METADATA_CHECKSUM_SINCE:
        hasher.update(b"\0metadata\0" + _canonical(meta or {}))
    return hasher.hexdigest()


def _temp_prefix(path: Path) -> str:
    """``.{name}.{host}.{pid}.``: one writer's temporary files for ``path`` (see :func:`_remove_orphans`)."""
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def _remove_orphans(path: Path) -> None:
    """Delete temporary files for ``path`` that writers on this host left when they were killed mid-save.

    A writer removes its temporary file on any error it survives; only a killed one
    (SIGKILL, power loss) leaves it. Files of live processes (other savers) are kept.
    """
    host = socket.gethostname()
    head = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(head) and name.endswith(".tmp")):
            continue
        parts = name[len(head): -len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid():
            continue  # another thread of this process may be writing it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)
        except OSError:
            pass  # alive (another user's process) or unknowable: keep it


def _new_file_mode(path: Path) -> int:
    """The target's current mode, or what ``open`` would give a new file (0o666 less the umask)."""
    with contextlib.suppress(OSError):
        return os.stat(path).st_mode & 0o777
    umask = 0o022
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    return 0o666 & ~umask


def _write_synced(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _anonymous_temp(path: Path, data: bytes | memoryview, mode: int) -> Path | None:
    """Write ``data`` to an anonymous file (Linux ``O_TMPFILE``) beside ``path`` and only then name it.

    A writer killed while writing leaves nothing behind. None where the system offers no
    anonymous files (or refuses to name one): the caller writes a named one instead.
    """
    anonymous = getattr(os, "O_TMPFILE", None)
    if anonymous is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        fd = os.open(path.parent, anonymous | os.O_WRONLY, mode)
    except OSError:  # a file system without O_TMPFILE
        return None
    try:
        os.fchmod(fd, mode)
        _write_synced(fd, data)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            while True:
                name = f"{_temp_prefix(path)}{os.urandom(6).hex()}.tmp"
                try:
                    # A directory fd makes Python call linkat with AT_SYMLINK_FOLLOW (see open(2), O_TMPFILE).
                    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=directory, follow_symlinks=True)
                    return path.parent / name
                except FileExistsError:
                    continue
                except OSError:
                    return None
        finally:
            os.close(directory)
    finally:
        os.close(fd)


def _named_temp(path: Path, data: bytes | memoryview, mode: int) -> Path:
    """Write ``data`` to a new ``mkstemp`` file beside ``path`` (named by :func:`_temp_prefix`), removed on failure."""
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        _write_synced(fd, data)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return Path(name)


def write_atomically(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Create or replace ``path`` with ``data``, all or nothing.

    ``data`` goes to a temporary file of this writer's own in the target's directory
    (anonymous until complete where the system allows, else named after the target, the
    host and the process), is fsynced, and only then renamed over the target
    (``os.replace``, atomic): a reader sees the old file or the new one, never a torn one,
    and of concurrent writers the last rename wins whole. The temporary file is removed on
    any failure; one left by a writer killed at the wrong moment is removed by the next
    save to the path (:func:`_remove_orphans`).
    """
    path = Path(path)
    _remove_orphans(path)
    mode = _new_file_mode(path)
    name = _anonymous_temp(path, data, mode) or _named_temp(path, data, mode)
    try:
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    # Make the rename itself durable (a crash after this keeps the new file).
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def save_state(path: str | os.PathLike, kind: str, config: dict, tensors: dict[str, torch.Tensor], extra: dict | None = None) -> None:
    """Atomically write tensors + JSON metadata (with a checksum of both) to one safetensors file."""
    from safetensors.torch import save

    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": kind, "config": config, **(extra or {})}
    meta["sha256"] = _digest(tensors, meta, FORMAT_VERSION)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    write_atomically(path, save(tensors, metadata={"mirage_env": json.dumps(meta)}))


def load_state(path: str | os.PathLike, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a file written by ``save_state`` and verify its format, version, kind and checksum.

    The caller validates the fields (a matching checksum proves no corruption, not consistency).
    """
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise MemoryFileError(f"no saved {kind} at {path}: the file does not exist")
    try:
        # One read of one open file: a save that replaces the path meanwhile cannot mix two files
        # (safetensors' safe_open may open the path again per tensor).
        with open(path, "rb") as handle:
            data = handle.read()
        length = int.from_bytes(data[:8], "little")
        if len(data) < 8 or length > len(data) - 8:
            raise ValueError(f"a header of {length} bytes in a file of {len(data)}")
        header = json.loads(data[8: 8 + length]).get("__metadata__") or {}
        tensors = load(data)
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
    if not isinstance(meta, dict):
        raise MemoryFileError(f"{path} has corrupted metadata (not a JSON object); restore it from a copy")
    if meta.get("format") != FORMAT_NAME:
        raise MemoryFileError(f"{path} has format {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise MemoryFileError(
            f"{path} was written by format version {version}, this mirage-env reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; use the mirage-env release that wrote it"
        )
    if meta.get("kind") != kind:
        raise MemoryFileError(f"{path} holds a saved {meta.get('kind')!r}, not a {kind!r}")
    if _digest(tensors, meta, version) != meta.get("sha256"):
        covered = "tensors or metadata" if version >= METADATA_CHECKSUM_SINCE else "tensors"
        raise MemoryFileError(f"{path} failed its checksum: its {covered} were changed after saving; "
                              f"restore it from a copy")
    return meta, tensors


# ---------------------------------------------------------------------- a memory

MEMORY_CONFIG_FIELDS = ("channels", "voxel_size", "num_worlds", "brick_size", "chunk_size", "max_bricks_per_world",
                        "merge", "closest_tolerance", "feature_dtype", "max_read_depth", "surface_tolerance",
                        "revisit_radius", "horizon")


def config_from_file(config: dict, version: int = FORMAT_VERSION, check: StateCheck | None = None,
                     field: str = "config") -> dict:
    """Keyword arguments for ``LatentSpatialMemory`` from a saved ``config()``, every field checked.

    ``field`` names the configuration in errors (``config`` in a memory file,
    ``config.memory`` in a world file). Version 3 predates ``horizon``.
    """
    check = check or StateCheck("saved memory")
    required = set(MEMORY_CONFIG_FIELDS) - ({"horizon"} if version < 4 else set())
    check.fields(config, field, required, optional={"horizon", "objects"})
    f = lambda name: f"{field}.{name}"  # noqa: E731
    kwargs = {
        "channels": check.integer(config["channels"], f("channels"), 1, MAX_CHANNELS),
        "voxel_size": check.real(config["voxel_size"], f("voxel_size"), positive=True),
        "num_worlds": check.integer(config["num_worlds"], f("num_worlds"), 1, MAX_WORLDS),
        "brick_size": check.integer(config["brick_size"], f("brick_size"), 1, MAX_BRICK_SIZE),
        "chunk_size": check.integer(config["chunk_size"], f("chunk_size"), 1, MAX_CHUNK_SIZE),
        "max_bricks_per_world": check.integer(config["max_bricks_per_world"], f("max_bricks_per_world"), 1, 1 << 62),
        "merge": check.choice(config["merge"], f("merge"), MERGE_POLICIES),
        "closest_tolerance": check.real(config["closest_tolerance"], f("closest_tolerance")),
        "feature_dtype": getattr(torch, check.choice(config["feature_dtype"], f("feature_dtype"), FEATURE_DTYPES)),
        "max_read_depth": check.real(config["max_read_depth"], f("max_read_depth"), positive=True),
        "surface_tolerance": check.real(config["surface_tolerance"], f("surface_tolerance")),
        "revisit_radius": check.real(config["revisit_radius"], f("revisit_radius")),
    }
    try:
        kwargs["horizon"] = check_horizon(config.get("horizon"), name=f("horizon"))
    except ValueError as error:
        check.fail(f("horizon"), f"is invalid ({error})")
    # A file from before the object layer has no such field: it loads with the layer off.
    kwargs["objects"] = object_layer_options(config.get("objects", False), check, f("objects")) or False
    return kwargs


def justified_capacities(bricks: int, entries: int, voxels_per_brick: int) -> tuple[int, int, int]:
    """The largest (brick, hash table, entry) capacities a memory of ``bricks`` brick slots and
    ``entries`` entries can have grown to: storage doubles (so at most twice what is used)
    from a start of :data:`INITIAL_BRICKS` bricks and a quarter of their voxels in entries,
    and a hash table holds at most 8 slots per brick."""
    brick_capacity = max(INITIAL_BRICKS, 2 * bricks)
    table = 1 << max(8, math.ceil(math.log2(max(8 * brick_capacity, 1))))
    entry_capacity = max(16, INITIAL_BRICKS * voxels_per_brick // 4, 2 * entries)
    return brick_capacity, table, entry_capacity


def memory_tensors(index: BrickIndex, pool: EntryPool, clock: WriteClock, prefix: str,
                   copy: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor needed to resume, trimmed to the bricks and entries in use (on the CPU).

    ``copy=False`` may return views of the live storage (fine for writing a file at once);
    ``copy=True`` returns tensors of their own (a snapshot that later writes do not change).
    """
    used, entries = index.in_use, pool.in_use
    # Capacities, so a loaded memory holds (and reports) the same bytes; a memory emptied by
    # clear() may hold more than its contents justify, and is saved as if it had grown anew.
    limits = justified_capacities(used, entries, index.voxels_per_brick)
    capacity = (index.capacity, index.table.mask + 1, pool.capacity)
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
        "capacity": torch.tensor([min(c, limit) for c, limit in zip(capacity, limits)], dtype=torch.int64),
    }
    return {prefix + name: (tensor.detach().to("cpu", copy=True) if copy else tensor.detach().cpu()).contiguous()
            for name, tensor in tensors.items()}


def checked_memory_tensors(tensors: dict[str, torch.Tensor], prefix: str, version: int, config: dict,
                           check: StateCheck | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a saved memory (``memory_tensors`` of format ``version``), validated.

    ``config``: the keyword arguments :func:`config_from_file` returned. Checked: every
    tensor's dtype and shape; finiteness; brick keys (no negative key but -1 for a free
    slot, no duplicate, each of its brick's world); the free lists (exactly the free slots
    and entries); each stored entry in one voxel only, and its point inside that voxel (which
    ties the keys, the points, ``voxel_size`` and ``brick_size`` together); per-world counts;
    clocks; and capacities no larger than the contents justify (:func:`justified_capacities`).

    Version 3 predates the horizon: its write clocks are derived, each world's set to the
    memory's write count and each entry's last write to its brick's (exact for one world
    written on every write; ages only matter under a horizon).
    """
    check = check or StateCheck("saved memory")
    channels, num_worlds, brick_size = config["channels"], config["num_worlds"], config["brick_size"]
    voxels_per_brick = brick_size**3
    n = lambda name: prefix + name  # noqa: E731
    names = ["features", "points", "observed_depth", "origins", "free_entries", "entry_of", "brick_keys",
             "brick_world", "brick_last_write", "free", "bricks_per_world", "entries_per_world", "step", "capacity"]
    if version >= 4:
        names += ["entry_last_write", "write_clock"]
    for name in names:
        if n(name) not in tensors:
            check.fail(n(name), f"is missing: the saved memory lacks tensor {name!r}, so the file is incomplete or "
                                f"not a memory")
    unknown = sorted(k for k in tensors if k.startswith(prefix) and k[len(prefix):] not in names
                     and not k.startswith(prefix + OBJECTS_PREFIX))
    if unknown:
        check.fail(unknown[0], "is not a tensor of a saved memory")
    entries = check.tensor(tensors, n("features"), config["feature_dtype"], (None, channels)).shape[0]
    used = check.tensor(tensors, n("brick_keys"), torch.int64, (None,)).shape[0]
    layout = {
        "features": (config["feature_dtype"], (entries, channels)),
        "points": (torch.float32, (entries, 3)),
        "observed_depth": (torch.float32, (entries,)),
        "origins": (torch.float32, (entries, 3)),
        "entry_last_write": (torch.int32, (entries,)),
        "free_entries": (torch.int64, (None,)),
        "entry_of": (torch.int32, (used, voxels_per_brick)),
        "brick_keys": (torch.int64, (used,)),
        "brick_world": (torch.int64, (used,)),
        "brick_last_write": (torch.int64, (used,)),
        "free": (torch.int64, (None,)),
        "bricks_per_world": (torch.int64, (num_worlds,)),
        "entries_per_world": (torch.int64, (num_worlds,)),
        "step": (torch.int64, (1,)),
        "write_clock": (torch.int64, (num_worlds,)),
        "capacity": (torch.int64, (3,)),
    }
    part = {name: check.tensor(tensors, n(name), *layout[name]) for name in names}

    # Capacities first: they say what a load allocates.
    capacity, table_size, entry_capacity = (int(v) for v in part["capacity"])
    most = justified_capacities(used, entries, voxels_per_brick)
    if not (used <= capacity <= most[0] and 2 * used <= table_size <= most[1] and table_size & (table_size - 1) == 0
            and entries <= entry_capacity <= most[2]):
        check.fail(n("capacity"), f"is [{capacity}, {table_size}, {entry_capacity}] (bricks, hash table, entries), "
                                  f"inconsistent with the {used} brick slots and {entries} entries the file holds "
                                  f"(at most {list(most)}, a power-of-two table at least twice the bricks)")

    for name in ("features", "points", "origins", "observed_depth"):
        check.finite(part[name], n(name))
    step = int(part["step"][0])
    check.within(part["step"], n("step"), 0)

    # Bricks: keys, worlds, free slots.
    keys, brick_world = part["brick_keys"], part["brick_world"]
    check.within(keys, n("brick_keys"), EMPTY, what="keys (-1 marks a free slot)")
    live = keys != EMPTY
    check.unique(keys[live], n("brick_keys"), "keys (two bricks at one place)")
    check.within(brick_world, n("brick_world"), 0, num_worlds - 1, "worlds")
    if bool((world_of(keys[live]) != brick_world[live]).any()):
        check.fail(n("brick_world"), "disagrees with the world packed in brick_keys")
    free = part["free"]
    check.within(free, n("free"), 0, used - 1, "slots")
    free_count = torch.bincount(free, minlength=used)  # (bincount, not unique: O(n), no sort)
    if free.numel() and int(free_count.max()) > 1:
        check.fail(n("free"), "holds duplicate slots")
    if not torch.equal(free_count.bool(), ~live):
        check.fail(n("free"), "is not exactly the brick slots whose key is -1")
    if not torch.equal(part["bricks_per_world"], torch.bincount(brick_world[live], minlength=num_worlds)):
        check.fail(n("bricks_per_world"), "disagrees with the bricks the file holds")
    check.within(part["brick_last_write"], n("brick_last_write"), 0, step, "write steps")

    # Entries: each stored in one voxel of a live brick, the rest on the free list.
    entry_of, free_entries = part["entry_of"], part["free_entries"]
    check.within(entry_of, n("entry_of"), EMPTY, entries - 1, "entry indices")
    if bool((entry_of[~live] != EMPTY).any()):
        check.fail(n("entry_of"), "stores entries in free brick slots")
    slot, voxel = torch.nonzero(entry_of >= 0, as_tuple=True)
    stored = entry_of[slot, voxel].long()
    stored_count = torch.bincount(stored, minlength=entries)
    if stored.numel() and int(stored_count.max()) > 1:
        check.fail(n("entry_of"), "holds duplicate entry indices (one entry in two voxels)")
    check.within(free_entries, n("free_entries"), 0, entries - 1, "entry indices")
    free_count = torch.bincount(free_entries, minlength=entries)
    if free_entries.numel() and int(free_count.max()) > 1:
        check.fail(n("free_entries"), "holds duplicate entry indices")
    if not bool((stored_count + free_count == 1).all()):
        check.fail(n("free_entries"), f"is not exactly the {entries - stored.numel()} entries no voxel stores")
    world_of_stored = brick_world[slot]
    if not torch.equal(part["entries_per_world"], torch.bincount(world_of_stored, minlength=num_worlds)):
        check.fail(n("entries_per_world"), "disagrees with the entries the file holds")
    if bool((part["observed_depth"][stored] <= 0).any()):
        check.fail(n("observed_depth"), "holds a depth <= 0 for a stored entry")
    # Each stored point lies in its voxel (up to rounding: the file may come from another device).
    position = part["points"][stored].to(torch.float64) / config["voxel_size"]
    local = torch.stack([voxel // brick_size**2, voxel // brick_size % brick_size, voxel % brick_size], -1)
    corner = ((unpack(keys[slot]) - AXIS_OFFSET) * brick_size + local).to(torch.float64)
    outside = ((position < corner - 1e-3) | (position > corner + 1 + 1e-3)).any(-1)
    if bool(outside.any()):
        check.fail(n("points"), f"has {int(outside.sum())} stored point(s) outside the voxel that brick_keys and "
                                f"entry_of put them in at voxel_size={config['voxel_size']:g} and brick_size={brick_size}")

    if version < 4:  # derive what version 3 did not save (see the docstring)
        part["write_clock"] = torch.full((num_worlds,), step, dtype=torch.int64)
        part["entry_last_write"] = torch.zeros(entries, dtype=torch.int32)
        part["entry_last_write"][stored] = part["brick_last_write"][slot].to(torch.int32)
    clock, last_write = part["write_clock"], part["entry_last_write"]
    if bool((clock < 0).any()) or bool((last_write < 0).any()):
        check.fail(n("write_clock"), "or entry_last_write holds negative write clocks or entry write indices")
    if bool((last_write[stored].to(torch.int64) > clock[world_of_stored]).any()):
        check.fail(n("entry_last_write"), "has entries observed after their world's last write (entry_last_write > "
                                          "write_clock)")
    return part


def restore_memory(part: dict[str, torch.Tensor], index: BrickIndex, pool: EntryPool, clock: WriteClock) -> None:
    """Put ``checked_memory_tensors`` back into empty parts allocated with the saved capacities (copies, never views)."""
    used, entries = part["brick_keys"].shape[0], part["features"].shape[0]
    device = index.device
    pool.features[:entries] = part["features"].to(device, pool.features.dtype)
    pool.points[:entries] = part["points"].to(device)
    pool.observed_depth[:entries] = part["observed_depth"].to(device)
    pool.origins[:entries] = part["origins"].to(device)
    pool.last_write[:entries] = part["entry_last_write"].to(device)
    pool.in_use = entries
    pool.free = part["free_entries"].to(device, torch.int64, copy=True)
    pool.entries_per_world = part["entries_per_world"].to(device, copy=True)
    index.entry_of[:used] = part["entry_of"].to(device, torch.int32)
    index.refresh_occupancy()
    index.keys[:used] = part["brick_keys"].to(device)
    index.world[:used] = part["brick_world"].to(device)
    index.last_write[:used] = part["brick_last_write"].to(device)
    index.free = part["free"].to(device, copy=True)
    index.bricks_per_world = part["bricks_per_world"].to(device, copy=True)
    index.in_use = used
    index.step = int(part["step"][0])
    clock.ticks = part["write_clock"].to(device, copy=True)
    index.rebuild_table(int(part["capacity"][1]) // 2)
    index.rebuild_chunks()
