"""The entry pool: what each stored entry holds, kept compactly and reused.

An entry is what one voxel remembers: a C-dim feature (fp16 by default), the 3D point
it was lifted to, the depth it was observed at, the origin of the camera that observed
it and the write clock of its world at the last write that observed it (the memory
horizon's bookkeeping, see :mod:`.horizon`). Surfaces fill only a fraction of a brick's
voxels, so entries live in this compact pool and a voxel stores a 4-byte index into it
(:class:`~.index.BrickIndex`). Entries freed by eviction, expiry or clearing go on a
free list and are reused, lowest index first within each freeing, before the pool grows.
"""

from __future__ import annotations

import torch


class EntryPool:
    """Entry storage (grown by doubling), its free list and the number of entries of each world.

    Attributes (per entry, grown together):
        features: (capacity, C) in ``feature_dtype``.
        points: (capacity, 3) float32 world points.
        observed_depth: (capacity,) float32 depth the entry was observed at.
        origins: (capacity, 3) float32 origin of the camera that wrote it.
        last_write: (capacity,) int32 write clock of its world at the last write that observed it.
    """

    def __init__(self, channels: int, feature_dtype: torch.dtype, num_worlds: int, device: torch.device,
                 capacity: int):
        e = max(16, capacity)
        self.num_worlds = num_worlds
        self.features = torch.zeros(e, channels, dtype=feature_dtype, device=device)
        self.points = torch.zeros(e, 3, dtype=torch.float32, device=device)
        self.observed_depth = torch.zeros(e, dtype=torch.float32, device=device)
        self.origins = torch.zeros(e, 3, dtype=torch.float32, device=device)
        self.last_write = torch.zeros(e, dtype=torch.int32, device=device)  # int32: 2**31 segments
        self.in_use = 0  # high-water mark of the pool; freed entries below it are in ``free``
        self.free = torch.zeros(0, dtype=torch.int64, device=device)
        self.entries_per_world = torch.zeros(num_worlds, dtype=torch.int64, device=device)

    @property
    def capacity(self) -> int:
        return self.features.shape[0]

    def nbytes(self) -> int:
        held = (self.features, self.points, self.observed_depth, self.origins, self.last_write)
        return sum(t.nbytes for t in held)

    def take(self, worlds: torch.Tensor) -> torch.Tensor:
        """Pool indices for new entries of ``worlds`` (one each): freed ones first, then fresh ones (growing the pool)."""
        count = worlds.numel()
        reused = self.free[:count]
        self.free = self.free[count:]
        fresh = count - reused.numel()
        if fresh > 0:
            start = self.in_use
            self.reserve(fresh)
            self.in_use += fresh
            reused = torch.cat([reused, torch.arange(start, start + fresh, device=self.free.device)])
        self.entries_per_world += torch.bincount(worlds, minlength=self.num_worlds)
        return reused

    def reserve(self, fresh: int) -> None:
        """Grow the storage (by doubling) so that ``fresh`` entries fit above ``in_use``; ``in_use`` is unchanged."""
        start, capacity = self.in_use, self.capacity
        if start + fresh > capacity:
            extra = max(start + fresh, 2 * capacity) - capacity
            pad = lambda t: torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])  # noqa: E731
            self.features, self.points = pad(self.features), pad(self.points)
            self.observed_depth, self.origins = pad(self.observed_depth), pad(self.origins)
            self.last_write = pad(self.last_write)

    def store(self, entries: torch.Tensor, features: torch.Tensor, points: torch.Tensor, observed_depth: torch.Tensor,
              origins: torch.Tensor, last_write: torch.Tensor) -> None:
        """Write what ``entries`` (M,) hold now (each argument has M rows)."""
        self.features[entries] = features.to(self.features.dtype)
        self.points[entries] = points
        self.observed_depth[entries] = observed_depth
        self.origins[entries] = origins
        self.last_write[entries] = last_write

    def release(self, entries: torch.Tensor, worlds: torch.Tensor) -> None:
        """Return ``entries`` of ``worlds`` (one each) to the free list."""
        self.free = torch.cat([self.free, entries.sort().values])
        self.entries_per_world -= torch.bincount(worlds, minlength=self.num_worlds)
