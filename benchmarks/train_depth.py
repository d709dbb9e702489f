"""Train the small procedural depth estimator and print its held-out figures.

    python benchmarks/train_depth.py [--out mirage_env/checkpoints/procedural-wan-mini/depth]
                                     [--json benchmarks/results/depth.json] [--steps 1300] [--seed 0]

Trains a tiny metric Depth Anything (transformers) on frames of the procedural
world (scene seeds < 1,000,000), saves it where ``TransformersDepth`` loads it,
and scores it on held-out scenes (seeds >= 1,000,000): absolute relative error
and delta < 1.25 at full resolution and at the 8x8-latent resolution memory
uses (median-pooled), and the sky / not-sky call. A constant depth (the median
of the held-out depth) is printed beside it as the floor to beat. The defaults
run in about four minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

DEFAULT_OUT = "mirage_env/checkpoints/procedural-wan-mini/depth"


def format_table(results: dict) -> str:
    """A plain-text table: one row per figure, columns all / per scene / constant depth."""
    scenes = list(results["by_scene"])
    columns = ["all", *scenes, "constant"]
    sources = {"all": results, "constant": results["constant"], **results["by_scene"]}
    rows = [
        ("abs rel (64x64)", "abs_rel", "{:.3f}"),
        ("delta<1.25 (64x64)", "delta1", "{:.1%}"),
        ("|ln error| (64x64)", "log_error", "{:.3f}"),
        ("abs rel (8x8 latent)", "latent_abs_rel", "{:.3f}"),
        ("delta<1.25 (8x8 latent)", "latent_delta1", "{:.1%}"),
        ("|ln error| (8x8 latent)", "latent_log_error", "{:.3f}"),
        ("sky accuracy", "sky_accuracy", "{:.1%}"),
        ("sky IoU", "sky_iou", "{:.3f}"),
    ]
    width = 26
    lines = [f"{'held-out figure':<{width}}" + "".join(f"{c:>12}" for c in columns)]
    for label, key, fmt in rows:
        cells = []
        for column in columns:
            value = sources[column].get(key)
            cells.append(f"{'-' if value is None else fmt.format(value):>12}")
        lines.append(f"{label:<{width}}" + "".join(cells))
    lines.append("")
    lines.append(f"{results['held_out_views']} held-out views (scene seeds {results['held_out_scene_seeds'][0]}.."
                 f"{results['held_out_scene_seeds'][1] - 1} per kind); trained {results['steps']} steps x "
                 f"{results['batch_size']} views in {results['train_seconds']:.0f} s, seed {results['seed']}; "
                 f"{results['parameters']:,} parameters, {results['weights_bytes'] / 1e6:.2f} MB weights")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="model directory to write")
    parser.add_argument("--json", default="benchmarks/results/depth.json", help="where to write the figures")
    parser.add_argument("--steps", type=int, default=1300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-frames", type=int, default=128, help="held-out views per scene kind")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the figures' setting)")
    parser.add_argument("--no-progress", action="store_true")
    options = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(options.threads))
    import torch

    from mirage_env.backends.depth_train import train_procedural_depth

    torch.set_num_threads(options.threads)
    results = train_procedural_depth(
        options.out, steps=options.steps, batch_size=options.batch_size, seed=options.seed,
        eval_frames=options.eval_frames, progress=not options.no_progress,
    )
    arguments = sys.argv[1:] if argv is None else argv
    results.update({"out": options.out, "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "command": ["python", "benchmarks/train_depth.py", *arguments]})
    print(format_table(results))
    Path(options.json).parent.mkdir(parents=True, exist_ok=True)
    Path(options.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
