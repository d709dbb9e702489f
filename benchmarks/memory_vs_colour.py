"""Latent memory against colour point-cloud memory, head to head: time and bytes per segment.

    python benchmarks/memory_vs_colour.py --json benchmarks/results/memory_vs_colour.json --plot docs/memory_vs_colour.png

The same run as ``mirage-env bench memory ...`` (same options): the scene, the two
memories and what is timed are described in :mod:`mirage_env.baselines.memory_bench`.
Smallest run: ``--vae tiny --image-size 32 --segments 2 --segment-frames 5
--read-frames 5 --steps 1 --fast-image-size 16 --fast-segment-frames 3 --loops 2``.
"""

from __future__ import annotations

from mirage_env.baselines.memory_bench import build_parser, run_memory_bench

if __name__ == "__main__":
    run_memory_bench(build_parser("python benchmarks/memory_vs_colour.py").parse_args())
