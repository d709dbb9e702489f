"""A bird's-eye map of what a world remembers: memory seen from above, agents and goals on it.

Anchors: habitat-lab's ``TopDownMap`` (an occupancy map with the agent's position and
heading and the goal drawn on it) and MiniWorld's ``render_top_view``. Ours draws
memory, not the simulator's ground truth: a place appears once some agent has seen it.

Conventions (the package's, see :mod:`mirage_env.geometry`): world up is -y, the
ground plane is (x, z). On the map x grows to the right and z grows upwards, so an
agent at the origin with yaw 0 (facing +z) points to the top of the image; yaw turns
it to the right.

Each map pixel shows the topmost stored entry in its column of space, ignoring
entries more than ``ceiling_margin`` above the highest camera (a room's ceiling would
hide the floor, as habitat slices its map at the agent's height). Its colour is the
entry's latent feature decoded by the world model (a latent image of the chosen
features, decoded once, each latent pixel's patch averaged), or, where the model
cannot decode or ``colour="height"``, its height (dark low, bright high). Unseen
places are dark grey; agents are coloured disks with a heading tick; goals are
crosses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TopDownMap", "render_top_down", "task_goals"]

UNSEEN = np.array([40, 40, 40], dtype=np.uint8)
AGENT_COLOURS = np.array([[255, 60, 60], [60, 160, 255], [255, 200, 40], [80, 220, 120],
                          [220, 90, 255], [255, 140, 0], [0, 220, 220], [255, 255, 255]], dtype=np.uint8)
GOAL_COLOUR = np.array([255, 0, 255], dtype=np.uint8)


@dataclass(frozen=True)
class TopDownMap:
    """How a map is drawn.

    Attributes:
        size: (height, width) of the map image in pixels.
        colour: "latent" (decode the stored features; falls back to height) or "height".
        margin: metres of border around what is drawn.
        min_extent: metres the map spans at least (a new world's map is not a few voxels blown up).
        ceiling_margin: entries higher than this above the highest camera are left out.
        fill: unseen pixels within this many pixels of a drawn one take its colour (memory holds one
            entry per latent pixel, sparse on a map; habitat's map is dilated the same way).
    """

    size: tuple[int, int] = (64, 64)
    colour: str = "latent"
    margin: float = 1.0
    min_extent: float = 6.0
    ceiling_margin: float = 0.3
    fill: int = 2

    def __post_init__(self):
        if self.colour not in ("latent", "height"):
            raise ValueError(f"colour must be 'latent' or 'height', got {self.colour!r}")
        if len(self.size) != 2 or min(self.size) < 8:
            raise ValueError(f"size must be (height, width) with sides >= 8, got {self.size!r}")


def task_goals(task, agents: np.ndarray) -> np.ndarray:
    """(k, 2) world (x, z) goals of ``agents`` that the task holds (PointNav ``goals``, ReturnHome
    ``waypoints`` and ``homes``); (0, 2) for a task without goals."""
    found = []
    for name in ("goals", "waypoints", "homes"):
        value = getattr(task, name, None)
        if isinstance(value, np.ndarray) and value.ndim == 2 and value.shape[1] == 2 and len(value) > agents.max(initial=-1):
            found.append(value[agents])
    return np.concatenate(found).astype(np.float64) if found else np.zeros((0, 2))


def _decoded_colours(model, features: torch.Tensor) -> np.ndarray | None:
    """(n, 3) uint8 colours of ``features`` (n, C) decoded by ``model``, or None if it cannot decode."""
    decode = getattr(model, "decode", None)
    if decode is None or len(features) == 0:
        return None
    n, channels = features.shape
    side = math.ceil(math.sqrt(n))
    grid = torch.zeros(side * side, channels, dtype=torch.float32, device=features.device)
    grid[:n] = features.float()
    latents = grid.T.reshape(1, 1, channels, side, side)
    try:
        with torch.no_grad():
            frames = decode(latents)  # (1, F, side * f, side * f, 3) uint8
    except Exception:  # noqa: BLE001 - a model that cannot decode a free-standing latent: colour by height
        return None
    image = torch.as_tensor(frames)[0, 0].float()
    factor = image.shape[0] // side
    patches = image[: side * factor, : side * factor].reshape(side, factor, side, factor, 3).mean((1, 3))
    return patches.reshape(-1, 3)[:n].round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def _height_colours(height: np.ndarray) -> np.ndarray:
    if len(height) == 0:
        return np.zeros((0, 3), dtype=np.uint8)
    low, high = float(height.min()), float(height.max())
    t = (height - low) / max(high - low, 1e-6)
    shade = (60 + 195 * t)[:, None]
    return (shade * np.array([0.85, 0.95, 1.0])).astype(np.uint8)


def _fill_gaps(image: np.ndarray, passes: int) -> None:
    """Give each unseen pixel the colour of a seen neighbour (8-neighbourhood), ``passes`` times."""
    for _ in range(passes):
        unseen = (image == UNSEEN).all(-1)
        if not unseen.any() or unseen.all():
            return
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        seen = np.pad(~unseen, 1, constant_values=False)
        source = image.copy()
        for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
            h, w = unseen.shape
            neighbour = padded[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
            take = unseen & seen[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
            source[take] = neighbour[take]
            unseen &= ~take
        image[...] = source


def _disk(image: np.ndarray, row: float, column: float, radius: float, colour: np.ndarray) -> None:
    h, w, _ = image.shape
    rows, columns = np.ogrid[:h, :w]
    image[(rows + 0.5 - row) ** 2 + (columns + 0.5 - column) ** 2 <= radius ** 2] = colour


def _line(image: np.ndarray, start: tuple[float, float], end: tuple[float, float], colour: np.ndarray) -> None:
    h, w, _ = image.shape
    steps = int(max(abs(end[0] - start[0]), abs(end[1] - start[1])) * 2) + 2
    for t in np.linspace(0.0, 1.0, steps):
        r, c = int(start[0] + t * (end[0] - start[0])), int(start[1] + t * (end[1] - start[1]))
        if 0 <= r < h and 0 <= c < w:
            image[r, c] = colour


def render_top_down(memory, world: int, rigs: np.ndarray, goals: np.ndarray | None = None, model=None,
                    settings: TopDownMap = TopDownMap()) -> np.ndarray:
    """The map of ``world`` of ``memory`` with cameras ``rigs`` on it.

    Args:
        memory: a :class:`mirage_env.memory.LatentSpatialMemory`.
        world: which of its worlds.
        rigs: (k, 6) the cameras to draw (x, y, z, yaw, pitch, roll; see ``CameraRig``).
        goals: (m, 2) world (x, z) goals to draw, or None.
        model: the world model whose ``decode`` colours the entries (None: colour by height).
        settings: size, colouring and framing.

    Returns:
        (height, width, 3) uint8 image.
    """
    height_px, width_px = settings.size
    rigs = np.asarray(rigs, dtype=np.float64).reshape(-1, 6)
    goals = np.zeros((0, 2)) if goals is None else np.asarray(goals, dtype=np.float64).reshape(-1, 2)
    points, features = memory.stored_entries(world)
    points = points.cpu().numpy().astype(np.float64)
    up = -points[:, 1]
    if len(rigs):
        keep = up <= (-rigs[:, 1]).max() + settings.ceiling_margin
        points, up, features = points[keep], up[keep], features[torch.from_numpy(keep).to(features.device)]

    # Framing: everything drawn, plus a margin, in a box of the image's aspect ratio.
    ground = np.concatenate([points[:, [0, 2]], rigs[:, [0, 2]], goals])
    low = ground.min(0) if len(ground) else np.zeros(2)
    high = ground.max(0) if len(ground) else np.zeros(2)
    centre = (low + high) / 2
    extent = max(float((high - low).max()) + 2 * settings.margin, settings.min_extent)
    metres_per_px = extent / min(height_px, width_px)

    def to_pixel(xz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        column = (xz[:, 0] - centre[0]) / metres_per_px + width_px / 2
        row = height_px / 2 - (xz[:, 1] - centre[1]) / metres_per_px
        return row, column

    image = np.tile(UNSEEN, (height_px, width_px, 1))
    if len(points):
        row, column = to_pixel(points[:, [0, 2]])
        row, column = np.floor(row).astype(np.int64), np.floor(column).astype(np.int64)
        inside = (row >= 0) & (row < height_px) & (column >= 0) & (column < width_px)
        pixel = (row * width_px + column)[inside]
        candidates = np.flatnonzero(inside)
        # Topmost entry per pixel: sort by (pixel, height), take the last of each pixel's run.
        order = np.lexsort((up[candidates], pixel))
        pixel_sorted = pixel[order]
        last = np.append(pixel_sorted[1:] != pixel_sorted[:-1], True)
        chosen, pixels = candidates[order[last]], pixel_sorted[last]
        colours = None
        if settings.colour == "latent" and model is not None:
            colours = _decoded_colours(model, features[torch.from_numpy(chosen).to(features.device)])
        if colours is None:
            colours = _height_colours(up[chosen])
        image.reshape(-1, 3)[pixels] = colours
        _fill_gaps(image, settings.fill)

    radius = max(1.5, min(height_px, width_px) / 40)
    for xz in goals:
        r, c = (v[0] for v in to_pixel(xz[None]))
        _line(image, (r - 2 * radius, c - 2 * radius), (r + 2 * radius, c + 2 * radius), GOAL_COLOUR)
        _line(image, (r - 2 * radius, c + 2 * radius), (r + 2 * radius, c - 2 * radius), GOAL_COLOUR)
    for k, rig in enumerate(rigs):
        colour = AGENT_COLOURS[k % len(AGENT_COLOURS)]
        r, c = (v[0] for v in to_pixel(rig[None, [0, 2]]))
        yaw = rig[3]  # 0 faces +z (up on the map); positive turns right (+x)
        tip = (r - 3 * radius * math.cos(yaw), c + 3 * radius * math.sin(yaw))
        _line(image, (r, c), tip, colour)
        _disk(image, r, c, radius, colour)
    return image


def batch_map(batch, world: int, settings: TopDownMap) -> np.ndarray:
    """The map of ``world`` of an ``AgentBatch``: its memory, its agents and the task's goals for them."""
    agents = np.asarray(batch.agents_of([world]), dtype=np.int64).reshape(-1)
    return render_top_down(batch.world.memory, world, batch.rigs[agents], task_goals(batch.task, agents),
                           model=batch.world.model, settings=settings)
