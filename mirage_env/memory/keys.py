"""Packed int64 keys of (world, x, y, z) cells and the hash table that finds their slots.

A key packs a world index and three cell coordinates (of a brick or a chunk) into one
int64, ``world << 48 | x << 32 | y << 16 | z``: each coordinate is shifted by
``AXIS_OFFSET`` so that negative ones fit in ``AXIS_BITS`` unsigned bits. The top bits
left over after the three axes (63 - 48 = 15) number the worlds, so keys stay positive.
"""

from __future__ import annotations

import math

import torch

from ..compiled import disable_kernels, kernel_module, kernels_enabled

EMPTY = -1  # a free slot in a table, an unused key, an empty voxel
_PROBES = 8  # slots a lookup on the torch path reads at once per key (KeyTable.lookup)
AXIS_BITS = 16
AXIS_OFFSET = 1 << (AXIS_BITS - 1)
WORLD_BITS = 63 - 3 * AXIS_BITS


def pack(world: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """int64 keys of (N,) worlds and (N, 3) non-negative coordinates below 2**AXIS_BITS (brick or chunk)."""
    return (world << (3 * AXIS_BITS)) | (coords[:, 0] << (2 * AXIS_BITS)) | (coords[:, 1] << AXIS_BITS) | coords[:, 2]


def unpack(keys: torch.Tensor) -> torch.Tensor:
    """(N, 3) int64 coordinates packed in brick or chunk keys (still shifted by their offset)."""
    mask = (1 << AXIS_BITS) - 1
    return torch.stack([(keys >> (2 * AXIS_BITS)) & mask, (keys >> AXIS_BITS) & mask, keys & mask], -1)


def world_of(keys: torch.Tensor) -> torch.Tensor:
    """The world index packed in each key."""
    return keys >> (3 * AXIS_BITS)


_BIT_VALUES = torch.tensor([1 << k for k in range(63)] + [-(1 << 63)], dtype=torch.int64)  # bit k of an int64


def bit_words(flags: torch.Tensor) -> torch.Tensor:
    """(N, K) bool -> (N, ceil(K / 64)) int64 words, flag k in bit k % 64 of word k // 64 (what the kernels
    walk with ``trailing_zeros`` to visit set flags in ascending order)."""
    rows, count = flags.shape
    words = -(-count // 64)
    padded = torch.zeros(rows, words * 64, dtype=torch.int64, device=flags.device)
    padded[:, :count] = flags
    # Distinct powers of two summed are their bitwise or; bit 63 is int64's sign bit, and no
    # partial sum overflows (the other 63 bits add up to at most 2**63 - 1).
    return (padded.view(rows, words, 64) * _BIT_VALUES.to(flags.device)).sum(-1)


class KeyTable:
    """Open-addressing hash table from int64 keys to int64 slots, vectorised (no loop over keys).

    Linear probing over a power-of-two table kept at most half full, so a lookup
    probes a few times whatever the number of keys. Keys are only ever inserted: to
    remove some, build a new table from the keys that stay.
    """

    def __init__(self, capacity: int, device: torch.device):
        size = 1 << max(4, math.ceil(math.log2(max(2 * capacity, 16))))
        self.mask = size - 1
        self.keys = torch.full((size,), EMPTY, dtype=torch.int64, device=device)
        self.values = torch.full((size,), EMPTY, dtype=torch.int64, device=device)
        self.count = 0

    @staticmethod
    def _hash(keys: torch.Tensor) -> torch.Tensor:
        # splitmix64's finaliser (int64 products wrap; >> is arithmetic here and in keys_kernels._home alike).
        # Every key bit reaches the low bits that pick the slot: a single product does not carry the world
        # (bits 48+) down, so the same cell of N worlds shared one home slot and probed ~N/2 slots at N = 64.
        mixed = (keys ^ (keys >> 30)) * -4658895280553007687
        mixed = (mixed ^ (mixed >> 27)) * -7723592293110705685
        return mixed ^ (mixed >> 31)

    def fits(self, count: int) -> bool:
        """Whether ``count`` more keys keep the table at most half full."""
        return 2 * (self.count + count) <= self.mask + 1

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Slots of ``keys`` (N,), -1 where absent."""
        result = torch.full_like(keys, EMPTY)
        if keys.numel() == 0:
            return result
        kernels = _kernels(keys.device)
        if kernels is not None and _ran(kernels.lookup, self.keys.numpy(), self.values.numpy(), self.mask,
                                        keys.contiguous().numpy(), result.numpy()):
            return result
        home = self._hash(keys)
        # The first _PROBES slots of every key at once: a probe sequence ends at the key or at an empty slot,
        # and in a table at most half full almost every one ends there. One round per probe would cost a
        # device synchronisation each (the loop's test of what is left), which bounds a GPU step.
        slots = (home[:, None] + torch.arange(_PROBES, device=keys.device)) & self.mask  # (N, _PROBES)
        found_keys = self.keys[slots]
        hit = found_keys == keys[:, None]
        ends = hit | (found_keys == EMPTY)
        first = ends.to(torch.uint8).argmax(1, keepdim=True)  # the first end (argmax: the first maximum)
        ended, found = ends.gather(1, first).squeeze(1), hit.gather(1, first).squeeze(1)
        result = torch.where(found, self.values[slots.gather(1, first).squeeze(1)], result)
        pending = torch.nonzero(~ended).flatten()  # the rare longer sequences go on one probe at a time
        probe = _PROBES
        while pending.numel() > 0:
            slot = (home[pending] + probe) & self.mask
            found_keys = self.keys[slot]
            hit = found_keys == keys[pending]
            result[pending[hit]] = self.values[slot[hit]]
            pending = pending[~hit & (found_keys != EMPTY)]
            probe += 1
        return result

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Insert distinct keys that are not yet present."""
        if keys.numel() == 0:
            return
        if not self.fits(keys.numel()):
            raise RuntimeError("brick table over half full; rebuild it larger first")
        kernels = _kernels(keys.device)
        if kernels is not None and _ran(kernels.insert, self.keys.numpy(), self.values.numpy(), self.mask,
                                        keys.contiguous().numpy(), values.to(torch.int64).contiguous().numpy()):
            self.count += keys.numel()
            return
        home = self._hash(keys)
        pending = torch.arange(keys.numel(), device=keys.device)
        probe = 0
        while pending.numel() > 0:
            slot = (home[pending] + probe) & self.mask
            free = self.keys[slot] == EMPTY
            candidates, candidate_slots = pending[free], slot[free]
            # Several keys may want the same free slot: the highest index wins, deterministically.
            wanted, which = torch.unique(candidate_slots, return_inverse=True)
            claim = torch.full((wanted.numel(),), EMPTY, dtype=torch.int64, device=keys.device)
            claim.scatter_reduce_(0, which, candidates, reduce="amax")
            won = claim[which] == candidates
            self.keys[candidate_slots[won]] = keys[candidates[won]]
            self.values[candidate_slots[won]] = values[candidates[won]]
            placed = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
            placed[candidates[won]] = True
            pending = pending[~placed[pending]]
            probe += 1
        self.count += keys.numel()


def _kernels(device: torch.device):
    """:mod:`.keys_kernels` when the compiled kernels run on ``device``, else None (the torch loops run)."""
    return kernel_module(f"{__package__}.keys_kernels") if kernels_enabled(device) else None


def _ran(kernel, *args) -> bool:
    """Run ``kernel``; False (and the kernels off, with a warning) if numba could not compile it."""
    try:
        kernel(*args)
    except Exception as error:  # a compile failure happens before the kernel touches the table
        disable_kernels(f"{type(error).__name__}: {error}")
        return False
    return True
