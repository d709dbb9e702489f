"""The procedural model's ray cast and shading as compiled CPU kernels (numba).

The same maths as ``ProceduralWorldModel._cast`` / ``_cast_objects`` / ``_shade``, one
ray at a time instead of one tensor op at a time, written so every float32 operation
happens in the same order as in the torch code: the results are bit-for-bit those of
the torch path (tests/test_compiled.py checks it). That is why some things look
roundabout here: constants are float32 (a float64 literal would promote the
arithmetic), the screen-space cull of the torch path is repeated (it decides which
ray-box pairs are tested at all), and ``exp`` is not called here (numba's ``expf``
and torch's vectorised one differ in the last bit for ~1% of inputs; the caller
computes the fog factor with torch from ``fog_arg``).

Arrays: V views (world-frames), P = H * W rays, K boxes, S surfaces.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..memory.lift_kernels import kth_smallest

_F = np.float32
_TINY = _F(1e-9)
_ONE = _F(1.0)
_NEAR_CORNER = _F(1e-2)
_HIT_MIN = _F(1e-4)
_FACES = 6


@njit(cache=True, inline="always")
def _rotate(r, x, y, z, i):
    # (r0 * x + r1 * y) + r2 * z, as procedural._rotate.
    return r[i, 0] * x + r[i, 1] * y + r[i, 2] * z


@njit(cache=True)
def _cast_view(v, rays, rotation, origin, room_lo, room_hi, box_lo, box_hi, outdoor, sky_id, fx, fy, cx, cy,
               width, height, directions, depth, surface, face_axis):
    r = rotation[v]
    o0, o1, o2 = origin[v, 0], origin[v, 1], origin[v, 2]
    boxes = box_lo.shape[1]
    # Screen rectangle of every box (the torch path's cull, repeated so the same pairs are tested).
    u_lo = np.empty(boxes, np.float32)
    u_hi = np.empty(boxes, np.float32)
    v_lo = np.empty(boxes, np.float32)
    v_hi = np.empty(boxes, np.float32)
    for k in range(boxes):
        all_front = True
        any_front = False
        umin = np.float32(np.inf)
        umax = np.float32(-np.inf)
        vmin = np.float32(np.inf)
        vmax = np.float32(-np.inf)
        for c in range(8):
            cx0 = (box_hi[v, k, 0] if (c >> 2) & 1 else box_lo[v, k, 0]) - o0
            cx1 = (box_hi[v, k, 1] if (c >> 1) & 1 else box_lo[v, k, 1]) - o1
            cx2 = (box_hi[v, k, 2] if c & 1 else box_lo[v, k, 2]) - o2
            # The transposed rotation: column i of R^T is row i of R.
            l0 = r[0, 0] * cx0 + r[1, 0] * cx1 + r[2, 0] * cx2
            l1 = r[0, 1] * cx0 + r[1, 1] * cx1 + r[2, 1] * cx2
            l2 = r[0, 2] * cx0 + r[1, 2] * cx1 + r[2, 2] * cx2
            if not l2 > _NEAR_CORNER:
                all_front = False
            if l2 > 0:
                any_front = True
            safe_z = l2 if l2 > _NEAR_CORNER else _ONE
            uu = fx * l0 / safe_z + cx
            vv = fy * l1 / safe_z + cy
            umin = min(umin, uu)
            umax = max(umax, uu)
            vmin = min(vmin, vv)
            vmax = max(vmax, vv)
        if not all_front and any_front:  # straddles the camera plane: every ray
            u_lo[k], u_hi[k], v_lo[k], v_hi[k] = -np.inf, np.inf, -np.inf, np.inf
        elif not any_front:  # wholly behind: none
            u_lo[k], u_hi[k], v_lo[k], v_hi[k] = np.inf, -np.inf, np.inf, -np.inf
        else:
            u_lo[k], u_hi[k], v_lo[k], v_hi[k] = umin - _ONE, umax + _ONE, vmin - _ONE, vmax + _ONE
    to_lo = np.empty((boxes, 3), np.float32)
    to_hi = np.empty((boxes, 3), np.float32)
    for k in range(boxes):
        for a in range(3):
            to_lo[k, a] = box_lo[v, k, a] - origin[v, a]
            to_hi[k, a] = box_hi[v, k, a] - origin[v, a]

    p_row, p_column = 0, -1  # of pixel p, kept by counters (no integer division per ray)
    for p in range(rays.shape[0]):
        p_column += 1
        if p_column == width:
            p_column = 0
            p_row += 1
        x, y, z = rays[p, 0], rays[p, 1], rays[p, 2]
        d0 = _rotate(r, x, y, z, 0)
        d1 = _rotate(r, x, y, z, 1)
        d2 = _rotate(r, x, y, z, 2)
        directions[v, p, 0], directions[v, p, 1], directions[v, p, 2] = d0, d1, d2
        i0 = _ONE / (_TINY if abs(d0) < _TINY else d0)
        i1 = _ONE / (_TINY if abs(d1) < _TINY else d1)
        i2 = _ONE / (_TINY if abs(d2) < _TINY else d2)
        # The room, from inside: the exit face.
        e0 = ((room_hi[v, 0] if d0 > 0 else room_lo[v, 0]) - o0) * i0
        e1 = ((room_hi[v, 1] if d1 > 0 else room_lo[v, 1]) - o1) * i1
        e2 = ((room_hi[v, 2] if d2 > 0 else room_lo[v, 2]) - o2) * i2
        yz = min(e1, e2)
        axis = 0 if e0 <= yz else (1 if e1 <= e2 else 2)
        t = min(e0, yz)
        step = d0 if axis == 0 else (d1 if axis == 1 else d2)
        positive = step > 0
        s = axis * 2 + (1 if positive else 0)
        if outdoor and not (axis == 1 and positive):
            t = np.float32(np.inf)
            s = sky_id
        # Objects: nearest slab hit among boxes whose screen rectangle holds the pixel centre.
        column = np.float32(p_column) + np.float32(0.5)
        row = np.float32(p_row) + np.float32(0.5)
        best = np.float32(np.inf)
        best_k = -1
        best_axis = 0
        for k in range(boxes):
            if not (column >= u_lo[k] and column <= u_hi[k] and row >= v_lo[k] and row <= v_hi[k]):
                continue
            a0, b0 = to_lo[k, 0] * i0, to_hi[k, 0] * i0
            a1, b1 = to_lo[k, 1] * i1, to_hi[k, 1] * i1
            a2, b2 = to_lo[k, 2] * i2, to_hi[k, 2] * i2
            n0, n1, n2 = min(a0, b0), min(a1, b1), min(a2, b2)
            t_near = max(max(n0, n1), n2)
            t_far = min(min(max(a0, b0), max(a1, b1)), max(a2, b2))
            if t_near <= t_far and t_near > _HIT_MIN and t_near < best:
                best = t_near
                best_k = k
                best_axis = 0 if n0 >= max(n1, n2) else (1 if n1 >= n2 else 2)
        if best_k >= 0 and best < t:
            step = d0 if best_axis == 0 else (d1 if best_axis == 1 else d2)
            t = best
            s = _FACES + best_k * _FACES + best_axis * 2 + (1 if step < 0 else 0)
            axis = best_axis
        depth[v, p] = t
        surface[v, p] = s
        face_axis[v, p] = axis


@njit(cache=True)
def _cast_serial(rays, rotation, origin, room_lo, room_hi, box_lo, box_hi, outdoor, sky_id, fx, fy, cx, cy,
                 width, height, directions, depth, surface, face_axis):
    for v in range(rotation.shape[0]):
        _cast_view(v, rays, rotation, origin, room_lo, room_hi, box_lo, box_hi, outdoor, sky_id, fx, fy, cx, cy,
                   width, height, directions, depth, surface, face_axis)


@njit(cache=True, parallel=True)
def _cast_parallel(rays, rotation, origin, room_lo, room_hi, box_lo, box_hi, outdoor, sky_id, fx, fy, cx, cy,
                   width, height, directions, depth, surface, face_axis):
    for v in prange(rotation.shape[0]):
        _cast_view(v, rays, rotation, origin, room_lo, room_hi, box_lo, box_hi, outdoor, sky_id, fx, fy, cx, cy,
                   width, height, directions, depth, surface, face_axis)


def cast(rays, rotation, origin, room_lo, room_hi, box_lo, box_hi, outdoor, sky_id, camera, parallel):
    """Depth (V, P) float32, surface and face axis (V, P) int64, directions (V, P, 3) float32.

    ``room_lo``/``room_hi`` are per view (V, 3); boxes (V, K, 3) where each view sees them.
    """
    views, pixels = rotation.shape[0], rays.shape[0]
    directions = np.empty((views, pixels, 3), np.float32)
    depth = np.empty((views, pixels), np.float32)
    surface = np.empty((views, pixels), np.int64)
    face_axis = np.empty((views, pixels), np.int64)
    kernel = _cast_parallel if parallel and views > 1 else _cast_serial
    kernel(rays, rotation, origin, room_lo, room_hi, box_lo, box_hi, outdoor, sky_id, _F(camera.fx), _F(camera.fy),
           _F(camera.cx), _F(camera.cy), camera.width, camera.height, directions, depth, surface, face_axis)
    return depth, surface, face_axis, directions


@njit(cache=True)
def _latent_view(v, depth, surface, width, factor, latent_depth, centre_surface, fog_arg):
    h, w = latent_depth.shape[1], latent_depth.shape[2]
    patch = np.empty(factor * factor, np.float32)
    for i in range(h):
        for j in range(w):
            n = 0
            for a in range(factor):
                for b in range(factor):
                    patch[n] = depth[v, (i * factor + a) * width + j * factor + b]
                    n += 1
            latent_depth[v, i, j] = kth_smallest(patch, (factor * factor) // 2)
            centre_surface[v, i, j] = surface[v, (i * factor + factor // 2) * width + j * factor + factor // 2]
    for p in range(depth.shape[1]):
        d = depth[v, p]
        fog_arg[v, p] = -(d if np.isfinite(d) else np.float32(0.0)) / np.float32(25.0)


@njit(cache=True, parallel=True)
def _latent_parallel(depth, surface, width, factor, latent_depth, centre_surface, fog_arg):
    for v in prange(depth.shape[0]):
        _latent_view(v, depth, surface, width, factor, latent_depth, centre_surface, fog_arg)


@njit(cache=True)
def _latent_serial(depth, surface, width, factor, latent_depth, centre_surface, fog_arg):
    for v in range(depth.shape[0]):
        _latent_view(v, depth, surface, width, factor, latent_depth, centre_surface, fog_arg)


def latent_grid(depth, surface, width, height, factor, parallel):
    """Median depth per latent pixel (V, h, w), the surface at each patch's centre pixel (V, h, w), and
    ``-finite_depth / 25`` (V, P), the argument of the fog's exp."""
    views = depth.shape[0]
    latent_depth = np.empty((views, height // factor, width // factor), np.float32)
    centre_surface = np.empty((views, height // factor, width // factor), np.int64)
    fog_arg = np.empty_like(depth)
    kernel = _latent_parallel if parallel and views > 1 else _latent_serial
    kernel(depth, surface, width, factor, latent_depth, centre_surface, fog_arg)
    return latent_depth, centre_surface, fog_arg


@njit(cache=True, inline="always")
def _mod2(x):
    # ``x % 2`` of a whole float32 (below 2**24 in size, as surface coordinates times a pattern scale are):
    # every step is exact, so it is the remainder torch and Python give, without a call to fmod.
    return x - np.float32(2.0) * np.floor(x * np.float32(0.5))


@njit(cache=True)
def _shade_view(v, world, directions, origin, depth, surface, face_axis, appearance, fog, ray_length, outdoor, sky_id,
                width, factor, image):
    o0, o1, o2 = origin[v, 0], origin[v, 1], origin[v, 2]
    b = world[v]
    zero, one = np.float32(0.0), np.float32(1.0)
    light = (np.float32(0.45), np.float32(0.75), np.float32(0.5))
    if outdoor:
        top0 = (np.float32(0.15) + np.float32(0.5) * appearance[b, sky_id, 0]) * np.float32(0.5)
        top1 = (np.float32(0.15) + np.float32(0.5) * appearance[b, sky_id, 1]) * np.float32(0.7)
        top2 = (np.float32(0.15) + np.float32(0.5) * appearance[b, sky_id, 2]) * np.float32(1.0)
        hor0 = np.float32(0.6) + np.float32(0.4) * appearance[b, sky_id, 3]
        hor1 = np.float32(0.6) + np.float32(0.4) * appearance[b, sky_id, 4]
        hor2 = np.float32(0.6) + np.float32(0.4) * appearance[b, sky_id, 5]
    # Pixel p = row * width + column, in row-major order; its place in the codec patches is kept by
    # counters (an integer division per pixel by a runtime width or factor costs more than the shading).
    i_patch, a_in, j_patch, b_in, column = 0, 0, 0, -1, -1
    for p in range(depth.shape[1]):
        column += 1
        b_in += 1
        if b_in == factor:
            b_in = 0
            j_patch += 1
        if column == width:
            column, b_in, j_patch = 0, 0, 0
            a_in += 1
            if a_in == factor:
                a_in = 0
                i_patch += 1
        s = surface[v, p]
        axis = face_axis[v, p]
        d = depth[v, p]
        t = d if np.isfinite(d) else zero
        d0, d1, d2 = directions[v, p, 0], directions[v, p, 1], directions[v, p, 2]
        q0, q1, q2 = o0 + d0 * t, o1 + d1 * t, o2 + d2 * t
        u = q2 if axis == 0 else q0
        w = q2 if axis == 1 else q1
        scale = one + np.float32(3.0) * appearance[b, s, 3]
        kind = int(appearance[b, s, 4] * np.float32(4.0))
        su, sv = u * scale, w * scale
        if kind == 1:
            pattern = _mod2(np.floor(su) + np.floor(sv))
        elif kind == 2:
            pattern = _mod2(np.floor(su + sv))
        elif kind == 3:
            fv = sv - np.trunc(sv)
            shifted = su + np.float32(0.5) * _mod2(np.floor(sv))
            fu = shifted - np.trunc(shifted)
            pattern = zero if (fv < np.float32(0.12) or fu < np.float32(0.08)) else one
        else:
            pattern = one
        pattern = np.float32(pattern)
        accent = np.float32(0.55) + np.float32(0.35) * appearance[b, s, 5]
        mix = accent + (one - accent) * pattern
        lit = np.float32(0.45) + np.float32(0.55) * light[axis]
        f = fog[v, p]
        haze = np.float32(0.6) * (one - f)
        if outdoor and s == sky_id:
            elevation = -d1 / ray_length[p]
            elevation = min(max(elevation, -one), one)
            elevation = min(max(elevation, zero), one)
        for c in range(3):
            base = np.float32(0.2) + np.float32(0.75) * appearance[b, s, c]
            colour = base * mix
            colour = colour * lit
            colour = colour * f + haze
            if outdoor and s == sky_id:
                top = top0 if c == 0 else (top1 if c == 1 else top2)
                hor = hor0 if c == 0 else (hor1 if c == 1 else hor2)
                colour = hor + (top - hor) * elevation
            image[v, c, i_patch, j_patch, a_in * factor + b_in] = min(max(colour, zero), one)


@njit(cache=True)
def _shade_serial(world, directions, origin, depth, surface, face_axis, appearance, fog, ray_length, outdoor, sky_id,
                  width, factor, image):
    for v in range(depth.shape[0]):
        _shade_view(v, world, directions, origin, depth, surface, face_axis, appearance, fog, ray_length, outdoor,
                    sky_id, width, factor, image)


@njit(cache=True, parallel=True)
def _shade_parallel(world, directions, origin, depth, surface, face_axis, appearance, fog, ray_length, outdoor,
                    sky_id, width, factor, image):
    for v in prange(depth.shape[0]):
        _shade_view(v, world, directions, origin, depth, surface, face_axis, appearance, fog, ray_length, outdoor,
                    sky_id, width, factor, image)


def shade(world, directions, origin, depth, surface, face_axis, appearance, fog, ray_length, outdoor, sky_id, width,
          height, factor, parallel, image):
    """Images as codec patches into ``image`` (V, 3, H/f, W/f, f*f) float32, in [0, 1] (what
    ``PatchDCTCodec.encode_patches`` takes, so the codec copies no pixels); ``world`` (V,) is each
    view's row of ``appearance`` (W, S, 6)."""
    views = depth.shape[0]
    kernel = _shade_parallel if parallel and views > 1 else _shade_serial
    kernel(world, directions, origin, depth, surface, face_axis, appearance, fog, ray_length, outdoor, sky_id, width,
           factor, image)
    return image


@njit(cache=True)
def bookkeeping(index, frames_per_view, surface, centre_surface, latent_depth, memory_mask, memory_depth,
                use_memory, tolerance, fresh, appearance, committed, in_view, moving_first, factor, width,
                memory_used, moving):
    """The per-surface bookkeeping of ``ProceduralWorldModel._generate`` around the shading, in place.

    Args:
        index: (B,) world of each batch item (distinct).
        surface: (B, T, P) int64 surface of every ray; centre_surface, latent_depth (B, T, h, w).
        memory_mask, memory_depth: (B, T, h, w) the projected memory (read only when ``use_memory``).
        tolerance: float32 relative depth within which memory agrees with the geometry.
        fresh: (B, S, 6) float32 looks drawn for this segment.
        appearance, committed: (W, S, 6) float32; in_view (W, S) bool: the model's per-world state.
        moving_first: first surface of the moving crate (it has 6).

    Fills ``memory_used`` (B, T, h, w) (memory agrees with the geometry there) and ``moving``
    (B, T, h, w) (a latent pixel shows the moving crate anywhere in its patch); updates
    ``appearance``, ``committed`` and ``in_view`` of the worlds in ``index`` as the torch path does.
    """
    batch, frames, h, w = latent_depth.shape
    surfaces = fresh.shape[1]
    shown = np.zeros(surfaces, np.bool_)
    seen = np.zeros(surfaces, np.bool_)
    last = np.zeros(surfaces, np.bool_)
    for b in range(batch):
        world = index[b]
        shown[:] = False
        for t in range(frames):
            for i in range(h):
                for j in range(w):
                    used = False
                    if use_memory and memory_mask[b, t, i, j]:
                        d = latent_depth[b, t, i, j]
                        used = abs(memory_depth[b, t, i, j] - d) <= tolerance * d
                    memory_used[b, t, i, j] = used
                    if used:
                        shown[centre_surface[b, t, i, j]] = True
        # Surfaces still in view keep their look; surfaces memory shows keep the look it recorded.
        for s in range(surfaces):
            if in_view[world, s]:
                continue
            for c in range(6):
                appearance[world, s, c] = committed[world, s, c] if shown[s] else fresh[b, s, c]
        seen[:] = False
        last[:] = False
        for t in range(frames):
            is_last = (t % frames_per_view) == frames_per_view - 1
            for p in range(surface.shape[2]):
                s = surface[b, t, p]
                seen[s] = True
                if is_last:
                    last[s] = True
            for i in range(h):
                for j in range(w):
                    hit = False
                    for a in range(factor):
                        for c in range(factor):
                            s = surface[b, t, (i * factor + a) * width + j * factor + c]
                            if s >= moving_first and s < moving_first + 6:
                                hit = True
                    moving[b, t, i, j] = hit
        for s in range(surfaces):
            in_view[world, s] = last[s]
            if seen[s]:
                for c in range(6):
                    committed[world, s, c] = appearance[world, s, c]


@njit(cache=True, inline="always")
def _point_box(a0, a1, lo0, lo1, hi0, hi1):
    # ``_point_box_distance``: the norm of the per-axis excess, summed as numpy's norm sums two squares.
    e0 = max(max(lo0 - a0, a0 - hi0), 0.0)
    e1 = max(max(lo1 - a1, a1 - hi1), 0.0)
    return np.sqrt(e0 * e0 + e1 * e1)


@njit(cache=True)
def _segment_box(a0, a1, b0, b1, lo0, lo1, hi0, hi1):
    # ``_segment_box_distance`` for one segment and one rectangle, in its float64 order.
    d0, d1 = b0 - a0, b1 - a1
    enter, leave = -np.inf, np.inf
    for axis in range(2):
        a, d, lo, hi = (a0, d0, lo0, hi0) if axis == 0 else (a1, d1, lo1, hi1)
        if abs(d) < 1e-12:
            within = a >= lo and a <= hi
            enter = max(enter, -np.inf if within else np.inf)
            leave = min(leave, np.inf if within else -np.inf)
        else:
            t1, t2 = (lo - a) / d, (hi - a) / d
            enter = max(enter, min(t1, t2))
            leave = min(leave, max(t1, t2))
    if max(enter, 0.0) <= min(leave, 1.0):
        return 0.0
    distance = min(_point_box(a0, a1, lo0, lo1, hi0, hi1), _point_box(b0, b1, lo0, lo1, hi0, hi1))
    length2 = d0 * d0 + d1 * d1
    divisor = length2 if length2 > 0 else 1.0
    for corner in range(4):
        c0 = lo0 if corner in (0, 2) else hi0
        c1 = lo1 if corner in (0, 3) else hi1
        t = ((c0 - a0) * d0 + (c1 - a1) * d1) / divisor
        t = min(max(t, 0.0), 1.0)
        n0, n1 = c0 - (a0 + t * d0), c1 - (a1 + t * d1)
        distance = min(distance, np.sqrt(n0 * n0 + n1 * n1))
    return distance


@njit(cache=True)
def blocked(room_lo, room_hi, box_lo, box_hi, start, end, clearance, out):
    """``ProceduralWorldModel.blocked``'s distances for N cameras: room (N, 3), object footprints in x and z
    (N, K, 2), start and end (N, 3), all float64, in the numpy code's order; True into ``out`` where blocked."""
    for n in range(start.shape[0]):
        inside_start, inside_end = np.inf, np.inf
        for a in range(3):
            inside_start = min(inside_start, min(start[n, a] - room_lo[n, a], room_hi[n, a] - start[n, a]))
            inside_end = min(inside_end, min(end[n, a] - room_lo[n, a], room_hi[n, a] - end[n, a]))
        hit = inside_end < min(inside_start, clearance)
        a0, a1, b0, b1 = start[n, 0], start[n, 2], end[n, 0], end[n, 2]
        for k in range(box_lo.shape[1]):
            lo0, lo1, hi0, hi1 = box_lo[n, k, 0], box_lo[n, k, 1], box_hi[n, k, 0], box_hi[n, k, 1]
            near_start = _point_box(a0, a1, lo0, lo1, hi0, hi1)
            if _segment_box(a0, a1, b0, b1, lo0, lo1, hi0, hi1) < min(near_start, clearance):
                hit = True
        out[n] = hit
