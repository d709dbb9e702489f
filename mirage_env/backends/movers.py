"""Moving things of the procedural world's busy scene: sliding, circling, stop-and-go.

The default indoor scene has one crate sliding back and forth on a sine. ``busy=True``
adds three crates with motions a memory of moving things must tell apart: one slides
at constant speed and turns back at the ends of its track (constant velocity, then a
change of course), one circles (a velocity that keeps turning), one goes, stops, goes
back and stops again. Each is a small box standing on the floor, placed by the world's
generator in front of the start but never within :data:`KEEP_CLEAR` metres of it, so a
camera walking a small loop there is not blocked.

Motions are pure functions of the frame time, so a world saved and resumed moves the same.
"""

from __future__ import annotations

import math

import torch

MOTIONS = ("slide", "circle", "stop_and_go")
MOVERS = len(MOTIONS)
SIDE = 0.45  # crate edge in metres
KEEP_CLEAR = 1.4  # metres between the start and any point of a mover's path
PARAMETERS = 6  # base x, base z, speed (m/frame), extent (m), phase (frames), axis (0: x, 1: z)


def draw_movers(random, half_x: float, half_z: float) -> torch.Tensor:
    """(MOVERS, PARAMETERS) float64 parameters of the busy scene's movers in a room of half extents
    ``half_x``, ``half_z`` (at least 3 m), from ``random()`` draws in [0, 1) (the world's generator)."""
    # All in front of the start (the camera's first view, +z, 90 degrees wide), where a camera
    # that walks a loop and comes back looks again.
    slide = [0.0, 0.85 * half_z, 0.06 + 0.04 * random(), 1.2, 40 * random(), 0.0]  # across, far
    circle = [-0.3 * half_x, 0.65 * half_z, 0.03 + 0.02 * random(), 0.4, 100 * random(), 0.0]  # front left
    stop_and_go = [1.3, 2.0, 0.08 + 0.04 * random(), 1.2, 40 * random(), 1.0]  # front right, to and fro in depth
    return torch.tensor([slide, circle, stop_and_go], dtype=torch.float64)


def mover_centres(parameters: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """Ground-plane centres (x, z) of the movers at frame ``time``.

    Args:
        parameters: (B, MOVERS, PARAMETERS) from :func:`draw_movers`.
        time: (B, T) frame times.

    Returns:
        (B, T, MOVERS, 2) float64 centres.
    """
    p = parameters[:, None].to(torch.float64)  # (B, 1, M, P)
    t = time.to(torch.float64)[:, :, None]  # (B, T, 1)
    base_x, base_z, speed, extent, phase, axis = (p[..., k] for k in range(PARAMETERS))
    centres = torch.stack([base_x, base_z], -1).expand(*t.shape[:2], MOVERS, 2).clone()

    # Slide: a triangle wave between -extent and +extent at constant speed.
    s = speed[..., 0] * (t[..., 0] + phase[..., 0])
    period = 4 * extent[..., 0]
    u = torch.remainder(s, period)
    slide = torch.where(u < 2 * extent[..., 0], u - extent[..., 0], 3 * extent[..., 0] - u)
    # Circle: radius ``extent`` at ``speed`` metres per frame.
    angle = speed[..., 1] / extent[..., 1] * (t[..., 0] + phase[..., 1])
    # Stop and go: a cycle of go (+), stop, go (-), stop, each leg ``extent`` long.
    leg = extent[..., 2] / speed[..., 2]
    c = torch.remainder(t[..., 0] + phase[..., 2], 4 * leg)
    go = torch.minimum(c, leg) - torch.minimum((c - 2 * leg).clamp_min(0), leg)
    stop_and_go = speed[..., 2] * go - 0.5 * extent[..., 2]

    along_z = axis[..., 0] > 0.5
    centres[..., 0, 0] += torch.where(along_z, torch.zeros_like(slide), slide)
    centres[..., 0, 1] += torch.where(along_z, slide, torch.zeros_like(slide))
    centres[..., 1, 0] += extent[..., 1] * torch.cos(angle)
    centres[..., 1, 1] += extent[..., 1] * torch.sin(angle)
    along_z = axis[..., 2] > 0.5
    centres[..., 2, 0] += torch.where(along_z, torch.zeros_like(stop_and_go), stop_and_go)
    centres[..., 2, 1] += torch.where(along_z, stop_and_go, torch.zeros_like(stop_and_go))
    return centres


def mover_boxes(parameters: torch.Tensor, time: torch.Tensor, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, MOVERS, 3) lower and upper corners of the movers' boxes at frame ``time``, standing on
    ``floor`` (B,) (the y of each world's floor)."""
    centres = mover_centres(parameters, time)
    half = SIDE / 2
    x, z = centres[..., 0], centres[..., 1]
    bottom = floor.to(torch.float64)[:, None, None] + torch.zeros_like(x)
    lo = torch.stack([x - half, bottom - SIDE, z - half], -1)
    hi = torch.stack([x + half, bottom, z + half], -1)
    return lo, hi


def check_movers_clear(parameters: torch.Tensor) -> None:
    """Raise if a mover's path comes within :data:`KEEP_CLEAR` of the start (a drawing bug, not user input)."""
    centres = mover_centres(parameters[None], torch.arange(400)[None])[0]
    nearest = float(centres.norm(dim=-1).min()) - SIDE * math.sqrt(0.5)
    if nearest < KEEP_CLEAR:
        raise RuntimeError(f"a mover passes {nearest:.2f} m from the start, nearer than {KEEP_CLEAR} m")
