"""LatentSpatialMemory: the facade that composes the memory's parts (see the package docstring).

The brick index (:mod:`.index`, with :mod:`.chunks`) says where entries are, the entry
pool (:mod:`.pool`) holds them, the write clocks (:mod:`.horizon`) age them; :mod:`.lift`,
:mod:`.merge`, :mod:`.raster` and :mod:`.fileformat` are the steps of a write, a read and
a save. This module holds the order of those steps and the checks at the edge.
It is long because it stays one file: one class whose methods are the memory's public
surface, with the compiled-kernel and torch paths of a read and a write side by side
(the torch path is the kernels' test oracle, so the two are read together).
"""

from __future__ import annotations

import math
import operator
import os
from typing import NamedTuple

import numpy as np
import torch

from ..compiled import disable_kernels, kernel_module, kernels_enabled, parallel_kernels
from ..geometry import Camera, invert_pose, unproject
from .fileformat import (
    FORMAT_VERSION,
    OBJECTS_PREFIX,
    StateCheck,
    checked_memory_tensors,
    config_from_file,
    load_state,
    memory_tensors,
    restore_memory,
    save_state,
)
from .horizon import WriteClock, check_horizon
from .index import BrickIndex, Released
from .keys import WORLD_BITS
from .lift import DOMINANT_SURFACE_TOLERANCE, depth_grid, lift_latent_depth
from .merge import MERGE_POLICIES, accepts, nearest_per_voxel
from .objects import ObjectLayer, object_layer_options
from .pool import EntryPool
from .raster import prefer_at_pixels, project_to_pixels, zbuffer
from .shapes import (
    MemoryRead,
    as_batch,
    check_worlds,
    keep_mask,
    kernel_poses,
    written_pixels,
)

# Integer dtypes of each element size: the kernels copy features as bits, whatever their float dtype.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
# The write kernels' "features to convert, not bits": empty, of the bits' dtype of each size.
_NO_FEATURES = {size: np.zeros((0, 0, 0), dtype) for size, dtype in _NUMPY_BITS.items()}

def _write_modules():
    """(lift_kernels, write_kernels); None where numba cannot load them (the torch path runs)."""
    lift_kernels = kernel_module(f"{__package__}.lift_kernels")
    write_kernels = kernel_module(f"{__package__}.write_kernels")
    return None if lift_kernels is None or write_kernels is None else (lift_kernels, write_kernels)


_NAN_DEPTH = "depth contains NaN; mark missing depth as +inf (it is then not written)"


# What __getstate__ leaves out: numpy views of storage tensors and scratch (see _drop_kernel_caches).
_KERNEL_CACHES = ("_views", "_free_view", "_read_scratch", "_write_scratch")


class _Storage(NamedTuple):
    """Numpy views of the storage tensors the kernels take (features as integers of their size)."""

    table_keys: np.ndarray
    table_values: np.ndarray
    entry_of: np.ndarray
    occupancy: np.ndarray
    brick_last_write: np.ndarray
    brick_keys: np.ndarray
    chunk_keys: np.ndarray
    members: np.ndarray
    member_bits: np.ndarray
    entries_per_world: np.ndarray
    features: np.ndarray
    points: np.ndarray
    depth: np.ndarray
    origins: np.ndarray
    last_write: np.ndarray
    ticks: np.ndarray


# Fewer bricks than this cannot hold what one segment of a small frame writes, so a bound
# below it would be overshot on every write (bricks a write uses are never evicted by it).
MIN_BRICKS_PER_WORLD = 64


