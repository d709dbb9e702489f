"""The object layer: moving things remembered in their own frame, with a pose track.

The static memory keeps what stays put; the write filters reject what moved (its depth
disagrees with what memory predicted, or with a neighbouring frame). Those rejected
latent pixels are not noise to throw away: they are the moving things, and this layer
keeps them so that a thing that moves stays itself when it is seen again.

- **Grouping.** A segment's rejected pixels (finite depth; where static memory predicted
  a depth, only those nearer than it: something now stands in front of what was
  remembered), and the pixels where a tracked moving object is predicted and the depth
  agrees (a crate standing on its own earlier sample passes the filters; these are kept
  out of static memory), are split per frame into objects: 4-neighbours on the latent
  grid whose depths agree within ``link_tolerance`` (relative) are one object (connected
  in 3D at latent resolution); groups smaller than ``min_pixels`` are dropped.
- **Objects.** Each is stored as latent entries in its own frame (translation only: the
  world models' moving things slide and circle without turning), at most
  ``max_entries``, one per voxel of the object frame.
- **Tracks.** Each keeps its last ``track_length`` observed positions with their frame
  times, and a constant-velocity model fitted to them by least squares, with its
  uncertainty: the fit's residual (floored by ``measurement_noise``), the velocity's
  standard error times the time since the track's mean, and an acceleration the model
  cannot see (``acceleration``, metres per frame squared) over the time since the last
  sighting. A track seen once has no velocity yet, so it is not predicted forward.
- **Re-identification.** A group seen in a frame is the object whose predicted position
  is nearest, if it lies within the gate (``gate`` metres plus three times the
  prediction's uncertainty) and their mean latents agree (cosine similarity at least
  ``min_similarity``); an object that is lost or uncertain is re-found farther away
  (``reacquire_radius``) when its latents agree closely (``reacquire_similarity``), and
  its track restarts there (it is shown again only once a new track shows motion). Its
  observed position is the centroid of the group, and its latest sighting replaces its
  entries. An observation farther from the prediction than three times its uncertainty
  means the thing changed course (or stopped): the track restarts from that observation.
- **Negative evidence.** An object predicted in view of a frame, not found in it, and
  with the frame's depth behind where it should be (the place is seen empty) is *lost*:
  not shown again until re-identified.
- **Forgetting.** An object not seen for ``forget_after`` frames is dropped; a world
  holds at most ``max_objects`` (a new one replaces the longest unseen). Storage is
  fixed-size per world, so memory stays bounded however long the episode.
- **Reading.** :meth:`ObjectLayer.compose` projects every shown object at its predicted
  position for each target frame's time and z-buffers it with the static read: the
  nearer wins. Shown: objects seen to move (more than ``min_motion`` metres from where
  first seen, with a velocity beyond twice its standard error over 3+ sightings: static
  pixels the filters doubted jitter but do not move), not lost, predicted within
  ``max_uncertainty`` (1-sigma radius), and out of the last observed frame (what it
  showed, the generator continues from its context). What is too uncertain is not
  shown, so the generator makes it up rather than being shown something wrong.
- **The world model's motion mask.** Where a world model says which pixels it animated
  (``Segment.keep`` False; the procedural model's ``motion_mask=True``, standing in for a
  motion segmenter), only those become objects, and a group inside it moves by the model's
  word without waiting for its track. :meth:`ObjectLayer.recall` then re-finds, in what was
  just generated, things back in view after too long for any prediction (by place and size;
  never by ground-truth ids or poses), and the World generates the segment again shown them
  where they are: their look comes back instead of a new one.

Time is counted in frames per world: :meth:`observe` advances a world's clock by the
frames of one view of the segment (views of a world are simultaneous), so the frames a
following :meth:`compose` reads for are at ``clock + j``.
"""

from __future__ import annotations

import math

import torch

from ..geometry import Camera, invert_pose, unproject
from .raster import project_to_pixels, zbuffer
from .shapes import MemoryRead

OBJECT_DEFAULTS = {
    "max_objects": 8,
    "max_entries": 256,
    "track_length": 8,
    "forget_after": 64,
    "max_uncertainty": 0.4,
    "gate": 0.5,
    "reacquire_radius": 3.0,
    "min_similarity": 0.5,
    "reacquire_similarity": 0.9,
    "min_pixels": 2,
    "link_tolerance": 0.1,
    "measurement_noise": 0.05,
    "acceleration": 0.02,
    "min_motion": 0.3,
}

# The tensors a saved layer holds, with their dtypes (shapes follow from the configuration).
STATE_FIELDS = ("alive", "lost", "moved", "first_pos", "ident", "next_id", "clock", "last_seen", "last_in_view",
                "track_time", "track_pos", "track_len",
                "entry_points", "entry_features", "entry_time", "entry_count")


