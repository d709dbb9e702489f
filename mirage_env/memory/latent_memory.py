"""Latent spatial memory: the generator's own latent features pinned to 3D points.

Layout (voxel hashing with bricks, as in Niessner et al. 2013):

- Space is cut into voxels of ``voxel_size``; voxels are grouped into cubic
  *bricks* of ``brick_size`` voxels per side. Each voxel holds at most one entry:
  a C-dim feature (fp16 by default), the 3D point it was lifted to, the depth it
  was observed at and the origin of the camera that observed it. Entries live in
  a compact pool (a voxel stores a 4-byte index), because surfaces fill only a
  fraction of a brick's voxels; entries freed by eviction or clearing are reused.
- Bricks are allocated on first write and found through an open-addressing
  hash table over (world, brick coordinates), so a write touches only the
  bricks its points fall in and costs the same with 1e3 or 1e6 stored entries.
- Bricks are grouped into cubic *chunks* of ``chunk_size`` bricks per side,
  indexed by a second hash table. A read culls chunks against the target
  cameras' frusta, then the bricks of the visible chunks, projects the entries of
  the visible bricks only, and z-buffers them at latent resolution. Chunks are
  few (one per chunk_size^3 bricks), so the cull costs about the same with 1e3
  or 1e6 stored entries. The chunk index is derived from the brick keys (rebuilt
  on load, never saved).

Policies, stated once:

- Merge: an entry that falls in an occupied voxel is dropped ("first wins", the
  default: the world as first generated is canon, so a place keeps the samples a
  returning camera expects); with ``merge="latest"`` it replaces the stored one
  (for worlds that change); with ``merge="closest"`` it replaces it only when
  observed from at most ``(1 + closest_tolerance)`` times the stored depth, so a
  close, detailed view is not overwritten by a distant blurry one. Within one
  write, the entry observed from nearest wins (ties: the later frame).
- Z-buffer: per latent pixel the nearest surface wins; among points within
  ``surface_tolerance`` (relative depth) of the nearest, the one whose projection
  is closest to the pixel centre wins. Entries written from within
  ``revisit_radius`` of the reading camera take precedence at the pixels they
  reach (that view already resolved visibility there), so a camera that returns
  to a pose reads back exactly the samples it wrote there, even where a thin
  object seen from elsewhere lies in front.
- Capacity: at most ``max_bricks_per_world`` bricks per world; when a write
  needs more, the least recently written bricks of that world are evicted down
  to 7/8 of the bound. Eviction rebuilds the hash tables (O(stored)), so it runs
  once per bound/8 new bricks, not on every write of a full memory.
- Horizon (an ablation: short-term memory only): each world has a *write clock*
  that advances by one on every ``write`` touching it (a World writes once per
  segment, so it counts segments), and each entry records the clock of the last
  write that observed its voxel: the write that created it, a later write whose
  own samples fell in that voxel (whatever the merge policy kept), or one told
  through ``seen`` that a read showed it to the generator for that segment. With
  ``horizon=K``, a write frees the entries of its worlds that no write among
  their last K observed, so a read shows only what was seen in the last K
  segments, and the voxel of a freed entry is empty again (a later view writes
  it anew, whatever the merge policy). Expiry frees entries through the entry
  pool and releases bricks it left empty in batches (a table rebuild per 1/8 of
  the bricks turned over, as eviction), so memory size is bounded by K segments
  and per-step cost stays flat. ``horizon=None`` (the default) never expires.
  Counting from the last observation rather than from creation matters: a world
  written with ``write="unseen"`` never writes back what memory supplied, so
  counting from creation would make a camera that stares at a wall forget it
  every K segments and have the generator draw it anew.

Several independent worlds share one memory (``num_worlds``), so a batch of
worlds is read and written in one call. Every operation is a tensor op on the
memory's device; there is no Python loop over points.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .geometry import Camera, check_pose, invert_pose, unproject

__all__ = ["LatentSpatialMemory", "MemoryRead", "MemoryFileError", "check_horizon"]

FORMAT_NAME = "mirage_env.LatentSpatialMemory"
# 2: entries carry the origin of the camera that wrote them; 3: entries in a pool;
# 4: per-world write clocks and each entry's last write (the memory horizon).
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)  # a version 3 file loads with its clocks derived (see from_state)

MERGE_POLICIES = ("latest", "closest", "first")
EVICT_TO_FRACTION = 7 / 8  # of max_bricks_per_world, once a write would exceed it
_EMPTY = -1
_AXIS_BITS = 16
_AXIS_OFFSET = 1 << (_AXIS_BITS - 1)
_WORLD_BITS = 63 - 3 * _AXIS_BITS


class MemoryFileError(ValueError):
    """A saved memory or world file is missing, truncated, tampered with or of another version."""


def check_horizon(value, name: str = "horizon") -> int | None:
    """``value`` as a memory horizon (a positive int, or None: full memory); a ValueError naming ``name`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer (read only what the last {name} segments wrote or saw) "
            f"or None (full memory), got {value!r}"
        )
    return int(value)


@dataclass
class MemoryRead:
    """The memory projected onto target cameras at latent resolution.

    Attributes:
        latents: (..., C, h, w) float32 features of the winning entries (0 where no hit).
        mask: (..., h, w) bool, True where memory has something to say.
        depth: (..., h, w) z-depth of the winning entries (+inf where no hit).
        points: (..., h, w, 3) float32 world points of the winning entries (NaN where no
            hit), or None; what a write's ``seen`` takes to refresh the entries shown.
    """

    latents: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    points: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.latents, self.mask, self.depth))


class _BrickTable:
    """Open-addressing hash table from int64 brick keys to brick slots, vectorised."""

    def __init__(self, capacity: int, device: torch.device):
        size = 1 << max(4, math.ceil(math.log2(max(2 * capacity, 16))))
        self.mask = size - 1
        self.keys = torch.full((size,), _EMPTY, dtype=torch.int64, device=device)
        self.values = torch.full((size,), _EMPTY, dtype=torch.int64, device=device)
        self.count = 0

    @staticmethod
    def _hash(keys: torch.Tensor) -> torch.Tensor:
        # Fibonacci hashing; int64 multiplication wraps, which is what we want.
        mixed = keys * -7046029254386353131
        return mixed ^ (mixed >> 29)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Slots of ``keys`` (N,), -1 where absent."""
        result = torch.full_like(keys, _EMPTY)
        if keys.numel() == 0:
            return result
        home = self._hash(keys)
        pending = torch.arange(keys.numel(), device=keys.device)
        probe = 0
        while pending.numel() > 0:
            slot = (home[pending] + probe) & self.mask
            found_keys = self.keys[slot]
            hit = found_keys == keys[pending]
            result[pending[hit]] = self.values[slot[hit]]
            pending = pending[~hit & (found_keys != _EMPTY)]
            probe += 1
        return result

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Insert distinct keys that are not yet present."""
        if keys.numel() == 0:
            return
        if 2 * (self.count + keys.numel()) > self.mask + 1:
            raise RuntimeError("brick table over half full; rebuild it larger first")
        home = self._hash(keys)
        pending = torch.arange(keys.numel(), device=keys.device)
        probe = 0
        while pending.numel() > 0:
            slot = (home[pending] + probe) & self.mask
            free = self.keys[slot] == _EMPTY
            candidates, candidate_slots = pending[free], slot[free]
            # Several keys may want the same free slot: the highest index wins, deterministically.
            wanted, which = torch.unique(candidate_slots, return_inverse=True)
            claim = torch.full((wanted.numel(),), _EMPTY, dtype=torch.int64, device=keys.device)
            claim.scatter_reduce_(0, which, candidates, reduce="amax")
            won = claim[which] == candidates
            self.keys[candidate_slots[won]] = keys[candidates[won]]
            self.values[candidate_slots[won]] = values[candidates[won]]
            placed = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
            placed[candidates[won]] = True
            pending = pending[~placed[pending]]
            probe += 1
        self.count += keys.numel()


class LatentSpatialMemory:
    """A persistent store of latent features pinned to world points.

    Args:
        channels: C, the latent channels of the world model.
        voxel_size: edge of a voxel in world units; one entry per voxel.
        num_worlds: independent worlds stored side by side (a batch of envs).
        brick_size: voxels per brick side.
        max_bricks_per_world: capacity bound per world (LRU eviction beyond it).
        merge: "first", "latest" or "closest" (see module docstring).
        feature_dtype: storage dtype of features (fp16 by default).
        max_read_depth: entries farther than this from a camera are not read.
        surface_tolerance: relative depth band treated as one surface in the z-buffer.
        revisit_radius: entries written from within this distance of a reading camera are
            preferred at the pixels they reach (default: half a voxel, "the same place" at
            the memory's resolution; 0: plain z-buffer).
        horizon: K, read only what the last K writes of a world wrote or saw (an ablation:
            short-term memory only); None (default): full memory. See the module docstring.
        device: where every tensor lives.
    """

    def __init__(
        self,
        channels: int,
        voxel_size: float = 0.1,
        num_worlds: int = 1,
        brick_size: int = 4,
        chunk_size: int = 8,
        max_bricks_per_world: int = 1 << 16,
        merge: str = "first",
        closest_tolerance: float = 0.1,
        feature_dtype: torch.dtype = torch.float16,
        max_read_depth: float = 1e4,
        surface_tolerance: float = 0.05,
        revisit_radius: float | None = None,
        horizon: int | None = None,
        device: str | torch.device = "cpu",
    ):
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        if not voxel_size > 0 or not math.isfinite(voxel_size):
            raise ValueError(f"voxel_size must be a positive number, got {voxel_size}")
        if merge not in MERGE_POLICIES:
            raise ValueError(f"merge must be one of {MERGE_POLICIES}, got {merge!r}")
        if num_worlds < 1 or num_worlds >= (1 << _WORLD_BITS):
            raise ValueError(f"num_worlds must be in [1, {1 << _WORLD_BITS}), got {num_worlds}")
        if brick_size < 1:
            raise ValueError(f"brick_size must be >= 1, got {brick_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.channels = channels
        self.voxel_size = float(voxel_size)
        self.num_worlds = num_worlds
        self.brick_size = brick_size
        self.chunk_size = chunk_size
        self.max_bricks_per_world = int(max_bricks_per_world)
        self.merge = merge
        self.closest_tolerance = float(closest_tolerance)
        self.feature_dtype = feature_dtype
        self.max_read_depth = float(max_read_depth)
        self.surface_tolerance = float(surface_tolerance)
        self.revisit_radius = float(0.5 * self.voxel_size if revisit_radius is None else revisit_radius)
        if not self.revisit_radius >= 0:
            raise ValueError(f"revisit_radius must be >= 0 (0 turns the preference off), got {revisit_radius}")
        self.horizon = check_horizon(horizon)
        self.device = torch.device(device)
        self._voxels_per_brick = brick_size**3
        self._allocate(initial_bricks=64)

    # ------------------------------------------------------------------ storage

    def _allocate(self, initial_bricks: int) -> None:
        n, v, dev = initial_bricks, self._voxels_per_brick, self.device
        # A voxel holds the index of its entry in the pool below (-1: empty): surfaces fill
        # a fraction of a brick's voxels, so entries live in a compact pool, not in bricks.
        self.entry_of = torch.full((n, v), _EMPTY, dtype=torch.int32, device=dev)
        self._allocate_entries(initial_entries=n * v // 4)
        self.brick_keys = torch.full((n,), _EMPTY, dtype=torch.int64, device=dev)
        self.brick_world = torch.zeros(n, dtype=torch.int64, device=dev)
        self.brick_last_write = torch.zeros(n, dtype=torch.int64, device=dev)
        self.bricks_in_use = 0  # high-water mark of used slots; free ones below it are in _free
        self._free = torch.zeros(0, dtype=torch.int64, device=dev)
        self._bricks_per_world = torch.zeros(self.num_worlds, dtype=torch.int64, device=dev)
        self._entries_per_world = torch.zeros(self.num_worlds, dtype=torch.int64, device=dev)
        self.step = 0
        # Writes that touched each world since it was last cleared (the horizon's clock).
        self._write_clock = torch.zeros(self.num_worlds, dtype=torch.int64, device=dev)
        self._table = _BrickTable(n, dev)
        self._reset_chunks()

    def _reset_chunks(self, initial_chunks: int = 16, table_capacity: int | None = None) -> None:
        dev = self.device
        self.chunk_keys = torch.full((initial_chunks,), _EMPTY, dtype=torch.int64, device=dev)
        # Brick slot of each of a chunk's chunk_size^3 bricks, -1 where none is allocated.
        self.chunk_members = torch.full((initial_chunks, self.chunk_size**3), _EMPTY, dtype=torch.int64, device=dev)
        self.chunks_in_use = 0
        self._chunk_table = _BrickTable(table_capacity or initial_chunks, dev)

    def _rebuild_chunks(self) -> None:
        """Index every live brick afresh (after bricks were released or loaded)."""
        # Same capacities as before, so releasing bricks never grows what the memory holds.
        self._reset_chunks(max(16, self.chunk_keys.numel()), (self._chunk_table.mask + 1) // 2)
        live = torch.nonzero(self.brick_keys[: self.bricks_in_use] != _EMPTY).flatten()
        self._index_bricks(live)

    def _index_bricks(self, slots: torch.Tensor) -> None:
        """Add newly allocated bricks ``slots`` to their chunks, allocating chunks as needed."""
        if slots.numel() == 0:
            return
        keys, size = self.brick_keys[slots], self.chunk_size
        shifted = self._unpack(keys)
        chunk, local = torch.div(shifted, size, rounding_mode="floor"), shifted % size
        world = keys >> (3 * _AXIS_BITS)
        chunk_keys = self._pack(world, chunk)
        unique_keys, inverse = torch.unique(chunk_keys, return_inverse=True)
        found = self._chunk_table.lookup(unique_keys)
        missing = found < 0
        if missing.any():
            count = int(missing.sum())
            start = self.chunks_in_use
            if start + count > self.chunk_keys.numel():
                extra = max(start + count, 2 * self.chunk_keys.numel()) - self.chunk_keys.numel()
                self.chunk_keys = torch.cat([self.chunk_keys, self.chunk_keys.new_full((extra,), _EMPTY)])
                self.chunk_members = torch.cat([self.chunk_members, self.chunk_members.new_full((extra, size**3), _EMPTY)])
            new_slots = torch.arange(start, start + count, device=self.device)
            self.chunk_keys[new_slots] = unique_keys[missing]
            self.chunks_in_use += count
            if 2 * (self._chunk_table.count + count) > self._chunk_table.mask + 1:
                self._chunk_table = _BrickTable(2 * self.chunks_in_use, self.device)
                self._chunk_table.insert(self.chunk_keys[: self.chunks_in_use], torch.arange(self.chunks_in_use, device=self.device))
            else:
                self._chunk_table.insert(unique_keys[missing], new_slots)
            found[missing] = new_slots
        local_index = (local[:, 0] * size + local[:, 1]) * size + local[:, 2]
        self.chunk_members[found[inverse], local_index] = slots

    def _allocate_entries(self, initial_entries: int) -> None:
        e, dev = max(16, initial_entries), self.device
        self.features = torch.zeros(e, self.channels, dtype=self.feature_dtype, device=dev)
        self.points = torch.zeros(e, 3, dtype=torch.float32, device=dev)
        self.observed_depth = torch.zeros(e, dtype=torch.float32, device=dev)
        self.origins = torch.zeros(e, 3, dtype=torch.float32, device=dev)
        # Write clock of its world at the last write that observed the entry (int32: 2**31 segments).
        self.entry_last_write = torch.zeros(e, dtype=torch.int32, device=dev)
        self.entries_in_use = 0  # high-water mark of the pool; freed entries below it are in _free_entries
        self._free_entries = torch.zeros(0, dtype=torch.int64, device=dev)

    def _take_entries(self, count: int) -> torch.Tensor:
        """Pool indices for ``count`` new entries: freed ones first, then fresh ones (growing the pool)."""
        reused = self._free_entries[:count]
        self._free_entries = self._free_entries[count:]
        fresh = count - reused.numel()
        if fresh > 0:
            start, capacity = self.entries_in_use, self.features.shape[0]
            if start + fresh > capacity:
                extra = max(start + fresh, 2 * capacity) - capacity
                pad = lambda t: torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])  # noqa: E731
                self.features, self.points = pad(self.features), pad(self.points)
                self.observed_depth, self.origins = pad(self.observed_depth), pad(self.origins)
                self.entry_last_write = pad(self.entry_last_write)
            self.entries_in_use += fresh
            reused = torch.cat([reused, torch.arange(start, start + fresh, device=self.device)])
        return reused

    def _grow(self, needed: int) -> None:
        capacity = self.brick_keys.numel()
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity)
        extra = new_capacity - capacity

        def extend(tensor, fill):
            pad = torch.full((extra, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
            return torch.cat([tensor, pad])

        self.entry_of = extend(self.entry_of, _EMPTY)
        self.brick_keys = extend(self.brick_keys, _EMPTY)
        self.brick_world = extend(self.brick_world, 0)
        self.brick_last_write = extend(self.brick_last_write, 0)
        self._rebuild_table()

    def _rebuild_table(self, capacity: int | None = None) -> None:
        """Re-insert every live brick into a fresh table for ``capacity`` bricks (default: storage size)."""
        self._table = _BrickTable(capacity or self.brick_keys.numel(), self.device)
        live = torch.nonzero(self.brick_keys != _EMPTY).flatten()
        self._table.insert(self.brick_keys[live], live)

    def _brick_key(self, world: torch.Tensor, brick: torch.Tensor) -> torch.Tensor:
        shifted = brick + _AXIS_OFFSET
        if (shifted < 0).any() or (shifted >= (1 << _AXIS_BITS)).any():
            limit = _AXIS_OFFSET * self.brick_size * self.voxel_size
            raise ValueError(
                f"a point lies farther than {limit:g} world units from the origin; the memory "
                f"addresses +-{limit:g} with voxel_size={self.voxel_size}: use a larger voxel_size "
                f"or keep the scene closer to the first camera"
            )
        return self._pack(world, shifted)

    def _brick_centres(self, slots: torch.Tensor) -> torch.Tensor:
        coords = self._unpack(self.brick_keys[slots])
        brick_edge = self.brick_size * self.voxel_size
        return (coords - _AXIS_OFFSET).to(torch.float32) * brick_edge + 0.5 * brick_edge

    # ------------------------------------------------------------------ shapes

    def _as_batch(self, poses: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Poses of shape (4,4), (T,4,4) or (B,T,4,4) -> (B,T,4,4) and the leading shape to restore."""
        poses = check_pose(poses, "poses")
        lead = tuple(poses.shape[:-2])
        if len(lead) == 0:
            poses = poses[None, None]
        elif len(lead) == 1:
            poses = poses[None]
        elif len(lead) != 2:
            raise ValueError(f"poses must have shape (4,4), (T,4,4) or (B,T,4,4), got {tuple(poses.shape)}")
        return poses, lead

    def _world_index(self, worlds, batch: int) -> torch.Tensor:
        if worlds is None:
            if batch != self.num_worlds:
                raise ValueError(
                    f"got a batch of {batch} worlds for a memory of num_worlds={self.num_worlds}; "
                    f"pass worlds=[...] to say which worlds the batch is"
                )
            return torch.arange(batch, device=self.device)
        worlds = torch.as_tensor(worlds, dtype=torch.int64, device=self.device).reshape(-1)
        if worlds.numel() != batch:
            raise ValueError(f"worlds has {worlds.numel()} entries for a batch of {batch}")
        if (worlds < 0).any() or (worlds >= self.num_worlds).any():
            raise ValueError(f"worlds must lie in [0, {self.num_worlds}), got {worlds.tolist()}")
        return worlds

    # ------------------------------------------------------------------ write

    @torch.no_grad()
    def write(
        self,
        latents: torch.Tensor,
        depth: torch.Tensor,
        camera: Camera,
        poses: torch.Tensor,
        keep: torch.Tensor | None = None,
        worlds=None,
        seen: torch.Tensor | None = None,
    ) -> int:
        """Lift every latent pixel to a world point and store its feature.

        Args:
            latents: (C, h, w), (T, C, h, w) or (B, T, C, h, w) features.
            depth: z-depth (matching leading shape), at latent resolution (h, w) or at
                image resolution (H, W) = (h, w) * f, then median-pooled per latent pixel.
            camera: intrinsics of the *latent* grid (``camera.scaled(1/f)``) or of the
                image when depth is given at image resolution (then the latent camera is derived).
            poses: camera-to-world pose of each latent frame, (4,4), (T,4,4) or (B,T,4,4).
            keep: optional bool mask at latent resolution; False entries are not written.
            worlds: which worlds of the memory the batch addresses (default: all, in order).
            seen: optional world points (..., 3), leading shape that of ``poses``, NaN where
                none: entries memory showed the generator for this segment (typically
                ``MemoryRead.points`` of the read that conditioned it). Their voxels count
                as observed by this write, so under a horizon what stays in view stays
                remembered though it is not written back.

        Returns:
            The number of entries written (after filtering).

        Every world in ``worlds`` advances its write clock by one, even if nothing is written;
        with a horizon, entries of those worlds that none of their last ``horizon`` writes
        observed are freed before the new entries are merged.
        """
        poses, lead = self._as_batch(poses)
        batch, frames = poses.shape[:2]
        expected_lead = lead
        if tuple(latents.shape[: len(lead)]) != expected_lead or latents.dim() != len(lead) + 3:
            raise ValueError(
                f"latents must have shape {(*expected_lead, 'C', 'h', 'w')} to match poses {tuple(poses.shape)}, "
                f"got {tuple(latents.shape)}"
            )
        latents = latents.reshape(batch, frames, *latents.shape[-3:])
        if latents.shape[2] != self.channels:
            raise ValueError(f"latents have {latents.shape[2]} channels, this memory stores {self.channels}")
        h, w = latents.shape[-2:]
        depth = torch.as_tensor(depth, device=self.device).reshape(batch, frames, *depth.shape[-2:]).to(torch.float32)
        if torch.isnan(depth).any():
            raise ValueError("depth contains NaN; mark missing depth as +inf (it is then not written)")
        c2w = poses.to(self.device, torch.float64)
        if depth.shape[-2:] != (h, w):
            factor_h, factor_w = depth.shape[-2] // h, depth.shape[-1] // w
            if factor_h != factor_w or factor_h * h != depth.shape[-2] or factor_w * w != depth.shape[-1]:
                raise ValueError(
                    f"depth of size {tuple(depth.shape[-2:])} is neither the latent size {(h, w)} "
                    f"nor an integer multiple of it"
                )
            image_camera = camera if (camera.height, camera.width) == depth.shape[-2:] else camera.scaled(factor_h * h / camera.height)
            all_points, depth = lift_dominant_surface(depth, image_camera, c2w, factor_h)
        else:
            if (camera.height, camera.width) != (h, w):
                camera = camera.scaled(h / camera.height)
            all_points = None
        world_index = self._world_index(worlds, batch)

        valid = torch.isfinite(depth) & (depth > 0)
        if keep is not None:
            keep = torch.as_tensor(keep, device=self.device)
            if keep.numel() != valid.numel():
                raise ValueError(f"keep must match the latent grid {(batch, frames, h, w)}, got {tuple(keep.shape)}")
            valid &= keep.reshape(valid.shape).bool()
        if seen is not None:
            seen = torch.as_tensor(seen, device=self.device)
            if tuple(seen.shape[: len(lead)]) != lead or seen.dim() < len(lead) + 1 or seen.shape[-1] != 3:
                raise ValueError(f"seen must have shape {(*lead, '...', 3)} (world points, NaN where none) to match "
                                 f"poses {tuple(poses.shape)}, got {tuple(seen.shape)}")
            seen = seen.reshape(batch, -1, 3).to(torch.float32)
        flat_valid = valid.reshape(-1)
        index = torch.nonzero(flat_valid).flatten()
        self.step += 1
        touched = torch.zeros(self.num_worlds, dtype=torch.bool, device=self.device)
        touched[world_index] = True
        self._write_clock += touched
        if seen is not None:
            self._observe_again(seen.reshape(-1, 3), world_index.repeat_interleave(seen.shape[1]))
        if index.numel() == 0:
            self._release_empty(self._expire(touched))
            return 0

        if all_points is None:
            all_points = unproject(depth.masked_fill(~valid, 1.0), camera, c2w)
        points = all_points.to(torch.float32).reshape(-1, 3)[index]
        features = latents.permute(0, 1, 3, 4, 2).reshape(-1, self.channels)[index.to(latents.device)].to(self.device)
        observed = depth.reshape(-1)[index]
        origins = c2w[..., :3, 3].to(torch.float32)[:, :, None].expand(batch, frames, h * w, 3).reshape(-1, 3)[index]
        entry_world = world_index.repeat_interleave(frames * h * w)[index]
        entry_frame = torch.arange(frames, device=self.device).repeat_interleave(h * w).repeat(batch)[index]

        keys, local_index = self._voxel_address(points, entry_world)
        slots = self._slots_for(keys, entry_world)
        voxel_id = slots * self._voxels_per_brick + local_index

        # Within one write, the entry seen from nearest wins a voxel (ties: the later frame, then index).
        # Order entries so the preferred one of each voxel comes last: depth descending,
        # equal depths by frame ascending.
        by_frame = torch.argsort(entry_frame, stable=True)
        order = by_frame[torch.argsort(-observed[by_frame], stable=True)]
        distinct, ranked_voxels = torch.unique(voxel_id[order], return_inverse=True)
        position = torch.arange(order.numel(), device=self.device)
        last = torch.full((distinct.numel(),), -1, dtype=torch.int64, device=self.device)
        last.scatter_reduce_(0, ranked_voxels, position, reduce="amax")
        winners = order[last]

        flat_slots = voxel_id[winners]
        brick_slot = torch.div(flat_slots, self._voxels_per_brick, rounding_mode="floor")
        voxel_slot = flat_slots - brick_slot * self._voxels_per_brick
        entry = self.entry_of[brick_slot, voxel_slot].long()
        was_occupied = entry >= 0
        clock = self._write_clock[entry_world[winners]].to(torch.int32)
        # A stored entry whose voxel this write observed again was seen now, whatever the merge keeps;
        # so expiry below never frees an entry this write hits, and ``entry`` stays valid.
        self.entry_last_write[entry[was_occupied]] = clock[was_occupied]
        emptied = self._expire(touched)
        if self.merge == "first":
            accept = ~was_occupied
        elif self.merge == "closest":
            stored = self.observed_depth[entry.clamp_min(0)]
            accept = ~was_occupied | (observed[winners] <= stored * (1 + self.closest_tolerance))
        else:
            accept = torch.ones_like(was_occupied)
        winners, brick_slot, voxel_slot = winners[accept], brick_slot[accept], voxel_slot[accept]
        entry, new, clock = entry[accept], ~was_occupied[accept], clock[accept]
        entry[new] = self._take_entries(int(new.sum()))
        self.entry_of[brick_slot[new], voxel_slot[new]] = entry[new].to(torch.int32)
        self._entries_per_world += torch.bincount(entry_world[winners][new], minlength=self.num_worlds)
        self.features[entry] = features[winners].to(self.feature_dtype)
        self.points[entry] = points[winners]
        self.observed_depth[entry] = observed[winners]
        self.origins[entry] = origins[winners]
        self.entry_last_write[entry] = clock
        self.brick_last_write[slots] = self.step
        self._release_empty(emptied)
        return int(winners.numel())

    def _voxel_address(self, points: torch.Tensor, world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Brick keys (N,) and voxel indices within the brick (N,) of (N, 3) float32 points of ``world`` (N,)."""
        voxel = torch.floor(points / self.voxel_size).to(torch.int64)
        brick = torch.div(voxel, self.brick_size, rounding_mode="floor")
        local = voxel - brick * self.brick_size
        local_index = (local[:, 0] * self.brick_size + local[:, 1]) * self.brick_size + local[:, 2]
        return self._brick_key(world, brick), local_index

    def _observe_again(self, points: torch.Tensor, world: torch.Tensor) -> None:
        """Stamp the entries in the voxels of ``points`` (N, 3) (NaN: none) with their world's write clock."""
        finite = torch.isfinite(points).all(-1)
        points, world = points[finite], world[finite]
        if points.numel() == 0:
            return
        keys, local_index = self._voxel_address(points, world)
        slots = self._table.lookup(keys)
        found = slots >= 0
        entry = self.entry_of[slots[found], local_index[found]].long()
        live = entry >= 0
        self.entry_last_write[entry[live]] = self._write_clock[world[found][live]].to(torch.int32)

    def _expire(self, touched: torch.Tensor) -> torch.Tensor:
        """Free the entries of ``touched`` worlds (bool (num_worlds,)) none of their last ``horizon`` writes observed.

        Returns the slots of bricks of those worlds that hold no entry now (for ``_release_empty``).
        """
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        if self.horizon is None:
            return empty
        used = self.bricks_in_use
        slots = torch.nonzero((self.brick_keys[:used] != _EMPTY) & touched[self.brick_world[:used]]).flatten()
        if slots.numel() == 0:
            return empty
        entries = self.entry_of[slots].long()  # O(stored bricks): bounded by what K segments hold
        occupied = entries >= 0
        deadline = (self._write_clock[self.brick_world[slots]] - self.horizon).to(torch.int32)
        expired = occupied & (self.entry_last_write[entries.clamp_min(0)] <= deadline[:, None])
        if expired.any():
            row, voxel = torch.nonzero(expired, as_tuple=True)
            self._free_entries = torch.cat([self._free_entries, entries[row, voxel].sort().values])
            self.entry_of[slots[row], voxel] = _EMPTY
            self._entries_per_world -= torch.bincount(self.brick_world[slots[row]], minlength=self.num_worlds)
            occupied &= ~expired
        return slots[~occupied.any(1)]

    def _release_empty(self, candidates: torch.Tensor) -> None:
        """Release the bricks among ``candidates`` still empty, once they are 1/8 of the bricks in use.

        Releasing rebuilds the hash tables (O(stored)), so, as eviction, it waits until enough
        bricks have turned over; empty bricks meanwhile cost a read nothing but their cull.
        """
        if candidates.numel() == 0:
            return
        candidates = candidates[(self.entry_of[candidates] < 0).all(1)]  # a write may have refilled some
        if 8 * candidates.numel() >= int(self._bricks_per_world.sum()):
            self._release(candidates)

    def _slots_for(self, keys: torch.Tensor, entry_world: torch.Tensor) -> torch.Tensor:
        """Brick slot of every key, allocating (and evicting) bricks as needed."""
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        found = self._table.lookup(unique_keys)
        missing = found < 0
        if missing.any():
            new_keys = unique_keys[missing]
            new_worlds = new_keys >> (3 * _AXIS_BITS)
            self._evict_for(new_worlds)
            new_slots = self._take_free_slots(new_keys.numel())
            self.brick_keys[new_slots] = new_keys
            self.brick_world[new_slots] = new_worlds
            self.entry_of[new_slots] = _EMPTY
            self._bricks_per_world += torch.bincount(new_worlds, minlength=self.num_worlds)
            self._table.insert(new_keys, new_slots)
            self._index_bricks(new_slots)
            found[missing] = new_slots
        return found[inverse]

    def _take_free_slots(self, count: int) -> torch.Tensor:
        reused = self._free[:count]
        self._free = self._free[count:]
        fresh = count - reused.numel()
        if fresh > 0:
            start = self.bricks_in_use
            self._grow(start + fresh)
            if 2 * (self._table.count + count) > self._table.mask + 1:
                self._rebuild_table(2 * (start + fresh))
            self.bricks_in_use += fresh
            reused = torch.cat([reused, torch.arange(start, start + fresh, device=self.device)])
        elif 2 * (self._table.count + count) > self._table.mask + 1:
            self._rebuild_table(2 * self.bricks_in_use)
        return reused

    def _evict_for(self, new_worlds: torch.Tensor) -> None:
        incoming = torch.bincount(new_worlds, minlength=self.num_worlds)
        wanted = self._bricks_per_world + incoming
        if not (wanted > self.max_bricks_per_world).any():
            return
        excess = torch.where(wanted > self.max_bricks_per_world, wanted - (self.max_bricks_per_world * EVICT_TO_FRACTION),
                             torch.zeros_like(wanted)).ceil().long()
        live = self.brick_keys[: self.bricks_in_use] != _EMPTY
        victims = []
        for world in torch.nonzero(excess > 0).flatten().tolist():  # loop over worlds, not points
            candidates = torch.nonzero(live & (self.brick_world[: self.bricks_in_use] == world)).flatten()
            count = min(int(excess[world]), candidates.numel())
            age_order = torch.argsort(self.brick_last_write[candidates], stable=True)
            victims.append(candidates[age_order[:count]])
        self._release(torch.cat(victims))

    def _release(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        self._bricks_per_world -= torch.bincount(self.brick_world[slots], minlength=self.num_worlds)
        entries = self.entry_of[slots]
        live = entries >= 0
        self._entries_per_world -= torch.zeros_like(self._entries_per_world).scatter_add_(
            0, self.brick_world[slots], live.sum(1))
        self._free_entries = torch.cat([self._free_entries, entries[live].long().sort().values])
        self.brick_keys[slots] = _EMPTY
        self.entry_of[slots] = _EMPTY
        self._free = torch.cat([self._free, slots.sort().values])
        self._rebuild_table()
        self._rebuild_chunks()

    def clear(self, worlds=None) -> None:
        """Forget everything stored for ``worlds`` (default: all worlds)."""
        if worlds is None:
            self._allocate(initial_bricks=self.brick_keys.numel())
            return
        worlds = torch.as_tensor(worlds, dtype=torch.int64, device=self.device).reshape(-1)
        worlds = self._world_index(worlds, worlds.numel())
        in_use = self.brick_keys[: self.bricks_in_use] != _EMPTY
        belongs = torch.isin(self.brick_world[: self.bricks_in_use], worlds)
        self._release(torch.nonzero(in_use & belongs).flatten())
        self._write_clock[worlds] = 0

    # ------------------------------------------------------------------ read

    @torch.no_grad()
    def read(self, camera: Camera, poses: torch.Tensor, worlds=None) -> MemoryRead:
        """Project the memory onto target cameras at latent resolution.

        Args:
            camera: intrinsics of the latent grid (h, w).
            poses: (4,4), (T,4,4) or (B,T,4,4) camera-to-world target poses.
            worlds: which worlds of the memory the batch addresses (default: all, in order).

        Returns:
            MemoryRead with latents (..., C, h, w), mask (..., h, w), depth (..., h, w) and
            points (..., h, w, 3); the leading shape is that of ``poses``. With a horizon,
            only what the last ``horizon`` writes of each world wrote or saw is left to read.
        """
        poses, lead = self._as_batch(poses)
        batch, frames = poses.shape[:2]
        world_index = self._world_index(worlds, batch)
        h, w = camera.height, camera.width
        views = batch * frames
        pixels = views * h * w
        out_latents = torch.zeros(pixels, self.channels, dtype=torch.float32, device=self.device)
        out_depth = torch.full((pixels,), math.inf, dtype=torch.float32, device=self.device)
        out_mask = torch.zeros(pixels, dtype=torch.bool, device=self.device)
        out_points = torch.full((pixels, 3), math.nan, dtype=torch.float32, device=self.device)

        w2c = invert_pose(poses.to(self.device, torch.float64)).to(torch.float32).reshape(views, 4, 4)
        brick_slot, view = self._visible_bricks(camera, w2c, world_index, frames)
        if brick_slot.numel() > 0:
            entries = self.entry_of[brick_slot]
            pair, voxel = torch.nonzero(entries >= 0, as_tuple=True)
            entry, view = entries[pair, voxel].long(), view[pair]
            points = self.points[entry]
            rotation, translation = w2c[view, :3, :3], w2c[view, :3, 3]
            local = (rotation @ points[:, :, None])[:, :, 0] + translation
            z = local[:, 2]
            safe_z = z.clamp_min(1e-6)
            u = camera.fx * local[:, 0] / safe_z + camera.cx
            v = camera.fy * local[:, 1] / safe_z + camera.cy
            column, row = torch.floor(u), torch.floor(v)
            inside = (z > 1e-6) & (z <= self.max_read_depth) & (column >= 0) & (column < w) & (row >= 0) & (row < h)
            if inside.any():
                keep = torch.nonzero(inside).flatten()
                pixel = view[keep] * (h * w) + row[keep].to(torch.int64) * w + column[keep].to(torch.int64)
                if self.revisit_radius > 0:
                    # What was seen from (nearly) here already resolved visibility along these
                    # rays: where such entries exist, entries seen from elsewhere (a thin pillar
                    # that covers under half of the pixel, a surface glimpsed past an edge) may
                    # not hide them. So a camera that returns reads back what it wrote.
                    camera_origin = poses.to(self.device, torch.float32).reshape(views, 4, 4)[:, :3, 3]
                    seen_from = self.origins[entry[keep]]
                    from_here = (seen_from - camera_origin[view[keep]]).norm(dim=-1) <= self.revisit_radius
                    pixel_has_here = torch.zeros(pixels, dtype=torch.bool, device=self.device)
                    pixel_has_here[pixel[from_here]] = True
                    eligible = from_here | ~pixel_has_here[pixel]
                    keep, pixel = keep[eligible], pixel[eligible]
                z = z[keep]
                # Nearest surface per pixel, then within that surface the sample nearest the pixel centre.
                out_depth.scatter_reduce_(0, pixel, z, reduce="amin")
                on_surface = z <= out_depth[pixel] * (1 + self.surface_tolerance)
                offset = (u[keep] - column[keep] - 0.5) ** 2 + (v[keep] - row[keep] - 0.5) ** 2
                offset = torch.where(on_surface, offset, torch.full_like(offset, math.inf))
                best_offset = torch.full((pixels,), math.inf, device=self.device)
                best_offset.scatter_reduce_(0, pixel, offset, reduce="amin")
                candidate = on_surface & (offset == best_offset[pixel])
                order = torch.arange(keep.numel(), device=self.device)
                winner_of = torch.full((pixels,), -1, dtype=torch.int64, device=self.device)
                winner_of.scatter_reduce_(0, pixel[candidate], order[candidate], reduce="amax")
                hit_pixels = torch.nonzero(winner_of >= 0).flatten()
                winners = keep[winner_of[hit_pixels]]
                out_latents[hit_pixels] = self.features[entry[winners]].to(torch.float32)
                out_depth[hit_pixels] = z[winner_of[hit_pixels]]
                out_points[hit_pixels] = self.points[entry[winners]]
                out_mask[hit_pixels] = True
                out_depth[~out_mask] = math.inf
        latents = out_latents.reshape(batch, frames, h, w, self.channels).permute(0, 1, 4, 2, 3)
        mask = out_mask.reshape(batch, frames, h, w)
        depth = out_depth.reshape(batch, frames, h, w)
        shape = lead
        return MemoryRead(
            latents=latents.reshape(*shape, self.channels, h, w).contiguous(),
            mask=mask.reshape(*shape, h, w),
            depth=depth.reshape(*shape, h, w),
            points=out_points.reshape(*shape, h, w, 3),
        )

    def _visible_bricks(self, camera: Camera, w2c: torch.Tensor, world_index: torch.Tensor, frames: int):
        """(brick slot, view) pairs whose bounding sphere meets a view's frustum.

        Culls chunks first (few: one per chunk_size^3 bricks), each against the
        ``frames`` views of its own world only, then the bricks of the visible chunks.
        """
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        batch_of_world = torch.full((self.num_worlds,), -1, dtype=torch.int64, device=self.device)
        batch_of_world[world_index] = torch.arange(world_index.numel(), device=self.device)
        chunks = torch.nonzero(self.chunk_keys[: self.chunks_in_use] != _EMPTY).flatten()
        chunk_batch = batch_of_world[self.chunk_keys[chunks] >> (3 * _AXIS_BITS)]
        chunks, chunk_batch = chunks[chunk_batch >= 0], chunk_batch[chunk_batch >= 0]
        if chunks.numel() == 0:
            return empty, empty
        brick_edge = self.brick_size * self.voxel_size
        chunk_edge = self.chunk_size * brick_edge
        # A chunk key packs (brick + _AXIS_OFFSET) // chunk_size: its first brick is key * chunk_size - offset.
        first_brick = self._unpack(self.chunk_keys[chunks]) * self.chunk_size - _AXIS_OFFSET
        chunk_centres = first_brick.to(torch.float32) * brick_edge + 0.5 * chunk_edge
        chunk_pair, chunk_view = self._in_frustum(camera, w2c, chunk_centres, chunk_batch * frames, frames,
                                                  0.5 * math.sqrt(3) * chunk_edge)
        members = self.chunk_members[chunks[chunk_pair]]  # (visible chunk-view pairs, chunk_size^3)
        pair, member = torch.nonzero(members >= 0, as_tuple=True)
        if pair.numel() == 0:
            return empty, empty
        bricks, views = members[pair, member], chunk_view[pair]
        kept, _ = self._in_frustum(camera, w2c, self._brick_centres(bricks), views, 1, 0.5 * math.sqrt(3) * brick_edge)
        return bricks[kept], views[kept]

    def _in_frustum(self, camera: Camera, w2c: torch.Tensor, centres: torch.Tensor, first_view: torch.Tensor,
                    frames: int, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Which spheres (centres (N, 3), one radius) meet which of views first_view[i] + [0, frames).

        Returns (sphere index, view index) of every meeting pair.
        """
        pair_sphere = torch.arange(centres.shape[0], device=self.device).repeat_interleave(frames)
        pair_view = (first_view[:, None] + torch.arange(frames, device=self.device)).reshape(-1)
        local = (w2c[pair_view, :3, :3] @ centres[pair_sphere][:, :, None])[:, :, 0] + w2c[pair_view, :3, 3]
        x, y, z = local.unbind(-1)
        # Frustum side planes through the optical centre; a sphere is outside a plane
        # when its centre is farther than the radius on the outer side.
        left, right = camera.cx / camera.fx, (camera.width - camera.cx) / camera.fx
        top, bottom = camera.cy / camera.fy, (camera.height - camera.cy) / camera.fy
        visible = (z > -radius) & (z < self.max_read_depth + radius)
        visible &= (x - right * z) <= radius * math.sqrt(1 + right * right)
        visible &= (-x - left * z) <= radius * math.sqrt(1 + left * left)
        visible &= (y - bottom * z) <= radius * math.sqrt(1 + bottom * bottom)
        visible &= (-y - top * z) <= radius * math.sqrt(1 + top * top)
        return pair_sphere[visible], pair_view[visible]

    @staticmethod
    def _pack(world: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """int64 keys of (N,) worlds and (N, 3) non-negative coordinates below 2**_AXIS_BITS (brick or chunk)."""
        return (world << (3 * _AXIS_BITS)) | (coords[:, 0] << (2 * _AXIS_BITS)) | (coords[:, 1] << _AXIS_BITS) | coords[:, 2]

    @staticmethod
    def _unpack(keys: torch.Tensor) -> torch.Tensor:
        """(N, 3) int64 coordinates packed in brick or chunk keys (still shifted by their offset)."""
        mask = (1 << _AXIS_BITS) - 1
        return torch.stack([(keys >> (2 * _AXIS_BITS)) & mask, (keys >> _AXIS_BITS) & mask, keys & mask], -1)

    # ------------------------------------------------------------------ inspection

    def stats(self, bounds: bool = True) -> dict:
        """Entries, bytes held, voxel size, horizon and (optionally, O(entries)) the bounds of what is stored."""
        entries = int(self._entries_per_world.sum())
        held = [self.features, self.points, self.observed_depth, self.origins, self.entry_last_write, self.entry_of,
                self._write_clock, self.brick_keys,
                self.brick_world, self.brick_last_write, self._table.keys, self._table.values,
                self.chunk_keys, self.chunk_members, self._chunk_table.keys, self._chunk_table.values]
        bytes_held = sum(t.numel() * t.element_size() for t in held)
        if bounds and entries:
            stored = self.stored_points()
            bounds = [stored.min(0).values.tolist(), stored.max(0).values.tolist()]
        else:
            bounds = None
        return {
            "entries": entries,
            "bricks": int(self._bricks_per_world.sum()),
            "bytes": int(bytes_held),
            "voxel_size": self.voxel_size,
            "horizon": self.horizon,
            "bounds": bounds,
        }

    def stored_points(self) -> torch.Tensor:
        """(entries, 3) world points of every stored entry (O(entries); for inspection and tests)."""
        return self.points[self.entry_of[self.entry_of >= 0].long()]

    def entries_per_world(self) -> torch.Tensor:
        """(num_worlds,) number of stored entries of each world."""
        return self._entries_per_world.clone()

    def write_clock(self) -> torch.Tensor:
        """(num_worlds,) int64 writes that touched each world since it was last cleared."""
        return self._write_clock.clone()

    def stored_ages(self, world: int = 0) -> torch.Tensor:
        """(entries,) int64 writes of ``world`` since each of its stored entries was last observed
        (0: by the last write), in storage order (O(stored); for inspection and tests)."""
        used = self.bricks_in_use
        mine = (self.brick_keys[:used] != _EMPTY) & (self.brick_world[:used] == world)
        entries = self.entry_of[:used][mine]
        return self._write_clock[world] - self.entry_last_write[entries[entries >= 0].long()].to(torch.int64)

    # ------------------------------------------------------------------ persistence

    def config(self) -> dict:
        return {
            "channels": self.channels,
            "voxel_size": self.voxel_size,
            "num_worlds": self.num_worlds,
            "brick_size": self.brick_size,
            "chunk_size": self.chunk_size,
            "max_bricks_per_world": self.max_bricks_per_world,
            "merge": self.merge,
            "closest_tolerance": self.closest_tolerance,
            "feature_dtype": str(self.feature_dtype).removeprefix("torch."),
            "max_read_depth": self.max_read_depth,
            "surface_tolerance": self.surface_tolerance,
            "revisit_radius": self.revisit_radius,
            "horizon": self.horizon,
        }

    def state_tensors(self, prefix: str = "memory.") -> dict[str, torch.Tensor]:
        """Every tensor needed to resume, trimmed to the bricks in use."""
        used, entries = self.bricks_in_use, self.entries_in_use
        tensors = {
            "features": self.features[:entries],
            "points": self.points[:entries],
            "observed_depth": self.observed_depth[:entries],
            "origins": self.origins[:entries],
            "entry_last_write": self.entry_last_write[:entries],
            "free_entries": self._free_entries,
            "entry_of": self.entry_of[:used],
            "brick_keys": self.brick_keys[:used],
            "brick_world": self.brick_world[:used],
            "brick_last_write": self.brick_last_write[:used],
            "free": self._free,
            "bricks_per_world": self._bricks_per_world,
            "entries_per_world": self._entries_per_world,
            "step": torch.tensor([self.step], dtype=torch.int64),
            "write_clock": self._write_clock,
            # Capacities, so a loaded memory holds (and reports) the same bytes.
            "capacity": torch.tensor([self.brick_keys.numel(), self._table.mask + 1, self.features.shape[0]],
                                     dtype=torch.int64),
        }
        return {prefix + k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], prefix: str = "memory.",
                   device: str | torch.device = "cpu", version: int = FORMAT_VERSION) -> "LatentSpatialMemory":
        """Rebuild a memory from ``config()`` and ``state_tensors()`` written by format ``version``.

        Version 3 predates the horizon: its files load with horizon None, each world's write
        clock set to the memory's write count and each entry's last write to its brick's
        (exact for one world written on every write; ages only matter under a horizon).
        """
        config = dict(config)
        config["feature_dtype"] = getattr(torch, config["feature_dtype"])
        try:
            check_horizon(config.get("horizon"))
        except ValueError as error:
            raise MemoryFileError(f"saved memory configuration is invalid: {error}; the file was altered") from None
        memory = cls(**config, device=device)
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
            part["features"].shape == (entries, memory.channels)
            and part["points"].shape == (entries, 3)
            and part["observed_depth"].shape == (entries,)
            and part["origins"].shape == (entries, 3)
            and part["entry_of"].shape == (used, memory._voxels_per_brick)
            and part["brick_world"].shape == (used,)
            and part["brick_last_write"].shape == (used,)
            and part["bricks_per_world"].shape == (memory.num_worlds,)
            and part["capacity"].shape == (3,)
        )
        if not shapes_ok:
            raise MemoryFileError("saved memory tensors do not match its configuration; the file was altered")
        entry_of, free_entries = part["entry_of"], part["free_entries"]
        if (entry_of >= entries).any() or (entry_of < _EMPTY).any() or (free_entries < 0).any() \
                or (free_entries >= entries).any():
            raise MemoryFileError("saved memory indexes entries it does not hold; the file was altered")
        capacity, table_size, entry_capacity = (int(v) for v in part["capacity"])
        if capacity < used or table_size < 2 * used or entry_capacity < entries:
            raise MemoryFileError("saved memory capacities are inconsistent with its contents; the file was altered")
        brick_world = part["brick_world"]
        if (brick_world < 0).any() or (brick_world >= memory.num_worlds).any():
            raise MemoryFileError("saved memory assigns bricks to worlds it does not have; the file was altered")
        stored = entry_of >= 0
        world_of_stored = brick_world[:, None].expand_as(entry_of)[stored]
        if version < 4:  # derive what version 3 did not save (see the docstring)
            part["write_clock"] = torch.full((memory.num_worlds,), int(part["step"][0]), dtype=torch.int64)
            part["entry_last_write"] = torch.zeros(entries, dtype=torch.int32)
            brick_of_stored = torch.arange(used)[:, None].expand_as(entry_of)[stored]
            part["entry_last_write"][entry_of[stored].long()] = part["brick_last_write"][brick_of_stored].to(torch.int32)
        clock, last_write = part["write_clock"], part["entry_last_write"]
        if clock.dtype != torch.int64 or clock.shape != (memory.num_worlds,):
            raise MemoryFileError(f"saved memory's write_clock must be int64 of shape ({memory.num_worlds},) (one per "
                                  f"world), got {clock.dtype} {tuple(clock.shape)}; the file was altered")
        if last_write.dtype != torch.int32 or last_write.shape != (entries,):
            raise MemoryFileError(f"saved memory's entry_last_write must be int32 of shape ({entries},) (one per "
                                  f"entry), got {last_write.dtype} {tuple(last_write.shape)}; the file was altered")
        if (clock < 0).any() or (last_write < 0).any():
            raise MemoryFileError("saved memory has negative write clocks or entry write indices; the file was altered")
        if (last_write[entry_of[stored].long()].to(torch.int64) > clock[world_of_stored]).any():
            raise MemoryFileError("saved memory has entries observed after their world's last write (entry_last_write "
                                  "> write_clock); the file was altered")
        memory._allocate(initial_bricks=capacity)
        memory._allocate_entries(initial_entries=entry_capacity)
        memory.features[:entries] = part["features"].to(memory.device, memory.feature_dtype)
        memory.points[:entries] = part["points"].to(memory.device)
        memory.observed_depth[:entries] = part["observed_depth"].to(memory.device)
        memory.origins[:entries] = part["origins"].to(memory.device)
        memory.entry_last_write[:entries] = last_write.to(memory.device)
        memory.entries_in_use = entries
        memory._free_entries = free_entries.to(memory.device, torch.int64)
        memory.entry_of[:used] = entry_of.to(memory.device, torch.int32)
        memory.brick_keys[:used] = part["brick_keys"].to(memory.device)
        memory.brick_world[:used] = part["brick_world"].to(memory.device)
        memory.brick_last_write[:used] = part["brick_last_write"].to(memory.device)
        memory._free = part["free"].to(memory.device)
        memory._bricks_per_world = part["bricks_per_world"].to(memory.device)
        memory._entries_per_world = part["entries_per_world"].to(memory.device)
        memory.bricks_in_use = used
        memory.step = int(part["step"][0])
        memory._write_clock = clock.to(memory.device).clone()
        memory._rebuild_table(table_size // 2)
        memory._rebuild_chunks()
        return memory

    def save(self, path: str | os.PathLike) -> None:
        """Write the memory to one safetensors file with JSON metadata (no pickle)."""
        save_state(path, kind="memory", config=self.config(), tensors=self.state_tensors())

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "LatentSpatialMemory":
        meta, tensors = load_state(path, kind="memory")
        return cls.from_state(meta["config"], tensors, device=device, version=meta["version"])


# ---------------------------------------------------------------------- helpers


def pool_depth(depth: torch.Tensor, factor: int) -> torch.Tensor:
    """Median-pool (..., H, W) depth by ``factor``: one depth per latent pixel.

    The median keeps a pixel on the surface most of its patch shows (a mean would
    float between a foreground edge and the wall behind it), and stays +inf when
    most of the patch is sky.
    """
    *lead, height, width = depth.shape
    patches = depth.reshape(*lead, height // factor, factor, width // factor, factor)
    patches = patches.movedim(-3, -2).reshape(*lead, height // factor, width // factor, factor * factor)
    return patches.sort(dim=-1).values[..., (factor * factor) // 2]


def lift_dominant_surface(depth: torch.Tensor, camera: Camera, c2w: torch.Tensor, factor: int,
                          surface_tolerance: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Lift each latent pixel through the medoid of the image pixels showing its dominant surface.

    Lifting a latent pixel along its centre ray at its median depth puts a point in
    empty space when the surface most of the patch shows misses the centre (a
    corner, a post in front of a wall): at 8x compression a latent pixel is ~1 m
    wide at 5 m, and such a point later wins the z-buffer where nothing is. Among
    the image pixels within ``surface_tolerance`` of the median depth, the one
    nearest their centroid is, by construction, on that surface.

    Args:
        depth: (B, T, H, W) image-resolution z-depth, +inf for sky / nothing.
        camera: intrinsics of the (H, W) image.
        c2w: (B, T, 4, 4) float64 camera-to-world poses.
        factor: latent spatial factor; H and W are multiples of it.

    Returns:
        points (B, T, h, w, 3) float64 world points and depth (B, T, h, w) float32, the
        z-depth of each chosen image pixel (the median, +inf, where most of the patch is sky).
    """
    *lead, height, width = depth.shape
    h, w, f = height // factor, width // factor, factor
    median = pool_depth(depth, f)
    patch_depth = depth.reshape(*lead, h, f, w, f).movedim(-3, -2).reshape(*lead, h, w, f * f)
    on_surface = (patch_depth - median[..., None]).abs() <= surface_tolerance * median[..., None]
    # The medoid: the surface's own pixel nearest its centroid (in the patch), so points of
    # neighbouring latent pixels stay about a latent pixel apart and do not share voxels.
    offset = torch.arange(f, dtype=torch.float32, device=depth.device) + 0.5
    row_of, column_of = offset.repeat_interleave(f), offset.repeat(f)
    weight = on_surface.to(torch.float32)
    count = weight.sum(-1, keepdim=True).clamp_min(1.0)
    centroid_row, centroid_column = (weight * row_of).sum(-1, keepdim=True) / count, (weight * column_of).sum(-1, keepdim=True) / count
    distance = (row_of - centroid_row) ** 2 + (column_of - centroid_column) ** 2
    # Where nothing is within tolerance (all sky) any choice will do: the entry is not written.
    chosen = torch.where(on_surface, distance, torch.full_like(patch_depth, math.inf)).argmin(-1, keepdim=True)
    chosen_depth = torch.where(torch.isfinite(median), patch_depth.gather(-1, chosen)[..., 0], median)
    row_in_patch, column_in_patch = chosen[..., 0] // f, chosen[..., 0] % f
    v = (torch.arange(h, device=depth.device)[:, None] * f + row_in_patch + 0.5).to(torch.float64)
    u = (torch.arange(w, device=depth.device)[None, :] * f + column_in_patch + 0.5).to(torch.float64)
    z = torch.where(torch.isfinite(chosen_depth), chosen_depth, torch.ones_like(chosen_depth)).to(torch.float64)
    camera_points = torch.stack([(u - camera.cx) / camera.fx * z, (v - camera.cy) / camera.fy * z, z], -1)
    rotation, translation = c2w[..., None, None, :3, :3], c2w[..., None, None, :3, 3]
    points = (rotation @ camera_points[..., None])[..., 0] + translation
    return points, chosen_depth


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