class LatentSpatialMemory:
    """A persistent store of latent features pinned to world points.

    Args:
        channels: C, the latent channels of the world model.
        voxel_size: edge of a voxel in world units; one entry per voxel.
        num_worlds: independent worlds stored side by side (a batch of envs).
        brick_size: voxels per brick side.
        chunk_size: bricks per chunk side; a read culls chunks, then the bricks of visible ones.
        max_bricks_per_world: capacity bound per world (LRU eviction beyond it).
        merge: "first", "latest" or "closest" (see :mod:`mirage_env.memory.merge`).
        closest_tolerance: with ``merge="closest"``, a new entry replaces a stored one when
            observed from at most ``1 + closest_tolerance`` times its depth.
        feature_dtype: storage dtype of features (fp16 by default).
        max_read_depth: entries farther than this from a camera are not read.
        surface_tolerance: relative depth band treated as one surface in the z-buffer.
        revisit_radius: entries written from within this distance of a reading camera are
            preferred at the pixels they reach (default: half a voxel, "the same place" at
            the memory's resolution; 0: plain z-buffer).
        horizon: K, read only what the last K writes of a world wrote or saw (an ablation:
            short-term memory only); None (default): full memory. See :mod:`mirage_env.memory.horizon`.
        objects: keep moving things in an object layer beside the static index (True; a dict
            of options: see :mod:`mirage_env.memory.objects`); False (default, an ablation
            switch until it never costs the static revisit figure anything): no layer.
        device: where every tensor lives.
    """

    def __init__(
        self,
        channels: int,
        voxel_size: float = 0.1,
        num_worlds: int = 1,
        brick_size: int = 4,
        chunk_size: int = 8,
        max_bricks_per_world: int = 1 << 16,
        merge: str = "first",
        closest_tolerance: float = 0.1,
        feature_dtype: torch.dtype = torch.float16,
        max_read_depth: float = 1e4,
        surface_tolerance: float = 0.05,
        revisit_radius: float | None = None,
        horizon: int | None = None,
        objects: bool | dict = False,
        device: str | torch.device = "cpu",
    ):
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        if not voxel_size > 0 or not math.isfinite(voxel_size):
            raise ValueError(f"voxel_size must be a positive number, got {voxel_size}")
        if merge not in MERGE_POLICIES:
            raise ValueError(f"merge must be one of {MERGE_POLICIES}, got {merge!r}")
        if num_worlds < 1 or num_worlds >= (1 << WORLD_BITS):
            raise ValueError(f"num_worlds must be in [1, {1 << WORLD_BITS}), got {num_worlds}")
        if brick_size < 1:
            raise ValueError(f"brick_size must be >= 1, got {brick_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.channels = channels
        self.voxel_size = float(voxel_size)
        self.num_worlds = num_worlds
        self.brick_size = brick_size
        self.chunk_size = chunk_size
        if isinstance(max_bricks_per_world, bool) or int(max_bricks_per_world) != max_bricks_per_world \
                or max_bricks_per_world < MIN_BRICKS_PER_WORLD:
            raise ValueError(f"max_bricks_per_world must be an integer >= {MIN_BRICKS_PER_WORLD} (one write alone can "
                             f"touch that many bricks, and they are never evicted mid-write), got {max_bricks_per_world!r}")
        self.max_bricks_per_world = int(max_bricks_per_world)
        self.merge = merge
        self.closest_tolerance = float(closest_tolerance)
        self.feature_dtype = feature_dtype
        self.max_read_depth = float(max_read_depth)
        self.surface_tolerance = float(surface_tolerance)
        self.revisit_radius = float(0.5 * self.voxel_size if revisit_radius is None else revisit_radius)
        if not self.revisit_radius >= 0:
            raise ValueError(f"revisit_radius must be >= 0 (0 turns the preference off), got {revisit_radius}")
        self.horizon = check_horizon(horizon)
        self.device = torch.device(device)
        self._object_options = object_layer_options(objects)
        self._allocate(bricks=64)

    def _allocate(self, bricks: int, entries: int | None = None) -> None:
        """Empty parts with room for ``bricks`` bricks and ``entries`` entries (default: a quarter of their voxels)."""
        self._index = BrickIndex(self.voxel_size, self.brick_size, self.chunk_size, self.num_worlds,
                                 self.max_bricks_per_world, self.device, capacity=bricks)
        if entries is None:
            entries = bricks * self.brick_size**3 // 4
        self._pool = EntryPool(self.channels, self.feature_dtype, self.num_worlds, self.device, capacity=entries)
        self._clock = WriteClock(self.num_worlds, self.device)
        # For the compiled kernels: numpy views of storage (see _storage), scratch and constants.
        self._drop_kernel_caches()
        self._every_world = np.arange(self.num_worlds, dtype=np.int64)
        self._gained = np.zeros(self.num_worlds, np.int64)  # see entries_gained
        self._keep_all = np.zeros(0, np.bool_)  # the kernels' "no keep mask"
        self._none_lifted = np.zeros((0, 3), np.float64)  # the write kernel's "unproject along centre rays"
        # The world loop feeds it (World._remember) and composes its reads (World.step).
        self.objects = None if self._object_options is None else ObjectLayer(
            self.channels, self.num_worlds, self.voxel_size, self.feature_dtype, self.device, **self._object_options)

    def _return_to_pool(self, released: Released | None) -> None:
        if released is not None:
            self._pool.release(*released)

    @property
    def entries_in_use(self) -> int:
        """High-water mark of the entry pool (entries stored plus freed ones awaiting reuse)."""
        return self._pool.in_use

    @property
    def entry_last_write(self) -> torch.Tensor:
        """(pool capacity,) int32 write clock of each entry's world at the last write that observed it."""
        return self._pool.last_write

    # ------------------------------------------------------------------ write

    def write(
        self,
        latents: torch.Tensor,
        depth: torch.Tensor,
        camera: Camera,
        poses: torch.Tensor,
        keep: torch.Tensor | None = None,
        worlds=None,
        seen: torch.Tensor | None = None,
        median_hint: torch.Tensor | None = None,
    ) -> int:
        """Lift every latent pixel to a world point and store its feature.

        Args:
            latents: (C, h, w), (T, C, h, w) or (B, T, C, h, w) features.
            depth: z-depth (matching leading shape), at latent resolution (h, w), each pixel
                lifted along its centre ray; or at image resolution (H, W) = (h, w) * f, each
                latent pixel then lifted through one of its f x f image pixels, at that pixel's
                depth: of those within 5% of the patch's median depth (its dominant surface), the
                one nearest their centroid (see :func:`~mirage_env.memory.lift_dominant_surface`).
            camera: intrinsics of the *latent* grid (``camera.scaled(1/f)``) or of the image
                (either is scaled to the resolution of ``depth``).
            poses: camera-to-world pose of each latent frame, (4,4), (T,4,4) or (B,T,4,4).
            keep: optional bool mask at latent resolution; False entries are not written.
            worlds: which worlds of the memory the batch addresses (default: all, in order).
            seen: optional world points (..., 3), leading shape that of ``poses``, NaN where
                none: entries memory showed the generator for this segment (typically
                ``MemoryRead.points`` of the read that conditioned it). Their voxels count
                as observed by this write, so under a horizon what stays in view stays
                remembered though it is not written back.
            median_hint: optional, with image-resolution ``depth``: what the caller believes each
                patch's median depth is, at latent resolution (a world model's own latent depth,
                pooled the same way). Only speed depends on it: the compiled lift uses a value
                only where its rank in the patch proves it is the median.

        Returns:
            The number of entries written (after filtering).

        Every world in ``worlds`` advances its write clock by one, even if nothing is written;
        with a horizon, entries of those worlds that none of their last ``horizon`` writes
        observed are freed before the new entries are merged.
        """
        # The kernels skip what only a horizon needs (observation stamps of ``seen``, expiry).
        if self.horizon is None and seen is None and kernels_enabled(self.device):
            written = self._compiled_write(latents, depth, camera, poses, keep, worlds, median_hint)
            if written is not None:
                return written
        poses, lead = as_batch(poses)
        batch, frames = poses.shape[:2]
        if tuple(latents.shape[: len(lead)]) != lead or latents.dim() != len(lead) + 3:
            raise ValueError(
                f"latents must have shape {(*lead, 'C', 'h', 'w')} to match poses {tuple(poses.shape)}, "
                f"got {tuple(latents.shape)}"
            )
        latents = latents.reshape(batch, frames, *latents.shape[-3:])
        if latents.shape[2] != self.channels:
            raise ValueError(f"latents have {latents.shape[2]} channels, this memory stores {self.channels}")
        with torch.no_grad():
            before = self._pool.entries_per_world.clone()
            written = self._torch_write(latents, torch.as_tensor(depth, device=self.device), camera, poses, lead,
                                        keep, worlds, seen)
            self._gained = (self._pool.entries_per_world - before).cpu().numpy()
            return written

    def _torch_write(self, latents, depth, camera, poses, lead, keep, worlds, seen) -> int:
        """The write in torch ops (any device, any options; the oracle of :mod:`.write_kernels`)."""
        batch, frames, _, h, w = latents.shape
        depth = depth.reshape(batch, frames, *depth.shape[-2:]).to(torch.float32)
        if torch.isnan(depth).any():
            raise ValueError(_NAN_DEPTH)
        c2w = poses.to(self.device, torch.float64)
        depth, all_points, camera = lift_latent_depth(depth, camera, c2w, (h, w))
        world_index = check_worlds(worlds, batch, self.num_worlds, self.device)
        valid = written_pixels(depth, keep, self.device, f"the latent grid {(batch, frames, h, w)}")
        if seen is not None:
            seen = torch.as_tensor(seen, device=self.device)
            if tuple(seen.shape[: len(lead)]) != lead or seen.dim() < len(lead) + 1 or seen.shape[-1] != 3:
                raise ValueError(f"seen must have shape {(*lead, '...', 3)} (world points, NaN where none) to match "
                                 f"poses {tuple(poses.shape)}, got {tuple(seen.shape)}")
            seen = seen.reshape(batch, -1, 3).to(torch.float32)
        index = torch.nonzero(valid.reshape(-1)).flatten()
        self._index.step += 1
        touched = torch.zeros(self.num_worlds, dtype=torch.bool, device=self.device)
        touched[world_index] = True
        self._clock.advance(touched)
        if seen is not None:
            self._clock.observe_again(self._index, self._pool, seen.reshape(-1, 3),
                                      world_index.repeat_interleave(seen.shape[1]))
        if index.numel() == 0:
            self._index.release_if_empty(self._clock.expire(self._index, self._pool, self.horizon, touched))
            return 0

        if all_points is None:  # depth at latent resolution: lift along each pixel's centre ray
            all_points = unproject(depth.masked_fill(~valid, 1.0), camera, c2w)
        points = all_points.to(torch.float32).reshape(-1, 3)[index]
        features = latents.permute(0, 1, 3, 4, 2).reshape(-1, self.channels)[index.to(latents.device)].to(self.device)
        observed = depth.reshape(-1)[index]
        origins = c2w[..., :3, 3].to(torch.float32)[:, :, None].expand(batch, frames, h * w, 3).reshape(-1, 3)[index]
        entry_world = world_index.repeat_interleave(frames * h * w)[index]
        entry_frame = torch.arange(frames, device=self.device).repeat_interleave(h * w).repeat(batch)[index]

        keys, local_index = self._index.address(points, entry_world)
        slots, released = self._index.slots_for(keys)
        self._return_to_pool(released)
        voxels_per_brick = self._index.voxels_per_brick
        winners = nearest_per_voxel(slots * voxels_per_brick + local_index, observed, entry_frame)
        brick_slot, voxel_slot = slots[winners], local_index[winners]
        entry = self._index.entry_of[brick_slot, voxel_slot].long()
        was_occupied = entry >= 0
        clock = self._clock.now(entry_world[winners])
        # A stored entry whose voxel this write observed again was seen now, whatever the merge keeps;
        # so expiry below never frees an entry this write hits, and ``entry`` stays valid.
        self._pool.last_write[entry[was_occupied]] = clock[was_occupied]
        emptied = self._clock.expire(self._index, self._pool, self.horizon, touched)
        stored_depth = self._pool.observed_depth[entry.clamp_min(0)]
        accept = accepts(self.merge, was_occupied, observed[winners], stored_depth, self.closest_tolerance)
        winners, brick_slot, voxel_slot = winners[accept], brick_slot[accept], voxel_slot[accept]
        entry, new, clock = entry[accept], ~was_occupied[accept], clock[accept]
        entry[new] = self._pool.take(entry_world[winners][new])
        self._index.entry_of[brick_slot[new], voxel_slot[new]] = entry[new].to(torch.int32)
        self._index.refresh_occupancy(brick_slot[new])
        self._pool.store(entry, features[winners], points[winners], observed[winners], origins[winners], clock)
        self._index.mark_written(slots)
        self._index.release_if_empty(emptied)
        return int(winners.numel())

    def _compiled_write(self, latents, depth, camera, poses, keep, worlds, median_hint=None) -> int | None:
        """The write by :mod:`.write_kernels` (and :mod:`.lift_kernels` for image-resolution depth): the same
        memory, bit for bit, as the torch path. None, before anything changed: the kernels could not be
        built, or the arguments are not the plain CPU ones they take (the torch path then checks them,
        raises its errors, or writes).

        A 64x64 env's write is ~10 us of kernels, so the Python around them is kept to what each call
        must do: storage views and scratch are cached (:meth:`_storage`, :class:`~.write_kernels.WriteScratch`),
        tensors are tested with ``is_cpu`` (``device.type`` builds a device object), float constants go to
        the kernels as Python floats (a numpy scalar argument costs numba 0.7 us to type).
        """
        kernels = _write_modules()
        intake = None if kernels is None else kernel_poses(poses)
        if intake is None or not isinstance(latents, torch.Tensor) or not latents.is_cpu:
            return None
        lift_kernels, write_kernels = kernels
        c2w, lead, batch, frames = intake
        shape = latents.shape
        if len(shape) != len(lead) + 3 or shape[: len(lead)] != lead or shape[-3] != self.channels:
            return None
        views, h, w = batch * frames, shape[-2], shape[-1]
        if isinstance(depth, torch.Tensor):
            if depth.dtype != torch.float32 or not depth.is_cpu or depth.requires_grad:
                return None
            depth = depth.numpy()
        if not isinstance(depth, np.ndarray) or depth.dtype != np.float32 or depth.ndim < 2 \
                or depth.size != views * depth.shape[-2] * depth.shape[-1]:
            return None
        given = np.ascontiguousarray(depth).reshape(views, depth.shape[-2], depth.shape[-1])
        if camera is not self._write_camera[0] or given.shape[1:] != self._write_camera[1]:
            lifted_camera, factor = depth_grid(given.shape[1:], camera, (h, w))
            intrinsics = [lifted_camera.fx, lifted_camera.fy, lifted_camera.cx, lifted_camera.cy]
            self._write_camera = (camera, given.shape[1:], factor, np.array(intrinsics, np.float32),
                                  np.array(intrinsics, np.float64))
        _, _, factor, intrinsics, lift_intrinsics = self._write_camera
        if worlds is None and batch == self.num_worlds:
            world_index = self._every_world
        else:
            world_index = check_worlds(worlds, batch, self.num_worlds, self.device).numpy()
        pixels = views * h * w
        if keep is None:
            keep = self._keep_all
        elif isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.is_cpu and keep.numel() == pixels:
            keep = keep.numpy().reshape(-1)  # (anything else: keep_mask converts it, or raises its error)
        else:
            keep = keep_mask(keep, pixels, self.device, f"the latent grid {(batch, frames, h, w)}").reshape(-1).numpy()
        pool, index = self._pool, self._index
        latents = latents.detach() if latents.requires_grad else latents
        if latents.dtype == torch.float32 and pool.features.dtype == torch.float16:
            # The kernel converts what it stores, as torch would (a torch conversion of every latent cost
            # more than the whole write kernel); it hands a NaN back, for torch to convert (see below).
            features = _NO_FEATURES[2]
            latents32 = (latents if latents.is_contiguous() else latents.contiguous()).numpy().view(np.uint32)
            latents32 = latents32.reshape(views, self.channels, h * w)
        else:
            features, latents32 = self._pool_bits(latents, views, h, w), write_kernels.NO_LATENTS32
        scratch = self._write_scratch
        if scratch is None or scratch.shape != (views, h, w):
            scratch = self._write_scratch = write_kernels.WriteScratch(views, h, w, self.num_worlds)
        policy, closest = write_kernels.POLICY[self.merge], 1 + self.closest_tolerance
        store = self._storage()
        try:  # numba compiles on first call (or loads its cache); a failure there means the torch path
            if factor == 1:
                latent_depth, lifted = given, self._none_lifted
            else:  # (NaN depth is refused by the write kernel before it changes anything; the lift only reads)
                hint = None
                if isinstance(median_hint, torch.Tensor) and median_hint.dtype == torch.float32 \
                        and median_hint.is_cpu and median_hint.numel() == pixels:
                    hint = (median_hint.detach() if median_hint.requires_grad else median_hint).numpy()
                    hint = np.ascontiguousarray(hint).reshape(views, h, w)
                latent_depth, lifted = scratch.latent_depth, scratch.lifted
                # Only the pixels this write keeps are lifted: the write reads no other (a write of the
                # default env's 64 worlds keep 6.5% of them, the rest memory already holds or the filters drop).
                lift_kernels.lift_into(given, c2w, lift_intrinsics, factor, DOMINANT_SURFACE_TOLERANCE,
                                       parallel_kernels(), hint, lifted, latent_depth, keep=keep)
                lifted = lifted.reshape(-1, 3)
            status, count, written, taken, fresh = write_kernels.write(
                given.reshape(-1), latent_depth, keep, lifted, c2w, intrinsics, frames, world_index,
                self.voxel_size, self.brick_size, store.table_keys, store.table_values, index.table.mask,
                store.ticks, index.step + 1, store.entry_of, store.occupancy, store.brick_last_write, policy, closest,
                self._free_entries(), pool.in_use, pool.capacity, store.entries_per_world, features, latents32,
                store.features, store.points, store.depth, store.origins, store.last_write, scratch.pixel,
                scratch.keys, scratch.local, scratch.slot, scratch.points, scratch.origins, scratch.gained)
        except ValueError:
            raise
        except Exception as error:  # it failed to compile, before changing anything
            disable_kernels(f"{type(error).__name__}: {error}")
            return None
        if status == write_kernels.HAS_NAN:
            raise ValueError(_NAN_DEPTH)
        # From here the write happens (as the torch path, a point out of range fails after the clocks moved).
        index.step += 1
        if status == write_kernels.OUT_OF_RANGE:
            raise index.out_of_range()
        if status != write_kernels.FOUND:
            pixel, local, slot = scratch.pixel[:count], scratch.local[:count], scratch.slot[:count]
            if status == write_kernels.MISSING:  # new bricks (and eviction to make room): the torch allocation
                slots, released = index.slots_for(torch.from_numpy(scratch.keys[:count]))
                self._return_to_pool(released)
                slot = slots.numpy()
            observed = latent_depth.reshape(-1)
            while True:
                if status == write_kernels.SHORT:
                    pool.reserve(fresh)  # grown exactly as EntryPool.take would; nothing was changed yet
                elif status == write_kernels.NAN_FEATURE:  # torch converts (NaN payloads as the torch path has them)
                    features, latents32 = self._pool_bits(latents, views, h, w), write_kernels.NO_LATENTS32
                store = self._storage()  # (allocation and growth replace storage tensors)
                try:
                    written, taken, fresh = write_kernels.merge_and_store(
                        pixel, slot, local, observed, frames * h * w, frames, h * w, world_index, store.ticks,
                        store.entry_of, store.occupancy, store.brick_last_write, index.step, policy, closest,
                        self._free_entries(), pool.in_use, pool.capacity, store.entries_per_world, features,
                        latents32, scratch.points, scratch.origins, store.features, store.points, store.depth,
                        store.origins, store.last_write)
                except Exception as error:  # it failed to compile, before changing anything: undo the clocks
                    index.step -= 1
                    store.ticks[np.unique(world_index)] -= 1
                    disable_kernels(f"{type(error).__name__}: {error}")
                    return None  # (bricks allocated above are the ones the torch path's write allocates)
                if written >= 0:
                    break
                status = write_kernels.SHORT if written == -1 else write_kernels.NAN_FEATURE
        if status == write_kernels.FOUND:
            self._gained[:] = scratch.gained
        else:  # (the kernel left the entries before the write there)
            np.subtract(pool.entries_per_world.numpy(), scratch.gained, out=self._gained)
        if taken:
            pool.free = pool.free[taken:]
        pool.in_use += fresh
        return int(written)

    def _pool_bits(self, latents: torch.Tensor, views: int, h: int, w: int) -> np.ndarray:
        """(views, C, h*w) ``latents`` in the pool's dtype by torch's conversion (its rounding is the torch
        path's), as integers of that size: the kernels copy the bits."""
        features = latents.to(self._pool.features.dtype).contiguous()
        bits = features.view(_BITS[features.element_size()]).numpy() if features.dtype == torch.bfloat16 else \
            features.numpy().view(_NUMPY_BITS[features.element_size()])
        return bits.reshape(views, self.channels, h * w)

    def clear(self, worlds=None) -> None:
        """Forget everything stored for ``worlds`` (default: all worlds)."""
        if worlds is None:
            self._allocate(bricks=self._index.capacity)
            return
        worlds = torch.as_tensor(worlds, dtype=torch.int64, device=self.device).reshape(-1)
        worlds = check_worlds(worlds, worlds.numel(), self.num_worlds, self.device)
        of_world = torch.zeros(self.num_worlds, dtype=torch.bool, device=self.device)
        of_world[worlds] = True
        self._return_to_pool(self._index.release(self._index.live_slots(of_world)))
        self._clock.ticks[worlds] = 0
        if self.objects is not None:
            self.objects.clear(worlds)

    # ------------------------------------------------------------------ read

    def read(self, camera: Camera, poses: torch.Tensor, worlds=None) -> MemoryRead:
        """Project the memory onto target cameras at latent resolution.

        Args:
            camera: intrinsics of the latent grid (h, w).
            poses: (4,4), (T,4,4) or (B,T,4,4) camera-to-world target poses.
            worlds: which worlds of the memory the batch addresses (default: all, in order).

        Returns:
            MemoryRead with latents (..., C, h, w), mask (..., h, w), depth (..., h, w) and
            points (..., h, w, 3); the leading shape is that of ``poses``. With a horizon,
            only what the last ``horizon`` writes of each world wrote or saw is left to read.
        """
        h, w = camera.height, camera.width
        intake = kernel_poses(poses) if kernels_enabled(self.device) else None
        compiled = None if intake is None else self._compiled_read(camera, intake[0], intake[2], intake[3], worlds)
        if compiled is not None:
            latents, mask, depth, points = compiled
            lead = intake[1]
            return MemoryRead(latents=torch.from_numpy(latents.reshape(*lead, self.channels, h, w)),
                              mask=torch.from_numpy(mask.reshape(*lead, h, w)),
                              depth=torch.from_numpy(depth.reshape(*lead, h, w)),
                              points=torch.from_numpy(points.reshape(*lead, h, w, 3)))
        poses, lead = as_batch(poses)
        batch, frames = poses.shape[:2]
        with torch.no_grad():
            world_index = check_worlds(worlds, batch, self.num_worlds, self.device)
            views = batch * frames
            pixels = views * h * w
            out_latents = torch.zeros(pixels, self.channels, dtype=torch.float32, device=self.device)
            out_depth = torch.full((pixels,), math.inf, dtype=torch.float32, device=self.device)
            out_mask = torch.zeros(pixels, dtype=torch.bool, device=self.device)
            out_points = torch.full((pixels, 3), math.nan, dtype=torch.float32, device=self.device)
            w2c = invert_pose(poses.to(self.device, torch.float64)).to(torch.float32).reshape(views, 4, 4)
            self._torch_read(camera, poses, w2c, world_index, frames, out_latents, out_depth, out_mask, out_points)
            return MemoryRead(
                latents=out_latents.reshape(*lead, h, w, self.channels).movedim(-1, -3).contiguous(),
                mask=out_mask.reshape(*lead, h, w),
                depth=out_depth.reshape(*lead, h, w),
                points=out_points.reshape(*lead, h, w, 3),
            )

    def _torch_read(self, camera, poses, w2c, world_index, frames, out_latents, out_depth, out_mask, out_points):
        """The read in torch ops (any device; the oracle of :mod:`.raster_kernels`), into the ``out_*`` tensors."""
        views, pixels = w2c.shape[0], out_mask.numel()
        brick_slot, view = self._index.visible_bricks(camera, w2c, world_index, frames, self.max_read_depth)
        if brick_slot.numel() > 0:
            entries = self._index.entry_of[brick_slot]
            pair, voxel = torch.nonzero(entries >= 0, as_tuple=True)
            entry, view = entries[pair, voxel].long(), view[pair]
            keep, pixel, z, u, v = project_to_pixels(self._pool.points[entry], view, w2c, camera, self.max_read_depth)
            if keep.numel() > 0:
                if self.revisit_radius > 0:
                    # What was seen from (nearly) here already resolved visibility along these
                    # rays: where such entries exist, entries seen from elsewhere (a thin pillar
                    # that covers under half of the pixel, a surface glimpsed past an edge) may
                    # not hide them. So a camera that returns reads back what it wrote.
                    camera_origin = poses.to(self.device, torch.float32).reshape(views, 4, 4)[:, :3, 3]
                    seen_from = self._pool.origins[entry[keep]]
                    from_here = (seen_from - camera_origin[view[keep]]).norm(dim=-1) <= self.revisit_radius
                    eligible = prefer_at_pixels(pixel, from_here, pixels)
                    keep, pixel, z, u, v = keep[eligible], pixel[eligible], z[eligible], u[eligible], v[eligible]
                hit, winner = zbuffer(pixel, z, u, v, pixels, self.surface_tolerance)
                winners = entry[keep[winner]]
                out_latents[hit] = self._pool.features[winners].to(torch.float32)
                out_depth[hit] = z[winner]
                out_points[hit] = self._pool.points[winners]
                out_mask[hit] = True

    def _compiled_read(self, camera, c2w, batch, frames, worlds):
        """The read by :mod:`.raster_kernels` of (B*T, 4, 4) float64 poses ``c2w``: latents (V, C, h*w), mask,
        depth (V*h*w,) and points (V*h*w, 3) as numpy arrays (None: the kernel could not be built, or the
        features' dtype is not one it widens, and the torch path runs)."""
        raster_kernels = kernel_module(f"{__package__}.raster_kernels")
        if raster_kernels is None:
            return None
        if camera is not self._read_camera and camera != self._read_camera:
            features = self._pool.features
            kind = raster_kernels.WIDEN.get(features.element_size(), {}).get(str(features.dtype).removeprefix("torch."))
            brick_edge = self.brick_size * self.voxel_size
            self._read_constants = (raster_kernels.read_constants(camera, self.chunk_size, brick_edge,
                                                                  self.max_read_depth), kind)
            self._read_camera = camera
        constants, kind = self._read_constants
        if kind is None:
            return None
        if worlds is None and batch == self.num_worlds:
            batch_of_world = self._every_world  # batch item k reads world k
        else:
            world_index = check_worlds(worlds, batch, self.num_worlds, self.device).numpy()
            batch_of_world = np.full(self.num_worlds, -1, np.int64)
            batch_of_world[world_index] = np.arange(world_index.shape[0])
        if self._read_scratch is None:
            self._read_scratch = raster_kernels.ReadScratch()
        store = self._storage()
        try:  # numba compiles on first call (or loads its cache); a failure there means the torch path
            return raster_kernels.read(
                frames, c2w, batch_of_world, store.chunk_keys, store.members, store.member_bits, store.brick_keys,
                store.entry_of, store.occupancy, store.points, store.origins, store.features, kind, camera, constants,
                self.chunk_size, self.brick_size * self.voxel_size, self.max_read_depth, self.revisit_radius,
                self.surface_tolerance, self._read_scratch, parallel_kernels())
        except Exception as error:
            disable_kernels(f"{type(error).__name__}: {error}")
            return None

    def __getstate__(self) -> dict:
        # Copies and pickles make their own numpy views: a copied view would not share the copied
        # tensor's memory. Scratch is dropped too (it holds nothing between calls).
        state = dict(self.__dict__)
        for name in _KERNEL_CACHES:
            state[name] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._drop_kernel_caches()

    def _drop_kernel_caches(self) -> None:
        self._views = self._free_view = None
        self._read_scratch = self._read_camera = self._read_constants = None
        self._write_scratch = None
        self._write_camera = (None, None)  # (camera given, depth size, factor, float32 and float64 intrinsics)

    def _storage(self) -> _Storage:
        """Numpy views of the storage tensors for the kernels, made again only when one of them was replaced.

        Storage grows, is rebuilt and is loaded by replacing tensors, never by resizing them in place, so
        the views are renewed exactly when one of the tensors is another object. One identity test of the
        whole set, not a lookup per tensor: 13 lookups were 4 us of a 64x64 write.
        """
        index, pool = self._index, self._pool
        chunks, table = index.chunks, index.table
        tensors = (table.keys, table.values, index.entry_of, index.occupancy, index.last_write, index.keys,
                   chunks.keys, chunks.members, chunks.member_bits, pool.entries_per_world, pool.features,
                   pool.points, pool.observed_depth, pool.origins, pool.last_write, self._clock.ticks)
        cached = self._views
        if cached is None or not all(map(operator.is_, tensors, cached[0])):
            bits = _BITS[pool.features.element_size()]
            cached = self._views = (tensors, _Storage(*(
                (t.view(bits) if t is pool.features else t).numpy() for t in tensors)))
        return cached[1]

    def _free_entries(self) -> np.ndarray:
        """A numpy view of the pool's free list (replaced, not changed, whenever it changes)."""
        free = self._pool.free
        if self._free_view is None or self._free_view[0] is not free:
            self._free_view = (free, free.numpy())
        return self._free_view[1]

    # ------------------------------------------------------------------ inspection

    def nbytes(self) -> int:
        """Bytes the memory holds: its entries, bricks, tables, clocks and object layer (``stats()["bytes"]``)."""
        layer = self.objects.nbytes() if self.objects is not None else 0
        return self._pool.nbytes() + self._index.nbytes() + self._clock.nbytes() + layer

    def stats(self, bounds: bool = True) -> dict:
        """Entries, bytes held, voxel size, horizon and (optionally, O(entries)) the bounds of what is stored."""
        entries = int(self._pool.entries_per_world.sum())
        bytes_held = self.nbytes()
        layer = self.objects
        if bounds and entries:
            stored = self.stored_points()
            bounds = [stored.min(0).values.tolist(), stored.max(0).values.tolist()]
        else:
            bounds = None
        return {
            "entries": entries,
            "bricks": int(self._index.bricks_per_world.sum()),
            "bytes": int(bytes_held),
            "voxel_size": self.voxel_size,
            "horizon": self.horizon,
            "bounds": bounds,
            "objects": layer.count() if layer is not None else None,
            "object_entries": layer.entries() if layer is not None else None,
        }

    def stored_points(self) -> torch.Tensor:
        """(entries, 3) world points of every stored entry (O(entries); for inspection and tests)."""
        entry_of = self._index.entry_of
        return self._pool.points[entry_of[entry_of >= 0].long()]

    def stored_entries(self, world: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``world``'s stored entries as copies: (n, 3) float32 world points and (n, C) features, in
        storage order (O(stored); for maps and inspection)."""
        if not 0 <= world < self.num_worlds:
            raise ValueError(f"world must be in [0, {self.num_worlds}), got {world}")
        of_world = torch.arange(self.num_worlds, device=self._pool.points.device) == world
        entries = self._index.entry_of[self._index.live_slots(of_world)]
        entries = entries[entries >= 0].long()
        return self._pool.points[entries], self._pool.features[entries]

    def entries_per_world(self, copy: bool = True) -> torch.Tensor:
        """(num_worlds,) number of stored entries of each world; ``copy=False``: the memory's own counts, to
        read before the next write changes them (an env's infos and tasks, every step: no clone)."""
        return self._pool.entries_per_world.clone() if copy else self._pool.entries_per_world

    def entries_gained(self) -> torch.Tensor:
        """(num_worlds,) int64 change the last write made to :meth:`entries_per_world`: its new entries, less
        those its evictions or expiry freed (zeros before the first write, and after ``clear()`` or a load;
        a write that raises leaves it as it was).

        What ``entries_per_world()`` after a write minus before it gives, without the two copies and the
        subtraction around every write (the kernels keep it as they go).
        """
        gained = torch.from_numpy(self._gained.copy())
        return gained if self.device.type == "cpu" else gained.to(self.device)

    def write_clock(self) -> torch.Tensor:
        """(num_worlds,) int64 writes that touched each world since it was last cleared."""
        return self._clock.ticks.clone()

    def stored_ages(self, world: int = 0) -> torch.Tensor:
        """(entries,) int64 writes of ``world`` since each of its stored entries was last observed
        (0: by the last write), in storage order (O(stored); for inspection and tests)."""
        return self._clock.ages(self._index, self._pool, world)

    # ------------------------------------------------------------------ persistence

    def config(self) -> dict:
        return {
            "channels": self.channels,
            "voxel_size": self.voxel_size,
            "num_worlds": self.num_worlds,
            "brick_size": self.brick_size,
            "chunk_size": self.chunk_size,
            "max_bricks_per_world": self.max_bricks_per_world,
            "merge": self.merge,
            "closest_tolerance": self.closest_tolerance,
            "feature_dtype": str(self.feature_dtype).removeprefix("torch."),
            "max_read_depth": self.max_read_depth,
            "surface_tolerance": self.surface_tolerance,
            "revisit_radius": self.revisit_radius,
            "horizon": self.horizon,
            "objects": self.objects.config() if self.objects is not None else False,
        }

    def state_tensors(self, prefix: str = "memory.", copy: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor needed to resume, trimmed to the bricks in use.

        ``copy=True``: tensors of their own (a snapshot); otherwise they may be views of the
        live storage that the next write changes.
        """
        tensors = memory_tensors(self._index, self._pool, self._clock, prefix, copy=copy)
        if self.objects is not None:
            tensors.update(self.objects.state_tensors(prefix + OBJECTS_PREFIX, copy=copy))
        return tensors

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], prefix: str = "memory.",
                   device: str | torch.device = "cpu", version: int = FORMAT_VERSION, check: StateCheck | None = None,
                   field: str = "config") -> LatentSpatialMemory:
        """Rebuild a memory from ``config()`` and ``state_tensors()`` written by format ``version``.

        Every field is validated first (:func:`~.fileformat.config_from_file`,
        :func:`~.fileformat.checked_memory_tensors`): an inconsistent state is a
        :class:`MemoryFileError` naming the field (``check`` names the source; ``field`` the
        configuration), and nothing is allocated beyond what the state justifies. The new
        memory shares no storage with ``tensors``.

        Version 3 predates the horizon: its files load with horizon None, each world's write
        clock set to the memory's write count and each entry's last write to its brick's
        (exact for one world written on every write; ages only matter under a horizon).
        """
        check = check or StateCheck("saved memory")
        kwargs = config_from_file(config, version, check, field)
        part = checked_memory_tensors(tensors, prefix, version, kwargs, check)
        memory = cls(**kwargs, device=device)
        capacity, _, entry_capacity = (int(v) for v in part["capacity"])
        memory._allocate(bricks=capacity, entries=entry_capacity)
        restore_memory(part, memory._index, memory._pool, memory._clock)
        layer = memory.objects
        saved_objects = any(name.startswith(prefix + OBJECTS_PREFIX) for name in tensors)
        if saved_objects and layer is None:
            check.fail(prefix + OBJECTS_PREFIX + "*", f"is saved, but {field}.objects turns the object layer off")
        if layer is not None and saved_objects:  # a file from before the layer loads with none remembered
            layer.load_tensors(tensors, prefix + OBJECTS_PREFIX, check)
        return memory

    def save(self, path: str | os.PathLike) -> None:
        """Write the memory to one safetensors file with JSON metadata (no pickle), atomically."""
        save_state(path, kind="memory", config=self.config(), tensors=self.state_tensors())

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> LatentSpatialMemory:
        """Read a memory written by ``save``; a missing, corrupted or inconsistent file is a MemoryFileError."""
        meta, tensors = load_state(path, kind="memory")
        return cls.from_state(meta.get("config"), tensors, device=device, version=meta["version"],
                              check=StateCheck(path))
