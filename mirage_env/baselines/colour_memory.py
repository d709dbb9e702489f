"""Colour point-cloud memory: the baseline that latent memory is measured against.

This is the memory of Voyager / WonderWorld / Spatia / GEN3C-style systems, kept
behind the same ``write`` / ``read`` / ``stats`` shape as
:class:`mirage_env.memory.LatentSpatialMemory` so a benchmark can swap one for
the other:

- **write** lifts every pixel of every decoded frame, at *image* resolution, to
  a world point with its RGB colour, and *appends* it. Nothing is merged or
  evicted, as in the published systems, so the cloud grows with every frame.
- **read** renders the whole cloud to each target camera at image resolution
  (1-pixel splats, nearest point wins through a z-buffer built with one
  ``scatter_reduce`` per chunk and view, no Python loop over points), then runs
  the VAE *encoder* on the render to get conditioning latents: the "double
  bottleneck" (decode to pixels, store pixels, render pixels, encode again).
  The hit mask is the render's coverage pooled to latent resolution.

Stored per point: xyz float32 (12 bytes) and RGB uint8 (3 bytes). That is the
cheapest honest layout for a point cloud (systems that keep float colours hold
more), so the bytes reported here are a lower bound for the baseline.

Frames at the API edge follow the package convention: (T, H, W, 3), uint8 in
[0, 255] or float in [0, 1]. The encoder sees (T, 3, H, W) float in [0, 1];
wrap a VAE that expects [-1, 1] (diffusers' ``AutoencoderKLWan`` does) with
``2 * x - 1``, as :func:`mirage_env.baselines.memory_bench.wan_vae_encoder` does.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..geometry import Camera, check_pose, invert_pose, unproject
from ..memory import MemoryRead, pool_depth
from ..memory.shapes import written_pixels

__all__ = ["ColourPointCloudMemory", "ColourRender"]

Encoder = Callable[[torch.Tensor], torch.Tensor]


class ColourRender:
    """A z-buffered render of the colour cloud.

    Attributes:
        images: (T, 3, H, W) float32 in [0, 1], black where nothing was hit.
        depth: (T, H, W) float32 z-depth of the winning point, +inf where nothing was hit.
        coverage: (T, H, W) bool, True where a point landed.
    """

    def __init__(self, images: torch.Tensor, depth: torch.Tensor, coverage: torch.Tensor):
        self.images = images
        self.depth = depth
        self.coverage = coverage

    def __iter__(self):
        return iter((self.images, self.depth, self.coverage))


class ColourPointCloudMemory:
    """An append-only RGB point cloud at image resolution, re-encoded on every read.

    Args:
        encoder: callable (T, 3, H, W) float in [0, 1] -> (T_lat, C, h, w) latents.
            ``T_lat`` may equal ``T`` (a per-frame codec) or be ``1 + (T - 1) / k``
            (a causal video VAE with temporal factor k, such as Wan's k = 4). May be
            None when only :meth:`render` is used.
        max_read_depth: points farther than this from a target camera are not rendered.
        coverage_threshold: a latent pixel counts as covered (mask True) when at
            least this fraction of its image pixels were hit by the render.
        device: where every tensor lives.
    """

    def __init__(
        self,
        encoder: Encoder | None = None,
        max_read_depth: float = 1e4,
        coverage_threshold: float = 0.5,
        device: str | torch.device = "cpu",
    ):
        if not 0.0 < coverage_threshold <= 1.0:
            raise ValueError(f"coverage_threshold must be in (0, 1], got {coverage_threshold}")
        if not max_read_depth > 0:
            raise ValueError(f"max_read_depth must be positive, got {max_read_depth}")
        self.encoder = encoder
        self.max_read_depth = float(max_read_depth)
        self.coverage_threshold = float(coverage_threshold)
        self.device = torch.device(device)
        # One chunk per write: appending a chunk never copies what is already stored,
        # so write cost stays that of the new frames (the published systems' cost model).
        self._points: list[torch.Tensor] = []  # each (N_i, 3) float32
        self._colours: list[torch.Tensor] = []  # each (N_i, 3) uint8

    # ------------------------------------------------------------------ write

    @torch.no_grad()
    def write(
        self,
        frames: torch.Tensor,
        depth: torch.Tensor,
        camera: Camera,
        poses: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> int:
        """Lift every pixel of every frame to a coloured world point and append it.

        Args:
            frames: (T, H, W, 3) or (H, W, 3) uint8 in [0, 255] or float in [0, 1].
            depth: (T, H, W) or (H, W) z-depth at image resolution; +inf / <= 0 is not written.
            camera: intrinsics of the image (H, W).
            poses: (T, 4, 4) or (4, 4) camera-to-world pose of each frame.
            keep: optional (T, H, W) bool; False pixels are not written.

        Returns:
            The number of points appended.
        """
        poses = check_pose(poses, "poses")
        if poses.dim() == 2:
            poses = poses[None]
        if poses.dim() != 3:
            raise ValueError(f"poses must have shape (4,4) or (T,4,4) (one world), got {tuple(poses.shape)}")
        frames = torch.as_tensor(frames)
        if frames.dim() == 3:
            frames = frames[None]
        count = poses.shape[0]
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] != count:
            raise ValueError(
                f"frames must have shape ({count}, H, W, 3) to match poses {tuple(poses.shape)}, got {tuple(frames.shape)}"
            )
        height, width = frames.shape[1:3]
        if (camera.height, camera.width) != (height, width):
            raise ValueError(
                f"camera is {camera.width}x{camera.height} but frames are {width}x{height}; "
                f"the colour memory works at image resolution"
            )
        depth = torch.as_tensor(depth, device=self.device).to(torch.float32)
        if depth.dim() == 2:
            depth = depth[None]
        if tuple(depth.shape) != (count, height, width):
            raise ValueError(f"depth must have shape {(count, height, width)} (image resolution), got {tuple(depth.shape)}")
        if torch.isnan(depth).any():
            raise ValueError("depth contains NaN; mark missing depth as +inf (it is then not written)")
        colours = _to_uint8(frames).to(self.device)

        valid = written_pixels(depth, keep, self.device, f"shape {(count, height, width)}")
        points = unproject(depth.masked_fill(~valid, 1.0), camera, poses.to(self.device, torch.float64))
        flat = valid.reshape(-1)
        new_points = points.to(torch.float32).reshape(-1, 3)[flat].contiguous()
        new_colours = colours.reshape(-1, 3)[flat].contiguous()
        if new_points.shape[0]:
            self._points.append(new_points)
            self._colours.append(new_colours)
        return int(new_points.shape[0])

    # ------------------------------------------------------------------ read

    @torch.no_grad()
    def render(self, camera: Camera, poses: torch.Tensor) -> ColourRender:
        """Render the cloud to each target camera at image resolution.

        Each point is a 1-pixel splat; per pixel the nearest point wins (ties: the
        point stored first). The z-buffer packs (depth bits, point index) into one
        int64 so a single ``scatter_reduce(amin)`` per chunk and view finds both
        the nearest depth and its point.

        Args:
            camera: image-resolution intrinsics (H, W).
            poses: (T, 4, 4) or (4, 4) camera-to-world target poses.

        Returns:
            ColourRender with images (T, 3, H, W), depth (T, H, W), coverage (T, H, W).
        """
        poses = self._check_read_poses(poses)
        views = poses.shape[0]
        height, width = camera.height, camera.width
        pixels = height * width
        w2c = invert_pose(poses.to(self.device, torch.float64)).to(torch.float32)
        empty = torch.iinfo(torch.int64).max
        images = torch.zeros(views, 3, pixels, dtype=torch.float32, device=self.device)
        depth = torch.full((views, pixels), math.inf, dtype=torch.float32, device=self.device)
        coverage = torch.zeros(views, pixels, dtype=torch.bool, device=self.device)
        offsets = [0]
        for chunk in self._points:
            offsets.append(offsets[-1] + chunk.shape[0])
        if offsets[-1] >= 1 << 31:
            raise ValueError(f"the cloud holds {offsets[-1]} points; the packed z-buffer addresses at most 2^31")
        for view in range(views):  # a loop over target views and stored chunks, never over points
            zbuffer = torch.full((pixels,), empty, dtype=torch.int64, device=self.device)
            for start, chunk in zip(offsets, self._points):
                local = chunk @ w2c[view, :3, :3].T + w2c[view, :3, 3]
                z = local[:, 2]
                inside = (z > 1e-6) & (z <= self.max_read_depth)
                safe_z = torch.where(inside, z, torch.ones_like(z))
                column = torch.floor(camera.fx * local[:, 0] / safe_z + camera.cx)
                row = torch.floor(camera.fy * local[:, 1] / safe_z + camera.cy)
                inside &= (column >= 0) & (column < width) & (row >= 0) & (row < height)
                index = torch.nonzero(inside).flatten()
                if index.numel() == 0:
                    continue
                pixel = row[index].to(torch.int64) * width + column[index].to(torch.int64)
                # Positive float32 bit patterns order like the floats, so (depth bits << 32 | index)
                # orders by depth first, then by storage order.
                key = (z[index].contiguous().view(torch.int32).to(torch.int64) << 32) | (index + start)
                zbuffer.scatter_reduce_(0, pixel, key, reduce="amin")
            hit = torch.nonzero(zbuffer != empty).flatten()
            if hit.numel() == 0:
                continue
            winner = zbuffer[hit] & 0xFFFFFFFF
            depth[view, hit] = (zbuffer[hit] >> 32).to(torch.int32).view(torch.float32)
            coverage[view, hit] = True
            images[view][:, hit] = self._gather_colours(winner, offsets).T.to(torch.float32) / 255.0
        return ColourRender(
            images=images.reshape(views, 3, height, width),
            depth=depth.reshape(views, height, width),
            coverage=coverage.reshape(views, height, width),
        )

    def _gather_colours(self, global_index: torch.Tensor, offsets: list[int]) -> torch.Tensor:
        """(N,) indices into the concatenated cloud -> (N, 3) uint8 colours."""
        bounds = torch.tensor(offsets[1:], dtype=torch.int64, device=self.device)
        chunk_of = torch.searchsorted(bounds, global_index, right=True)
        out = torch.empty(global_index.numel(), 3, dtype=torch.uint8, device=self.device)
        for chunk_id in torch.unique(chunk_of).tolist():  # one gather per chunk that won pixels
            pick = chunk_of == chunk_id
            out[pick] = self._colours[chunk_id][global_index[pick] - offsets[chunk_id]]
        return out

    @torch.no_grad()
    def read(self, camera: Camera, poses: torch.Tensor) -> MemoryRead:
        """Render the cloud to the target cameras and re-encode the render with the VAE.

        Args:
            camera: image-resolution intrinsics (H, W); the latent grid (h, w) is what the
                encoder returns.
            poses: (T, 4, 4) or (4, 4) camera-to-world target poses, one per video frame.

        Returns:
            MemoryRead with latents (T_lat, C, h, w), mask (T_lat, h, w) and depth
            (T_lat, h, w). For a temporal VAE, latent frame j is paired with video
            frame ``j * k`` (the frame it ends on, with Wan's causal first frame at 0)
            for mask and depth.
        """
        if self.encoder is None:
            raise ValueError("this ColourPointCloudMemory has no encoder; pass encoder=... to read latents")
        render = self.render(camera, poses)
        latents = self.encoder(render.images)
        frames = render.images.shape[0]
        if latents.dim() != 4:
            raise ValueError(f"the encoder must return (T_lat, C, h, w) latents, got shape {tuple(latents.shape)}")
        latent_frames, _, h, w = latents.shape
        if camera.height % h or camera.width % w or camera.height // h != camera.width // w:
            raise ValueError(f"latent grid {h}x{w} is not an integer downscale of the {camera.height}x{camera.width} image")
        factor = camera.height // h
        if latent_frames == frames:
            frame_of_latent = torch.arange(frames)
        elif latent_frames > 1 and (frames - 1) % (latent_frames - 1) == 0:
            frame_of_latent = torch.arange(latent_frames) * ((frames - 1) // (latent_frames - 1))
        elif latent_frames == 1:
            frame_of_latent = torch.zeros(1, dtype=torch.int64)
        else:
            raise ValueError(f"the encoder turned {frames} frames into {latent_frames} latent frames; expected {frames} or 1 + (T-1)/k")
        coverage = render.coverage[frame_of_latent].to(torch.float32)
        covered = torch.nn.functional.avg_pool2d(coverage[:, None], factor)[:, 0] >= self.coverage_threshold
        depth = pool_depth(render.depth[frame_of_latent], factor)
        return MemoryRead(latents=latents.to(torch.float32), mask=covered, depth=depth.masked_fill(~covered, math.inf))

    def _check_read_poses(self, poses) -> torch.Tensor:
        poses = check_pose(poses, "poses")
        if poses.dim() == 2:
            poses = poses[None]
        if poses.dim() != 3:
            raise ValueError(f"poses must have shape (4,4) or (T,4,4) (one world), got {tuple(poses.shape)}")
        return poses

    # ------------------------------------------------------------------ inspection

    @property
    def num_points(self) -> int:
        return sum(chunk.shape[0] for chunk in self._points)

    def stats(self) -> dict:
        """Points and bytes held (every stored tensor, counted at its real size)."""
        held = self._points + self._colours
        return {
            "entries": self.num_points,
            "chunks": len(self._points),
            "bytes": int(sum(t.numel() * t.element_size() for t in held)),
            "bytes_per_point": 15,
        }

    def clear(self) -> None:
        self._points.clear()
        self._colours.clear()


def _to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(..., 3) uint8 or float in [0, 1] -> uint8."""
    if frames.dtype == torch.uint8:
        return frames
    if not frames.is_floating_point():
        raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")
    if frames.numel() and (frames.min() < 0 or frames.max() > 1):
        raise ValueError(
            f"float frames must lie in [0, 1], got values in [{float(frames.min()):.3g}, {float(frames.max()):.3g}]"
        )
    return (frames * 255.0).round().to(torch.uint8)
