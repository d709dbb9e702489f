"""The object layer at work: a busy world's episode with the layer and without, frame by frame.

The same seed, moves and generator draws run twice (memory on, object layer on / off).
The figure (docs/object_layer.png) shows, side by side, the first frame that showed the
moving thing the layer later put back | the frame where the layer showed it, generated
without the layer | the same frame with the layer. Printed: per step where the layer
showed something, the PSNR of the moving pixels against the view with every moving thing
in its first look (mirage_env.object_eval), with and without the layer.

    python benchmarks/object_layer_figure.py [--seed 0] [--image-size 128] [--frames-per-step 3] [--motion-mask]

With ``--motion-mask`` the procedural model reports the pixels it animated (``motion_mask=True``,
both runs): the layer then takes only those as moving things and re-finds, in what was just
generated, things back in view after too long for a prediction (``ObjectLayer.recall``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mirage_env.env import MirageEnv
from mirage_env.metrics import masked_psnr
from mirage_env.object_eval import FirstLooks

TURNS = [6] * 4 + [5] * 4  # look right 60 degrees and back


def run(seed: int, size: int, frames: int, objects: bool, motion_mask: bool = False):
    env = MirageEnv(render_mode="rgb_array", max_episode_steps=None, image_size=size, frames_per_step=frames,
                    backend_options={"busy": True, "motion_mask": motion_mask}, memory_options={"objects": objects})
    env.reset(seed=seed)
    looks = FirstLooks(env.world.model)
    looks.update()
    frames_seen, shown, scores, first_seen = [env.render()], [], [], {}
    for k in range(env.world.model.moving_boxes().__len__()):
        first_seen[k] = 0 if k in looks.looks else None
    for step, move in enumerate(TURNS, start=1):
        env.step(move)
        looks.update()
        for k in looks.looks:
            if first_seen.get(k) is None:
                first_seen[k] = step
        frames_seen.append(env.render())
        layer = env.world.memory.objects
        shown.append(int(layer.last_shown["pixels"][0, -1].sum()) if objects and layer.last_shown else 0)
        info = env.batch.last_step.segment.info
        seen = looks.seen(info["object_ids"][0, -1].cpu().numpy())
        factor = env.world.model.latent.spatial_factor
        mask = np.kron(seen, np.ones((factor, factor), dtype=bool)).astype(bool)
        pose = torch.as_tensor(env.batch.last_step.poses[0, -1], dtype=torch.float64)
        scores.append(masked_psnr(looks.reference(pose), frames_seen[-1], mask) if mask.any() else None)
    return frames_seen, shown, scores, first_seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--frames-per-step", type=int, default=3)
    parser.add_argument("--motion-mask", action="store_true", help="the generator reports what it animated")
    parser.add_argument("--out", default="docs/object_layer.png")
    args = parser.parse_args()
    with_layer, shown, on_scores, first_seen = run(args.seed, args.image_size, args.frames_per_step, True,
                                                   args.motion_mask)
    without, _, off_scores, _ = run(args.seed, args.image_size, args.frames_per_step, False, args.motion_mask)
    print("step  layer pixels  moving-things PSNR with / without the layer (dB)")
    for step, (pixels, on, off) in enumerate(zip(shown, on_scores, off_scores), start=1):
        fmt = lambda v: "-" if v is None else f"{min(v, 100):.2f}"  # noqa: E731
        print(f"{step:4d}  {pixels:12d}  {fmt(on)} / {fmt(off)}")
    if not any(shown):
        print("the layer showed nothing in this episode; no figure written")
        return
    best = int(np.argmax(shown)) + 1
    first = min(s for s in first_seen.values() if s is not None)
    picture = np.concatenate([with_layer[first], without[best], with_layer[best]], axis=1)
    scale = max(1, 256 // args.image_size)
    picture = picture.repeat(scale, 0).repeat(scale, 1)
    import imageio.v3 as iio

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.out, picture)
    print(f"wrote {args.out}: step {first} (first sight) | step {best} without the layer | step {best} with it")


if __name__ == "__main__":
    main()
