"""World models behind one small protocol (see base.py).

``make_model(name, ...)`` builds one by name; ``build_model(config)`` rebuilds one
from the ``config()`` it saved (used when a World is loaded). Heavy backends
import lazily, so the procedural default never imports diffusers.
"""

from __future__ import annotations

from .base import LatentSpec, Segment, SegmentRequest, WorldModel

BACKENDS = ("procedural", "wan")


def make_model(name: str = "procedural", image_size=64, checkpoint=None, **options) -> WorldModel:
    """A world model by name: "procedural" (default, CPU) or "wan" (needs ``checkpoint``)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if name == "procedural":
        from .procedural import ProceduralWorldModel

        if checkpoint is not None:
            raise ValueError("the procedural world model takes no checkpoint")
        return ProceduralWorldModel(image_size=size, **options)
    if name == "wan":
        from .wan import WanWorldModel

        if checkpoint is None:
            raise ValueError("backend='wan' needs checkpoint=DIR, a local Wan2.2 directory in diffusers format")
        return WanWorldModel(checkpoint, image_size=size, **options)
    raise ValueError(f"unknown backend {name!r}; available: {BACKENDS}")


def build_model(config: dict) -> WorldModel:
    """Rebuild a world model from its saved ``config()``."""
    name = config.get("name")
    if name == "procedural":
        from .procedural import ProceduralWorldModel

        return ProceduralWorldModel.from_config(config)
    if name == "wan":
        from .wan import WanWorldModel

        return WanWorldModel.from_config(config)
    raise ValueError(f"cannot rebuild a world model named {name!r}; pass model= explicitly")


__all__ = ["LatentSpec", "Segment", "SegmentRequest", "WorldModel", "make_model", "build_model", "BACKENDS"]
