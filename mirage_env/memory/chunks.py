"""The chunk index: bricks grouped into cubic chunks, so a read culls a few chunks, not every brick.

A chunk holds ``chunk_size`` bricks per side. Its key packs (world, brick coordinates
// chunk_size) as :mod:`.keys` describes, and a :class:`~.keys.KeyTable` finds its
slot; ``members[slot]`` lists the brick slot of each of its chunk_size^3 bricks (-1
where none is allocated). Chunks are few (one per chunk_size^3 bricks), so culling
them costs about the same with 1e3 or 1e6 stored entries. The chunk index is derived
from the brick keys: it is rebuilt on load and whenever bricks are released, never saved.
"""

from __future__ import annotations

import math

import torch

from ..geometry import Camera
from .keys import AXIS_OFFSET, EMPTY, KeyTable, bit_words, pack, unpack, world_of
from .raster import spheres_in_frustum


class ChunkIndex:
    """Chunk keys, their member bricks and the table from chunk key to chunk slot."""

    def __init__(self, chunk_size: int, device: torch.device, initial_chunks: int = 16,
                 table_capacity: int | None = None):
        self.chunk_size = chunk_size
        self.device = device
        self.keys = torch.full((initial_chunks,), EMPTY, dtype=torch.int64, device=device)
        # Brick slot of each of a chunk's chunk_size^3 bricks, -1 where none is allocated; and the same
        # as bits (member k in bit k % 64 of word k // 64), so a read visits a chunk's bricks, not its slots.
        self.members = torch.full((initial_chunks, chunk_size**3), EMPTY, dtype=torch.int64, device=device)
        self.member_bits = torch.zeros(initial_chunks, -(-chunk_size**3 // 64), dtype=torch.int64, device=device)
        self.in_use = 0
        self.table = KeyTable(table_capacity or initial_chunks, device)

    def rebuilt(self, brick_keys: torch.Tensor) -> ChunkIndex:
        """A fresh index of every live brick among ``brick_keys`` (indexed by brick slot).

        Same capacities as this one, so releasing bricks never grows what the memory holds.
        """
        fresh = ChunkIndex(self.chunk_size, self.device, max(16, self.keys.numel()), (self.table.mask + 1) // 2)
        live = torch.nonzero(brick_keys != EMPTY).flatten()
        fresh.add(live, brick_keys[live])
        return fresh

    def nbytes(self) -> int:
        held = (self.keys, self.members, self.member_bits)
        return sum(t.nbytes for t in held) + self.table.nbytes()

    def add(self, slots: torch.Tensor, brick_keys: torch.Tensor) -> None:
        """Add newly allocated bricks (their ``slots`` and keys) to their chunks, allocating chunks as needed."""
        if slots.numel() == 0:
            return
        size = self.chunk_size
        shifted = unpack(brick_keys)
        chunk, local = torch.div(shifted, size, rounding_mode="floor"), shifted % size
        chunk_keys = pack(world_of(brick_keys), chunk)
        unique_keys, inverse = torch.unique(chunk_keys, return_inverse=True)
        found = self.table.lookup(unique_keys)
        missing = found < 0
        if missing.any():
            count = int(missing.sum())
            start = self.in_use
            if start + count > self.keys.numel():
                extra = max(start + count, 2 * self.keys.numel()) - self.keys.numel()
                self.keys = torch.cat([self.keys, self.keys.new_full((extra,), EMPTY)])
                self.members = torch.cat([self.members, self.members.new_full((extra, size**3), EMPTY)])
                self.member_bits = torch.cat([self.member_bits,
                                              self.member_bits.new_zeros((extra, self.member_bits.shape[1]))])
            new_slots = torch.arange(start, start + count, device=self.device)
            self.keys[new_slots] = unique_keys[missing]
            self.in_use += count
            if not self.table.fits(count):
                self.table = KeyTable(2 * self.in_use, self.device)
                self.table.insert(self.keys[: self.in_use], torch.arange(self.in_use, device=self.device))
            else:
                self.table.insert(unique_keys[missing], new_slots)
            found[missing] = new_slots
        local_index = (local[:, 0] * size + local[:, 1]) * size + local[:, 2]
        self.members[found[inverse], local_index] = slots
        self.member_bits[found] = bit_words(self.members[found] >= 0)

    def visible_members(self, camera: Camera, w2c: torch.Tensor, batch_of_world: torch.Tensor, frames: int,
                        brick_edge: float, max_depth: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(brick slot, view) pairs of the bricks of every chunk whose bounding sphere meets a view's frustum.

        A chunk of world ``k`` is tested against views ``batch_of_world[k] * frames + [0, frames)``
        only (worlds with ``batch_of_world`` -1 are not read).
        """
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        chunks = torch.nonzero(self.keys[: self.in_use] != EMPTY).flatten()
        chunk_batch = batch_of_world[world_of(self.keys[chunks])]
        chunks, chunk_batch = chunks[chunk_batch >= 0], chunk_batch[chunk_batch >= 0]
        if chunks.numel() == 0:
            return empty, empty
        chunk_edge = self.chunk_size * brick_edge
        # A chunk key packs (brick + AXIS_OFFSET) // chunk_size: its first brick is key * chunk_size - offset.
        first_brick = unpack(self.keys[chunks]) * self.chunk_size - AXIS_OFFSET
        chunk_centres = first_brick.to(torch.float32) * brick_edge + 0.5 * chunk_edge
        chunk_pair, chunk_view = spheres_in_frustum(camera, w2c, chunk_centres, chunk_batch * frames, frames,
                                                    0.5 * math.sqrt(3) * chunk_edge, max_depth)
        members = self.members[chunks[chunk_pair]]  # (visible chunk-view pairs, chunk_size^3)
        pair, member = torch.nonzero(members >= 0, as_tuple=True)
        if pair.numel() == 0:
            return empty, empty
        return members[pair, member], chunk_view[pair]
