"""The embedded default world model: procedural geometry, generated appearance.

Why it is long: one file because it is one class: drawing scenes, ray casting and shading all read and
write ``ProceduralWorldModel``'s per-world tensors (boxes, motion, appearance, what is in view).

It stands in for a video diffusion model, honestly:

- **Geometry is procedural and ray-cast**, so depth is exact. A scene is a set of
  axis-aligned boxes drawn from the world's generator at ``start``: indoors, a
  room (seen from inside) with pillars and crates; outdoors, a ground plane with
  buildings under a sky (+inf depth). One crate slides back and forth, so
  memory's filters have moving content to reject.
- **Appearance is generated anew for every segment**, like a video model that
  only sees its context: each surface's colour, pattern and pattern scale are
  drawn from the world's generator per segment, and only two things carry an
  appearance over: the previous segment (a surface still in view keeps its look:
  short-term continuity from the clean context frames) and memory (wherever the
  projected memory hits what stays put, the output latent *is* the memory latent;
  a surface memory shows anywhere in view takes the look memory recorded for it,
  and a box memory shows any face of takes it for all its faces, as a
  memory-conditioned model continues the style of what it is shown; a moving box
  is drawn where it is now in that look, not pasted where memory saw it). A look
  is recorded only for a surface owning a latent pixel (memory holds latent
  pixels), so a sliver's look is never recalled. So without memory a place that
  left the view looks different when the agent returns; with memory it matches.
- It works in a latent space like a real VAE (``codec.PatchDCTCodec``: 8x,
  48 channels); frames are always decoded from the latents, so what an agent
  sees is exactly what memory can store.

Everything is batched over worlds and frames: one call renders (B, T, H*W) rays
against (B, K) boxes with a handful of tensor ops.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch

from ..compiled import disable_kernels, kernel_module, kernels_enabled, parallel_kernels
from ..geometry import Camera
from .base import LatentSpec, Segment, SegmentRequest
from .codec import PatchDCTCodec
from .movers import MOVERS, PARAMETERS, draw_movers, mover_boxes

SCENES = ("indoor", "outdoor")
NUM_OBJECTS = 8  # boxes per scene besides the room / ground; the last one moves
FACES = 6
PATTERNS = 4  # plain, checker, stripes, bricks


class ProceduralWorldModel:
    """Procedural scenes with per-segment generated appearance, behind the WorldModel protocol.

    Args:
        image_size: (height, width) of generated frames, multiples of ``spatial_factor``.
        fov_degrees: horizontal field of view.
        spatial_factor: codec patch side (8 like Wan2.1's VAE).
        dct_keep: DCT coefficients kept per patch side; channels = 3 * dct_keep**2.
        scene: "indoor" (a room with pillars and crates) or "outdoor" (buildings under a sky).
        busy: indoors, three more crates move (sliding, circling, stop-and-go; see
            :mod:`.movers`) besides the sliding one.
        motion_mask: report the latent pixels this model animated (a moving box shows in
            them) as ``Segment.keep`` False, as a video model's motion segmenter would: the
            ``model_mask`` filter then keeps them out of static memory, and the object layer
            takes them as moving things. It is the generator's own motion mask standing in for
            a segmenter (with Wan a real one would be needed); nothing reads ground-truth ids
            or poses through it. Off by default: without it moving crates enter static memory
            on first sight and their stale copies are shown where depth allows.
        device: where rendering runs.
    """

    name = "procedural"
    context_frames = 1
    memory_depth_tolerance = 0.1

    def __init__(
        self,
        image_size: tuple[int, int] = (64, 64),
        fov_degrees: float = 90.0,
        spatial_factor: int = 8,
        dct_keep: int = 4,
        scene: str = "indoor",
        busy: bool = False,
        motion_mask: bool = False,
        device: str | torch.device = "cpu",
    ):
        if scene not in SCENES:
            raise ValueError(f"scene must be one of {SCENES}, got {scene!r}")
        if busy and scene != "indoor":
            raise ValueError(f"busy=True adds moving crates to the indoor scene; scene={scene!r} has none")
        self.busy = bool(busy)
        self.motion_mask = bool(motion_mask)
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.codec = PatchDCTCodec(spatial_factor, dct_keep, device=device)
        self.latent = LatentSpec(channels=self.codec.channels, spatial_factor=spatial_factor, temporal_factor=1)
        self.camera = Camera.from_fov(int(width), int(height), fov_degrees)
        self.latent.latent_camera(self.camera)  # validates divisibility with a clear error
        self.fov_degrees = float(fov_degrees)
        self.scene = scene
        self.device = torch.device(device)
        # About a third of a latent pixel's footprint at 3 m: fine enough that a
        # revisit reads back the samples it wrote, coarse enough to stay compact.
        self.suggested_voxel_size = 0.25 * 3.0 / self.latent.latent_camera(self.camera).fx * 1.5
        # Per-pixel camera-frame ray directions with z = 1, so the ray parameter is z-depth.
        v, u = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                              torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
        self._rays = torch.stack([(u - self.camera.cx) / self.camera.fx, (v - self.camera.cy) / self.camera.fy,
                                  torch.ones_like(u)], -1).reshape(-1, 3).to(self.device)
        self._ray_length = self._rays.norm(dim=-1)
        # Per-world scene state, grown as worlds are started.
        self.room_lo = torch.zeros(0, 3, device=self.device)
        self.room_hi = torch.zeros(0, 3, device=self.device)
        self.box_lo = torch.zeros(0, NUM_OBJECTS, 3, device=self.device)
        self.box_hi = torch.zeros(0, NUM_OBJECTS, 3, device=self.device)
        self.motion = torch.zeros(0, 3, device=self.device)  # amplitude, angular speed, phase of the moving crate
        self.movers = torch.zeros(0, MOVERS, PARAMETERS, dtype=torch.float64, device=self.device)  # busy scene only
        self.time = torch.zeros(0, dtype=torch.int64, device=self.device)
        # The generator's current look of every surface, the look memory recorded for it
        # (committed when the surface was last generated, since the World writes every
        # segment), and which surfaces the last segment showed.
        self.appearance = torch.zeros(0, self._surface_count(), 6, device=self.device)
        self.committed = torch.zeros(0, self._surface_count(), 6, device=self.device)
        self.in_view = torch.zeros(0, self._surface_count(), dtype=torch.bool, device=self.device)

    # ------------------------------------------------------------------ protocol

    def start(self, poses, generators, conditioning=None, worlds=None, views: int = 1) -> Segment:
        poses = self._check(poses, generators)
        n = poses.shape[0]
        worlds = list(range(n)) if worlds is None else [int(w) for w in worlds]
        if len(worlds) != n:
            raise ValueError(f"worlds lists {len(worlds)} indices for a batch of {n} poses")
        if conditioning and any(c and ("image" in c or "prompt" in c) for c in conditioning):
            raise ValueError("the procedural world model draws its scene from the seed; "
                             "reset options image/prompt need backend='wan'")
        self._grow(max(worlds) + 1)
        for world, generator in zip(worlds, generators):
            self._draw_scene(world, generator)
        return self._generate(poses, generators, worlds, memory=None, views=views)

    def generate(self, request: SegmentRequest) -> Segment:
        poses = self._check(request.poses, request.generators)
        worlds = list(range(poses.shape[0]))
        if len(worlds) > self.time.numel():
            raise RuntimeError(f"generate() for {len(worlds)} worlds but only {self.time.numel()} were started")
        memory = (request.memory_latents, request.memory_mask, request.memory_depth) if request.use_memory else None
        return self._generate(poses, request.generators, worlds, memory, views=request.views)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode_uint8(latents)

    def blocked(self, worlds, start, end, clearance: float) -> torch.Tensor:
        """Whether the scene stops cameras moving in a straight line from ``start`` to ``end``.

        The camera is the top of a vertical column standing on the floor (a body, as
        habitat's cylinder agents), and a move is blocked when the column, anywhere along
        the way, comes nearer than ``clearance`` to an object, or the camera nearer than
        ``clearance`` to a wall, the ceiling or the floor (outdoors: the ground and the
        edge of the world, 200 m out). Distances are exact (segment against box, from the
        scene's own boxes); every object stands on the floor, so an object meets the
        column at any camera height and the object test is in x and z. The moving crate
        counts where it stands in the next frame the model generates. A camera already
        nearer than ``clearance`` (a crate slid up to it) may move but not get nearer.

        Args:
            worlds: (N,) world index of each camera.
            start: (N, 3) world positions before the move.
            end: (N, 3) world positions after it.
            clearance: metres kept free around the camera.

        Returns:
            (N,) bool, True where the move is blocked.
        """
        # A few (N, K) numbers: numpy on the host costs a tenth of as many small torch ops.
        index = np.asarray(worlds, dtype=np.int64).reshape(-1)
        start = np.asarray(start, dtype=np.float64).reshape(-1, 3)
        end = np.asarray(end, dtype=np.float64).reshape(-1, 3)
        if start.shape != end.shape or start.shape[0] != index.size:
            raise ValueError(f"blocked() needs one world index and one (3,) start and end per camera, got "
                             f"{index.size} worlds, start {start.shape}, end {end.shape}")
        if index.size and (np.minimum.reduce(index) < 0 or np.maximum.reduce(index) >= self.time.numel()):
            raise ValueError(f"worlds {index.tolist()} include one that was never started "
                             f"({self.time.numel()} started)")
        if self.device.type == "cpu" and kernels_enabled("cpu"):
            blocked = self._compiled_blocked(index, start, end, clearance)
            if blocked is not None:
                return blocked
        # The room (the ground and the world's edge outdoors), seen from inside: the distance to
        # its nearest face is concave along a straight path, so its least value is at an end.
        room_lo = self.room_lo.cpu().numpy()[index].astype(np.float64)
        room_hi = self.room_hi.cpu().numpy()[index].astype(np.float64)
        # Objects: footprints in x and z, where they stand in the next frame (the moving crate moves).
        if self.device.type == "cpu":
            box_lo, box_hi = self._object_boxes_on_host(index, self._host()["time"][index][:, None])
        else:
            on_device = torch.as_tensor(index, device=self.device)
            box_lo, box_hi = (b.cpu().numpy() for b in self._object_boxes(on_device, self.time[on_device][:, None]))
        box_lo = box_lo[:, 0][..., [0, 2]].astype(np.float64)  # (N, K, 2)
        box_hi = box_hi[:, 0][..., [0, 2]].astype(np.float64)
        inside = lambda p: np.minimum(p - room_lo, room_hi - p).min(-1)  # noqa: E731
        blocked = inside(end) < np.minimum(inside(start), clearance)
        a, b = start[:, None, [0, 2]], end[:, None, [0, 2]]  # (N, 1, 2)
        near_start = _point_box_distance(a, box_lo, box_hi)
        along = _segment_box_distance(a, b, box_lo, box_hi)
        blocked |= (along < np.minimum(near_start, clearance)).any(-1)
        return torch.from_numpy(blocked)

    def _compiled_blocked(self, index, start, end, clearance) -> torch.Tensor | None:
        """``blocked`` by one kernel (boxes where they stand next, then the distances in the numpy code's
        float64 order); None where it could not be built."""
        kernels = _kernels()
        if kernels is None:
            return None
        procedural_kernels = kernels[0]
        host = self._host()
        # at each world's next frame
        sine, mover_lo, mover_hi = self._motion_on_host(procedural_kernels, host, index, 1, 1)
        out = np.empty(index.size, np.bool_)
        try:
            procedural_kernels.blocked(index, host["room_lo"], host["room_hi"], host["box_lo"], host["box_hi"],
                                       host["motion"], sine, mover_lo, mover_hi, np.ascontiguousarray(start),
                                       np.ascontiguousarray(end), float(clearance), out)
        except Exception as error:  # numba missing or broken
            disable_kernels(f"{type(error).__name__}: {error}")
            return None
        return torch.from_numpy(out)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image_size": [self.camera.height, self.camera.width],
            "fov_degrees": self.fov_degrees,
            "spatial_factor": self.codec.factor,
            "dct_keep": self.codec.keep,
            "scene": self.scene,
            **({"busy": True} if self.busy else {}),
            **({"motion_mask": True} if self.motion_mask else {}),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides) -> "ProceduralWorldModel":
        options = {k: v for k, v in config.items() if k != "name"}
        options["image_size"] = tuple(options["image_size"])
        return cls(**(options | overrides))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._state_names()}

    _STATE = ("room_lo", "room_hi", "box_lo", "box_hi", "motion", "time", "appearance", "committed", "in_view")

    def _state_names(self) -> tuple[str, ...]:
        return self._STATE + (("movers",) if self.busy else ())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self._state_names():
            if name not in state:
                raise ValueError(f"procedural world state lacks {name!r}; the saved world is incomplete")
            setattr(self, name, state[name].to(self.device).clone())

    # ------------------------------------------------------------------ scenes

    def _check(self, poses, generators) -> torch.Tensor:
        if not isinstance(poses, torch.Tensor) or poses.dtype != torch.float64:  # (a World's are already)
            poses = torch.as_tensor(poses, dtype=torch.float64)
        if len(poses.shape) != 4 or poses.shape[-2:] != (4, 4):
            raise ValueError(f"poses must have shape (B, T, 4, 4), got {tuple(poses.shape)}")
        host = poses.numpy() if poses.is_cpu and not poses.requires_grad else poses.detach().cpu().numpy()
        if not np.logical_and.reduce(np.isfinite(host), axis=None):  # the ufunc: ndarray.all has a Python wrapper
            raise ValueError("poses contain NaN or inf; camera-to-world poses must be finite")
        if len(generators) != poses.shape[0]:
            raise ValueError(f"need one generator per world: {len(generators)} for {poses.shape[0]} worlds")
        return poses

    def _grow(self, count: int) -> None:
        extra = count - self.time.numel()
        if extra <= 0:
            return
        pad = lambda t: torch.cat([t, torch.zeros((extra, *t.shape[1:]), dtype=t.dtype, device=t.device)])  # noqa: E731
        self.room_lo, self.room_hi = pad(self.room_lo), pad(self.room_hi)
        self.box_lo, self.box_hi = pad(self.box_lo), pad(self.box_hi)
        self.motion, self.time = pad(self.motion), pad(self.time)
        self.appearance, self.in_view = pad(self.appearance), pad(self.in_view)
        self.committed = pad(self.committed)
        self.movers = pad(self.movers)

    def _draw_scene(self, world: int, generator: torch.Generator) -> None:
        """A new layout for ``world``; the camera starts at the origin, 1.5 m above the floor."""
        r = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
        floor = 1.5
        if self.scene == "indoor":
            half_x, half_z = 3.0 + 3.0 * r(1).item(), 3.0 + 3.0 * r(1).item()
            ceiling = 1.3 + 1.2 * r(1).item()
            lo = torch.tensor([-half_x, -ceiling, -half_z])
            hi = torch.tensor([half_x, floor, half_z])
        else:
            lo = torch.tensor([-200.0, -1e3, -200.0])
            hi = torch.tensor([200.0, floor, 200.0])
        boxes_lo, boxes_hi = [], []
        extent = 0.8 * torch.minimum(hi[[0, 2]].abs(), lo[[0, 2]].abs()) if self.scene == "indoor" else torch.tensor([25.0, 25.0])
        for k in range(NUM_OBJECTS):
            while True:  # place objects away from the start so the first view is free
                centre = (r(2) * 2 - 1) * extent
                if centre.norm() > (1.6 if self.scene == "indoor" else 6.0):
                    break
            if self.scene == "indoor":
                pillar = k < 3
                size = torch.tensor([0.3 + 0.3 * r(1).item(), 0.0, 0.3 + 0.3 * r(1).item()]) if pillar else \
                    torch.tensor([0.4 + 0.6 * r(1).item(), 0.0, 0.4 + 0.6 * r(1).item()])
                top = lo[1] if pillar else floor - (0.4 + 0.8 * r(1).item())
            else:
                size = torch.tensor([2.0 + 4.0 * r(1).item(), 0.0, 2.0 + 4.0 * r(1).item()])
                top = floor - (3.0 + 12.0 * r(1).item())
            boxes_lo.append(torch.tensor([centre[0] - size[0] / 2, top, centre[1] - size[2] / 2]))
            boxes_hi.append(torch.tensor([centre[0] + size[0] / 2, floor, centre[1] + size[2] / 2]))
        if self.scene == "indoor":
            # The moving crate: smaller, lower, sliding along x in front of the start.
            side = 0.5
            z = 2.0 + 1.0 * r(1).item()
            boxes_lo[-1] = torch.tensor([-side / 2, floor - side, z - side / 2])
            boxes_hi[-1] = torch.tensor([side / 2, floor, z + side / 2])
        motion = torch.tensor([1.0 + 0.8 * r(1).item(), 0.15 + 0.15 * r(1).item(), 2 * math.pi * r(1).item()])
        dtype = self.room_lo.dtype
        self.room_lo[world], self.room_hi[world] = lo.to(dtype), hi.to(dtype)
        self.box_lo[world] = torch.stack(boxes_lo).to(dtype)
        self.box_hi[world] = torch.stack(boxes_hi).to(dtype)
        self.motion[world] = motion.to(dtype)
        if self.busy:  # drawn last, so the rest of the scene is the default one's
            self.movers[world] = draw_movers(lambda: r(1).item(), float(hi[0]), float(hi[2]))
        self.time[world] = 0
        self.in_view[world] = False  # nothing carries over into a new world
        # Nor the looks a previous world at this index recorded: a surface memory shows at a
        # pixel whose centre now lands on a never-seen surface would otherwise recall one,
        # and a reset world would depend on the episode before it.
        self.committed[world] = 0.5

    # ------------------------------------------------------------------ rendering

    def _generate(self, poses: torch.Tensor, generators, worlds: list[int], memory, views: int = 1) -> Segment:
        frames = poses.shape[1]
        if views < 1 or frames % views:
            raise ValueError(f"{frames} frames cannot be split among views={views} cameras per world")
        # Always draw, so every world consumes its generator the same way whatever it sees (and whichever
        # path runs: the compiled one hands these to the torch path if it cannot run).
        surfaces = self._surface_count()
        if len(generators) == 1:
            fresh = torch.rand(1, surfaces, 6, generator=generators[0])  # the same draws as (surfaces, 6)
        else:  # in place, a world's row at a time: torch.rand's bits, without N allocations and a stack
            fresh = torch.empty(len(generators), surfaces, 6)
            for row, generator in zip(fresh.unbind(0), generators):
                row.uniform_(generator=generator)
        if self.device.type != "cpu":
            fresh = fresh.to(self.device)
        if kernels_enabled(self.device) and self._compiled_inputs_fit(poses, memory):
            segment = self._generate_compiled(poses, fresh, worlds, memory, frames // views)
            if segment is not None:
                return segment
        return self._generate_torch(poses, fresh, worlds, memory, frames // views)

    def _generate_torch(self, poses: torch.Tensor, fresh, worlds: list[int], memory, frames_per_view: int) -> Segment:
        """The reference implementation (any device; the oracle of the compiled path)."""
        batch, frames = poses.shape[:2]
        height, width, f = self.camera.height, self.camera.width, self.codec.factor
        h, w, surfaces = height // f, width // f, self._surface_count()
        index = torch.tensor(worlds, device=self.device)
        # The views of a world are simultaneous: frame j of every view is at the same instant.
        time = self.time[index][:, None] + torch.arange(frames, device=self.device) % frames_per_view  # (B, T)
        depth, surface, face_axis, directions, origin = self._cast(poses.to(self.device, torch.float32), index, time)
        patches = depth.reshape(batch, frames, h, f, w, f).transpose(3, 4).reshape(batch, frames, h, w, f * f)
        latent_depth = patches.sort(dim=-1).values[..., (f * f) // 2]  # median: stays inf when mostly sky
        centre_surface = surface.reshape(batch, frames, h, f, w, f)[:, :, :, f // 2, :, f // 2]

        offsets = torch.arange(batch, device=self.device)[:, None] * surfaces
        continuing = self.in_view[index]
        # The latent pixels this model animates (any pixel on a moving box): its own motion mask.
        movers = torch.tensor(self.moving_boxes(), device=self.device)
        box_of = torch.div(surface - FACES, FACES, rounding_mode="floor")
        moving = (surface >= FACES) & torch.isin(box_of, movers)
        moving = moving.reshape(batch, frames, h, f, w, f).any(5).any(3)
        agrees = torch.zeros(batch, frames, h, w, dtype=torch.bool, device=self.device)
        if memory is not None:
            memory_latents, memory_mask, memory_depth = memory
            # Memory that contradicts the geometry in view (a crate that has since moved, a
            # sample from an oblique view of another part of the surface) is not shown: an
            # ideal model resolves such conflicts in favour of what is there now.
            agrees = memory_mask.to(self.device) & \
                ((memory_depth.to(self.device) - latent_depth).abs() <= self.memory_depth_tolerance * latent_depth)
        # Memory is reproduced exactly where it shows what stays put; what the model animates it
        # draws where it is now (in the look memory recalls below): a remembered latent of a
        # moving thing holds it where it was seen, with what stood behind it then.
        memory_used = agrees & ~moving
        shown = torch.zeros(batch * surfaces, dtype=torch.bool, device=self.device)
        shown[(centre_surface + offsets[:, :, None, None])[agrees]] = True
        shown = shown.reshape(batch, surfaces)
        # A box is one thing: memory showing any face of it shows the box, so every face recalls
        # its look (faces coming back into view, and slivers), as a model shown part of an object
        # knows the rest of it.
        whole = shown[:, FACES:FACES + NUM_OBJECTS * FACES].reshape(batch, NUM_OBJECTS, FACES).any(-1)
        shown[:, FACES:FACES + NUM_OBJECTS * FACES] |= whole.repeat_interleave(FACES, dim=1)
        committed = self.committed[index]
        # A surface memory shows takes the look memory recorded for it, also while in view: a look
        # memory never recorded (a sliver's: see below) does not hold against memory, and one it
        # recorded is the same look. Only a recorded look is recalled (not the never-written 0.5
        # of _draw_scene: fresh draws are never exactly that in all six channels); anything else
        # continues from context or is drawn anew.
        recalled = shown & (committed != 0.5).any(-1)
        appearance = torch.where(recalled[..., None], committed,
                                 torch.where(continuing[..., None], self.appearance[index], fresh))
        self.appearance[index] = appearance

        images = self._shade(directions, origin, depth, surface, face_axis, appearance)
        images = images.reshape(batch, frames, height, width, 3).permute(0, 1, 4, 2, 3)
        latents = self.codec.encode(images)  # (B, T, C, h, w)
        if memory is not None:
            latents = torch.where(memory_used[:, :, None], memory[0].to(self.device), latents)

        surface = surface.reshape(batch, frames, height, width)
        in_view = torch.zeros(batch * surfaces, dtype=torch.bool, device=self.device)
        # Every view's last frame is context for the next segment, not only the last view's.
        last_of_each_view = surface[:, frames_per_view - 1 :: frames_per_view].reshape(batch, -1)
        in_view[(last_of_each_view + offsets).reshape(-1)] = True
        self.in_view[index] = in_view.reshape(batch, surfaces)
        # What this segment shows goes to memory (the World writes every segment) with its current look,
        # but memory holds latent pixels: a surface records a look only where it owns one (the pixel's
        # centre is on it). A sliver inside another surface's latent pixel records nothing, so it cannot
        # overwrite the look memory holds for it.
        owned = torch.zeros(batch * surfaces, dtype=torch.bool, device=self.device)
        owned[(centre_surface + offsets[:, :, None, None]).reshape(-1)] = True
        self.committed[index] = torch.where(owned.reshape(batch, surfaces)[..., None], appearance, committed)
        self.time[index] += frames_per_view

        # Ground truth for evaluation only (nothing in memory reads it): which moving box each
        # latent pixel's centre shows (its index in moving_boxes(), -1: none) and where each is.
        centre_box = torch.div(centre_surface - FACES, FACES, rounding_mode="floor")
        object_ids = torch.full_like(centre_box, -1)
        for k, box in enumerate(movers.tolist()):
            object_ids[(centre_surface >= FACES) & (centre_box == box)] = k
        box_lo, box_hi = self._object_boxes(index, time)
        object_centres = 0.5 * (box_lo + box_hi)[:, :, movers]
        return Segment(
            latents=latents,
            depth=latent_depth,
            poses=poses,
            image_depth=depth.reshape(batch, frames, height, width),
            keep=~moving if self.motion_mask else None,
            frames=self.codec.decode_uint8(latents),
            info={
                "moving": moving,
                "sky": torch.isinf(latent_depth),
                "memory_used": memory_used,
                "object_ids": object_ids,
                "object_centres": object_centres,
            },
        )

    def _surface_count(self) -> int:
        return FACES + NUM_OBJECTS * FACES + 1  # room faces, object faces, sky

    # ------------------------------------------------------------------ compiled path (CPU)

    def _compiled_inputs_fit(self, poses, memory) -> bool:
        """Whether the request is on the CPU with the dtypes the kernels take (other dtypes promote in torch's
        maths, other devices are moved by the torch path)."""
        if not poses.is_cpu or poses.requires_grad:
            return False
        return memory is None or (memory[0].is_cpu and memory[1].is_cpu and memory[2].is_cpu and memory[0].dtype
                                  == memory[2].dtype == torch.float32 and memory[1].dtype == torch.bool)

    def __getstate__(self) -> dict:
        # Copies and pickles make their own host views: a copied view would not share the copied tensor's memory.
        return {name: value for name, value in self.__dict__.items() if name != "_host_cache"}

    def _host(self) -> dict[str, np.ndarray]:
        """numpy views of the per-world state and the constant tables the kernels read, rebuilt when a state
        tensor is replaced (``_grow``, ``load_state_dict``); in-place updates show through the views."""
        tensors = self._host_tensors(self)  # identities compared, C-level: this runs several times a step
        cached = getattr(self, "_host_cache", None)
        if cached is None or not all(map(operator.is_, cached[0], tensors)):
            views = {name: tensor.numpy() for name, tensor in zip(self._HOST, tensors)}
            views["rays"] = np.ascontiguousarray(self._rays.numpy().T)  # a row per axis: the kernels read rows
            views["ray_length"] = self._ray_length.numpy()
            # Per surface: whether it belongs to a moving box, and that box's index in moving_boxes() (-1: none).
            surfaces = np.arange(self._surface_count())
            box_of = (surfaces - FACES) // FACES
            movers = self.moving_boxes()
            views["object_of"] = np.array([movers.index(box) if s >= FACES and box in movers else -1
                                           for s, box in zip(surfaces, box_of)], dtype=np.int64)
            views["moving_of"] = views["object_of"] >= 0
            views["moving_boxes"] = np.array(movers, dtype=np.int64)
            views["no_movers"] = np.zeros((0, 0, 0, 3))
            views["scratch"] = {}  # the kernels' buffers that never leave the model, by shape
            views["last_sine"] = None  # _motion_on_host's last phases and their sine (the kernels only read it)
            self._host_cache = cached = (tensors, views)
        return cached[1]

    _HOST = ("room_lo", "room_hi", "box_lo", "box_hi", "motion", "time", "appearance", "committed", "in_view",
             "movers")
    _host_tensors = operator.attrgetter(*_HOST)

    def _generate_compiled(self, poses, fresh, worlds, memory, frames_per_view) -> Segment | None:
        """``_generate_torch`` as three compiled kernels with torch's exp and the codec's two products between
        them: the same bits (tests/test_compiled.py). None when the first kernel cannot run (nothing changed)."""
        kernels = _kernels()
        if kernels is None:
            return None
        procedural_kernels, codec_kernels = kernels
        batch, frames = poses.shape[:2]
        camera, codec, f = self.camera, self.codec, self.codec.factor
        h, w = camera.height // f, camera.width // f
        host = self._host()
        world = np.asarray(worlds, dtype=np.int64)
        sine, mover_lo, mover_hi = self._motion_on_host(procedural_kernels, host, world, frames, frames_per_view)
        scratch = host["scratch"]
        if memory is None:
            if scratch.get("no_memory", np.empty(0)).shape != (batch, frames, h, w):
                scratch["no_memory"] = np.zeros((batch, frames, h, w), np.bool_)
                scratch["no_memory_depth"] = np.zeros((batch, frames, h, w), np.float32)
            mask, memory_depth = scratch["no_memory"], scratch["no_memory_depth"]
        else:
            mask, memory_depth = (np.ascontiguousarray(tensor.numpy()) for tensor in memory[1:])
        parallel = parallel_kernels()
        outdoor, sky_id = self.scene == "outdoor", self._surface_count() - 1
        pose_array = np.ascontiguousarray(poses.numpy())
        try:  # numba compiles on first call (or loads its cache); a failure there means the torch path
            depth, surface, face_axis, fog_arg, latent_depth, memory_used, moving, sky, object_ids, centres = \
                procedural_kernels.front(
                    host["rays"], pose_array, world, host["room_lo"], host["room_hi"], host["box_lo"],
                    host["box_hi"], host["motion"], sine, mover_lo, mover_hi, host["moving_boxes"], outdoor, sky_id,
                    camera, f, frames_per_view, mask, memory_depth, memory is not None,
                    np.float32(self.memory_depth_tolerance), fresh.numpy(), host["appearance"], host["committed"],
                    host["in_view"], host["time"], host["moving_of"], host["object_of"], parallel, scratch)
        except Exception as error:
            disable_kernels(f"{type(error).__name__}: {error}")
            return None
        memory_used = torch.from_numpy(memory_used)
        # exp is torch's: numba's expf differs from torch's vectorised one in the last bit for ~1% of inputs.
        fog = torch.exp(torch.from_numpy(fog_arg))
        latents = torch.empty(batch, frames, codec.channels, h, w)
        try:
            if scratch.get("patches") is None or scratch["patches"].shape[0] != batch * frames:
                # torch's allocator, not numpy's, for what the codec's products read: a BLAS may round
                # differently with differently aligned memory.
                scratch["patches"] = torch.empty(batch * frames, 3, h, w, f * f)
                scratch["decode_in"] = torch.empty(batch * frames, 3, h, w, codec.keep * codec.keep)
            patches, decode_in = scratch["patches"], scratch["decode_in"]
            # Patches memory pastes are not shaded: latents_from_coefficients takes memory's latents there.
            procedural_kernels.shade(host["rays"], pose_array, world, depth, surface, face_axis, fog.numpy(),
                                     host["appearance"], host["ray_length"], outdoor, sky_id, camera.width, f,
                                     parallel, patches.numpy(), memory_used.numpy() if memory is not None else None)
            codec_kernels.latents_from_coefficients(
                (patches @ codec.basis).numpy(), memory_used.numpy(),
                np.ascontiguousarray(memory[0].numpy()) if memory is not None else latents.numpy(), memory is not None,
                latents.numpy(), decode_in.numpy(), parallel)
            images = codec_kernels.frames_from_patches((decode_in @ codec.basis.T).numpy(), f, parallel)
            images = torch.from_numpy(images.reshape(batch, frames, camera.height, camera.width, 3))
        except Exception as error:
            disable_kernels(f"{type(error).__name__}: {error}")
            latents, images = self._shade_on_torch(poses, world, depth, surface, face_axis, memory, memory_used)
        return Segment(
            latents=latents,
            depth=torch.from_numpy(latent_depth),
            poses=poses,
            image_depth=torch.from_numpy(depth.reshape(batch, frames, camera.height, camera.width)),
            keep=~torch.from_numpy(moving) if self.motion_mask else None,
            frames=images,
            info={
                "moving": torch.from_numpy(moving),
                "sky": torch.from_numpy(sky),
                "memory_used": memory_used,
                "object_ids": torch.from_numpy(object_ids),
                "object_centres": torch.from_numpy(centres),
            },
        )

    def _motion_on_host(self, kernels, host, world, frames,
                        frames_per_view) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the kernels place the moving boxes from, for (B, T) views of worlds ``world`` (B,) from
        each world's clock on (``host``: :meth:`_host`): torch's sin of the sliding crate's phase (B, T)
        (torch's sin rounds by position in the tensor, vectorised or not, so it is taken of the (B, T) array
        the torch path takes it of), and the busy scene's movers (B, T, M, 3) float64 as
        :func:`.movers.mover_boxes` places them (the kernels with torch's cos and sin between; (0, 0, 0, 3)
        arrays without movers)."""
        time, angle = kernels.phases(world, host["time"], host["motion"], frames, frames_per_view)
        # A step asks twice for the same phases (its collision check, then its segment): the last answer is kept.
        last = host["last_sine"]
        if last is not None and last[0] == angle.shape and last[1] == angle.tobytes():
            sine = last[2]
        else:
            sine = torch.sin(torch.from_numpy(angle)).numpy()
            host["last_sine"] = (angle.shape, angle.tobytes(), sine)
        if not self.busy:
            return sine, host["no_movers"], host["no_movers"]
        angle = torch.from_numpy(kernels.mover_angles(world, time, host["movers"]))
        return (sine, *kernels.mover_boxes(world, time, host["movers"], host["room_hi"], torch.cos(angle).numpy(),
                                           torch.sin(angle).numpy()))

    def _shade_on_torch(self, poses, world, depth, surface, face_axis, memory, memory_used):
        """Latents and frames from the compiled cast by the torch shading and codec (a shading or codec kernel
        failed after the cast kernel had updated the model's state)."""
        batch, frames = poses.shape[:2]
        poses32 = poses.to(torch.float32)
        directions = _rotate(poses32[..., :3, :3][:, :, None], self._rays)
        as_tensor = lambda a: torch.from_numpy(a).to(torch.int64)  # noqa: E731
        images = self._shade(directions, poses32[..., :3, 3][:, :, None], torch.from_numpy(depth), as_tensor(surface),
                             as_tensor(face_axis), self.appearance[torch.from_numpy(world)])
        images = images.reshape(batch, frames, self.camera.height, self.camera.width, 3).permute(0, 1, 4, 2, 3)
        latents = self.codec.encode(images)
        if memory is not None:
            latents = torch.where(memory_used[:, :, None], memory[0], latents)
        return latents, self.codec.decode_uint8(latents)

    def _cast(self, poses, index, time):
        """Ray-cast (B, T) cameras: z-depth, surface id and face axis per ray (B, T, P), ray directions, origins.

        Written per axis with elementwise minimum/maximum: torch's reductions over a
        trailing axis of size 3 cost several times more than the arithmetic here.
        """
        rotation, origin = poses[..., :3, :3], poses[..., :3, 3]  # (B, T, 3, 3), (B, T, 3)
        directions = _rotate(rotation[:, :, None], self._rays)  # (B, T, P, 3)
        safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
        inverse = (1.0 / safe).unbind(-1)  # 3 x (B, T, P)
        o = origin[:, :, None, :]  # (B, T, 1, 3)
        step = directions.unbind(-1)

        # The room (or the ground) is seen from inside: the exit face of its box.
        room_lo, room_hi = self.room_lo[index][:, None, None], self.room_hi[index][:, None, None]
        # The face on the side the guarded inverse points to: a direction within 1e-9 of zero (of either sign)
        # then exits ~1e9 m away, never behind the camera, where a negative depth would give NaN colours.
        exits = [(torch.where(inverse[a] > 0, room_hi[..., a], room_lo[..., a]) - o[..., a]) * inverse[a]
                 for a in range(3)]
        depth, axis = _argmin3(*exits)
        positive = _pick3(axis, *step) > 0
        surface = axis * 2 + positive.long()  # room faces 0..5
        if self.scene == "outdoor":
            ground = (axis == 1) & positive
            depth = torch.where(ground, depth, torch.full_like(depth, math.inf))
            surface = torch.where(ground, surface, torch.full_like(surface, self._surface_count() - 1))

        # Objects: slab test on the (ray, box) pairs that survive a screen-space cull.
        box_lo, box_hi = self._object_boxes(index, time)  # (B, T, K, 3)
        object_depth, which, object_axis = self._cast_objects(rotation, origin, box_lo, box_hi, inverse)
        closer = object_depth < depth
        entering_from_positive = _pick3(object_axis, *step) < 0
        object_surface = FACES + which * FACES + object_axis * 2 + entering_from_positive.long()
        depth = torch.where(closer, object_depth, depth)
        surface = torch.where(closer, object_surface, surface)
        face_axis = torch.where(closer, object_axis, axis)
        return depth, surface, face_axis, directions, o

    def _cast_objects(self, rotation, origin, box_lo, box_hi, inverse):
        """Nearest box hit per ray: depth (inf: none), box index and entered face axis, each (B, T, P).

        Most rays miss most boxes, so each box is first bounded on screen by its
        projected corners (the projection of a convex box lies inside their bounding
        rectangle; a box reaching behind the camera keeps the whole screen), and the
        slab test runs only on rays inside that rectangle plus a pixel of margin.
        """
        batch, frames, boxes = box_lo.shape[:3]
        camera, pixels = self.camera, self._rays.shape[0]
        corner_bits = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.bool,
                                   device=self.device)
        corners = torch.where(corner_bits, box_hi[:, :, :, None], box_lo[:, :, :, None])  # (B, T, K, 8, 3)
        # Camera-frame corners: the transposed rotation (world to camera) applied to each.
        local = _rotate(rotation.transpose(-1, -2)[:, :, None, None], corners - origin[:, :, None, None])
        z = local[..., 2]
        in_front = (z > 1e-2).all(-1)
        safe_z = torch.where(z > 1e-2, z, torch.ones_like(z))
        u = camera.fx * local[..., 0] / safe_z + camera.cx
        v = camera.fy * local[..., 1] / safe_z + camera.cy
        whole = ~in_front & (z > 0).any(-1)  # straddles the camera plane: keep every ray
        hidden = ~(z > 0).any(-1)  # entirely behind the camera: no ray can reach it
        inf = torch.full_like(z[..., 0], math.inf)
        u_lo = torch.where(whole, -inf, torch.where(hidden, inf, u.amin(-1) - 1.0))
        u_hi = torch.where(whole, inf, torch.where(hidden, -inf, u.amax(-1) + 1.0))
        v_lo = torch.where(whole, -inf, torch.where(hidden, inf, v.amin(-1) - 1.0))
        v_hi = torch.where(whole, inf, torch.where(hidden, -inf, v.amax(-1) + 1.0))
        columns = torch.arange(camera.width, device=self.device, dtype=torch.float32) + 0.5
        rows = torch.arange(camera.height, device=self.device, dtype=torch.float32) + 0.5
        in_columns = (columns[:, None] >= u_lo[:, :, None]) & (columns[:, None] <= u_hi[:, :, None])  # (B, T, W, K)
        in_rows = (rows[:, None] >= v_lo[:, :, None]) & (rows[:, None] <= v_hi[:, :, None])  # (B, T, H, K)
        candidate = (in_rows[:, :, :, None] & in_columns[:, :, None]).reshape(-1)
        flat = torch.nonzero(candidate).squeeze(1)
        ray = torch.div(flat, boxes, rounding_mode="floor")
        box = flat - ray * boxes
        pair = torch.div(ray, pixels, rounding_mode="floor") * boxes + box  # (view, box) index

        # Box planes relative to the camera, per (view, box): small, then gathered per axis.
        to_lo_planes = (box_lo - origin[:, :, None]).reshape(-1, 3)
        to_hi_planes = (box_hi - origin[:, :, None]).reshape(-1, 3)
        near, far = [], []
        for a in range(3):
            step_inverse = inverse[a].reshape(-1).index_select(0, ray)
            to_lo = to_lo_planes[:, a].index_select(0, pair) * step_inverse
            to_hi = to_hi_planes[:, a].index_select(0, pair) * step_inverse
            near.append(torch.minimum(to_lo, to_hi))
            far.append(torch.maximum(to_lo, to_hi))
        t_near = torch.maximum(torch.maximum(near[0], near[1]), near[2])
        t_far = torch.minimum(torch.minimum(far[0], far[1]), far[2])
        hit = (t_near <= t_far) & (t_near > 1e-4)
        ray, box, t_near = ray[hit], box[hit], t_near[hit]
        near = [n[hit] for n in near]

        rays_total = batch * frames * pixels
        object_depth = torch.full((rays_total,), math.inf, device=self.device)
        object_depth.scatter_reduce_(0, ray, t_near, reduce="amin")
        # The nearest box; among boxes at the same depth the lowest index, as torch.min picks.
        nearest = t_near == object_depth[ray]
        which = torch.full((rays_total,), boxes, dtype=torch.int64, device=self.device)
        which.scatter_reduce_(0, ray[nearest], box[nearest], reduce="amin")
        winner = nearest & (box == which[ray])
        object_axis = torch.zeros(rays_total, dtype=torch.int64, device=self.device)
        object_axis[ray[winner]] = _argmax3(near[0][winner], near[1][winner], near[2][winner])
        # Rays that hit no box keep the sentinel until here; any valid index will do, since
        # their depth is inf and the caller never picks the object surface for them.
        which = torch.where(which == boxes, torch.zeros_like(which), which)
        shape = (batch, frames, pixels)
        return object_depth.reshape(shape), which.reshape(shape), object_axis.reshape(shape)

    def _object_boxes_on_host(self, index: np.ndarray, time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``_object_boxes`` on numpy index (B,) and time (B, T) arrays (CPU): the same numbers, fewer torch ops.

        The crate's shift stays a torch computation: torch's ``sin`` (vectorised or not by
        position in the tensor) and numpy's need not round alike.
        """
        host = self._host()
        motion = host["motion"][index]  # amplitude, angular speed, phase
        angle = motion[:, 1:2] * time.astype(np.float32) + motion[:, 2:3]
        shift = motion[:, 0:1] * torch.sin(torch.from_numpy(angle)).numpy()
        lo = np.repeat(host["box_lo"][index][:, None], time.shape[1], axis=1)
        hi = np.repeat(host["box_hi"][index][:, None], time.shape[1], axis=1)
        lo[:, :, -1, 0] += shift
        hi[:, :, -1, 0] += shift
        if self.busy:  # the crates before the sliding one move too
            rows = torch.from_numpy(index)
            mover_lo, mover_hi = mover_boxes(self.movers[rows], torch.from_numpy(time), self.room_hi[rows][:, 1])
            lo[:, :, -1 - MOVERS:-1] = mover_lo.numpy().astype(lo.dtype)
            hi[:, :, -1 - MOVERS:-1] = mover_hi.numpy().astype(hi.dtype)
        return lo, hi

    def _object_boxes(self, index, time):
        lo = self.box_lo[index][:, None].expand(-1, time.shape[1], -1, -1).clone()
        hi = self.box_hi[index][:, None].expand(-1, time.shape[1], -1, -1).clone()
        amplitude, speed, phase = self.motion[index].unbind(-1)
        shift = amplitude[:, None] * torch.sin(speed[:, None] * time.float() + phase[:, None])  # (B, T)
        lo[:, :, -1, 0] += shift
        hi[:, :, -1, 0] += shift
        if self.busy:  # the crates before the sliding one move too
            mover_lo, mover_hi = mover_boxes(self.movers[index], time, self.room_hi[index][:, 1])
            lo[:, :, -1 - MOVERS:-1] = mover_lo.to(lo.dtype)
            hi[:, :, -1 - MOVERS:-1] = mover_hi.to(hi.dtype)
        return lo, hi

    def moving_boxes(self) -> list[int]:
        """Indices of the boxes that move, the ids of ground-truth ``object_ids`` (for evaluation)."""
        return [NUM_OBJECTS - 1] + (list(range(NUM_OBJECTS - 1 - MOVERS, NUM_OBJECTS - 1)) if self.busy else [])

    def _shade(self, directions, origin, depth, surface, face_axis, appearance):
        """Colour (B, T, P, 3): per-surface colour and pattern, Lambert shading and distance fog."""
        batch = directions.shape[0]
        sky_id = self._surface_count() - 1
        params = torch.gather(appearance, 1, surface.reshape(batch, -1, 1).expand(-1, -1, 6)).reshape(*surface.shape, 6)
        finite_depth = torch.where(torch.isfinite(depth), depth, torch.zeros_like(depth))
        point = origin + directions * finite_depth[..., None]
        # Surface coordinates: the two world axes across the hit face.
        u = torch.where(face_axis == 0, point[..., 2], point[..., 0])
        v = torch.where(face_axis == 1, point[..., 2], point[..., 1])
        scale = 1.0 + 3.0 * params[..., 3]
        pattern_kind = (params[..., 4] * PATTERNS).long()
        su, sv = u * scale, v * scale
        checker = ((torch.floor(su) + torch.floor(sv)) % 2)
        stripes = (torch.floor(su + sv) % 2)
        bricks = ((torch.frac(sv) < 0.12) | (torch.frac(su + 0.5 * (torch.floor(sv) % 2)) < 0.08)).float()
        pattern = torch.where(pattern_kind == 1, checker, torch.where(pattern_kind == 2, stripes,
                              torch.where(pattern_kind == 3, 1.0 - bricks, torch.ones_like(checker))))
        base = 0.2 + 0.75 * params[..., :3]
        accent = 0.55 + 0.35 * params[..., 5:6]
        colour = base * (accent + (1 - accent) * pattern[..., None])
        normal_light = torch.tensor([0.45, 0.75, 0.5], device=self.device)[face_axis]
        colour = colour * (0.45 + 0.55 * normal_light[..., None])
        fog = torch.exp(-finite_depth / 25.0)[..., None]
        colour = colour * fog + 0.6 * (1 - fog)
        if self.scene != "outdoor":  # rooms have no sky
            return colour.clamp(0, 1)
        # Sky: a gradient between two generated colours by elevation (-y is up).
        # Rotation keeps lengths, so the camera-frame ray lengths serve every pose.
        elevation = (-directions[..., 1] / self._ray_length).clamp(-1, 1)[..., None]
        sky_top, sky_horizon = appearance[:, sky_id, :3], appearance[:, sky_id, 3:6]
        sky_top = (0.15 + 0.5 * sky_top)[:, None, None] * torch.tensor([0.5, 0.7, 1.0], device=self.device)
        sky_horizon = (0.6 + 0.4 * sky_horizon)[:, None, None]
        sky = sky_horizon + (sky_top - sky_horizon) * elevation.clamp(0, 1)
        is_sky = (surface == sky_id)[..., None]
        return torch.where(is_sky, sky, colour).clamp(0, 1)


def _kernels() -> tuple | None:
    """(procedural_kernels, codec_kernels); None where numba cannot load them (the torch path runs)."""
    procedural_kernels = kernel_module(f"{__package__}.procedural_kernels")
    codec_kernels = kernel_module(f"{__package__}.codec_kernels")
    return None if procedural_kernels is None or codec_kernels is None else (procedural_kernels, codec_kernels)


def _rotate(rotation: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``rotation @ vector`` for (..., 3, 3) rotations and (..., 3) vectors (broadcast), elementwise.

    Not einsum or matmul: those dispatch to kernels whose rounding depends on how many
    matrices are in the batch, and world i of a batch must render exactly what a batch of
    one renders. Each output is ``(r0 * x + r1 * y) + r2 * z`` in float arithmetic, always.
    """
    x, y, z = vectors[..., 0, None], vectors[..., 1, None], vectors[..., 2, None]
    return rotation[..., 0] * x + rotation[..., 1] * y + rotation[..., 2] * z


def _argmin3(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min of three tensors and which one (the first on ties, as torch.min)."""
    yz = torch.minimum(y, z)
    which = torch.where(x <= yz, 0, torch.where(y <= z, 1, 2))
    return torch.minimum(x, yz), which


def _argmax3(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Which of three tensors is largest, elementwise (the first on ties, as torch.max)."""
    return torch.where(x >= torch.maximum(y, z), 0, torch.where(y >= z, 1, 2))


def _pick3(which: torch.Tensor, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.where(which == 0, x, torch.where(which == 1, y, z))


def _point_box_distance(point: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Euclidean distance from points (..., D) to axis-aligned boxes [lo, hi] (..., D); 0 inside."""
    return np.linalg.norm(np.maximum(np.maximum(lo - point, point - hi), 0.0), axis=-1)


def _segment_box_distance(a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Least distance between segments a-b and axis-aligned rectangles [lo, hi], all (..., 2); 0 where they meet.

    Two convex sets that do not meet are nearest at a vertex of one of them: an end of
    the segment to the rectangle, or a corner of the rectangle to the segment.
    """
    a, b, lo, hi = np.broadcast_arrays(a, b, lo, hi)
    direction = b - a
    # Slab test: the part of the segment (parameter in [0, 1]) inside each axis' slab.
    still = np.abs(direction) < 1e-12
    safe = np.where(still, 1.0, direction)
    t1, t2 = (lo - a) / safe, (hi - a) / safe
    within = (a >= lo) & (a <= hi)
    enter = np.where(still, np.where(within, -np.inf, np.inf), np.minimum(t1, t2)).max(-1)
    leave = np.where(still, np.where(within, np.inf, -np.inf), np.maximum(t1, t2)).min(-1)
    meets = np.maximum(enter, 0.0) <= np.minimum(leave, 1.0)
    distance = np.minimum(_point_box_distance(a, lo, hi), _point_box_distance(b, lo, hi))
    length2 = (direction * direction).sum(-1)
    for corner in (lo, hi, np.stack([lo[..., 0], hi[..., 1]], -1), np.stack([hi[..., 0], lo[..., 1]], -1)):
        t = ((corner - a) * direction).sum(-1) / np.where(length2 > 0, length2, 1.0)
        nearest = a + np.clip(t, 0.0, 1.0)[..., None] * direction
        distance = np.minimum(distance, np.linalg.norm(corner - nearest, axis=-1))
    return np.where(meets, 0.0, distance)
