"""Latent spatial memory: the generator's own latent features pinned to 3D points.

Layout (voxel hashing with bricks, as in Niessner et al. 2013): space is cut into
voxels; each voxel holds at most one *entry* (a latent feature, the 3D point it was
lifted to, the depth it was observed at, the origin of the camera that observed it).
Voxels are grouped into bricks allocated on first write and found through a hash
table, bricks into chunks that a read culls against the target cameras' frusta; so
reads and writes cost the same with 1e3 or 1e6 stored entries. Several independent
worlds share one memory, and every operation is a tensor op on its device.

Policies, stated once (each explained where it is implemented):

- Merge (:mod:`.merge`): an entry that falls in an occupied voxel is dropped ("first
  wins", the default); ``merge="latest"`` replaces the stored one; ``merge="closest"``
  replaces it only when observed from at most ``(1 + closest_tolerance)`` times the
  stored depth. Within one write, the entry observed from nearest wins a voxel.
- Z-buffer (:mod:`.raster`): per latent pixel the nearest surface wins; among points
  within ``surface_tolerance`` (relative depth) of the nearest, the one whose projection
  is closest to the pixel centre wins. Entries written from within ``revisit_radius`` of
  the reading camera take precedence at the pixels they reach (that view already
  resolved visibility there), so a camera that returns to a pose reads back exactly the
  samples it wrote there, even where a thin object seen from elsewhere lies in front.
- Capacity (:mod:`.index`): at most ``max_bricks_per_world`` bricks per world; the least
  recently written bricks of a world are evicted, in batches, beyond it.
- Horizon (:mod:`.horizon`, an ablation: short-term memory only): with ``horizon=K`` a
  read shows only what the last K writes of a world wrote or saw.

The package, one idea per module (arrows point down the list, never up):

- :mod:`.latent_memory`: :class:`LatentSpatialMemory`, the facade (write, read, clear,
  stats, save/load).
- :mod:`.fileformat`: the safetensors file format, its validation and
  :class:`MemoryFileError`.
- :mod:`.objects`: the object layer beside the static index (opt-in): moving things in
  their own frame with a pose track, composed into the generator's read by the World.
- :mod:`.shapes`: batches of poses, the worlds a batch addresses, :class:`MemoryRead`.
- :mod:`.horizon`: per-world write clocks, observation and expiry (short-term memory).
- :mod:`.merge`: which sample a voxel keeps.
- :mod:`.index`: bricks (keys, slots, voxels -> entries), allocation and eviction.
- :mod:`.chunks`: the chunk index a read culls first.
- :mod:`.pool`: the entries themselves, their free list and per-world counts.
- :mod:`.keys`: packed (world, x, y, z) keys and the hash table over them.
- :mod:`.lift`: depth lifting (pixels + depth + camera -> world points), :func:`pool_depth`.
- :mod:`.raster`: frustum culling, projection and z-buffer as pure functions.
"""

from .fileformat import FORMAT_VERSION, MemoryFileError, load_state, save_state
from .horizon import check_horizon
from .latent_memory import LatentSpatialMemory
from .lift import lift_dominant_surface, pool_depth
from .shapes import MemoryRead

__all__ = [
    "FORMAT_VERSION",
    "LatentSpatialMemory",
    "MemoryFileError",
    "MemoryRead",
    "check_horizon",
    "lift_dominant_surface",
    "load_state",
    "pool_depth",
    "save_state",
]
