"""Merging: which sample a voxel keeps when several fall in it.

Within one write, the sample observed from nearest wins a voxel (ties: the later
frame). Against what the voxel already holds, the memory's ``merge`` policy decides:

- ``"first"`` (the default): the stored entry stays. The world as first generated is
  canon, so a place keeps the samples a returning camera expects.
- ``"latest"``: the new sample replaces it (for worlds that change).
- ``"closest"``: the new sample replaces it only when observed from at most
  ``(1 + closest_tolerance)`` times the stored depth, so a close, detailed view is
  not overwritten by a distant blurry one.
"""

from __future__ import annotations

import torch

MERGE_POLICIES = ("latest", "closest", "first")


def nearest_per_voxel(voxel: torch.Tensor, observed_depth: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Index of the winning sample of each distinct voxel (in ascending voxel order).

    Args:
        voxel: (N,) int64 voxel id of each sample.
        observed_depth: (N,) depth each sample was observed at; the nearest wins.
        frame: (N,) frame of each sample; among equal depths the later frame wins, then the later index.
    """
    # Order samples so the preferred one of each voxel comes last: depth descending,
    # equal depths by frame ascending; then keep the last of each voxel.
    by_frame = torch.argsort(frame, stable=True)
    order = by_frame[torch.argsort(-observed_depth[by_frame], stable=True)]
    distinct, ranked_voxels = torch.unique(voxel[order], return_inverse=True)
    position = torch.arange(order.numel(), device=voxel.device)
    last = torch.full((distinct.numel(),), -1, dtype=torch.int64, device=voxel.device)
    last.scatter_reduce_(0, ranked_voxels, position, reduce="amax")
    return order[last]


def accepts(policy: str, occupied: torch.Tensor, observed_depth: torch.Tensor, stored_depth: torch.Tensor,
            closest_tolerance: float) -> torch.Tensor:
    """Which new samples a voxel takes under ``policy``.

    Args:
        occupied: (N,) bool, the voxel already holds an entry.
        observed_depth: (N,) depth each new sample was observed at.
        stored_depth: (N,) depth the stored entry was observed at (any value where not occupied).
    """
    if policy == "first":
        return ~occupied
    if policy == "closest":
        return ~occupied | (observed_depth <= stored_depth * (1 + closest_tolerance))
    return torch.ones_like(occupied)