class ObjectLayer:
    """Moving things of ``num_worlds`` worlds, each in its own frame with a pose track (see the module docstring).

    Args:
        channels: C, the latent channels.
        num_worlds: independent worlds side by side.
        voxel_size: voxel edge of the object frame (one entry per voxel).
        feature_dtype: storage dtype of the entries' latents.
        device: where every tensor lives.
        **options: any of :data:`OBJECT_DEFAULTS` (described in the module docstring).
    """

    def __init__(self, channels: int, num_worlds: int, voxel_size: float, feature_dtype: torch.dtype = torch.float16,
                 device: str | torch.device = "cpu", **options):
        self.options = _checked_settings(options)
        for name, value in self.options.items():
            setattr(self, name, value)
        self.channels = int(channels)
        self.num_worlds = int(num_worlds)
        self.voxel_size = float(voxel_size)
        self.feature_dtype = feature_dtype
        self.device = torch.device(device)
        self._allocate()
        self.last_shown: dict[str, torch.Tensor] | None = None

    def _allocate(self) -> None:
        w, s, length, e, d = self.num_worlds, self.max_objects, self.track_length, self.max_entries, self.device
        self.alive = torch.zeros(w, s, dtype=torch.bool, device=d)
        self.lost = torch.zeros(w, s, dtype=torch.bool, device=d)
        self.moved = torch.zeros(w, s, dtype=torch.bool, device=d)
        self.first_pos = torch.zeros(w, s, 3, dtype=torch.float64, device=d)
        self.ident = torch.full((w, s), -1, dtype=torch.int64, device=d)
        self.next_id = torch.zeros(w, dtype=torch.int64, device=d)
        self.clock = torch.zeros(w, dtype=torch.int64, device=d)
        self.last_seen = torch.zeros(w, s, dtype=torch.int64, device=d)
        self.last_in_view = torch.zeros(w, s, dtype=torch.int64, device=d)
        self.track_time = torch.zeros(w, s, length, dtype=torch.int64, device=d)
        self.track_pos = torch.zeros(w, s, length, 3, dtype=torch.float64, device=d)
        self.track_len = torch.zeros(w, s, dtype=torch.int64, device=d)
        self.entry_points = torch.zeros(w, s, e, 3, dtype=torch.float32, device=d)
        self.entry_features = torch.zeros(w, s, e, self.channels, dtype=self.feature_dtype, device=d)
        self.entry_time = torch.zeros(w, s, e, dtype=torch.int64, device=d)
        self.entry_count = torch.zeros(w, s, dtype=torch.int64, device=d)

    # ------------------------------------------------------------------ the motion model

    def predict(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's predicted origin and uncertainty at ``times``.

        Args:
            times: (W, T) frame times, one row per world.

        Returns:
            centre (W, T, S, 3) float64 predicted positions of the object frames' origins and
            radius (W, T, S) float64, the prediction's 1-sigma radius in metres (inf for an
            empty slot; a track seen once predicts only its own time).
        """
        length = self.track_len.to(torch.float64)  # (W, S)
        valid = torch.arange(self.track_length, device=self.device) < self.track_len[..., None]  # (W, S, L)
        weight = valid.to(torch.float64)
        count = length.clamp_min(1)
        t = self.track_time.to(torch.float64)
        t_mean = (t * weight).sum(-1) / count
        p_mean = (self.track_pos * weight[..., None]).sum(-2) / count[..., None]
        dt = (t - t_mean[..., None]) * weight
        spread = (dt * dt).sum(-1)  # (W, S)
        moving = spread > 0
        velocity = (dt[..., None] * (self.track_pos - p_mean[..., None, :])).sum(-2) / spread.clamp_min(1e-12)[..., None]
        velocity = torch.where(moving[..., None], velocity, torch.zeros_like(velocity))
        fitted = p_mean[..., None, :] + velocity[..., None, :] * (t - t_mean[..., None])[..., None]
        residual = ((self.track_pos - fitted) ** 2).sum(-1) * weight
        dof = 3 * (length - 2).clamp_min(1)
        noise = torch.maximum((residual.sum(-1) / dof), torch.full_like(length, self.measurement_noise ** 2))
        velocity_var = torch.where(moving, noise / spread.clamp_min(1e-12), torch.full_like(noise, math.inf))
        last = torch.where(valid, self.track_time, torch.full_like(self.track_time, -(1 << 62))).amax(-1)  # (W, S)

        when = times.to(torch.float64)[:, :, None]  # (W, T, 1)
        ahead = when - t_mean[:, None]
        since = (when - last[:, None].to(torch.float64)).clamp_min(0)
        drift = velocity_var[:, None] * ahead**2
        drift = torch.where(ahead == 0, torch.zeros_like(drift), drift)  # inf * 0 for a track seen once
        variance = noise[:, None] / count[:, None] + drift + (0.5 * self.acceleration * since**2) ** 2
        radius = torch.sqrt(3 * variance)
        radius = torch.where((self.alive & (self.track_len > 0))[:, None], radius, torch.full_like(radius, math.inf))
        centre = p_mean[:, None] + velocity[:, None] * ahead[..., None]
        return centre, radius

    # ------------------------------------------------------------------ observing

    @torch.no_grad()
    def observe(self, latents: torch.Tensor, depth: torch.Tensor, camera: Camera, poses: torch.Tensor,
                candidates: torch.Tensor, worlds: list[int], views: int = 1,
                predicted_depth: torch.Tensor | None = None, animated: torch.Tensor | None = None) -> int:
        """Group what the filters rejected into objects and update their entries and tracks.

        Args:
            latents: (B, T, C, h, w) the segment's latents.
            depth: (B, T, h, w) its latent-resolution z-depth (+inf: nothing).
            camera: intrinsics of the latent grid (h, w).
            poses: (B, T, 4, 4) camera-to-world of each latent frame.
            candidates: (B, T, h, w) bool, latent pixels the write filters rejected.
            worlds: the world of each batch row.
            views: cameras per world (T = views x frames, view-major; views are simultaneous).
            predicted_depth: (B, T, h, w) the depth static memory predicted (+inf: none). Where
                it has a prediction, only pixels nearer than it (by ``link_tolerance``) can be a
                moving thing: something now stands in front of what was remembered. Farther
                ones are the background a moved thing uncovered, or an edge the filter doubted.
            animated: (B, T, h, w) bool, the world model's own motion mask (the pixels it
                animated: ``~Segment.keep``), or None. A group mostly inside it counts as seen to
                move at once (the generator says so), without waiting for its track to show it.

        Returns:
            (B, T, h, w) bool, the pixels the layer claims as moving things it tracks (pixels
            at a moving object's predicted place whose depth agrees): whatever the filters said,
            they are the object's, and static memory should not keep them. Every world in
            ``worlds`` advances its clock by T / views frames, and forgets what it has not seen
            for too long.
        """
        batch, frames, channels, h, w = latents.shape
        if channels != self.channels:
            raise ValueError(f"latents have {channels} channels, the object layer stores {self.channels}")
        per_view = frames // views
        depth = depth.to(self.device, torch.float32)
        candidates = candidates.to(self.device).bool() & torch.isfinite(depth) & (depth > 0)
        if predicted_depth is not None:
            predicted_depth = predicted_depth.to(self.device, torch.float32)
            candidates &= depth < predicted_depth * (1 - self.link_tolerance)  # inf (no prediction) passes
        # A tracked thing is found where it is predicted even where the filters let it pass (it
        # stood on its own earlier sample in static memory, or on a place memory never saw).
        claimed = self._claimed(depth, camera, poses.to(self.device, torch.float64), worlds, per_view)
        candidates |= claimed
        flagged = None if animated is None else animated.to(self.device).bool()
        if flagged is not None:  # the model says what it animated: what else the filters rejected is not a mover
            candidates &= flagged
        if bool(candidates.any()):
            c2w = poses.to(self.device, torch.float64)
            labels = _components(candidates.reshape(-1, h, w), depth.reshape(-1, h, w), self.link_tolerance)
            labels = labels.reshape(batch, frames, h, w)
            points = unproject(depth.masked_fill(~candidates, 1.0).to(torch.float64), camera, c2w)  # (B,T,h,w,3)
            features = latents.to(self.device).movedim(2, -1)  # (B, T, h, w, C)
            for row, world in enumerate(worlds):
                # Frame by frame in time order: a track is updated by one sighting before the next.
                for step in range(per_view):
                    time = int(self.clock[world]) + step
                    for view in range(views):
                        j = view * per_view + step
                        self._observe_frame(world, time, labels[row, j], points[row, j], features[row, j],
                                            depth[row, j], camera, c2w[row, j],
                                            None if flagged is None else flagged[row, j])
        else:
            for row, world in enumerate(worlds):
                for step in range(per_view):
                    for view in range(views):
                        j = view * per_view + step
                        self._mark_missing(world, int(self.clock[world]) + step, set(), depth[row, j], camera,
                                           poses[row, j].to(self.device, torch.float64))
        index = torch.as_tensor(worlds, dtype=torch.int64, device=self.device)
        self.clock[index] += per_view
        stale = (self.clock[:, None] - self.last_seen) > self.forget_after
        self.alive &= ~stale
        return claimed

    def _claimed(self, depth: torch.Tensor, camera: Camera, c2w: torch.Tensor, worlds: list[int],
                 per_view: int) -> torch.Tensor:
        """(B, T, h, w) bool: pixels whose depth agrees with a moving object projected at its predicted place."""
        batch, frames, h, w = depth.shape
        claimed = torch.zeros(batch * frames * h * w, dtype=torch.bool, device=self.device)
        index = torch.as_tensor(worlds, dtype=torch.int64, device=self.device)
        times = torch.zeros(self.num_worlds, frames, dtype=torch.int64, device=self.device)
        times[index] = self.clock[index][:, None] + torch.arange(frames, device=self.device) % per_view
        centre, radius = self.predict(times)
        centre, radius = centre[index], radius[index]
        eligible = (self.alive & ~self.lost & self.moved)[index][:, None] & (radius <= self.max_uncertainty)
        if not bool(eligible.any()):
            return claimed.reshape(batch, frames, h, w)
        row, frame, slot = torch.nonzero(eligible, as_tuple=True)
        count = self.entry_count[index][row, slot]
        pair, e = torch.nonzero(torch.arange(self.max_entries, device=self.device)[None] < count[:, None],
                                as_tuple=True)
        points = (self.entry_points[index][row[pair], slot[pair], e].to(torch.float64)
                  + centre[row[pair], frame[pair], slot[pair]]).to(torch.float32)
        w2c = invert_pose(c2w).to(torch.float32).reshape(batch * frames, 4, 4)
        keep, pixel, z, _, _ = project_to_pixels(points, row[pair] * frames + frame[pair], w2c, camera, math.inf)
        source = pair[keep]
        slack = radius[row[source], frame[source], slot[source]].to(torch.float32)
        agree = (depth.reshape(-1)[pixel] - z).abs() <= self.link_tolerance * z + slack
        claimed[pixel[agree]] = True
        return claimed.reshape(batch, frames, h, w)

    def _observe_frame(self, world: int, time: int, labels, points, features, depth, camera, c2w,
                       flagged=None) -> None:
        present = labels[labels >= 0]
        if present.numel() == 0:
            self._mark_missing(world, time, set(), depth, camera, c2w)
            return
        groups, sizes = torch.unique(present, return_counts=True)
        groups = groups[sizes >= self.min_pixels]
        detections, animated = [], []
        for group in groups.tolist():
            where = labels == group
            detections.append((points[where], features[where].to(torch.float32)))
            animated.append(flagged is not None and float(flagged[where].float().mean()) > 0.5)
        matched = self._associate(world, time, detections, animated)
        self._mark_missing(world, time, matched, depth, camera, c2w)

    def _associate(self, world: int, time: int, detections, animated=None) -> set[int]:
        """Give each detection an object (greedy, best first); returns the slots found in this frame."""
        centre, radius = self.predict(torch.full((self.num_worlds, 1), time, dtype=torch.int64, device=self.device))
        centre, radius = centre[world, 0], radius[world, 0]  # (S, 3), (S,)
        descriptor = self._descriptors(world)  # (S, C)
        pairs = []
        for d, (points, features) in enumerate(detections):
            mean = features.mean(0)
            similarity = torch.nn.functional.cosine_similarity(descriptor, mean[None], dim=-1)
            distance = (centre - points.mean(0)[None]).norm(dim=-1)
            # A track seen once has no velocity: gate it around where it was seen, wider as time
            # passes (up to reacquire_radius). A placed track: around its prediction.
            tracked = torch.isfinite(radius)
            placed = tracked & (radius <= self.max_uncertainty)
            since = (time - self.last_seen[world]).clamp_min(0).to(torch.float64)
            reach = torch.where(placed, self.gate + 3 * radius,
                                (self.gate * (1 + since)).clamp(max=self.reacquire_radius))
            near = self.alive[world] & ~self.lost[world] & (placed | ~tracked) & (distance <= reach) & \
                (similarity >= self.min_similarity)
            # What prediction can no longer place (lost, or too uncertain) is looked for by its look
            # alone, and its track restarts where it is found.
            unplaced = self.lost[world] | (tracked & ~placed)
            far = self.alive[world] & unplaced & (distance <= self.reacquire_radius) & \
                (similarity >= self.reacquire_similarity)
            for s in torch.nonzero(near | far).flatten().tolist():
                cost = float(distance[s]) / max(self.gate, 1e-6) + (1.0 - float(similarity[s]))
                pairs.append((cost, d, s, bool(far[s])))
        pairs.sort()
        used_detections, found = set(), set()
        for _, d, s, refound in pairs:
            if d in used_detections or s in found:
                continue
            used_detections.add(d)
            found.add(s)
            self._update(world, s, time, *detections[d], float(radius[s]), refound)
            if animated is not None and animated[d]:
                self.moved[world, s] = True
        for d, detection in enumerate(detections):
            if d not in used_detections:
                s = self._create(world, time, *detection)
                found.add(s)
                if animated is not None and animated[d]:
                    self.moved[world, s] = True  # the generator says it moves: no need to wait for the track
        return found

    def _descriptors(self, world: int) -> torch.Tensor:
        """(S, C) mean latent of each slot's entries (zeros for an empty slot)."""
        valid = (torch.arange(self.max_entries, device=self.device) < self.entry_count[world][:, None]).to(torch.float32)
        total = (self.entry_features[world].to(torch.float32) * valid[..., None]).sum(1)
        return total / valid.sum(1, keepdim=True).clamp_min(1)

    def _create(self, world: int, time: int, points: torch.Tensor, features: torch.Tensor) -> int:
        free = torch.nonzero(~self.alive[world]).flatten()
        # Full: the object unseen the longest makes room.
        slot = int(free[0]) if free.numel() else int(torch.argmin(self.last_seen[world]))
        self.alive[world, slot] = True
        self.lost[world, slot] = False
        self.moved[world, slot] = False
        self.first_pos[world, slot] = points.mean(0)
        self.ident[world, slot] = self.next_id[world]
        self.next_id[world] += 1
        self.entry_count[world, slot] = 0
        self.track_len[world, slot] = 0
        origin = points.mean(0)
        self._append_track(world, slot, time, origin)
        self._merge_entries(world, slot, time, (points - origin).to(torch.float32), features)
        return slot

    def _update(self, world: int, slot: int, time: int, points: torch.Tensor, features: torch.Tensor,
                radius: float, refound: bool = False) -> None:
        centre, _ = self.predict(torch.full((self.num_worlds, 1), time, dtype=torch.int64, device=self.device))
        predicted = centre[world, 0, slot] if math.isfinite(radius) else self._last_position(world, slot)
        # The centroid of what is seen, not an alignment of the stored entries to it: at latent
        # resolution a face sliding within its own plane moves less than a pixel per frame, and
        # nearest-neighbour alignment of a flat patch cannot see in-plane motion at all.
        position = points.mean(0)
        innovation = float((position - predicted).norm())
        if refound or bool(self.lost[world, slot]) or (math.isfinite(radius) and innovation > 3 * radius):
            # A new course (or found again after being lost): the old track says nothing about it.
            self.track_len[world, slot] = 0
        self.lost[world, slot] = False
        self._append_track(world, slot, time, position)
        if float((position - self.first_pos[world, slot]).norm()) > self.min_motion and self._steady(world, slot):
            self.moved[world, slot] = True
        # Its latest look replaces the older ones: a centroid that shifts with the part in view
        # would smear entries of several sightings across each other.
        self.entry_count[world, slot] = 0
        self._merge_entries(world, slot, time, (points - position).to(torch.float32), features)

    def _steady(self, world: int, slot: int) -> bool:
        """Whether the track shows a velocity (3+ sightings) beyond twice its standard error: a thing
        that moves, not a group of static pixels whose centroid jitters from view to view."""
        n = int(self.track_len[world, slot])
        if n < 3:
            return False
        t = self.track_time[world, slot, :n].to(torch.float64)
        p = self.track_pos[world, slot, :n]
        dt = t - t.mean()
        spread = float((dt * dt).sum())
        velocity = (dt[:, None] * (p - p.mean(0))).sum(0) / spread
        residual = p - (p.mean(0) + dt[:, None] * velocity)
        noise = max(float((residual**2).sum()) / (3 * max(n - 2, 1)), self.measurement_noise**2)
        return float(velocity.norm()) > 2 * math.sqrt(3 * noise / spread)

    def _last_position(self, world: int, slot: int) -> torch.Tensor:
        n = int(self.track_len[world, slot])
        return self.track_pos[world, slot, n - 1].clone()

    def _append_track(self, world: int, slot: int, time: int, position: torch.Tensor) -> None:
        n = int(self.track_len[world, slot])
        if n == self.track_length:  # the oldest sighting makes room
            self.track_time[world, slot] = self.track_time[world, slot].roll(-1)
            self.track_pos[world, slot] = self.track_pos[world, slot].roll(-1, 0)
            n -= 1
        self.track_time[world, slot, n] = time
        self.track_pos[world, slot, n] = position.to(torch.float64)
        self.track_len[world, slot] = n + 1
        self.last_seen[world, slot] = time
        self.last_in_view[world, slot] = time

    def _merge_entries(self, world: int, slot: int, time: int, local: torch.Tensor, features: torch.Tensor) -> None:
        """Add a sighting's entries in the object frame: newest per voxel, the newest ``max_entries`` overall."""
        n = int(self.entry_count[world, slot])
        points = torch.cat([self.entry_points[world, slot, :n], local])
        feats = torch.cat([self.entry_features[world, slot, :n].to(torch.float32), features])
        stamps = torch.cat([self.entry_time[world, slot, :n],
                            torch.full((local.shape[0],), time, dtype=torch.int64, device=self.device)])
        voxel = torch.floor(points / self.voxel_size).to(torch.int64)
        _, inverse = torch.unique(voxel, dim=0, return_inverse=True)
        order = torch.arange(points.shape[0], device=self.device)
        newest = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.int64, device=self.device)
        newest.scatter_reduce_(0, inverse, order, reduce="amax")  # later rows are newer
        keep = newest[stamps[newest].argsort(stable=True)][-self.max_entries:]
        m = keep.numel()
        self.entry_points[world, slot, :m] = points[keep]
        self.entry_features[world, slot, :m] = feats[keep].to(self.feature_dtype)
        self.entry_time[world, slot, :m] = stamps[keep]
        self.entry_count[world, slot] = m

    def _mark_missing(self, world: int, time: int, found: set[int], depth, camera: Camera, c2w) -> None:
        """Lose objects predicted in view whose place the frame shows empty (its depth lies behind them)."""
        shown = self.alive[world] & ~self.lost[world]
        for s in found:
            shown[s] = False
        if not bool(shown.any()):
            return
        centre, radius = self.predict(torch.full((self.num_worlds, 1), time, dtype=torch.int64, device=self.device))
        w2c = invert_pose(c2w[None]).to(torch.float32)
        for s in torch.nonzero(shown & torch.isfinite(radius[world, 0])).flatten().tolist():
            entries = self.entry_points[world, s, : int(self.entry_count[world, s])] + centre[world, 0, s].to(torch.float32)
            keep, pixel, z, _, _ = project_to_pixels(entries, torch.zeros(entries.shape[0], dtype=torch.int64,
                                                                          device=self.device), w2c, camera, math.inf)
            if keep.numel() < self.min_pixels:
                continue
            observed = depth.reshape(-1)[pixel]
            behind = observed > z * (1 + self.link_tolerance) + float(radius[world, 0, s])
            if float(behind.float().mean()) > 0.5:
                self.lost[world, s] = True
            elif float(((observed - z).abs() <= self.link_tolerance * z).float().mean()) > 0.5:
                # Something stands where it should (the filters kept it, so it was not a group):
                # the frame shows it, and the generator's context carries it on.
                self.last_in_view[world, s] = time

    # ------------------------------------------------------------------ reading

    @torch.no_grad()
    def compose(self, read: MemoryRead, camera: Camera, poses: torch.Tensor, worlds=None, views: int = 1) -> MemoryRead:
        """``read`` (the static memory's) with every shown object projected at its predicted pose, nearer wins.

        Args:
            read: the static read for ``poses``, (B, T, ...) leading shape.
            camera: intrinsics of the latent grid.
            poses: (B, T, 4, 4) target camera-to-world poses of the next segment.
            worlds: the world of each batch row (default: all, in order).
            views: cameras per world (T = views x frames).

        Returns:
            A new MemoryRead (``read`` is left as it was). :attr:`last_shown` records, per batch
            row, frame and slot, the object's id, its predicted centre (of its entries' bounds)
            and how many latent pixels it won, for evaluation.
        """
        batch, frames = poses.shape[:2]
        worlds = list(range(batch)) if worlds is None else [int(w) for w in worlds]
        index = torch.as_tensor(worlds, dtype=torch.int64, device=self.device)
        per_view = frames // views
        times = self.clock[index][:, None] + torch.arange(frames, device=self.device) % per_view
        full_times = torch.zeros(self.num_worlds, frames, dtype=torch.int64, device=self.device)
        full_times[index] = times
        centre, radius = self.predict(full_times)
        centre, radius = centre[index], radius[index]  # (B, T, S, 3), (B, T, S)
        # Only what was seen to move: a group that never moved is static content the filters
        # doubted (an edge, an oblique view), which static memory and the generator handle.
        shown = (self.alive & ~self.lost & self.moved)[index][:, None] & (radius <= self.max_uncertainty)  # (B, T, S)
        # What the last observed frame showed reaches the generator as context (the previous
        # segment's tail), at its true place; older latents pasted over it only blur it. The
        # layer speaks for things out of view since: the ones that come back.
        shown &= (self.last_in_view < (self.clock[:, None] - 1))[index][:, None]
        slots = self.max_objects
        won = torch.zeros(batch, frames, slots, dtype=torch.int64, device=self.device)
        valid = torch.arange(self.max_entries, device=self.device) < self.entry_count[index][..., None]  # (B, S, E)
        big = torch.full((1,), math.inf, device=self.device)
        lo = torch.where(valid[..., None], self.entry_points[index], big).amin(2)
        hi = torch.where(valid[..., None], self.entry_points[index], -big).amax(2)
        middle = torch.where(torch.isfinite(lo), 0.5 * (lo + hi), torch.zeros_like(lo)).to(torch.float64)
        self.last_shown = {"ident": self.ident[index][:, None].expand(-1, frames, -1).clone(),
                           "centre": centre + middle[:, None], "pixels": won, "shown": shown.clone()}
        if not bool(shown.any()):
            return read
        row, frame, slot = torch.nonzero(shown, as_tuple=True)
        count = self.entry_count[index][row, slot]
        entry = torch.arange(self.max_entries, device=self.device)
        pair, e = torch.nonzero(entry[None] < count[:, None], as_tuple=True)
        points = (self.entry_points[index][row[pair], slot[pair], e].to(torch.float64)
                  + centre[row[pair], frame[pair], slot[pair]]).to(torch.float32)
        view = row[pair] * frames + frame[pair]
        w2c = invert_pose(poses.to(self.device, torch.float64)).to(torch.float32).reshape(batch * frames, 4, 4)
        h, w = camera.height, camera.width
        pixels = batch * frames * h * w
        keep, pixel, z, u, v = project_to_pixels(points, view, w2c, camera, math.inf)
        latents = read.latents.movedim(-3, -1).reshape(pixels, -1).clone()
        mask, depth = read.mask.reshape(-1).clone(), read.depth.reshape(-1).clone()
        points_out = read.points.reshape(pixels, 3).clone() if read.points is not None else None
        if keep.numel():
            hit, winner = zbuffer(pixel, z, u, v, pixels, 0.05)
            nearer = z[winner] < depth[hit]
            hit, winner = hit[nearer], winner[nearer]
            point = keep[winner]  # the winning entries (rows of points / pair / e)
            source = pair[point]  # and the (row, frame, slot) each belongs to
            latents[hit] = self.entry_features[index][row[source], slot[source], e[point]].to(latents.dtype)
            depth[hit] = z[winner]
            mask[hit] = True
            if points_out is not None:
                points_out[hit] = points[keep[winner]]
            won.index_put_((row[source], frame[source], slot[source]), torch.ones_like(source), accumulate=True)
        lead = read.mask.shape
        return MemoryRead(latents=latents.reshape(*lead, -1).movedim(-1, -3).contiguous(), mask=mask.reshape(lead),
                          depth=depth.reshape(lead),
                          points=points_out.reshape(*lead, 3) if points_out is not None else None)

    @torch.no_grad()
    def recall(self, shown: MemoryRead, latents: torch.Tensor, depth: torch.Tensor, animated: torch.Tensor,
               camera: Camera, poses: torch.Tensor, worlds=None,
               predicted_depth: torch.Tensor | None = None) -> MemoryRead | None:
        """Re-find objects that came back into view where no prediction could place them.

        After a thing has been out of view for long, a motion model cannot say where it is
        (turn-backs, circles, stops), so :meth:`compose` does not show it and the generator
        draws it anew. This looks at what the generator just made: groups of pixels its own
        motion mask ``animated`` flags (nearer than static memory's prediction, where it has
        one) are matched, nearest first, to moving objects that were out of view before this
        segment and not shown in it, by place (within ``reacquire_radius`` of where each was
        last seen) and size (no larger than the object seen before, plus ``gate``). Groups where
        the layer saw something in the last observed frame are left alone (the generator carries
        that look on from its context), and so are pixels that already look like the object
        (:func:`_likeness` at least ``reacquire_similarity``: the generator kept its look). Each
        remaining pixel of a matched group gets the object's entry nearest to it (centroids
        aligned), at the depth the generator gave it, so the World can generate the segment
        again, shown the object where it is. Nothing in the layer changes except
        :attr:`last_shown`, which gains the re-found objects (placed centre, pixels).

        Args:
            shown: the read the segment was generated from (:meth:`compose`'s output).
            latents: (B, T, C, h, w) the generated segment's latents.
            depth: (B, T, h, w) its z-depth.
            animated: (B, T, h, w) bool, the world model's motion mask (``~Segment.keep``).
            camera, poses, worlds: as for :meth:`compose`.
            predicted_depth: (B, T, h, w) static memory's predicted depth (+inf: none), or None.

        Returns:
            The read to generate the segment again from, or None when nothing was re-found.
        """
        batch, frames, h, w = depth.shape
        worlds = list(range(batch)) if worlds is None else [int(x) for x in worlds]
        depth = depth.to(self.device, torch.float32)
        candidates = animated.to(self.device).bool() & torch.isfinite(depth) & (depth > 0)
        if predicted_depth is not None:
            candidates &= depth < predicted_depth.to(self.device, torch.float32) * (1 - self.link_tolerance)
        index = torch.as_tensor(worlds, dtype=torch.int64, device=self.device)
        away = (self.alive & self.moved & (self.last_in_view < (self.clock[:, None] - 1)))[index]  # (B, S)
        if not bool(candidates.any()) or not bool(away.any()):
            return None
        labels = _components(candidates.reshape(-1, h, w), depth.reshape(-1, h, w), self.link_tolerance)
        labels = labels.reshape(batch, frames, h, w)
        points = unproject(depth.masked_fill(~candidates, 1.0).to(torch.float64), camera,
                           poses.to(self.device, torch.float64))  # (B, T, h, w, 3)
        generated = latents.to(self.device).movedim(2, -1)  # (B, T, h, w, C)
        out = MemoryRead(latents=shown.latents.movedim(-3, -1).clone(), mask=shown.mask.clone(),
                         depth=shown.depth.clone(), points=shown.points.clone() if shown.points is not None else None)
        found = False
        for row, world in enumerate(worlds):
            slots = torch.nonzero(away[row]).flatten().tolist()
            if not slots:
                continue
            seen_last = torch.nonzero(self.alive[world] & (self.last_in_view[world] >= self.clock[world] - 1)).flatten()
            seen_last = [self._last_position(world, int(s)) for s in seen_last]
            for j in range(frames):
                found |= self._recall_frame(world, row, j, slots, seen_last, labels[row, j], points[row, j],
                                            generated[row, j], depth[row, j], out)
        if not found:
            return None
        return MemoryRead(latents=out.latents.movedim(-1, -3).contiguous(), mask=out.mask, depth=out.depth,
                          points=out.points)

    def _recall_frame(self, world, row, j, slots, seen_last, labels, points, generated, depth, out) -> bool:
        """:meth:`recall` for frame ``j`` of batch row ``row``: writes matched objects into ``out`` (latents
        channels-last); returns whether any was placed."""
        present = labels[labels >= 0]
        if present.numel() == 0:
            return False
        won = self.last_shown["pixels"][row, j] if self.last_shown is not None else None
        last = torch.stack([self._last_position(world, s) for s in slots])  # (n, 3)
        extent = [float(self._extent(world, s)) for s in slots]
        descriptor = self._descriptors(world)[slots]  # (n, C)
        pairs = []
        for g in torch.unique(present).tolist():
            where = labels == g
            group = points[where]
            centroid = group.mean(0)
            if any(float((p - centroid).norm()) <= self.gate for p in seen_last):
                continue  # the layer saw something here in the last frame: not back in view
            size = float((group.amax(0) - group.amin(0)).norm())
            distance = (last - centroid[None]).norm(dim=-1)
            similarity = _likeness(generated[where].to(torch.float32).mean(0)[None], descriptor)
            for k, s in enumerate(slots):
                if won is not None and int(won[s]) > 0:
                    continue  # compose showed it in this frame already
                if float(similarity[k]) < self.reacquire_similarity and float(distance[k]) <= self.reacquire_radius \
                        and size <= extent[k] + self.gate:
                    pairs.append((float(distance[k]), g, s))
        groups, objects, placed = set(), set(), False
        for _, g, s in sorted(pairs):
            if g in groups or s in objects:
                continue
            groups.add(g)
            objects.add(s)
            placed |= self._place(world, row, j, s, labels == g, points, generated, depth, out)
        return placed

    def _place(self, world, row, j, slot, where, points, generated, depth, out) -> bool:
        """Put ``slot``'s entries on the pixels ``where`` of frame ``j`` (see :meth:`recall`)."""
        group = points[where]
        centroid = group.mean(0)
        n = int(self.entry_count[world, slot])
        nearest = torch.cdist((group - centroid).to(torch.float32), self.entry_points[world, slot, :n]).argmin(1)
        remembered = self.entry_features[world, slot, nearest].to(torch.float32)
        # Only where the generator's pixel does not look like the remembered one: where it does,
        # it kept the look, and a stale latent pasted there only blurs it.
        differs = _likeness(generated[where].to(torch.float32), remembered) < self.reacquire_similarity
        if not bool(differs.any()):
            return False
        target = torch.nonzero(where)[differs]
        r, c = target[:, 0], target[:, 1]
        out.latents[row, j, r, c] = remembered[differs].to(out.latents.dtype)
        out.depth[row, j, r, c] = depth[r, c].to(out.depth.dtype)
        out.mask[row, j, r, c] = True
        if out.points is not None:
            out.points[row, j, r, c] = group[differs].to(out.points.dtype)
        if self.last_shown is not None:
            self.last_shown["centre"][row, j, slot] = centroid + self._middle(world, slot)
            self.last_shown["pixels"][row, j, slot] = int(differs.sum())
            self.last_shown["shown"][row, j, slot] = True
        return True

    def _extent(self, world: int, slot: int) -> torch.Tensor:
        """Diagonal of the bounds of a slot's entries (metres, float64)."""
        n = int(self.entry_count[world, slot])
        entries = self.entry_points[world, slot, :n].to(torch.float64)
        return (entries.amax(0) - entries.amin(0)).norm()

    def _middle(self, world: int, slot: int) -> torch.Tensor:
        """Centre of the bounds of a slot's entries in its own frame (float64)."""
        n = int(self.entry_count[world, slot])
        entries = self.entry_points[world, slot, :n].to(torch.float64)
        return 0.5 * (entries.amax(0) + entries.amin(0))

    # ------------------------------------------------------------------ state

    def clear(self, worlds=None) -> None:
        """Forget every object of ``worlds`` (default: all) and restart their clocks."""
        if worlds is None:
            self._allocate()
            return
        index = torch.as_tensor(worlds, dtype=torch.int64, device=self.device).reshape(-1)
        for name in STATE_FIELDS:
            tensor = getattr(self, name)
            tensor[index] = -1 if name == "ident" else 0

    def count(self) -> int:
        """Objects held, over all worlds."""
        return int(self.alive.sum())

    def entries(self) -> int:
        """Latent entries held by live objects, over all worlds."""
        return int(self.entry_count[self.alive].sum())

    def nbytes(self) -> int:
        """Bytes of every tensor the layer holds (fixed by its configuration: it never grows)."""
        return sum(getattr(self, name).element_size() * getattr(self, name).numel() for name in STATE_FIELDS)

    def config(self) -> dict:
        return dict(self.options)

    def state_tensors(self, prefix: str, copy: bool = False) -> dict[str, torch.Tensor]:
        return {prefix + name: (getattr(self, name).detach().to("cpu", copy=True) if copy
                                else getattr(self, name).detach().cpu()).contiguous() for name in STATE_FIELDS}

    def load_tensors(self, tensors: dict[str, torch.Tensor], prefix: str, check) -> None:
        """Take ``prefix``-named tensors (from :meth:`state_tensors`), each validated by ``check``
        (a :class:`~.fileformat.StateCheck`) before any is taken, so a refused state changes nothing."""
        w, s, length, e = self.num_worlds, self.max_objects, self.track_length, self.max_entries
        layout = {
            "alive": (torch.bool, (w, s)), "lost": (torch.bool, (w, s)), "moved": (torch.bool, (w, s)),
            "first_pos": (torch.float64, (w, s, 3)), "ident": (torch.int64, (w, s)),
            "next_id": (torch.int64, (w,)), "clock": (torch.int64, (w,)), "last_seen": (torch.int64, (w, s)),
            "last_in_view": (torch.int64, (w, s)),
            "track_time": (torch.int64, (w, s, length)), "track_pos": (torch.float64, (w, s, length, 3)),
            "track_len": (torch.int64, (w, s)), "entry_points": (torch.float32, (w, s, e, 3)),
            "entry_features": (self.feature_dtype, (w, s, e, self.channels)),
            "entry_time": (torch.int64, (w, s, e)), "entry_count": (torch.int64, (w, s)),
        }
        unknown = sorted(k for k in tensors if k.startswith(prefix) and k[len(prefix):] not in layout)
        if unknown:
            check.fail(unknown[0], "is not a tensor of a saved object layer")
        part = {name: check.tensor(tensors, prefix + name, *layout[name]) for name in STATE_FIELDS}
        for name in ("track_pos", "first_pos", "entry_points", "entry_features"):
            check.finite(part[name], prefix + name)
        clock = part["clock"]
        check.within(clock, prefix + "clock", 0, what="frame times")
        check.within(part["track_len"], prefix + "track_len", 0, length, "track lengths")
        check.within(part["entry_count"], prefix + "entry_count", 0, e, "entry counts")
        alive = part["alive"]
        if bool((part["lost"] & ~alive).any()):
            check.fail(prefix + "lost", "marks an empty slot lost")
        if bool((alive & (part["track_len"] < 1)).any()) or bool((alive & (part["entry_count"] < 1)).any()):
            check.fail(prefix + "track_len", "or entry_count is 0 for a live object (every object was seen once)")
        late = (part["last_seen"] > part["last_in_view"]) | (part["last_in_view"] > clock[:, None])
        if bool(late.any()) or bool((part["track_time"] > clock[:, None, None]).any()):
            check.fail(prefix + "last_seen", "or track_time holds a frame after its world's clock")
        ident = part["ident"]
        if bool(((ident < 0) & alive).any()) or bool(((ident >= part["next_id"][:, None]) & alive).any()):
            check.fail(prefix + "ident", "holds an id outside [0, next_id) for a live object")
        for world in range(w):
            check.unique(ident[world][alive[world]], prefix + "ident", "object ids in one world")
        for name in STATE_FIELDS:
            setattr(self, name, part[name].to(self.device, copy=True))


