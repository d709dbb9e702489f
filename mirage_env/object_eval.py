"""Ground truth for judging the object layer in the procedural world (evaluation only).

"A moving thing stays itself" is measured against what the world would show if every
moving thing kept the look it had when first seen in the episode: the returning view is
rendered again by the procedural model at the same pose and time, with the moving
boxes' surfaces given that first look (through the same codec, so both sides carry the
same compression). Nothing here is read by memory: the layer sees only what the filters
reject; this module reads the model's ground truth (``Segment.info["object_ids"]``,
``["object_centres"]``) to score it.
"""

from __future__ import annotations

import numpy as np
import torch

from .backends.procedural import FACES, ProceduralWorldModel


class FirstLooks:
    """The look (appearance row) each face of each moving box had the first time that face was in view.

    Per face, not per box: a face the camera has not seen yet has no look to keep (the
    generator makes it up when it first shows it), so it is recorded when it first shows.
    """

    def __init__(self, model: ProceduralWorldModel):
        self.model = model
        self.looks: dict[int, torch.Tensor] = {}  # box k -> (FACES, 6) looks; rows of faces not yet seen unused
        self.known: dict[int, torch.Tensor] = {}  # box k -> (FACES,) bool, faces seen so far
        self.start: tuple[torch.Tensor, torch.Tensor] | None = None  # every surface's look and in-view at the start

    def update(self, world: int = 0) -> None:
        """Record the faces the model's last segment showed for the first time (call after every reset and step)."""
        if self.start is None:
            self.start = (self.model.appearance[world].clone(), self.model.in_view[world].clone())
        for k, box in enumerate(self.model.moving_boxes()):
            faces = slice(FACES + box * FACES, FACES + (box + 1) * FACES)
            new = self.model.in_view[world, faces].clone()
            if k in self.known:
                new &= ~self.known[k]
            if not bool(new.any()):
                continue
            if k not in self.looks:
                self.looks[k] = self.model.appearance[world, faces].clone()
                self.known[k] = torch.zeros_like(new)
            self.looks[k][new] = self.model.appearance[world, faces][new]
            self.known[k] |= new

    def reference(self, pose: torch.Tensor, world: int = 0, appearance: torch.Tensor | None = None) -> np.ndarray:
        """(H, W, 3) uint8: the model's last frame time seen from ``pose`` (4, 4), moving boxes' faces in their first looks."""
        model = self.model
        appearance = (model.appearance[world] if appearance is None else appearance).clone()
        for k, look in self.looks.items():
            box = model.moving_boxes()[k]
            faces = appearance[FACES + box * FACES: FACES + (box + 1) * FACES]
            faces[self.known[k]] = look[self.known[k]]  # a face never seen before keeps the look it has now
        index = torch.tensor([world], device=model.device)
        time = model.time[index][:, None] - 1  # the frame the last segment ended on
        depth, surface, face_axis, directions, origin = model._cast(
            pose.to(model.device, torch.float32)[None, None], index, time)
        images = model._shade(directions, origin, depth, surface, face_axis, appearance[None])
        height, width = model.camera.height, model.camera.width
        images = images.reshape(1, 1, height, width, 3).permute(0, 1, 4, 2, 3)
        return model.codec.decode_uint8(model.codec.encode(images))[0, 0].cpu().numpy()

    def ideal(self, pose: torch.Tensor, world: int = 0) -> np.ndarray:
        """(H, W, 3) uint8: what a perfect memory would show from ``pose`` at the last frame time: every surface
        in view at the start in its look then, moving boxes where they truly are now, faces in their first looks.

        Its PSNR against the first view is the most a revisit can score on every pixel once things moved:
        a memory that scores more shows moving things where they no longer are.
        """
        looks, in_view = self.start
        appearance = torch.where(in_view[:, None], looks, self.model.appearance[world])
        return self.reference(pose, world, appearance)

    def seen(self, object_ids: np.ndarray) -> np.ndarray:
        """(h, w) bool: latent pixels showing a moving box seen before (one with a first look)."""
        known = np.array(sorted(self.looks), dtype=np.int64)
        return np.isin(object_ids, known) if known.size else np.zeros(object_ids.shape, dtype=bool)


def shown_position_errors(layer, object_centres: torch.Tensor, frame: int = -1, row: int = 0) -> list[float]:
    """Metres between each object the layer showed in ``frame`` of its last read and the nearest true centre."""
    if layer is None or layer.last_shown is None:
        return []
    shown = layer.last_shown["pixels"][row, frame] > 0
    predicted = layer.last_shown["centre"][row, frame][shown].to(torch.float64)
    truth = object_centres[row, frame].to(torch.float64)
    if predicted.numel() == 0 or truth.numel() == 0:
        return []
    return torch.cdist(predicted, truth).min(1).values.tolist()
