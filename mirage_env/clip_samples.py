"""Training and evaluation samples from posed clips, with memory built by the World itself.

A clip of S segments gives S - 1 samples: for target segment s, the clean
context is the last ``context_frames`` latent frames before it, and the memory
read is exactly what a World reads there: the clips are *replayed* through an
ordinary ``World`` (same filters, same write rule, same lift, optional
horizon) by :class:`ReplayModel`, a world model that returns the clip's own
frames instead of generating and records every request the World makes. So a
model trained on these samples sees at training time the memory it will see in
an episode. Clips are replayed many at once, one world per clip.

All latents are in the model's DiT space (``WanWorldModel.encode``), as a World
holding that model stores them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .backends.base import LatentSpec, Segment, SegmentRequest
from .geometry import Camera, invert_pose

__all__ = ["ClipSamples", "ReplayModel", "list_clips", "load_clip", "prepare_clip_samples"]


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
    from .backends.posed_clips import read_camera_file, read_clip_frames

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


class ReplayModel:
    """A WorldModel that replays given segments (teacher forcing) and records the World's requests.

    Args:
        latent: the latent space of the model whose latents these are.
        camera: image-resolution intrinsics of the frames.
        latents: (B, F, C, h, w) latents of B clips, F = segments x segment length.
        depth: (B, F, H, W) image-resolution z-depth (the World lifts through it).
        frames: (B, F, H, W, 3) uint8 frames (returned as the segments' frames).
        segment_frames: latent frames per segment.
        context_frames / suggested_voxel_size: as the replayed model's.
    """

    def __init__(self, latent: LatentSpec, camera: Camera, latents: torch.Tensor, depth: torch.Tensor, frames: torch.Tensor,
                 segment_frames: int, context_frames: int, suggested_voxel_size: float):
        self.latent, self.camera = latent, camera
        self.latents, self.depth, self.frames = latents, depth, frames
        self.segment_frames, self.context_frames = segment_frames, context_frames
        self.suggested_voxel_size = suggested_voxel_size
        self.segment = 0
        self.requests: dict[int, SegmentRequest] = {}

    def _segment(self, poses: torch.Tensor) -> Segment:
        from .memory import pool_depth

        window = slice(self.segment * self.segment_frames, (self.segment + 1) * self.segment_frames)
        if poses.shape[1] != self.segment_frames:
            raise ValueError(f"replay serves segments of {self.segment_frames} frames, the World asked for {poses.shape[1]}")
        image_depth = self.depth[:, window]
        segment = Segment(latents=self.latents[:, window], depth=pool_depth(image_depth, self.latent.spatial_factor),
                          poses=poses, image_depth=image_depth, frames=self.frames[:, window])
        self.segment += 1
        return segment

    def start(self, poses, generators, conditioning=None, worlds=None, views: int = 1) -> Segment:
        self.segment = 0
        return self._segment(poses)

    def generate(self, request: SegmentRequest) -> Segment:
        self.requests[self.segment] = request
        return self._segment(request.poses)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("replayed segments carry their frames")

    def config(self) -> dict:
        return {"name": "replay"}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError("a replay model has no state to load")


@torch.no_grad()
def prepare_clip_samples(
    model,
    clips: list[Path],
    *,
    voxel_size: float | None = None,
    segments: list[int] | None = None,
    memory_options: dict | None = None,
    chunk: int = 64,
    progress: bool = True,
) -> ClipSamples:
    """Samples of every clip for target ``segments`` (default: all but the first).

    Args:
        model: a ``WanWorldModel`` (its encoder, camera, segment and context lengths).
        clips: clip folders of equal length, a multiple of the model's segment length.
        voxel_size: memory voxel edge (default: the model's ``suggested_voxel_size``, as a World).
        memory_options: extra ``LatentSpatialMemory`` options, e.g. ``{"horizon": 1}``.
        chunk: clips replayed (as the worlds of one World) at once.
    """
    from tqdm.auto import tqdm

    from .world import World

    n = model.latent_frames
    if model.latent.temporal_factor != 1:
        raise ValueError("clip samples are cut per latent frame; use a model without temporal compression")
    camera = model.camera
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
        depth = torch.from_numpy(np.stack([c["depth"] for c in loaded]))
        poses = torch.from_numpy(np.stack([c["poses"] for c in loaded]))
        batch = frames.shape[0]
        replay = ReplayModel(model.latent, camera, latents, depth, frames, n, model.context_frames,
                             voxel_size or model.suggested_voxel_size)
        world = World(replay, num_worlds=batch, memory_options=memory_options)
        world.reset(poses[:, :n])
        wanted = segments or list(range(1, total // n))
        for s in range(1, total // n):
            world.step(poses[:, s * n : (s + 1) * n])
            if s in wanted:
                read = replay.requests[s]
                parts.append(ClipSamples(
                    context=latents[:, s * n - model.context_frames : s * n].clone(), target=latents[:, s * n : (s + 1) * n].clone(),
                    memory_latents=read.memory_latents, memory_mask=read.memory_mask, memory_depth=read.memory_depth,
                    poses=read.poses.clone(), clip=torch.arange(first, first + batch),
                    segment=torch.full((batch,), s, dtype=torch.int64),
                ))
        bar.update(batch)
    bar.close()
    return ClipSamples.cat(parts)
