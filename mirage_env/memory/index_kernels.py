"""Brick allocation as a compiled CPU kernel (numba): :meth:`.index.BrickIndex.slots_for` when
nothing needs to grow or be evicted.

A camera that explores allocates bricks on about one write in five (a 64x64 default env),
and the torch allocation (unique keys, lookups, free slots, the brick and chunk tables,
the chunk members) is some forty small tensor operations, ~1 ms under load: more than the
rest of the write. :func:`allocate` does the same in one call. It first checks that the
torch code would neither evict, nor grow the brick storage, nor rebuild a table, nor grow
the chunk index; if it would, it changes nothing and says so, and the torch code runs.
Otherwise every array ends as the torch code leaves it (slots from the free list first,
then fresh ones, in ascending key order; chunks likewise; table layouts by
:func:`~.keys_kernels.insert`, the torch insert's rule); tests/test_compiled.py compares
whole memories after writes that allocate.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .keys_kernels import _home, insert
# numba caches this module's kernels by this file alone: an edit of the helper imported above must
# come with an edit here, or a checkout keeps machine code with the old helper (compiled.py).

_EMPTY = -1
_AXIS_BITS = 16
_AXIS_MASK = (1 << _AXIS_BITS) - 1


@njit(cache=True)
def _lookup_one(table_keys, table_values, mask, key):
    slot = _home(key) & mask
    while True:
        found = table_keys[slot]
        if found == key:
            return table_values[slot]
        if found == _EMPTY:
            return _EMPTY
        slot = (slot + 1) & mask


@njit(cache=True)
def _lookup_all(table_keys, table_values, table_mask, keys, found):
    """``found[i]``: the value of ``keys[i]`` in the table, -1 where it is missing; returns how many are missing."""
    missing = 0
    for i in range(keys.shape[0]):
        found[i] = _lookup_one(table_keys, table_values, table_mask, keys[i])
        if found[i] < 0:
            missing += 1
    return missing

@njit(cache=True)
def _chunk_of(key, size):
    world = key >> (3 * _AXIS_BITS)
    c0 = ((key >> (2 * _AXIS_BITS)) & _AXIS_MASK) // size
    c1 = ((key >> _AXIS_BITS) & _AXIS_MASK) // size
    c2 = (key & _AXIS_MASK) // size
    return (world << (3 * _AXIS_BITS)) | (c0 << (2 * _AXIS_BITS)) | (c1 << _AXIS_BITS) | c2


@njit(cache=True)
def _member_of(key, size):
    l0 = ((key >> (2 * _AXIS_BITS)) & _AXIS_MASK) % size
    l1 = ((key >> _AXIS_BITS) & _AXIS_MASK) % size
    l2 = (key & _AXIS_MASK) % size
    return (l0 * size + l1) * size + l2


@njit(cache=True)
def allocate(keys, table_keys, table_values, table_mask, table_count, brick_keys, brick_world, entry_of, occupancy,
             bricks_per_world, max_bricks, free, in_use, chunk_size, chunk_keys, members, member_bits, chunk_in_use,
             chunk_table_keys, chunk_table_values, chunk_table_mask, chunk_table_count, out_slots):
    """Brick slot of every key of ``keys`` into ``out_slots``, allocating the missing bricks.

    Returns:
        (done, taken_from_free, fresh, new_bricks, new_chunks). ``done`` False: the torch code
        must run (it would evict, grow or rebuild); nothing was changed. Otherwise the caller
        drops ``taken_from_free`` from the free list and adds ``fresh`` to ``in_use``,
        ``new_bricks`` to the brick table's count and ``new_chunks`` to the chunk index's
        ``in_use`` and its table's count.
    """
    unique = np.unique(keys)
    found = np.empty(unique.shape[0], np.int64)
    missing = _lookup_all(table_keys, table_values, table_mask, unique, found)
    if missing > 0:
        new_keys = np.empty(missing, np.int64)
        k = 0
        for i in range(unique.shape[0]):
            if found[i] < 0:
                new_keys[k] = unique[i]
                k += 1
        incoming = np.zeros(bricks_per_world.shape[0], np.int64)
        for i in range(missing):
            incoming[new_keys[i] >> (3 * _AXIS_BITS)] += 1
        for world in range(incoming.shape[0]):
            if bricks_per_world[world] + incoming[world] > max_bricks:
                return False, 0, 0, 0, 0  # eviction
        reused = min(missing, free.shape[0])
        fresh = missing - reused
        if in_use + fresh > brick_keys.shape[0] or 2 * (table_count + missing) > table_mask + 1:
            return False, 0, 0, 0, 0  # the storage grows or the table is rebuilt
        chunk_of_new = np.empty(missing, np.int64)
        for i in range(missing):
            chunk_of_new[i] = _chunk_of(new_keys[i], chunk_size)
        new_chunk_keys = np.unique(chunk_of_new)
        chunk_found = np.empty(new_chunk_keys.shape[0], np.int64)
        chunks_missing = _lookup_all(chunk_table_keys, chunk_table_values, chunk_table_mask, new_chunk_keys,
                                     chunk_found)
        if chunks_missing > 0 and (chunk_in_use + chunks_missing > chunk_keys.shape[0]
                                   or 2 * (chunk_table_count + chunks_missing) > chunk_table_mask + 1):
            return False, 0, 0, 0, 0  # the chunk index grows or its table is rebuilt
        # Everything fits: allocate as the torch code does.
        new_slots = np.empty(missing, np.int64)
        for i in range(missing):
            new_slots[i] = free[i] if i < reused else in_use + (i - reused)
        for i in range(missing):
            slot = new_slots[i]
            brick_keys[slot] = new_keys[i]
            brick_world[slot] = new_keys[i] >> (3 * _AXIS_BITS)
            entry_of[slot, :] = _EMPTY
            occupancy[slot, :] = 0
        for world in range(incoming.shape[0]):
            bricks_per_world[world] += incoming[world]
        insert(table_keys, table_values, table_mask, new_keys, new_slots)
        if chunks_missing > 0:
            added_keys = np.empty(chunks_missing, np.int64)
            added_slots = np.empty(chunks_missing, np.int64)
            k = 0
            for i in range(new_chunk_keys.shape[0]):
                if chunk_found[i] < 0:
                    chunk_found[i] = chunk_in_use + k
                    added_keys[k], added_slots[k] = new_chunk_keys[i], chunk_in_use + k
                    chunk_keys[chunk_in_use + k] = new_chunk_keys[i]
                    k += 1
            insert(chunk_table_keys, chunk_table_values, chunk_table_mask, added_keys, added_slots)
        for i in range(missing):
            chunk = chunk_found[np.searchsorted(new_chunk_keys, chunk_of_new[i])]
            member = _member_of(new_keys[i], chunk_size)
            members[chunk, member] = new_slots[i]
            member_bits[chunk, member >> 6] |= np.int64(1) << (member & 63)
        k = 0
        for i in range(unique.shape[0]):
            if found[i] < 0:
                found[i] = new_slots[k]
                k += 1
    else:
        reused = fresh = chunks_missing = 0
    for i in range(keys.shape[0]):
        out_slots[i] = found[np.searchsorted(unique, keys[i])]
    return True, reused, fresh, missing, chunks_missing