def _likeness(latents: torch.Tensor, remembered: torch.Tensor) -> torch.Tensor:
    """(N,) how much each of ``latents`` (N, C) looks like ``remembered`` (N or 1, C): 1 - their distance relative
    to the remembered latent's length. Not their cosine: a latent is dominated by its per-colour means, so any two
    looks of one thing in daylight colours have a cosine above 0.9 (measured: 0.93 to 0.99 between a crate's
    remembered look and the new ones drawn for it); only the difference tells a new look from the kept one."""
    return 1 - (latents - remembered).norm(dim=-1) / remembered.norm(dim=-1).clamp_min(1e-12)


def _components(candidates: torch.Tensor, depth: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Connected groups of candidate pixels per frame: (N, h, w) int64 labels, -1 where not a candidate.

    Two 4-neighbours are connected when both are candidates and their depths agree within
    ``tolerance`` (relative): neighbours on the grid that are also near in 3D. Labels spread
    as the minimum over connected neighbours until nothing changes (at most h x w rounds,
    in practice about the groups' diameter), one tensor op per round for every frame.
    """
    n, h, w = candidates.shape
    big = n * h * w
    labels = torch.arange(big, device=candidates.device).reshape(n, h, w)
    labels = torch.where(candidates, labels, torch.full_like(labels, big))
    safe = torch.where(candidates, depth, torch.full_like(depth, math.inf))
    near_x = candidates[:, :, 1:] & candidates[:, :, :-1] & \
        ((safe[:, :, 1:] - safe[:, :, :-1]).abs() <= tolerance * torch.minimum(safe[:, :, 1:], safe[:, :, :-1]))
    near_y = candidates[:, 1:] & candidates[:, :-1] & \
        ((safe[:, 1:] - safe[:, :-1]).abs() <= tolerance * torch.minimum(safe[:, 1:], safe[:, :-1]))
    for _ in range(h * w):
        before = labels
        labels = labels.clone()
        labels[:, :, 1:] = torch.where(near_x, torch.minimum(labels[:, :, 1:], before[:, :, :-1]), labels[:, :, 1:])
        labels[:, :, :-1] = torch.where(near_x, torch.minimum(labels[:, :, :-1], before[:, :, 1:]), labels[:, :, :-1])
        labels[:, 1:] = torch.where(near_y, torch.minimum(labels[:, 1:], before[:, :-1]), labels[:, 1:])
        labels[:, :-1] = torch.where(near_y, torch.minimum(labels[:, :-1], before[:, 1:]), labels[:, :-1])
        if torch.equal(labels, before):
            break
    return torch.where(candidates, labels, torch.full_like(labels, -1))


def object_layer_options(value, check=None, field: str = "objects") -> dict | None:
    """The object layer's options from a memory's ``objects`` argument or saved config.

    ``True``: the defaults; ``False`` or None: no layer (returns None); a dict: options
    overriding :data:`OBJECT_DEFAULTS`. With ``check`` (a :class:`~.fileformat.StateCheck`)
    a bad value is a MemoryFileError naming ``field``, else a ValueError.
    """
    if value is None or value is False:
        return None
    if value is True:
        return dict(OBJECT_DEFAULTS)
    if not isinstance(value, dict):
        message = f"must be true, false or a dict of object layer options, got {value!r}"
        if check is not None:
            check.fail(field, message)
        raise ValueError(f"{field} {message}")
    try:
        return _checked_settings(value)
    except ValueError as error:
        if check is not None:
            check.fail(field, f"is invalid ({error})")
        raise


# Bounds on what a configuration (perhaps read from a file) may make a layer allocate.
_LIMITS = {"max_objects": 1024, "max_entries": 1 << 16, "track_length": 1024, "forget_after": 1 << 40,
           "min_pixels": 1 << 20}


def _checked_settings(options: dict) -> dict:
    """:data:`OBJECT_DEFAULTS` overridden by ``options``, every value checked (ValueError naming it)."""
    unknown = sorted(set(options) - set(OBJECT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown object layer option {unknown[0]!r}; valid: {', '.join(OBJECT_DEFAULTS)}")
    settings = {**OBJECT_DEFAULTS, **options}
    for name, limit in _LIMITS.items():
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"object layer option {name} must be an integer in [1, {limit}], got {value!r}")
    if settings["track_length"] < 2:
        raise ValueError(f"object layer option track_length must be >= 2 (a velocity needs two sightings), "
                         f"got {settings['track_length']}")
    for name in ("max_uncertainty", "gate", "reacquire_radius", "min_motion", "link_tolerance", "measurement_noise",
                 "acceleration", "min_similarity", "reacquire_similarity"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"object layer option {name} must be a finite number >= 0, got {value!r}")
    return {k: type(OBJECT_DEFAULTS[k])(v) for k, v in settings.items()}
