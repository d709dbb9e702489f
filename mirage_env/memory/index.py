"""The brick index: where in space each stored entry is (voxel hashing, Niessner et al. 2013).

Space is cut into voxels of ``voxel_size``; voxels are grouped into cubic *bricks* of
``brick_size`` voxels per side. A brick is allocated on first write and found through
a :class:`~.keys.KeyTable` over its (world, brick coordinates) key, so a write touches
only the bricks its points fall in and costs the same with 1e3 or 1e6 stored entries.
Each voxel of a brick holds the index of its entry in the :class:`~.pool.EntryPool`
(-1: empty). Bricks are grouped into chunks (:mod:`.chunks`) so that a read culls
chunks before bricks.

Capacity: at most ``max_bricks_per_world`` bricks per world; when a write needs more,
the least recently written bricks of that world are evicted down to 7/8 of the bound.
Releasing bricks rebuilds the hash tables (O(stored)), so eviction runs once per bound/8
new bricks, not on every write of a full memory. The entries a released brick held are
handed back to the caller (:class:`Released`) to return to the pool.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..compiled import disable_kernels, kernel_module, kernels_enabled
from ..geometry import Camera
from .chunks import ChunkIndex
from .keys import AXIS_BITS, AXIS_OFFSET, EMPTY, KeyTable, bit_words, pack, unpack, world_of
from .raster import spheres_in_frustum

EVICT_TO_FRACTION = 7 / 8  # of max_bricks_per_world, once a write would exceed it


class Released(NamedTuple):
    """Pool entries that released bricks held, and the world of each."""

    entries: torch.Tensor
    worlds: torch.Tensor


class BrickIndex:
    """Bricks: their keys, worlds, last write step and voxels (entry index per voxel), plus the chunk index.

    Attributes (per brick slot, grown together):
        keys: (capacity,) int64 brick keys, -1 for a free slot.
        world: (capacity,) int64 world of each brick.
        last_write: (capacity,) int64 ``step`` of the last write that touched the brick (eviction order).
        entry_of: (capacity, brick_size^3) int32 pool index of each voxel's entry, -1 where empty.
        occupancy: (capacity, ceil(brick_size^3 / 64)) int64 bits, voxel k of a brick in bit
            k % 64 of word k // 64: set where ``entry_of`` holds an entry. Derived from ``entry_of``
            (kept with it, rebuilt on load, never saved) so a read visits a brick's entries, not
            its voxels.
    """

    def __init__(self, voxel_size: float, brick_size: int, chunk_size: int, num_worlds: int,
                 max_bricks_per_world: int, device: torch.device, capacity: int = 64):
        self.voxel_size = voxel_size
        self.brick_size = brick_size
        self.num_worlds = num_worlds
        self.max_bricks_per_world = max_bricks_per_world
        self.device = device
        self.voxels_per_brick = brick_size**3
        self.entry_of = torch.full((capacity, self.voxels_per_brick), EMPTY, dtype=torch.int32, device=device)
        self.occupancy = torch.zeros(capacity, -(-self.voxels_per_brick // 64), dtype=torch.int64, device=device)
        self.keys = torch.full((capacity,), EMPTY, dtype=torch.int64, device=device)
        self.world = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.last_write = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.in_use = 0  # high-water mark of used slots; free ones below it are in ``free``
        self.free = torch.zeros(0, dtype=torch.int64, device=device)
        self.bricks_per_world = torch.zeros(num_worlds, dtype=torch.int64, device=device)
        self.step = 0  # writes so far: the clock of ``last_write``
        self.table = KeyTable(capacity, device)
        self.chunks = ChunkIndex(chunk_size, device)

    @property
    def capacity(self) -> int:
        return self.keys.numel()

    def nbytes(self) -> int:
        """Bytes of the brick storage, its tables and the chunk index."""
        held = (self.entry_of, self.occupancy, self.keys, self.world, self.last_write)
        return sum(t.nbytes for t in held) + self.table.nbytes() + self.chunks.nbytes()

    # ------------------------------------------------------------------ addressing

    def address(self, points: torch.Tensor, world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Brick keys (N,) and voxel indices within the brick (N,) of (N, 3) float32 points of ``world`` (N,)."""
        voxel = torch.floor(points / self.voxel_size).to(torch.int64)
        brick = torch.div(voxel, self.brick_size, rounding_mode="floor")
        local = voxel - brick * self.brick_size
        local_index = (local[:, 0] * self.brick_size + local[:, 1]) * self.brick_size + local[:, 2]
        shifted = brick + AXIS_OFFSET
        if (shifted < 0).any() or (shifted >= (1 << AXIS_BITS)).any():
            raise self.out_of_range()
        return pack(world, shifted), local_index

    def out_of_range(self) -> ValueError:
        """The error for a point beyond what the keys can address."""
        limit = AXIS_OFFSET * self.brick_size * self.voxel_size
        return ValueError(
            f"a point lies farther than {limit:g} world units from the origin; the memory "
            f"addresses +-{limit:g} with voxel_size={self.voxel_size}: use a larger voxel_size "
            f"or keep the scene closer to the first camera"
        )

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Brick slots of ``keys`` (N,), -1 where no brick is allocated."""
        return self.table.lookup(keys)

    def live_slots(self, of_world: torch.Tensor) -> torch.Tensor:
        """Slots, ascending, of the allocated bricks of the worlds where ``of_world`` (num_worlds,) bool is True."""
        used = self.in_use
        return torch.nonzero((self.keys[:used] != EMPTY) & of_world[self.world[:used]]).flatten()

    def centres(self, slots: torch.Tensor) -> torch.Tensor:
        """(N, 3) float32 world centres of bricks ``slots``."""
        coords = unpack(self.keys[slots])
        brick_edge = self.brick_size * self.voxel_size
        return (coords - AXIS_OFFSET).to(torch.float32) * brick_edge + 0.5 * brick_edge

    def visible_bricks(self, camera: Camera, w2c: torch.Tensor, world_index: torch.Tensor, frames: int,
                       max_depth: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(brick slot, view) pairs whose bounding sphere meets a view's frustum.

        Batch item ``b`` reads world ``world_index[b]`` through views ``b * frames + [0, frames)``.
        Culls chunks first, each against the views of its own world only, then the bricks
        of the visible chunks.
        """
        batch_of_world = torch.full((self.num_worlds,), -1, dtype=torch.int64, device=self.device)
        batch_of_world[world_index] = torch.arange(world_index.numel(), device=self.device)
        brick_edge = self.brick_size * self.voxel_size
        bricks, views = self.chunks.visible_members(camera, w2c, batch_of_world, frames, brick_edge, max_depth)
        if bricks.numel() == 0:
            return bricks, views
        kept, _ = spheres_in_frustum(camera, w2c, self.centres(bricks), views, 1, 0.5 * math.sqrt(3) * brick_edge,
                                     max_depth)
        return bricks[kept], views[kept]

    # ------------------------------------------------------------------ allocation

    def slots_for(self, keys: torch.Tensor) -> tuple[torch.Tensor, Released | None]:
        """Brick slot of every key, allocating bricks as needed; and what eviction released to make room."""
        if kernels_enabled(self.device):
            slots = self._compiled_slots_for(keys)
            if slots is not None:
                return slots, None
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        found = self.table.lookup(unique_keys)
        missing = found < 0
        released = None
        if missing.any():
            new_keys = unique_keys[missing]
            new_worlds = world_of(new_keys)
            # Bricks this write already found are in use by it: evicting one would hand its slot to
            # a new brick while this write's entries still point there.
            released = self._evict_for(new_worlds, protected=found[~missing])
            new_slots = self._take_free_slots(new_keys.numel())
            self.keys[new_slots] = new_keys
            self.world[new_slots] = new_worlds
            self.entry_of[new_slots] = EMPTY
            self.occupancy[new_slots] = 0
            self.bricks_per_world += torch.bincount(new_worlds, minlength=self.num_worlds)
            self.table.insert(new_keys, new_slots)
            self.chunks.add(new_slots, self.keys[new_slots])
            found[missing] = new_slots
        return found[inverse], released

    def refresh_occupancy(self, slots: torch.Tensor | None = None) -> None:
        """Recompute :attr:`occupancy` of bricks ``slots`` (default: all) from ``entry_of``, after the torch
        code changed which of their voxels hold an entry (the kernels keep the bits as they go)."""
        entries = self.entry_of if slots is None else self.entry_of[slots]
        packed = bit_words(entries >= 0)
        if slots is None:
            self.occupancy.copy_(packed)
        else:
            self.occupancy[slots] = packed

    def _compiled_slots_for(self, keys: torch.Tensor) -> torch.Tensor | None:
        """:meth:`slots_for` by :func:`.index_kernels.allocate` (None, nothing changed: it would evict, grow or
        rebuild a table, or the kernel could not be built; the torch code then runs)."""
        index_kernels = kernel_module(f"{__package__}.index_kernels")
        if index_kernels is None:
            return None
        try:
            chunks, slots = self.chunks, np.empty(keys.numel(), np.int64)
            done, taken, fresh, new_bricks, new_chunks = index_kernels.allocate(
                keys.contiguous().numpy(), self.table.keys.numpy(), self.table.values.numpy(), self.table.mask,
                self.table.count, self.keys.numpy(), self.world.numpy(), self.entry_of.numpy(), self.occupancy.numpy(),
                self.bricks_per_world.numpy(), self.max_bricks_per_world, self.free.numpy(), self.in_use,
                chunks.chunk_size, chunks.keys.numpy(), chunks.members.numpy(), chunks.member_bits.numpy(),
                chunks.in_use, chunks.table.keys.numpy(),
                chunks.table.values.numpy(), chunks.table.mask, chunks.table.count, slots)
        except Exception as error:  # the kernel failed to compile (before changing anything)
            disable_kernels(f"{type(error).__name__}: {error}")
            return None
        if not done:
            return None
        if taken:
            self.free = self.free[taken:]
        self.in_use += fresh
        self.table.count += new_bricks
        chunks.in_use += new_chunks
        chunks.table.count += new_chunks
        return torch.from_numpy(slots)

    def mark_written(self, slots: torch.Tensor) -> None:
        """Record that the current write (``step``) touched bricks ``slots``."""
        self.last_write[slots] = self.step

    def _take_free_slots(self, count: int) -> torch.Tensor:
        reused = self.free[:count]
        self.free = self.free[count:]
        fresh = count - reused.numel()
        if fresh > 0:
            start = self.in_use
            self._grow(start + fresh)
            if not self.table.fits(count):
                self.rebuild_table(2 * (start + fresh))
            self.in_use += fresh
            reused = torch.cat([reused, torch.arange(start, start + fresh, device=self.device)])
        elif not self.table.fits(count):
            self.rebuild_table(2 * self.in_use)
        return reused

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        if needed <= capacity:
            return
        extra = max(needed, 2 * capacity) - capacity

        def extend(tensor, fill):
            pad = torch.full((extra, *tensor.shape[1:]), fill, dtype=tensor.dtype, device=tensor.device)
            return torch.cat([tensor, pad])

        self.entry_of = extend(self.entry_of, EMPTY)
        self.occupancy = extend(self.occupancy, 0)
        self.keys = extend(self.keys, EMPTY)
        self.world = extend(self.world, 0)
        self.last_write = extend(self.last_write, 0)
        self.rebuild_table()

    def rebuild_table(self, capacity: int | None = None) -> None:
        """Re-insert every live brick into a fresh table for ``capacity`` bricks (default: storage size)."""
        self.table = KeyTable(capacity or self.capacity, self.device)
        live = torch.nonzero(self.keys != EMPTY).flatten()
        self.table.insert(self.keys[live], live)

    def rebuild_chunks(self) -> None:
        """Index every live brick afresh (after bricks were released or loaded)."""
        self.chunks = self.chunks.rebuilt(self.keys[: self.in_use])

    # ------------------------------------------------------------------ release

    def _evict_for(self, new_worlds: torch.Tensor, protected: torch.Tensor) -> Released | None:
        """Evict the least recently written bricks of worlds that ``new_worlds`` (one per new brick) would overfill.

        ``protected`` slots (bricks the current write uses) are never evicted, so a write
        that by itself touches more bricks than the bound leaves its world over the bound
        until a later write evicts them.
        """
        incoming = torch.bincount(new_worlds, minlength=self.num_worlds)
        wanted = self.bricks_per_world + incoming
        if not (wanted > self.max_bricks_per_world).any():
            return None
        excess = torch.where(wanted > self.max_bricks_per_world, wanted - (self.max_bricks_per_world * EVICT_TO_FRACTION),
                             torch.zeros_like(wanted)).ceil().long()
        live = self.keys[: self.in_use] != EMPTY
        live[protected] = False
        victims = []
        for world in torch.nonzero(excess > 0).flatten().tolist():  # loop over worlds, not points
            candidates = torch.nonzero(live & (self.world[: self.in_use] == world)).flatten()
            count = min(int(excess[world]), candidates.numel())
            age_order = torch.argsort(self.last_write[candidates], stable=True)
            victims.append(candidates[age_order[:count]])
        return self.release(torch.cat(victims))

    def release(self, slots: torch.Tensor) -> Released | None:
        """Free bricks ``slots`` and rebuild the tables; returns the entries they held (None: no slots)."""
        if slots.numel() == 0:
            return None
        self.bricks_per_world -= torch.bincount(self.world[slots], minlength=self.num_worlds)
        entries = self.entry_of[slots]
        live = entries >= 0
        released = Released(entries[live].long(), self.world[slots][:, None].expand_as(entries)[live])
        self.keys[slots] = EMPTY
        self.entry_of[slots] = EMPTY
        self.occupancy[slots] = 0
        self.free = torch.cat([self.free, slots.sort().values])
        self.rebuild_table()
        self.rebuild_chunks()
        return released

    def release_if_empty(self, candidates: torch.Tensor) -> None:
        """Release the bricks among ``candidates`` still empty, once they are 1/8 of the bricks in use.

        Releasing rebuilds the hash tables (O(stored)), so, as eviction, it waits until enough
        bricks have turned over; empty bricks meanwhile cost a read nothing but their cull.
        """
        if candidates.numel() == 0:
            return
        candidates = candidates[(self.entry_of[candidates] < 0).all(1)]  # a write may have refilled some
        if 8 * candidates.numel() >= int(self.bricks_per_world.sum()):
            self.release(candidates)  # empty bricks: nothing to return to the pool
