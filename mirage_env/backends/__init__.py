"""World models behind one small protocol (see base.py).

``make_model(name, ...)`` builds one by name; ``build_model(config)`` rebuilds one
from the ``config()`` it saved (used when a World is loaded). Heavy backends
import lazily, so the procedural default never imports diffusers. ``"remote"`` is a
client of a model served elsewhere (``remote.py``; ``checkpoint`` names the served model).
"""

from __future__ import annotations

from .base import LatentSpec, Segment, SegmentRequest, WorldModel

BACKENDS = ("procedural", "wan", "remote")


def size_multiple(name: str, checkpoint=None, **options) -> int:
    """The frame sides a backend can generate are multiples of this (latent factor x token patch).

    Read from the backend's settings without building it (a Wan checkpoint's VAE and DiT
    configs), so an env can ask for the next size up before loading anything heavy.
    """
    if name == "procedural":
        return int(options.get("spatial_factor", 8))
    if name == "remote" and checkpoint is not None:
        from .remote import RemoteWorldModel

        return RemoteWorldModel(checkpoint).size_multiple
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
    """A world model by name: "procedural" (default, CPU), "wan" (needs ``checkpoint``) or
    "remote" (``checkpoint`` names a served model, see ``remote.py``)."""
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
    if name == "remote":
        from .remote import RemoteWorldModel

        if checkpoint is None:
            raise ValueError("backend='remote' needs checkpoint=NAME, the name a world model is served under "
                             "(mirage_env.backends.model_server.serve_world_model)")
        if options:
            raise ValueError(f"backend='remote' takes no backend options ({sorted(options)}): the served model's "
                             f"settings are fixed where it is served")
        return RemoteWorldModel(checkpoint, image_size=size)
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
    if name == "remote":
        from .remote import RemoteWorldModel

        return RemoteWorldModel.from_config(config)
    raise ValueError(f"cannot rebuild a world model named {name!r}; pass model= explicitly")


__all__ = ["LatentSpec", "Segment", "SegmentRequest", "WorldModel", "make_model", "build_model", "size_multiple",
           "BACKENDS"]
