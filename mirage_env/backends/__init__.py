"""World models behind one small protocol (see base.py).

``make_model(name, ...)`` builds one by name; ``build_model(config)`` rebuilds one
from the ``config()`` it saved (used when a World is loaded). Heavy backends
import lazily, so the procedural default never imports diffusers.
"""

from __future__ import annotations

from .base import LatentSpec, Segment, SegmentRequest, WorldModel

BACKENDS = ("procedural", "wan")


def size_multiple(name: str, checkpoint=None, **options) -> int:
    """The frame sides a backend can generate are multiples of this (latent factor x token patch).

    Read from the backend's settings without building it (a Wan checkpoint's VAE and DiT
    configs), so an env can ask for the next size up before loading anything heavy.
    """
    if name == "procedural":
        return int(options.get("spatial_factor", 8))
    if name == "wan" and checkpoint is not None:
        import json

        from .wan_checkpoint import resolve_checkpoint

        root = resolve_checkpoint(checkpoint)
        try:
            vae = json.loads((root / "vae" / "config.json").read_text())
            dit = json.loads((root / "transformer" / "config.json").read_text())
            return int(vae.get("scale_factor_spatial", 8)) * int(dit.get("patch_size", [1, 2, 2])[1])
        except (OSError, ValueError, TypeError, IndexError):
            return 1  # let the model itself say what is wrong with the checkpoint
    return 1


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


__all__ = ["LatentSpec", "Segment", "SegmentRequest", "WorldModel", "make_model", "build_model", "size_multiple",
           "BACKENDS"]
