"""What latent memory is measured against, and the measurement.

- :mod:`~mirage_env.baselines.colour_memory`: the colour point-cloud memory of
  Voyager / WonderWorld-style systems (:class:`ColourPointCloudMemory`).
- :mod:`~mirage_env.baselines.memory_bench`: latent memory against it, head to
  head (``mirage-env bench memory``, ``python benchmarks/memory_vs_colour.py``).
  It imports diffusers and matplotlib when run, so it is not imported here.
"""

from .colour_memory import ColourPointCloudMemory, ColourRender

__all__ = ["ColourPointCloudMemory", "ColourRender"]
