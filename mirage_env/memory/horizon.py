"""The memory horizon: per-world write clocks, what counts as observed, and expiry.

Each world has a *write clock* that advances by one on every write touching it (a
World writes once per segment, so it counts segments), and each entry records (in
:attr:`EntryPool.last_write <.pool.EntryPool>`) the clock of the last write that
observed its voxel: the write that created it, a later write whose own samples fell
in that voxel (whatever the merge policy kept), or one told through ``seen`` that a
read showed it to the generator for that segment. With ``horizon=K``, a write frees
the entries of its worlds that no write among their last K observed, so a read shows
only what was seen in the last K segments, and the voxel of a freed entry is empty
again (a later view writes it anew, whatever the merge policy). Expiry frees entries
through the entry pool and releases bricks it left empty in batches (a table rebuild
per 1/8 of the bricks turned over, as eviction), so memory size is bounded by K
segments and per-step cost stays flat. ``horizon=None`` never expires.

Counting from the last observation rather than from creation matters: a world written
with ``write="unseen"`` never writes back what memory supplied, so counting from
creation would make a camera that stares at a wall forget it every K segments and
have the generator draw it anew.
"""

from __future__ import annotations

import numbers

import torch

from .index import BrickIndex
from .keys import EMPTY
from .pool import EntryPool


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


class WriteClock:
    """Writes that touched each world since it was last cleared (``ticks``, (num_worlds,) int64)."""

    def __init__(self, num_worlds: int, device: torch.device):
        self.ticks = torch.zeros(num_worlds, dtype=torch.int64, device=device)

    def nbytes(self) -> int:
        return self.ticks.nbytes

    def advance(self, touched: torch.Tensor) -> None:
        """One more write for the worlds where ``touched`` (num_worlds,) bool is True."""
        self.ticks += touched

    def now(self, world: torch.Tensor) -> torch.Tensor:
        """int32 clock of each world in ``world`` (N,), as entries record it."""
        return self.ticks[world].to(torch.int32)

    def observe_again(self, index: BrickIndex, pool: EntryPool, points: torch.Tensor, world: torch.Tensor) -> None:
        """Stamp the entries in the voxels of ``points`` (N, 3) (NaN: none) of ``world`` (N,) with their world's clock."""
        finite = torch.isfinite(points).all(-1)
        points, world = points[finite], world[finite]
        if points.numel() == 0:
            return
        keys, local_index = index.address(points, world)
        slots = index.lookup(keys)
        found = slots >= 0
        entry = index.entry_of[slots[found], local_index[found]].long()
        live = entry >= 0
        pool.last_write[entry[live]] = self.now(world[found][live])

    def expire(self, index: BrickIndex, pool: EntryPool, horizon: int | None, touched: torch.Tensor) -> torch.Tensor:
        """Free the entries of ``touched`` worlds (bool (num_worlds,)) none of their last ``horizon`` writes observed.

        Returns the slots of bricks of those worlds that hold no entry now (for
        :meth:`BrickIndex.release_if_empty <.index.BrickIndex.release_if_empty>`).
        """
        empty = torch.zeros(0, dtype=torch.int64, device=self.ticks.device)
        if horizon is None:
            return empty
        slots = index.live_slots(touched)
        if slots.numel() == 0:
            return empty
        entries = index.entry_of[slots].long()  # O(stored bricks): bounded by what K segments hold
        occupied = entries >= 0
        world = index.world[slots]
        deadline = (self.ticks[world] - horizon).to(torch.int32)
        expired = occupied & (pool.last_write[entries.clamp_min(0)] <= deadline[:, None])
        if expired.any():
            row, voxel = torch.nonzero(expired, as_tuple=True)
            pool.release(entries[row, voxel], world[row])
            index.entry_of[slots[row], voxel] = EMPTY
            index.refresh_occupancy(slots[row])
            occupied &= ~expired
        return slots[~occupied.any(1)]

    def ages(self, index: BrickIndex, pool: EntryPool, world: int) -> torch.Tensor:
        """(entries,) int64 writes of ``world`` since each of its stored entries was last observed, in storage order."""
        of_world = torch.arange(index.num_worlds, device=self.ticks.device) == world
        entries = index.entry_of[index.live_slots(of_world)]
        return self.ticks[world] - pool.last_write[entries[entries >= 0].long()].to(torch.int64)
