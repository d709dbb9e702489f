"""Shapes at the memory's edge: batches of poses, the worlds a batch addresses, what a read returns.

A call addresses a batch of B worlds with T frames each: poses (B, T, 4, 4), or (T, 4, 4)
and (4, 4) for one world and one frame, and every result keeps the leading shape given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..compiled import disable_kernels, kernel_module
from ..geometry import check_pose


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


def as_batch(poses: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
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


def kernel_poses(poses) -> tuple[np.ndarray, tuple[int, ...], int, int] | None:
    """For the compiled kernels: float64 CPU poses of shape (4,4), (T,4,4) or (B,T,4,4) that pass
    ``check_pose``'s rule (:mod:`.shape_kernels` checks), as a C-contiguous (B*T, 4, 4) numpy array,
    their leading shape, B and T. None for anything else: :func:`as_batch` then converts, or raises
    ``check_pose``'s error, so the messages stay in one place.
    """
    if isinstance(poses, torch.Tensor):  # is_cpu, not device.type: a read and a write each ask, 0.3 us apiece
        if poses.dtype != torch.float64 or not poses.is_cpu or poses.requires_grad:
            return None
        array = poses.numpy()
    elif isinstance(poses, np.ndarray) and poses.dtype == np.float64:
        array = poses
    else:
        return None
    shape = array.shape
    if not 2 <= len(shape) <= 4 or shape[-1] != 4 or shape[-2] != 4:
        return None
    c2w = array.reshape(-1, 4, 4) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1, 4, 4)
    shape_kernels = kernel_module(f"{__package__}.shape_kernels")
    try:
        if shape_kernels is None or not shape_kernels.rigid_and_finite(c2w.reshape(-1, 16)):
            return None
    except Exception as error:  # the kernel failed to compile: check_pose checks
        disable_kernels(f"{type(error).__name__}: {error}")
        return None
    batch, frames = (1, 1) if len(shape) == 2 else (1, shape[0]) if len(shape) == 3 else shape[:2]
    return c2w, shape[:-2], batch, frames


def check_worlds(worlds, batch: int, num_worlds: int, device: torch.device) -> torch.Tensor:
    """(batch,) int64 indices of the worlds a batch addresses: ``worlds`` checked, or all worlds in order (None)."""
    if worlds is None:
        if batch != num_worlds:
            raise ValueError(
                f"got a batch of {batch} worlds for a memory of num_worlds={num_worlds}; "
                f"pass worlds=[...] to say which worlds the batch is"
            )
        return torch.arange(batch, device=device)
    if isinstance(worlds, (list, tuple, range, np.ndarray)):  # a step's list: checked in numpy, a few us less
        worlds = np.asarray(worlds, dtype=np.int64).reshape(-1)
        low, high = (int(worlds.min()), int(worlds.max())) if worlds.size else (0, 0)
    else:
        worlds = torch.as_tensor(worlds, dtype=torch.int64, device=device).reshape(-1)
        low, high = (int(worlds.min()), int(worlds.max())) if worlds.numel() else (0, 0)
    if len(worlds) != batch:
        raise ValueError(f"worlds has {len(worlds)} entries for a batch of {batch}")
    if low < 0 or high >= num_worlds:
        raise ValueError(f"worlds must lie in [0, {num_worlds}), got {worlds.tolist()}")
    return torch.from_numpy(worlds).to(device) if isinstance(worlds, np.ndarray) else worlds


def written_pixels(depth: torch.Tensor, keep, device: torch.device, grid: str) -> torch.Tensor:
    """Bool mask, depth's shape, of the pixels a write stores: finite depth > 0, and ``keep``
    where given (any shape with depth's number of elements; ``grid`` names the expected one)."""
    valid = torch.isfinite(depth) & (depth > 0)
    keep = keep_mask(keep, valid.numel(), device, grid)
    if keep is not None:
        valid &= keep.reshape(valid.shape)
    return valid


def keep_mask(keep, count: int, device: torch.device, grid: str) -> torch.Tensor | None:
    """``keep`` (None: keep all) as a bool tensor of ``count`` elements in its own shape; a ValueError
    naming ``grid`` (the expected shape) if it has another number of elements."""
    if keep is None:
        return None
    keep = torch.as_tensor(keep, device=device)
    if keep.numel() != count:
        raise ValueError(f"keep must match {grid}, got {tuple(keep.shape)}")
    return keep.bool()
