"""The procedural model's ray cast and shading as compiled CPU kernels (numba).

The same maths as ``ProceduralWorldModel._cast`` / ``_cast_objects`` / ``_shade``, a row
of rays at a time instead of one tensor op at a time, written so every float32 operation
happens in the same order as in the torch code: the results are bit-for-bit those of
the torch path (tests/test_compiled.py, tests/test_procedural_kernels.py check it). That is why some things look
roundabout here: constants are float32 (a float64 literal would promote the
arithmetic), the screen-space cull of the torch path is repeated (it decides which
ray-box pairs are tested at all), and ``exp`` is not called here (numba's ``expf``
and torch's vectorised one differ in the last bit for ~1% of inputs; the caller
computes the fog factor with torch from ``fog_arg``).

Arrays: V views (world-frames), P = H * W rays, K boxes, S surfaces.

The row loops are shaped for LLVM's vectoriser, which numba runs: a loop vectorises only when it
has no table lookups (they are done in a loop of their own before it) and its selects compare
32-bit values (an int64 ``kind`` kept the shading's pattern loop scalar). The box loop stays
scalar: with ``np.minimum``/``np.maximum`` instead of the builtins it vectorises, but measured
2-5x slower in the kernel (a box's column run in a row is short).

Why it is long: a segment is three kernels (``front``: cast, latent grid and bookkeeping; ``shade``;
the codec's in :mod:`.codec_kernels`) plus the collision check, and each must mirror its torch code
line by line; splitting them across files would separate the helpers they share.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..memory.lift_kernels import kth_smallest
# numba caches this module's kernels by this file alone: an edit of the helper imported above must
# come with an edit here, or a checkout keeps machine code with the old helper (compiled.py).
from .movers import MOTIONS
from .movers import SIDE as _MOVER_SIDE

_F = np.float32
_TINY = _F(1e-9)
_ONE = _F(1.0)
_NEAR_CORNER = _F(1e-2)
_HIT_MIN = _F(1e-4)
# The straddling-box cull (_screen_intervals): half the least depth of a hit, and a pixel of margin.
_CLIP_DEPTH = 5e-5
_CLIP_MARGIN = 1.0
_FACES = 6
if MOTIONS != ("slide", "circle", "stop_and_go"):  # mover_boxes below follows movers.mover_centres line by line
    raise ImportError(f"procedural_kernels.mover_boxes knows the motions slide, circle, stop_and_go, not {MOTIONS}")


@njit(cache=True, inline="always")
def _rotate(r, x, y, z, i):
    # (r0 * x + r1 * y) + r2 * z, as procedural._rotate.
    return r[i, 0] * x + r[i, 1] * y + r[i, 2] * z


@njit(cache=True)
def _rotation(poses, b, t):
    # ``poses.to(torch.float32)``'s rounding of the camera's rotation (float64 -> float32, to nearest).
    r = np.empty((3, 3), np.float32)
    for i in range(3):
        for j in range(3):
            r[i, j] = np.float32(poses[b, t, i, j])
    return r


@njit(cache=True)
def _clipped_rectangle(r, o0, o1, o2, lo, hi, fx, fy, cx, cy):
    """The screen rectangle (u_lo, u_hi, v_lo, v_hi, float64) of the part of box (lo, hi) at camera depth
    ``_CLIP_DEPTH`` or more; an empty one (lo > hi) when no part is. For a box the torch cull sends every ray
    to: why fewer are enough is said in ``_screen_intervals``."""
    z = np.empty(8, np.float64)
    x = np.empty(8, np.float64)
    y = np.empty(8, np.float64)
    r64 = r.astype(np.float64)
    for c in range(8):
        p0 = np.float64(hi[0] if (c >> 2) & 1 else lo[0]) - np.float64(o0)
        p1 = np.float64(hi[1] if (c >> 1) & 1 else lo[1]) - np.float64(o1)
        p2 = np.float64(hi[2] if c & 1 else lo[2]) - np.float64(o2)
        x[c] = r64[0, 0] * p0 + r64[1, 0] * p1 + r64[2, 0] * p2
        y[c] = r64[0, 1] * p0 + r64[1, 1] * p1 + r64[2, 1] * p2
        z[c] = r64[0, 2] * p0 + r64[1, 2] * p1 + r64[2, 2] * p2
    umin, umax, vmin, vmax = np.inf, -np.inf, np.inf, -np.inf
    near = _CLIP_DEPTH
    # The clipped solid's vertices: the corners at the clip depth or beyond, and where the box's edges
    # cross the clip plane.
    for c in range(8):
        if z[c] >= near:
            u, v = x[c] / z[c], y[c] / z[c]
            umin, umax, vmin, vmax = min(umin, u), max(umax, u), min(vmin, v), max(vmax, v)
        for bit in (1, 2, 4):
            e = c | bit
            if e == c or (z[c] >= near) == (z[e] >= near):
                continue
            s = (near - z[c]) / (z[e] - z[c])
            u = (x[c] + s * (x[e] - x[c])) / near
            v = (y[c] + s * (y[e] - y[c])) / near
            umin, umax, vmin, vmax = min(umin, u), max(umax, u), min(vmin, v), max(vmax, v)
    f_x, f_y = np.float64(fx), np.float64(fy)
    return (f_x * umin + np.float64(cx) - _CLIP_MARGIN, f_x * umax + np.float64(cx) + _CLIP_MARGIN,
            f_y * vmin + np.float64(cy) - _CLIP_MARGIN, f_y * vmax + np.float64(cy) + _CLIP_MARGIN)


@njit(cache=True, inline="always")
def _centres_within(lo, hi, count):
    """The first and last of ``count`` pixels whose centre lies in [lo, hi] (count, -1: none). Centres increase
    along a row or column, so those inside are one run. The bounds are float64: a float32 bound (the torch
    cull's) widens exactly, and a centre c + 0.5 is exact in either width, so every comparison is the one the
    float32 arithmetic makes."""
    first, last = count, -1
    for c in range(count):
        centre = np.float64(c) + 0.5
        if centre >= lo and centre <= hi:
            first = min(first, c)
            last = c
    return first, last


@njit(cache=True)
def _screen_intervals(r, o0, o1, o2, box_lo, box_hi, fx, fy, cx, cy, width, height, span, to_lo, to_hi):
    """Per box k, the first and last column (``span[k, 0:2]``) and row (``span[k, 2:4]``) of the rays tested
    against it, and the box's planes relative to the camera (``to_lo``, ``to_hi``).

    The torch cull decides which ray-box pairs are tested, so its outcome is part of the result; this one is
    it or a subset of it that keeps every pair that can pass the slab test, hence the same output bits. For
    a box wholly in front of the camera it is the torch cull: the rectangle of the 8 projected corners plus a
    pixel (computed as torch does, in float32). Where torch sends every ray (a box straddling the camera
    plane), the rectangle of the box clipped at camera depth ``_CLIP_DEPTH`` plus ``_CLIP_MARGIN`` pixels:
    a pair passes only with t_near > 1e-4, and the rays' camera z is 1, so the entry point o + t_near d lies
    in the box (to within float32's rounding, relative to its distance from the camera: ~1e-6 rad, well under
    a pixel; the 1e-9 guard on a tiny direction component only narrows a slab or moves it by < 1e-8 rad) at
    camera depth ~t_near, beyond the clip depth with a factor 2 to spare; its pixel is inside the projection
    of the clipped box, which lies inside the rectangle of that solid's projected vertices (computed in
    float64, so the rectangle's own rounding is negligible beside the margin). The margin is far from tight:
    the test that checks every hitting pair fails at -0.05 px and passes at 0."""
    for k in range(box_lo.shape[0]):
        all_front = True
        any_front = False
        umin = np.float32(np.inf)
        umax = np.float32(-np.inf)
        vmin = np.float32(np.inf)
        vmax = np.float32(-np.inf)
        for c in range(8):
            cx0 = (box_hi[k, 0] if (c >> 2) & 1 else box_lo[k, 0]) - o0
            cx1 = (box_hi[k, 1] if (c >> 1) & 1 else box_lo[k, 1]) - o1
            cx2 = (box_hi[k, 2] if c & 1 else box_lo[k, 2]) - o2
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
        if not all_front and any_front:  # straddles the camera plane: torch tests every ray
            u_lo, u_hi, v_lo, v_hi = _clipped_rectangle(r, o0, o1, o2, box_lo[k], box_hi[k], fx, fy, cx, cy)
        elif any_front:
            u_lo, u_hi, v_lo, v_hi = (np.float64(umin - _ONE), np.float64(umax + _ONE), np.float64(vmin - _ONE),
                                      np.float64(vmax + _ONE))
        else:  # wholly behind the camera: no ray
            u_lo, u_hi, v_lo, v_hi = np.inf, -np.inf, np.inf, -np.inf
        span[k, 0], span[k, 1] = _centres_within(u_lo, u_hi, width)
        span[k, 2], span[k, 3] = _centres_within(v_lo, v_hi, height)
        for a in range(3):
            to_lo[k, a] = box_lo[k, a] - (o0 if a == 0 else (o1 if a == 1 else o2))
            to_hi[k, a] = box_hi[k, a] - (o0 if a == 0 else (o1 if a == 1 else o2))


@njit(cache=True)
def _view_boxes(b, t, world, box_lo, box_hi, motion, sine, mover_lo, mover_hi, movers, centres):
    """Where view (b, t) sees the boxes (K, 3) float32, as ``ProceduralWorldModel._object_boxes`` places them:
    the sliding crate (the last box) shifted along x by its amplitude times ``sine`` (B, T) (torch's sin of
    the phase), the busy scene's movers (B, T, M, 3) float64 in the places before it; and the centres of the
    ``movers`` boxes into ``centres`` (B, T, len(movers), 3)."""
    wb = world[b]
    boxes = box_lo.shape[1]
    lo = np.empty((boxes, 3), np.float32)
    hi = np.empty((boxes, 3), np.float32)
    for k in range(boxes):
        for a in range(3):
            lo[k, a] = box_lo[wb, k, a]
            hi[k, a] = box_hi[wb, k, a]
    shift = motion[wb, 0] * sine[b, t]
    lo[boxes - 1, 0] += shift
    hi[boxes - 1, 0] += shift
    count = mover_lo.shape[2]
    for m in range(count):
        for a in range(3):
            lo[boxes - 1 - count + m, a] = np.float32(mover_lo[b, t, m, a])
            hi[boxes - 1 - count + m, a] = np.float32(mover_hi[b, t, m, a])
    half = np.float32(0.5)
    for m in range(movers.shape[0]):
        for a in range(3):
            centres[b, t, m, a] = half * (lo[movers[m], a] + hi[movers[m], a])
    return lo, hi


@njit(cache=True)
def _cast_view(b, t, rays, poses, world, room_lo, room_hi, box_lo, box_hi, outdoor, sky_id, fx, fy, cx, cy,
               width, height, depth, surface, face_axis, fog_arg):
    """One view, a row at a time, in loops simple enough for the compiler to vectorise: the room's exit face
    for every ray of the row, then each box whose screen rectangle spans the row against the rays inside it,
    then the nearer of the two. Boxes are visited in ascending order with a strict ``<``, so among boxes at
    the same depth the lowest index wins, as torch.min. ``rays`` is (3, P).

    Shaped for the vectoriser: int32 per-ray tables (32-bit selects, see above); the room's exit, face and
    sky taken in the loop that makes the directions, from values in registers; the nearer of room and box
    picked with selects of loaded values, never a select of which array to load from (LLVM turns that into a
    select of pointers and then cannot bound the loop's accesses); and a row's results kept in row buffers,
    then copied to the (B, T, P) arrays in loops of their own. Together 24.2 -> 14.5 us a view (the cull
    aside) on a recorded N=64 rollout."""
    r = _rotation(poses, b, t)
    o0, o1, o2 = np.float32(poses[b, t, 0, 3]), np.float32(poses[b, t, 1, 3]), np.float32(poses[b, t, 2, 3])
    boxes = box_lo.shape[0]
    span = np.empty((boxes, 4), np.int64)
    to_lo = np.empty((boxes, 3), np.float32)
    to_hi = np.empty((boxes, 3), np.float32)
    _screen_intervals(r, o0, o1, o2, box_lo, box_hi, fx, fy, cx, cy, width, height, span, to_lo, to_hi)
    wb = world[b]
    lo0, lo1, lo2 = room_lo[wb, 0], room_lo[wb, 1], room_lo[wb, 2]
    hi0, hi1, hi2 = room_hi[wb, 0], room_hi[wb, 1], room_hi[wb, 2]
    r00, r01, r02 = r[0, 0], r[0, 1], r[0, 2]
    r10, r11, r12 = r[1, 0], r[1, 1], r[1, 2]
    r20, r21, r22 = r[2, 0], r[2, 1], r[2, 2]
    s0 = np.empty(width, np.float32)
    s1 = np.empty(width, np.float32)
    s2 = np.empty(width, np.float32)
    v0 = np.empty(width, np.float32)
    v1 = np.empty(width, np.float32)
    v2 = np.empty(width, np.float32)
    room = np.empty(width, np.float32)
    room_axis = np.empty(width, np.int32)
    best = np.empty(width, np.float32)
    best_k = np.empty(width, np.int32)
    best_axis = np.empty(width, np.int32)
    out_depth = np.empty(width, np.float32)
    room_s = np.empty(width, np.int32)
    out_s = np.empty(width, np.int32)
    out_axis = np.empty(width, np.int32)
    inf = np.float32(np.inf)
    rx, ry, rz = rays[0], rays[1], rays[2]
    sky = np.int32(sky_id)
    for row in range(height):
        first = row * width
        for c in range(width):
            x, y, z = rx[first + c], ry[first + c], rz[first + c]
            d0 = r00 * x + r01 * y + r02 * z
            d1 = r10 * x + r11 * y + r12 * z
            d2 = r20 * x + r21 * y + r22 * z
            s0[c], s1[c], s2[c] = d0, d1, d2
            i0 = _ONE / (_TINY if abs(d0) < _TINY else d0)
            i1 = _ONE / (_TINY if abs(d1) < _TINY else d1)
            i2 = _ONE / (_TINY if abs(d2) < _TINY else d2)
            v0[c], v1[c], v2[c] = i0, i1, i2
            # The room, from inside: the exit face, on the side the guarded inverse points to (a direction
            # within 1e-9 of zero, whatever its sign, exits far away rather than behind the camera).
            e0 = ((hi0 if i0 > 0 else lo0) - o0) * i0
            e1 = ((hi1 if i1 > 0 else lo1) - o1) * i1
            e2 = ((hi2 if i2 > 0 else lo2) - o2) * i2
            yz = min(e1, e2)
            exit_axis = np.int32(0) if e0 <= yz else (np.int32(1) if e1 <= e2 else np.int32(2))
            positive = (d0 if exit_axis == 0 else (d1 if exit_axis == 1 else d2)) > 0
            # Outdoors the room's other faces are sky.
            open_sky = outdoor & ((exit_axis != 1) | (not positive))
            room[c] = inf if open_sky else min(e0, yz)
            room_s[c] = sky if open_sky else exit_axis * np.int32(2) + (np.int32(1) if positive else np.int32(0))
            room_axis[c] = exit_axis
            best[c] = inf
            best_k[c] = -1
            best_axis[c] = 0
        for k in range(boxes):
            if row < span[k, 2] or row > span[k, 3]:
                continue
            a_lo0, a_lo1, a_lo2 = to_lo[k, 0], to_lo[k, 1], to_lo[k, 2]
            a_hi0, a_hi1, a_hi2 = to_hi[k, 0], to_hi[k, 1], to_hi[k, 2]
            k32 = np.int32(k)
            for c in range(span[k, 0], span[k, 1] + 1):
                i0, i1, i2 = v0[c], v1[c], v2[c]
                a0, b0 = a_lo0 * i0, a_hi0 * i0
                a1, b1 = a_lo1 * i1, a_hi1 * i1
                a2, b2 = a_lo2 * i2, a_hi2 * i2
                n0, n1, n2 = min(a0, b0), min(a1, b1), min(a2, b2)
                t_near = max(max(n0, n1), n2)
                t_far = min(min(max(a0, b0), max(a1, b1)), max(a2, b2))
                held = best[c]
                take = (t_near <= t_far) & (t_near > _HIT_MIN) & (t_near < held)
                best[c] = t_near if take else held
                best_k[c] = k32 if take else best_k[c]
                n12 = max(n1, n2)
                best_axis[c] = (np.int32(0) if n0 >= n12 else (np.int32(1) if n1 >= n2 else np.int32(2))) if take \
                    else best_axis[c]
        for c in range(width):
            k, nearer, box_axis = best_k[c], best[c], best_axis[c]
            # The entered face's side: the direction's sign along its axis (three loads, no select of them).
            entering_negative = ((box_axis == 0) & (s0[c] < 0)) | ((box_axis == 1) & (s1[c] < 0)) | \
                ((box_axis == 2) & (s2[c] < 0))
            box_s = np.int32(_FACES) + k * np.int32(_FACES) + box_axis * np.int32(2) + \
                (np.int32(1) if entering_negative else np.int32(0))
            hit = room[c]
            closer = (k >= 0) & (nearer < hit)
            out_depth[c] = nearer if closer else hit
            out_s[c] = box_s if closer else room_s[c]
            out_axis[c] = box_axis if closer else room_axis[c]
        for c in range(width):
            hit = out_depth[c]
            depth[b, t, first + c] = hit
            fog_arg[b, t, first + c] = -(hit if np.isfinite(hit) else np.float32(0.0)) / np.float32(25.0)
        for c in range(width):
            surface[b, t, first + c] = out_s[c]
            face_axis[b, t, first + c] = out_axis[c]


@njit(cache=True)
def _patch_median(values, k, order):
    """``np.sort(values)[k]``, as :func:`.kth_smallest` gives it, without reordering ``values``: x is that value
    when at most k values are below it and more than k at most it. Candidates are tried in ``order`` (from the
    patch's centre out, where a smooth depth's median tends to be), each count vectorised, and a candidate
    outside the bounds the earlier counts set is skipped: about 3 counts a patch instead of a partition's
    branchy passes. NaN is neither counted nor a candidate, as sort puts it last; when no candidate qualifies
    (a NaN median) or the median is zero (-0.0 and 0.0 compare equal, so which one sorts to k is the sort's
    choice) it is :func:`.kth_smallest`'s answer."""
    n = values.shape[0]
    lo = hi = np.float32(0.0)
    have_lo = have_hi = False
    for step in range(n):
        x = values[order[step]]
        if np.isnan(x) or (have_lo and x <= lo) or (have_hi and x >= hi):
            continue  # NaN, or ruled out by an earlier count
        below = 0
        at_most = 0
        for j in range(n):
            below += values[j] < x
            at_most += values[j] <= x
        if below > k:
            hi, have_hi = x, True
        elif at_most <= k:
            lo, have_lo = x, True
        elif x != 0:
            return x
        else:
            break
    return kth_smallest(values, k)


@njit(cache=True)
def _latent_view(b, t, depth, surface, width, factor, moving_of, latent_depth, centre_surface, moving):
    """Per patch of view (b, t): the median depth, the surface at the centre pixel, and whether any pixel shows
    a moving box."""
    h, w = latent_depth.shape[2], latent_depth.shape[3]
    size = factor * factor
    patch = np.empty(size, np.float32)
    # The patch's pixels from its centre out, alternating sides, for _patch_median.
    order = np.empty(size, np.int64)
    centre = (factor // 2) * factor + factor // 2
    order[0] = centre
    m = 1
    for step in range(1, size):
        for i in (centre - step, centre + step):
            if i >= 0 and i < size and m < size:
                order[m] = i
                m += 1
    for i in range(h):
        for j in range(w):
            n = 0
            hit = False
            for a in range(factor):
                first = (i * factor + a) * width + j * factor
                for c in range(factor):
                    patch[n] = depth[b, t, first + c]
                    hit |= moving_of[surface[b, t, first + c]]
                    n += 1
            latent_depth[b, t, i, j] = _patch_median(patch, size // 2, order)
            centre_surface[b, t, i, j] = surface[b, t, (i * factor + factor // 2) * width + j * factor + factor // 2]
            moving[b, t, i, j] = hit


@njit(cache=True)
def _bookkeeping(b, world, frames_per_view, surface, centre_surface, latent_depth, memory_mask, memory_depth,
                 use_memory, tolerance, fresh, appearance, committed, in_view, object_of, moving, memory_used, sky,
                 object_ids):
    """The per-surface bookkeeping of ``ProceduralWorldModel._generate`` for batch item ``b``, in place (see
    ``front``)."""
    frames, h, w = latent_depth.shape[1], latent_depth.shape[2], latent_depth.shape[3]
    surfaces = fresh.shape[1]
    boxes = (surfaces - _FACES - 1) // _FACES  # room faces, then each box's faces, then the sky
    shown = np.zeros(surfaces, np.bool_)
    owned = np.zeros(surfaces, np.bool_)
    last = np.zeros(surfaces, np.bool_)
    wb = world[b]
    for t in range(frames):
        for i in range(h):
            for j in range(w):
                d = latent_depth[b, t, i, j]
                agrees = False
                if use_memory and memory_mask[b, t, i, j]:
                    agrees = abs(memory_depth[b, t, i, j] - d) <= tolerance * d
                memory_used[b, t, i, j] = agrees and not moving[b, t, i, j]  # pasted only on what stays put
                centre = centre_surface[b, t, i, j]
                owned[centre] = True
                if agrees:
                    shown[centre] = True
                sky[b, t, i, j] = np.isinf(d)
                object_ids[b, t, i, j] = object_of[centre]
    # Memory showing any face of a box shows the box (see _generate_torch).
    for k in range(boxes):
        first = _FACES + k * _FACES
        whole = False
        for s in range(first, first + _FACES):
            whole |= shown[s]
        if whole:
            for s in range(first, first + _FACES):
                shown[s] = True
    # A surface memory shows takes the look memory recorded for it, if it recorded one (not the never-written
    # 0.5); else a surface still in view keeps its look and the rest are drawn anew.
    for s in range(surfaces):
        recorded = False
        for c in range(6):
            recorded |= committed[wb, s, c] != np.float32(0.5)
        if shown[s] and recorded:
            for c in range(6):
                appearance[wb, s, c] = committed[wb, s, c]
        elif not in_view[wb, s]:
            for c in range(6):
                appearance[wb, s, c] = fresh[b, s, c]
    for t in range(frames):
        if (t % frames_per_view) == frames_per_view - 1:
            for p in range(surface.shape[2]):
                last[surface[b, t, p]] = True
    # Only surfaces owning a latent pixel's centre record a look (memory holds latent pixels).
    for s in range(surfaces):
        in_view[wb, s] = last[s]
        if owned[s]:
            for c in range(6):
                committed[wb, s, c] = appearance[wb, s, c]


@njit(cache=True)
def _front_view(v, frames, rays, poses, world, room_lo, room_hi, box_lo, box_hi, motion, sine, mover_lo, mover_hi,
                movers, outdoor, sky_id, fx, fy, cx, cy, width, height, factor, moving_of, depth, surface, face_axis,
                fog_arg, latent_depth, centre_surface, moving, centres):
    b = v // frames
    t = v - b * frames
    lo, hi = _view_boxes(b, t, world, box_lo, box_hi, motion, sine, mover_lo, mover_hi, movers, centres)
    _cast_view(b, t, rays, poses, world, room_lo, room_hi, lo, hi, outdoor, sky_id, fx, fy, cx, cy, width, height,
               depth, surface, face_axis, fog_arg)
    _latent_view(b, t, depth, surface, width, factor, moving_of, latent_depth, centre_surface, moving)


@njit(cache=True)
def _front_world(b, rays, poses, world, room_lo, room_hi, box_lo, box_hi, motion, sine, mover_lo, mover_hi, movers,
                 outdoor, sky_id, fx, fy, cx, cy, width, height, factor, frames_per_view, memory_mask, memory_depth,
                 use_memory, tolerance, fresh, appearance, committed, in_view, clock, moving_of, object_of, depth,
                 surface, face_axis, fog_arg, latent_depth, centre_surface, memory_used, moving, sky, object_ids,
                 centres):
    # A world's views, then its bookkeeping while its pixels are still in cache.
    frames = poses.shape[1]
    for t in range(frames):
        _front_view(b * frames + t, frames, rays, poses, world, room_lo, room_hi, box_lo, box_hi, motion, sine,
                    mover_lo, mover_hi, movers, outdoor, sky_id, fx, fy, cx, cy, width, height, factor, moving_of,
                    depth, surface, face_axis, fog_arg, latent_depth, centre_surface, moving, centres)
    _bookkeeping(b, world, frames_per_view, surface, centre_surface, latent_depth, memory_mask, memory_depth,
                 use_memory, tolerance, fresh, appearance, committed, in_view, object_of, moving, memory_used, sky,
                 object_ids)
    clock[world[b]] += frames_per_view


@njit(cache=True)
def _front_serial(rays, poses, world, room_lo, room_hi, box_lo, box_hi, motion, sine, mover_lo, mover_hi, movers,
                  outdoor, sky_id, fx, fy, cx, cy, width, height, factor, frames_per_view, memory_mask, memory_depth,
                  use_memory, tolerance, fresh, appearance, committed, in_view, clock, moving_of, object_of, depth,
                  surface, face_axis, fog_arg, latent_depth, centre_surface, memory_used, moving, sky, object_ids,
                  centres):
    for b in range(poses.shape[0]):
        _front_world(b, rays, poses, world, room_lo, room_hi, box_lo, box_hi, motion, sine, mover_lo, mover_hi,
                     movers, outdoor, sky_id, fx, fy, cx, cy, width, height, factor, frames_per_view, memory_mask,
                     memory_depth, use_memory, tolerance, fresh, appearance, committed, in_view, clock, moving_of,
                     object_of, depth, surface, face_axis, fog_arg, latent_depth, centre_surface, memory_used,
                     moving, sky, object_ids, centres)


@njit(cache=True, parallel=True)
def _front_parallel(rays, poses, world, room_lo, room_hi, box_lo, box_hi, motion, sine, mover_lo, mover_hi, movers,
                    outdoor, sky_id, fx, fy, cx, cy, width, height, factor, frames_per_view, memory_mask,
                    memory_depth, use_memory, tolerance, fresh, appearance, committed, in_view, clock, moving_of,
                    object_of, depth, surface, face_axis, fog_arg, latent_depth, centre_surface, memory_used, moving,
                    sky, object_ids, centres):
    batch, frames = poses.shape[0], poses.shape[1]
    if batch > 1:  # a world per task: distinct worlds touch distinct rows of the model's state
        for b in prange(batch):
            _front_world(b, rays, poses, world, room_lo, room_hi, box_lo, box_hi, motion, sine, mover_lo, mover_hi,
                         movers, outdoor, sky_id, fx, fy, cx, cy, width, height, factor, frames_per_view,
                         memory_mask, memory_depth, use_memory, tolerance, fresh, appearance, committed, in_view,
                         clock, moving_of, object_of, depth, surface, face_axis, fog_arg, latent_depth,
                         centre_surface, memory_used, moving, sky, object_ids, centres)
    else:  # one world's views (agents sharing it) in parallel, then its bookkeeping
        for v in prange(frames):
            _front_view(v, frames, rays, poses, world, room_lo, room_hi, box_lo, box_hi, motion, sine, mover_lo,
                        mover_hi, movers, outdoor, sky_id, fx, fy, cx, cy, width, height, factor, moving_of, depth,
                        surface, face_axis, fog_arg, latent_depth, centre_surface, moving, centres)
        _bookkeeping(0, world, frames_per_view, surface, centre_surface, latent_depth, memory_mask, memory_depth,
                     use_memory, tolerance, fresh, appearance, committed, in_view, object_of, moving, memory_used,
                     sky, object_ids)
        clock[world[0]] += frames_per_view


def front(rays, poses, world, room_lo, room_hi, box_lo, box_hi, motion, sine, mover_lo, mover_hi, movers, outdoor,
          sky_id, camera, factor, frames_per_view, memory_mask, memory_depth, use_memory, tolerance, fresh, appearance,
          committed, in_view, clock, moving_of, object_of, parallel, scratch):
    """Everything of ``ProceduralWorldModel._generate`` before the fog's exp, in one call: where the boxes
    are, the ray cast, the latent grid and the per-surface bookkeeping (which updates ``appearance``,
    ``committed`` and ``in_view``).

    Args:
        rays: (3, P) float32 camera-frame ray directions (z = 1), a row per axis.
        poses: (B, T, 4, 4) float64 camera-to-world poses.
        world: (B,) int64 world of each batch item (distinct).
        room_lo, room_hi, box_lo, box_hi, motion: the model's per-world (W, 3), (W, K, 3), (W, 3) float32.
        sine: (B, T) float32, torch's sin of the sliding crate's phase at each view's time.
        mover_lo, mover_hi: (B, T, M, 3) float64 busy-scene movers (M = 0: none); movers: (N,) int64 the
            boxes whose centres are reported.
        memory_mask, memory_depth: (B, T, h, w) bool / float32 projected memory (read only when ``use_memory``).
        tolerance: float32 relative depth within which memory agrees with the geometry.
        fresh: (B, S, 6) float32 looks drawn for this segment; appearance, committed (W, S, 6) float32,
            in_view (W, S) bool and clock (W,) int64: the model's per-world state (the clock advances by
            ``frames_per_view``).
        moving_of: (S,) bool, surfaces of moving boxes; object_of: (S,) int64, a surface's index among the
            moving boxes (-1: none).
        scratch: dict of reusable arrays (surface, face axis, fog argument, centre surface), filled here.

    Returns:
        depth (B, T, P) float32; surface and face axis (B, T, P) int8; the fog's exp argument
        ``-finite_depth / 25`` (B, T, P) float32; latent depth (median per patch, B, T, h, w) float32;
        memory_used (memory agrees with the geometry and the patch is not moving: pasted), moving (any pixel of
        the patch on a moving box) and sky (B, T, h, w) bool; object ids
        (B, T, h, w) int64 (of the centre pixel); the movers' centres (B, T, N, 3) float32.
    """
    batch, frames = poses.shape[:2]
    pixels = rays.shape[1]
    h, w = camera.height // factor, camera.width // factor
    key = (batch, frames, pixels, h, w, camera)
    if scratch.get("key") != key:  # what does not leave the model is kept between calls of one shape and camera
        scratch.clear()
        scratch.update(key=key, surface=np.empty((batch, frames, pixels), np.int8),
                       face_axis=np.empty((batch, frames, pixels), np.int8),
                       fog_arg=np.empty((batch, frames, pixels), np.float32),
                       centre_surface=np.empty((batch, frames, h, w), np.int8),
                       intrinsics=(_F(camera.fx), _F(camera.fy), _F(camera.cx), _F(camera.cy)))
    surface, face_axis, fog_arg = scratch["surface"], scratch["face_axis"], scratch["fog_arg"]
    depth = np.empty((batch, frames, pixels), np.float32)
    latent_depth = np.empty((batch, frames, h, w), np.float32)
    memory_used = np.empty((batch, frames, h, w), np.bool_)
    moving = np.empty((batch, frames, h, w), np.bool_)
    sky = np.empty((batch, frames, h, w), np.bool_)
    object_ids = np.empty((batch, frames, h, w), np.int64)
    centres = np.empty((batch, frames, movers.shape[0], 3), np.float32)
    kernel = _front_parallel if parallel and batch * frames > 1 else _front_serial
    fx, fy, cx, cy = scratch["intrinsics"]
    kernel(rays, poses, world, room_lo, room_hi, box_lo, box_hi, motion, sine, mover_lo, mover_hi, movers, outdoor,
           sky_id, fx, fy, cx, cy, camera.width, camera.height, factor,
           frames_per_view, memory_mask, memory_depth, use_memory, tolerance, fresh, appearance, committed, in_view,
           clock, moving_of, object_of, depth, surface, face_axis, fog_arg, latent_depth, scratch["centre_surface"],
           memory_used, moving, sky, object_ids, centres)
    return depth, surface, face_axis, fog_arg, latent_depth, memory_used, moving, sky, object_ids, centres


@njit(cache=True)
def phases(world, clock, motion, frames, frames_per_view):
    """Each view's time (B, T) int64 (the views of a world are simultaneous: frame j of every view is at the
    same instant) and the sliding crate's phase then (B, T) float32, ``speed * time + phase`` in float32."""
    batch = world.shape[0]
    time = np.empty((batch, frames), np.int64)
    angle = np.empty((batch, frames), np.float32)
    for b in range(batch):
        for t in range(frames):
            time[b, t] = clock[world[b]] + t % frames_per_view
            angle[b, t] = motion[world[b], 1] * np.float32(time[b, t]) + motion[world[b], 2]
    return time, angle


@njit(cache=True)
def mover_angles(world, time, parameters):
    """The circling mover's angle at each view's time (B, T) float64, ``speed / extent * (t + phase)`` as
    :func:`.movers.mover_centres` computes it (its cos and sin stay torch's, taken of this (B, T) array)."""
    angle = np.empty(time.shape, np.float64)
    for b in range(time.shape[0]):
        p = parameters[world[b]]
        for t in range(time.shape[1]):
            angle[b, t] = p[1, 2] / p[1, 3] * (np.float64(time[b, t]) + p[1, 4])
    return angle


@njit(cache=True, inline="always")
def _remainder(a, b):
    # torch.remainder of floats: fmod (exact) moved to the divisor's sign.
    mod = np.fmod(a, b)
    if mod != 0 and ((b < 0) != (mod < 0)):
        mod += b
    return mod


@njit(cache=True)
def mover_boxes(world, time, parameters, room_hi, cos, sin):
    """:func:`.movers.mover_boxes` for (B, T) views of worlds ``world`` (B,): lower and upper corners
    (B, T, M, 3) float64, each float64 operation in that code's order; ``cos``/``sin`` (B, T) are torch's of
    :func:`mover_angles`."""
    batch, frames = time.shape
    movers = parameters.shape[1]
    lo = np.empty((batch, frames, movers, 3), np.float64)
    hi = np.empty((batch, frames, movers, 3), np.float64)
    half = _MOVER_SIDE / 2
    for b in range(batch):
        p = parameters[world[b]]
        bottom = np.float64(room_hi[world[b], 1]) + 0.0
        for t in range(frames):
            tf = np.float64(time[b, t])
            # Slide: a triangle wave between -extent and +extent at constant speed.
            u = _remainder(p[0, 2] * (tf + p[0, 4]), 4 * p[0, 3])
            slide = u - p[0, 3] if u < 2 * p[0, 3] else 3 * p[0, 3] - u
            # Stop and go: a cycle of go (+), stop, go (-), stop, each leg ``extent`` long.
            leg = p[2, 3] / p[2, 2]
            c = _remainder(tf + p[2, 4], 4 * leg)
            go = min(c, leg) - min(max(c - 2 * leg, 0.0), leg)
            stop_and_go = p[2, 2] * go - 0.5 * p[2, 3]
            for m in range(movers):
                if m == 0:
                    along_z = p[0, 5] > 0.5
                    x = p[0, 0] + (0.0 if along_z else slide)
                    z = p[0, 1] + (slide if along_z else 0.0)
                elif m == 1:
                    x = p[1, 0] + p[1, 3] * cos[b, t]
                    z = p[1, 1] + p[1, 3] * sin[b, t]
                else:
                    along_z = p[2, 5] > 0.5
                    x = p[2, 0] + (0.0 if along_z else stop_and_go)
                    z = p[2, 1] + (stop_and_go if along_z else 0.0)
                lo[b, t, m, 0], lo[b, t, m, 1], lo[b, t, m, 2] = x - half, bottom - _MOVER_SIDE, z - half
                hi[b, t, m, 0], hi[b, t, m, 1], hi[b, t, m, 2] = x + half, bottom, z + half
    return lo, hi


@njit(cache=True, inline="always")
def _mod2(x):
    # ``x % 2`` of a whole float32 (below 2**24 in size, as surface coordinates times a pattern scale are):
    # every step is exact, so it is the remainder torch and Python give, without a call to fmod.
    return x - np.float32(2.0) * np.floor(x * np.float32(0.5))


@njit(cache=True)
def _shade_view(v, frames, rays, poses, world, depth, surface, face_axis, fog, appearance, ray_length, outdoor,
                sky_id, width, factor, pasted, use_memory, image):
    """One view a row at a time: each pixel's surface terms looked up, then its pattern in a loop without
    lookups (the compiler vectorises it), then its colour from the surface's table. Patches memory pastes
    (``pasted``, when ``use_memory``) are not shaded: their latents are memory's, so their colours would
    only be encoded and thrown away. They get zeros, and a row shades only the columns from its first
    to its last patch that needs it (a pixel's colour never depends on another's: the same bits)."""
    b = v // frames
    t = v - b * frames
    wb = world[b]
    zero, one, half = np.float32(0.0), np.float32(1.0), np.float32(0.5)
    # Per surface, what does not depend on the pixel: base colour times the pattern's mix for pattern 0 and
    # 1 (the only values a pattern takes), pattern scale and kind; per face axis the light.
    surfaces = appearance.shape[1]
    mixed = np.empty((surfaces * 2, 3), np.float32)
    scale = np.empty(surfaces, np.float32)
    kind = np.empty(surfaces, np.int32)
    for s in range(surfaces):
        accent = np.float32(0.55) + np.float32(0.35) * appearance[wb, s, 5]
        mix0 = accent + (one - accent) * zero
        mix1 = accent + (one - accent) * one
        for c in range(3):
            base = np.float32(0.2) + np.float32(0.75) * appearance[wb, s, c]
            mixed[2 * s, c] = base * mix0
            mixed[2 * s + 1, c] = base * mix1
        scale[s] = one + np.float32(3.0) * appearance[wb, s, 3]
        kind[s] = int(appearance[wb, s, 4] * np.float32(4.0))
    lit = np.empty(3, np.float32)
    lit[0] = np.float32(0.45) + np.float32(0.55) * np.float32(0.45)
    lit[1] = np.float32(0.45) + np.float32(0.55) * np.float32(0.75)
    lit[2] = np.float32(0.45) + np.float32(0.55) * np.float32(0.5)
    sky_colour = np.zeros((2, 3), np.float32)  # top, horizon
    if outdoor:
        for c in range(3):
            tint = np.float32(0.5) if c == 0 else (np.float32(0.7) if c == 1 else np.float32(1.0))
            sky_colour[0, c] = (np.float32(0.15) + np.float32(0.5) * appearance[wb, sky_id, c]) * tint
            sky_colour[1, c] = np.float32(0.6) + np.float32(0.4) * appearance[wb, sky_id, 3 + c]
    r = _rotation(poses, b, t)
    r00, r01, r02 = r[0, 0], r[0, 1], r[0, 2]
    r10, r11, r12 = r[1, 0], r[1, 1], r[1, 2]
    r20, r21, r22 = r[2, 0], r[2, 1], r[2, 2]
    o0, o1, o2 = np.float32(poses[b, t, 0, 3]), np.float32(poses[b, t, 1, 3]), np.float32(poses[b, t, 2, 3])
    h, w = image.shape[2], image.shape[3]
    pixel_scale = np.empty(width, np.float32)
    pixel_kind = np.empty(width, np.int32)
    pattern = np.empty(width, np.float32)
    red = np.empty(width, np.float32)
    green = np.empty(width, np.float32)
    blue = np.empty(width, np.float32)
    elevation = np.empty(width, np.float32)
    top0, top1, top2 = sky_colour[0, 0], sky_colour[0, 1], sky_colour[0, 2]
    hor0, hor1, hor2 = sky_colour[1, 0], sky_colour[1, 1], sky_colour[1, 2]
    skip = np.zeros(w, np.bool_)
    lo, hi = 0, w
    for row in range(h * factor):
        i = row // factor
        a = row - i * factor
        if a == 0:  # a new row of patches: which of them memory pastes, and the span of columns to shade
            lo, hi = w, 0
            for j in range(w):
                skip[j] = use_memory and pasted[b, t, i, j]
                if not skip[j]:
                    lo, hi = min(lo, j), j + 1
        for j in range(w):
            if skip[j]:
                for bb in range(factor):
                    image[v, 0, i, j, a * factor + bb] = zero
                    image[v, 1, i, j, a * factor + bb] = zero
                    image[v, 2, i, j, a * factor + bb] = zero
        if lo >= hi:
            continue
        # The row's arrays from the span's first column on, indexed from 0: a loop from a variable start
        # would index with a possibly negative number, whose wraparound check stops LLVM vectorising it.
        start, span = lo * factor, (hi - lo) * factor
        first = row * width + start
        rx, ry, rz = rays[0, first:first + span], rays[1, first:first + span], rays[2, first:first + span]
        row_depth, row_surface = depth[b, t, first:first + span], surface[b, t, first:first + span]
        row_axis, row_fog = face_axis[b, t, first:first + span], fog[b, t, first:first + span]
        row_length = ray_length[first:first + span]
        patterned = False
        for c in range(span):
            s = row_surface[c]
            pixel_scale[c] = scale[s]
            pixel_kind[c] = kind[s]
            patterned |= kind[s] != 0
        for c in range(span if patterned else 0):
            d = row_depth[c]
            q = d if np.isfinite(d) else zero
            x, y, z = rx[c], ry[c], rz[c]
            # The hit point's two world coordinates across the face (the cast's directions again).
            q0 = o0 + (r00 * x + r01 * y + r02 * z) * q
            q1 = o1 + (r10 * x + r11 * y + r12 * z) * q
            q2 = o2 + (r20 * x + r21 * y + r22 * z) * q
            axis = row_axis[c]
            u = q2 if axis == 0 else q0
            vv = q2 if axis == 1 else q1
            su, sv = u * pixel_scale[c], vv * pixel_scale[c]
            floor_v = np.floor(sv)
            checker = _mod2(np.floor(su) + floor_v)
            stripes = _mod2(np.floor(su + sv))
            shifted = su + half * _mod2(floor_v)
            # Bricks: dark mortar lines where the fractional parts are small (torch's frac is x - trunc(x)).
            mortar = ((sv - np.trunc(sv)) < np.float32(0.12)) | ((shifted - np.trunc(shifted)) < np.float32(0.08))
            brick = zero if mortar else one
            k = pixel_kind[c]  # int32, not int64: the compiler vectorises the selects only then
            pattern[c] = checker if k == 1 else (stripes if k == 2 else (brick if k == 3 else one))
        if not patterned:  # plain surfaces only
            pattern[:] = one
        for c in range(span):
            light = lit[row_axis[c]]
            entry = 2 * row_surface[c] + (0 if pattern[c] == zero else 1)
            red[c] = mixed[entry, 0] * light
            green[c] = mixed[entry, 1] * light
            blue[c] = mixed[entry, 2] * light
        if not outdoor:
            for jj in range(hi - lo):
                j = lo + jj
                if skip[j]:
                    continue
                for bb in range(factor):
                    c = jj * factor + bb
                    f = row_fog[c]
                    haze = np.float32(0.6) * (one - f)
                    image[v, 0, i, j, a * factor + bb] = min(max(red[c] * f + haze, zero), one)
                    image[v, 1, i, j, a * factor + bb] = min(max(green[c] * f + haze, zero), one)
                    image[v, 2, i, j, a * factor + bb] = min(max(blue[c] * f + haze, zero), one)
            continue
        # Outdoors the sky: a gradient between two colours by elevation (-y is up) where the sky shows.
        for c in range(span):
            e = -(r10 * rx[c] + r11 * ry[c] + r12 * rz[c]) / row_length[c]
            e = min(max(e, -one), one)
            elevation[c] = min(max(e, zero), one)
        for jj in range(hi - lo):
            j = lo + jj
            if skip[j]:
                continue
            for bb in range(factor):
                c = jj * factor + bb
                f = row_fog[c]
                haze = np.float32(0.6) * (one - f)
                sky = row_surface[c] == sky_id
                e = elevation[c]
                image[v, 0, i, j, a * factor + bb] = min(max(
                    (hor0 + (top0 - hor0) * e) if sky else red[c] * f + haze, zero), one)
                image[v, 1, i, j, a * factor + bb] = min(max(
                    (hor1 + (top1 - hor1) * e) if sky else green[c] * f + haze, zero), one)
                image[v, 2, i, j, a * factor + bb] = min(max(
                    (hor2 + (top2 - hor2) * e) if sky else blue[c] * f + haze, zero), one)


@njit(cache=True)
def _shade_serial(frames, rays, poses, world, depth, surface, face_axis, fog, appearance, ray_length, outdoor, sky_id,
                  width, factor, pasted, use_memory, image):
    for v in range(image.shape[0]):
        _shade_view(v, frames, rays, poses, world, depth, surface, face_axis, fog, appearance, ray_length, outdoor,
                    sky_id, width, factor, pasted, use_memory, image)


@njit(cache=True, parallel=True)
def _shade_parallel(frames, rays, poses, world, depth, surface, face_axis, fog, appearance, ray_length, outdoor,
                    sky_id, width, factor, pasted, use_memory, image):
    for v in prange(image.shape[0]):
        _shade_view(v, frames, rays, poses, world, depth, surface, face_axis, fog, appearance, ray_length, outdoor,
                    sky_id, width, factor, pasted, use_memory, image)


def shade(rays, poses, world, depth, surface, face_axis, fog, appearance, ray_length, outdoor, sky_id, width, factor,
          parallel, image, pasted=None):
    """``_shade``: images as codec patches into ``image`` (V, 3, H/f, W/f, f*f) float32 in [0, 1] (what
    ``PatchDCTCodec.encode_patches`` takes, so the codec copies no pixels).

    ``depth``, ``surface``, ``face_axis`` and ``fog`` (the fog's factor) are (B, T, P) as ``front`` gives them
    (V = B * T); ``rays`` is (3, P) as ``front`` takes it; ``world`` (B,) is each batch item's row of
    ``appearance`` (W, S, 6). Ray directions are
    recomputed from ``rays`` and ``poses`` in the cast's order (the same bits), cheaper than storing them.
    ``pasted`` (B, T, h, w) bool, ``front``'s ``memory_used``: patches left unshaded (zeros), as memory's
    latents replace theirs; None shades every patch.
    """
    frames = poses.shape[1]
    use_memory = pasted is not None
    kernel = _shade_parallel if parallel and image.shape[0] > 1 else _shade_serial
    kernel(frames, rays, poses, world, depth, surface, face_axis, fog, appearance, ray_length, outdoor, sky_id, width,
           factor, pasted if use_memory else _NOTHING_PASTED, use_memory, image)
    return image


_NOTHING_PASTED = np.zeros((1, 1, 1, 1), np.bool_)  # shade's ``pasted`` when no memory is offered


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
def blocked(world, room_lo, room_hi, box_lo, box_hi, motion, sine, mover_lo, mover_hi, start, end, clearance, out):
    """``ProceduralWorldModel.blocked`` for N cameras, True into ``out`` where blocked.

    The boxes stand where ``_view_boxes`` places them (``sine`` (N, 1), ``mover_lo``/``mover_hi``
    (N, 1, M, 3) as ``front`` takes them, for each camera's world ``world`` (N,) at its next frame); room and
    footprints widened to float64 as the numpy code does, then its distances in its float64 order; start
    and end (N, 3) float64.
    """
    no_movers = np.empty(0, np.int64)
    no_centres = np.empty((1, 1, 0, 3), np.float32)
    for n in range(start.shape[0]):
        lo, hi = _view_boxes(n, 0, world, box_lo, box_hi, motion, sine, mover_lo, mover_hi, no_movers, no_centres)
        wn = world[n]
        inside_start, inside_end = np.inf, np.inf
        for a in range(3):
            r_lo, r_hi = np.float64(room_lo[wn, a]), np.float64(room_hi[wn, a])
            inside_start = min(inside_start, min(start[n, a] - r_lo, r_hi - start[n, a]))
            inside_end = min(inside_end, min(end[n, a] - r_lo, r_hi - end[n, a]))
        hit = inside_end < min(inside_start, clearance)
        a0, a1, b0, b1 = start[n, 0], start[n, 2], end[n, 0], end[n, 2]
        for k in range(lo.shape[0]):
            lo0, lo1 = np.float64(lo[k, 0]), np.float64(lo[k, 2])
            hi0, hi1 = np.float64(hi[k, 0]), np.float64(hi[k, 2])
            near_start = _point_box(a0, a1, lo0, lo1, hi0, hi1)
            if _segment_box(a0, a1, b0, b1, lo0, lo1, hi0, hi1) < min(near_start, clearance):
                hit = True
        out[n] = hit
