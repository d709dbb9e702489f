"""The small protocol every world model implements.

A world model generates a *segment* of frames for a batch of worlds at once.
Everything crosses this boundary as tensors with a leading world dimension B
and a latent-frame dimension T:

    latents         (B, T, C, h, w)   float32, the generator's own latent space
    depth           (B, T, h, w)      z-depth at latent resolution, +inf = sky/none
    memory_latents  (B, T, C, h, w)   the memory projected onto the target cameras
    memory_mask     (B, T, h, w)      bool, where memory had something to say
    frames          (B, F, H, W, 3) uint8, decoded on demand; F = 1 + temporal_factor * (T - 1)
                    (a causal video VAE codes the first frame alone), the pose of latent
                    frame k is that of frame k * temporal_factor (LatentSpec.frame_indices)

Poses are camera-to-world (B, T, 4, 4) float64 (see mirage_env.geometry).
Randomness comes from one ``torch.Generator`` per world, so world i of a batch
produces exactly what a batch of one with the same generator state produces:
bit for bit with the procedural model. A neural model (Wan) draws the same noise,
but its batched convolutions and matmuls may round differently from a batch of
one (latents agree to ~1e-6, decoded pixels to +-1). The same batch is always
reproduced bit for bit, which is what saving and resuming a world relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ..geometry import Camera


@dataclass(frozen=True)
class LatentSpec:
    """Shape of a world model's latent space."""

    channels: int
    spatial_factor: int
    temporal_factor: int = 1

    def latent_camera(self, camera: Camera) -> Camera:
        """The image camera at latent resolution."""
        if camera.width % self.spatial_factor or camera.height % self.spatial_factor:
            raise ValueError(
                f"image size {camera.width}x{camera.height} is not divisible by the latent "
                f"spatial factor {self.spatial_factor}; use sides that are multiples of it"
            )
        return camera.scaled(1.0 / self.spatial_factor)

    def video_frames(self, latent_frames: int) -> int:
        """Frames decoded from ``latent_frames`` latent frames: 1 + temporal_factor * (T - 1).

        A causal video VAE (Wan's) codes the first frame alone and each further
        ``temporal_factor`` frames together; without temporal compression F = T.
        """
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        return 1 + self.temporal_factor * (latent_frames - 1)

    def frame_indices(self, latent_frames: int) -> list[int]:
        """Index of the decoded frame each latent frame's pose belongs to: 0, tf, 2 tf, ..., F - 1."""
        return [k * self.temporal_factor for k in range(latent_frames)]


@dataclass
class SegmentRequest:
    """What the world loop asks of a world model for the next segment.

    Attributes:
        poses: (B, T, 4, 4) float64 camera-to-world pose of each latent frame to generate.
        memory_latents: (B, T, C, h, w) memory projected onto those cameras (zeros where no hit).
        memory_mask: (B, T, h, w) bool hit mask of that projection.
        memory_depth: (B, T, h, w) depth of the projected memory (+inf where no hit).
        previous: the previous segment of the same worlds (for continuity), or None.
        generators: one torch.Generator per world; the only source of randomness.
        use_memory: False in ablations: the model must ignore the memory inputs.
        views: cameras per world (agents sharing it); T = views x frames per view, view-major,
            and the views' frames are simultaneous.
    """

    poses: torch.Tensor
    memory_latents: torch.Tensor
    memory_mask: torch.Tensor
    memory_depth: torch.Tensor
    generators: list[torch.Generator]
    previous: "Segment | None" = None
    use_memory: bool = True
    views: int = 1
    conditioning: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.poses.shape[0]


