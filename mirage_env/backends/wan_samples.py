"""Training and evaluation samples from posed clips, with memory built as the World builds it.

A clip of S segments gives S - 1 samples: for target segment s, the clean
context is the last ``context_frames`` latent frames before it, and the memory
read is what a World would read there after generating segments 0 .. s - 1: a
``LatentSpatialMemory`` that, segment by segment, is read at the segment's
cameras and then written with what memory did not already supply, minus moving
content (the clip's ground-truth ``moving`` mask stands in for the write
filter). Clips are processed many at once: one memory holds one world per clip.

All latents are in the DiT's normalised space (``WanWorldModel.encode``), as the
World stores them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ..geometry import invert_pose

__all__ = ["ClipSamples", "list_clips", "load_clip", "prepare_clip_samples"]


@dataclass
class ClipSamples:
    """N samples, each one target segment of one clip.

    Attributes:
        context: (N, Tc, C, h, w) clean latents before the target.
        target: (N, T, C, h, w) latents to generate.
        memory_latents: (N, T, C, h, w) memory projected onto the target cameras.
        memory_mask: (N, T, h, w) bool hit mask of that projection.
        memory_depth: (N, T, h, w) its depth (+inf where no hit).
        poses: (N, T, 4, 4) float64 target cameras (relative to the clip's first camera).
        clip: (N,) int64 index into the clip list; segment: (N,) int64 target segment.
    """

    context: torch.Tensor
    target: torch.Tensor
    memory_latents: torch.Tensor
    memory_mask: torch.Tensor
    memory_depth: torch.Tensor
    poses: torch.Tensor
    clip: torch.Tensor
    segment: torch.Tensor

    def __len__(self) -> int:
        return self.target.shape[0]

    def batch(self, index: torch.Tensor, prompt_embeds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The samples ``index`` in the form ``MemoryBranchTrainer.loss`` takes."""
        out = {f.name: getattr(self, f.name)[index] for f in fields(self)}
        if prompt_embeds is not None:
            out["prompt_embeds"] = prompt_embeds.expand(len(index), -1, -1)
        return out

    @staticmethod
    def cat(parts: list["ClipSamples"]) -> "ClipSamples":
        return ClipSamples(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(ClipSamples)})


def list_clips(root: str | os.PathLike) -> list[Path]:
    """Clip folders (holding ``cameras.txt``) under ``root``, sorted."""
    clips = sorted(p.parent for p in Path(root).glob("*/cameras.txt"))
    if not clips:
        raise FileNotFoundError(f"no clip folders with cameras.txt under {root}; export some with: mirage-env dataset export")
    return clips


def load_clip(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """``frames`` uint8 (F, H, W, 3), ``poses`` (F, 4, 4) relative to the first camera,
    ``intrinsics`` (4,) normalised, ``depth`` (F, H, W) and ``moving`` (F, h, w) when present."""
    from .wan_train import read_camera_file, read_clip_frames

    folder = Path(folder)
    track = read_camera_file(folder / "cameras.txt")
    c2w = torch.from_numpy(track.c2w)
    out = {
        "poses": (invert_pose(c2w[:1]) @ c2w).numpy(),
        "intrinsics": track.intrinsics[0],
        "frames": read_clip_frames(folder, np.arange(len(track))),
    }
    if (folder / "depth.npz").is_file():
        with np.load(folder / "depth.npz") as data:
            out["depth"] = data["depth"].astype(np.float32)
    if (folder / "masks.npz").is_file():
        with np.load(folder / "masks.npz") as data:
            out["moving"] = data["moving"].astype(bool)
    return out


@torch.no_grad()
def prepare_clip_samples(
    model,
    clips: list[Path],
    *,
    voxel_size: float,
    segments: list[int] | None = None,
    memory_options: dict | None = None,
    chunk: int = 64,
    progress: bool = True,
) -> ClipSamples:
    """Samples of every clip for target ``segments`` (default: all but the first).

    Args:
        model: a ``WanWorldModel`` (its encoder, latent camera, segment and context lengths).
        clips: clip folders of equal length, a multiple of the model's segment length.
        voxel_size: memory voxel edge (the World's: the model's ``suggested_voxel_size``).
        memory_options: extra ``LatentSpatialMemory`` options, e.g. ``{"horizon": 1}``.
        chunk: clips processed (and held in one memory) at once.
    """
    from tqdm.auto import tqdm

    from ..memory import LatentSpatialMemory, pool_depth

    n = model.latent_frames
    if model.latent.temporal_factor != 1:
        raise ValueError("clip samples are cut per latent frame; use a model without temporal compression")
    camera = model.latent_camera
    parts = []
    bar = tqdm(total=len(clips), desc="prepare samples", unit="clip", disable=not progress)
    for first in range(0, len(clips), chunk):
        loaded = [load_clip(c) for c in clips[first : first + chunk]]
        frames = torch.from_numpy(np.stack([c["frames"] for c in loaded]))
        total = frames.shape[1]
        if total % n or total < 2 * n:
            raise ValueError(f"clips have {total} frames; need a multiple of the segment length {n}, at least two segments")
        if "depth" not in loaded[0]:
            raise ValueError(f"{clips[first]} has no depth.npz; samples need depth to build memory")
        expected = np.array([camera.fx / camera.width, camera.fy / camera.height, camera.cx / camera.width, camera.cy / camera.height])
        if not np.allclose(loaded[0]["intrinsics"], expected, atol=1e-4):
            raise ValueError(f"{clips[first]} was filmed with intrinsics {loaded[0]['intrinsics']}, the model's are {expected}")
        latents = model.encode(frames)  # (B, F, C, h, w)
        depth = pool_depth(torch.from_numpy(np.stack([c["depth"] for c in loaded])), model.latent.spatial_factor)
        moving = torch.from_numpy(np.stack([c.get("moving", np.zeros(depth.shape[1:], bool)) for c in loaded]))
        poses = torch.from_numpy(np.stack([c["poses"] for c in loaded]))
        batch = frames.shape[0]
        memory = LatentSpatialMemory(latents.shape[2], voxel_size=voxel_size, num_worlds=batch, **(memory_options or {}))
        wanted = segments or list(range(1, total // n))
        for s in range(total // n):
            window = slice(s * n, (s + 1) * n)
            read = memory.read(camera, poses[:, window])
            if s in wanted:
                start = max(0, s * n - model.context_frames)
                parts.append(ClipSamples(
                    context=latents[:, start : s * n].clone(), target=latents[:, window].clone(),
                    memory_latents=read.latents, memory_mask=read.mask, memory_depth=read.depth,
                    poses=poses[:, window].clone(), clip=torch.arange(first, first + batch),
                    segment=torch.full((batch,), s, dtype=torch.int64),
                ))
            keep = ~read.mask & ~moving[:, window]
            seen = read.points if memory.horizon is not None else None
            memory.write(latents[:, window], depth[:, window], camera, poses[:, window], keep=keep, seen=seen)
        bar.update(batch)
    bar.close()
    return ClipSamples.cat(parts)
