"""The README's picture of the top-down map: the first-person view beside the map of memory.

    python benchmarks/topdown_figure.py [--out docs/topdown.png] [--seed 0] [--steps 40] [--image-size 128]

A PointNav ``MirageEnv`` (procedural world) is driven by a fixed script: a full turn on
the spot to look around, then a walk with a few turns. The figure is ``render()`` with
``render_map=True`` at the end: the last generated frame (left) and the top-down map of
what memory holds (right; see ``mirage_env.topdown``): the topmost remembered surface
under each map pixel, coloured by decoding its latent, the agent (red disk, tick =
heading) and the PointNav goal (magenta cross). Dark grey is space nobody has seen.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from mirage_env.env import MirageEnv
from mirage_env.geometry import Move


def script(steps: int) -> list[int]:
    """Turn right all the way round (12 x 30 degrees), then walk forward, turning now and then."""
    look_around = [Move.TURN_RIGHT] * 12
    walk = [Move.TURN_LEFT if i % 6 == 5 else Move.FORWARD for i in range(max(0, steps - len(look_around)))]
    return [int(a) for a in (look_around + walk)[:steps]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/topdown.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling of the picture")
    args = parser.parse_args()

    env = MirageEnv(task="pointnav", image_size=args.image_size, render_mode="rgb_array", render_map=True)
    env.reset(seed=args.seed)
    for action in script(args.steps):
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    picture = env.render()  # (H, 2 W, 3): first-person view | map
    size = args.image_size
    gap = np.full((size, 4, 3), 255, dtype=np.uint8)
    picture = np.concatenate([picture[:, :size], gap, picture[:, size:]], axis=1)
    picture = np.kron(picture, np.ones((args.scale, args.scale, 1), dtype=np.uint8))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.out, picture)
    stats = env.world.memory.stats(bounds=False)
    print(f"wrote {args.out} ({picture.shape[1]}x{picture.shape[0]}): {stats['entries']:,} memory entries, "
          f"agent at x={env.batch.rigs[0, 0]:.2f} z={env.batch.rigs[0, 2]:.2f} m")


if __name__ == "__main__":
    main()