@dataclass
class Segment:
    """What a world model returns for one segment.

    Attributes:
        latents: (B, T, C, h, w) float32 generated latents.
        depth: (B, T, h, w) z-depth at latent resolution (+inf for sky / nothing).
        poses: (B, T, 4, 4) pose each latent frame is lifted with.
        image_depth: optional (B, T, H, W) z-depth at image resolution; when given, memory
            lifts each latent pixel to the centroid of the surface it mostly shows
            (see mirage_env.memory.lift_dominant_surface) instead of its centre ray.
        keep: optional (B, T, h, w) bool, what the model itself knows must not persist
            (e.g. a segmentation of moving objects); None = no opinion.
        frames: optional (B, T_frames, H, W, 3) uint8, filled when the model already
            decoded them (or by ``WorldModel.decode``).
        info: extra per-model tensors (e.g. ground-truth masks of the procedural world).
    """

    latents: torch.Tensor
    depth: torch.Tensor
    poses: torch.Tensor
    image_depth: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    frames: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def select(self, index) -> "Segment":
        """The sub-batch of worlds ``index`` (a list/tensor of world indices)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Segment(
            latents=self.latents[index],
            depth=self.depth[index],
            poses=self.poses[index],
            image_depth=pick(self.image_depth),
            keep=pick(self.keep),
            frames=pick(self.frames),
            info={k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in self.info.items()},
        )


@runtime_checkable
class WorldModel(Protocol):
    """A generator of posed latent video, conditioned on projected memory."""

    latent: LatentSpec
    camera: Camera  # image-resolution intrinsics of the frames it makes

    def start(
        self,
        poses: torch.Tensor,
        generators: list[torch.Generator],
        conditioning: list[dict[str, Any]] | None = None,
        worlds: list[int] | None = None,
        views: int = 1,
    ) -> Segment:
        """First segment of n new worlds seen from ``poses`` (n, T, 4, 4), ``views`` cameras each.

        ``worlds`` says which worlds of the batch restart (default: all, in order), so a
        model that keeps per-world state (a scene layout, a cached prompt embedding)
        can replace just those. ``conditioning[i]`` may carry ``image`` (HxWx3 uint8)
        and ``prompt`` (str) for the i-th of them.
        """
        ...

    def generate(self, request: SegmentRequest) -> Segment:
        """The next segment, conditioned on the projected memory."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, T, C, h, w) latents -> (B, T_frames, H, W, 3) uint8 frames."""
        ...

    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings that rebuild this model (saved with a world).

        Must hold ``"name"`` (the backend's name for mirage_env.backends.build_model).
        """
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per-world state (e.g. scene layouts) as tensors, saved with a world."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ...


@runtime_checkable
class KnowsGeometry(Protocol):
    """Optional: a world model that knows its scene's solid geometry answers collision queries.

    The envs (``mirage_env.batch.AgentBatch``) ask it about every translation, discrete
    or continuous, in any direction, before the camera moves. A model without it (Wan,
    which only generates pixels) gets the fallback: the depth the camera saw straight
    ahead in its last frame, which can only check moves towards what it sees (FORWARD,
    and continuous velocities with a positive forward part); backward, sideways and
    vertical moves go unchecked there.
    """

    def blocked(self, worlds, start, end, clearance: float) -> torch.Tensor:
        """(N,) bool: whether the scene stops camera i of world ``worlds[i]`` moving straight
        from ``start[i]`` to ``end[i]`` ((N, 3) world positions), keeping ``clearance`` metres
        from walls and objects (numpy arrays or tensors, on the host: an env passes arrays). A function
        of the model's per-world state only (no randomness), so episodes stay reproducible."""
        ...


# Optional attributes a model may define, read with getattr by the World and the envs:
#   suggested_voxel_size: float   memory voxel edge that fits the model's scene scale
#   context_frames: int           latent frames of the previous segment it wants as context
#   latent_frames: int            latent frames (poses) per view that every segment has, start
#                                 included; start/generate refuse other counts, and the envs
#                                 step with this many (AgentBatch.frames_per_step). Absent: any
#                                 count (the procedural model).
#   blocked(worlds, start, end, clearance)  collision from the scene's geometry (KnowsGeometry)
