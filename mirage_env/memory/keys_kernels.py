"""The brick/chunk hash table's lookup and insert as compiled CPU kernels (numba).

Probing a table key by key is a short loop; in torch it is a loop of rounds of
vectorised gathers, a dozen tensor ops per round, and at 64 worlds those rounds were
the largest single cost of a step. The insert keeps :meth:`.keys.KeyTable.insert`'s
rule for keys that want the same free slot in the same probe round (the highest index
wins), so the table's layout, not only its answers, is the torch path's.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_EMPTY = -1


@njit(cache=True, inline="always")
def _home(key):
    # KeyTable._hash, operation for operation (splitmix64's finaliser)
    mixed = (key ^ (key >> 30)) * np.int64(-4658895280553007687)
    mixed = (mixed ^ (mixed >> 27)) * np.int64(-7723592293110705685)
    return mixed ^ (mixed >> 31)


@njit(cache=True)
def lookup(table_keys, table_values, mask, keys, result):
    """Values of ``keys`` into ``result`` (-1 where absent)."""
    for i in range(keys.shape[0]):
        key = keys[i]
        slot = _home(key) & mask
        while True:
            found = table_keys[slot]
            if found == key:
                result[i] = table_values[slot]
                break
            if found == _EMPTY:
                result[i] = _EMPTY
                break
            slot = (slot + 1) & mask


@njit(cache=True)
def insert(table_keys, table_values, mask, keys, values):
    """Insert distinct absent keys in probe rounds; in each round the highest index claims a contested slot."""
    n = keys.shape[0]
    home = np.empty(n, np.int64)
    for i in range(n):
        home[i] = _home(keys[i])
    pending = np.arange(n)
    count = n
    probe = 0
    while count > 0:
        # Slots free at the start of the round; claimed ones fill as the round goes, highest index first.
        left = 0
        placed = np.zeros(count, np.bool_)
        free_at_start = np.empty(count, np.bool_)
        for j in range(count):
            free_at_start[j] = table_keys[(home[pending[j]] + probe) & mask] == _EMPTY
        for j in range(count - 1, -1, -1):
            i = pending[j]
            slot = (home[i] + probe) & mask
            if free_at_start[j] and table_keys[slot] == _EMPTY:
                table_keys[slot] = keys[i]
                table_values[slot] = values[i]
                placed[j] = True
        for j in range(count):
            if not placed[j]:
                pending[left] = pending[j]
                left += 1
        count = left
        probe += 1
