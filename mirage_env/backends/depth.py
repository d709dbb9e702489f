"""Depth for the Wan backend: a small protocol, a transformers model, known depth.

A generative world model knows no depth, so one is estimated on its decoded
frames. Monocular estimators are either metric (depth in metres, up to their
error) or relative (affine-invariant disparity, e.g. Depth Anything); either
way their scale drifts from segment to segment, while memory must live in one
scale. ``align_depth_scale`` fixes that: a least-squares scale (and shift, for
relative models) against a reference of known scale, e.g. the depth of memory
projected where it hits, or a known depth of the start image.

Depth is z-depth, +inf where there is nothing (see mirage_env.geometry).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["DepthEstimator", "TransformersDepth", "KnownDepth", "ConstantDepth", "align_depth_scale", "DepthModelNotFoundError"]


class DepthModelNotFoundError(FileNotFoundError):
    """A depth model directory is missing or incomplete."""


@runtime_checkable
class DepthEstimator(Protocol):
    """Estimates z-depth of frames.

    ``__call__(frames)`` takes uint8 (N, H, W, 3) frames and returns float32 (N, H, W)
    z-depth (+inf where there is nothing). ``kind`` is "metric" or "disparity":
    disparity models return 1 / depth up to an unknown scale and shift.
    """

    kind: str

    def __call__(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor: ...


def _as_frames(frames) -> torch.Tensor:
    frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if frames.dim() == 3:
        frames = frames[None]
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames


class TransformersDepth:
    """A ``transformers`` depth-estimation model loaded from a local directory.

    Args:
        path: directory holding a model saved with ``save_pretrained`` and its image
            processor (e.g. a local copy of ``depth-anything/Depth-Anything-V2-Small-hf``).
        device: where the model runs.
        kind: "metric" or "disparity"; by default read from the config's
            ``depth_estimation_type`` ("relative" means disparity).
        batch_size: frames per forward pass.
        max_depth: depths beyond it (and non-positive disparities) become +inf; default: the
            config's ``sky_depth_threshold`` when it has one (a model trained to put sky at a
            ceiling depth, e.g. procedural-wan-mini's), else 1e4.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", kind: str | None = None,
                 batch_size: int = 16, max_depth: float | None = None, dtype: torch.dtype = torch.float32):
        path = Path(path)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DepthModelNotFoundError(
                f"no depth model at {path} (need config.json, weights and preprocessor_config.json). "
                f"On a machine with internet: huggingface-cli download depth-anything/Depth-Anything-V2-Small-hf "
                f"--local-dir {path}"
            )
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.model = AutoModelForDepthEstimation.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        if kind is None:
            kind = "metric" if getattr(self.model.config, "depth_estimation_type", "relative") == "metric" else "disparity"
        if kind not in ("metric", "disparity"):
            raise ValueError(f"kind must be 'metric' or 'disparity', got {kind!r}")
        self.kind = kind
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_depth = float(max_depth if max_depth is not None else getattr(self.model.config, "sky_depth_threshold", 1e4))
        self.path = str(path)

    @torch.no_grad()
    def __call__(self, frames) -> torch.Tensor:
        frames = _as_frames(frames)
        n, height, width, _ = frames.shape
        outputs = []
        for start in range(0, n, self.batch_size):
            chunk = list(frames[start : start + self.batch_size].cpu().numpy())
            inputs = self.processor(images=chunk, return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            predicted = self.model(**inputs).predicted_depth.float()
            predicted = torch.nn.functional.interpolate(predicted[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            outputs.append(predicted)
        raw = torch.cat(outputs)
        if self.kind == "disparity":
            # Left as disparity: only after alignment does 1/x become a depth.
            return raw
        return torch.where((raw > 0) & (raw < self.max_depth), raw, torch.full_like(raw, math.inf))


class KnownDepth:
    """Depth supplied by the caller (e.g. from a simulator or a depth sensor).

    ``__call__`` returns the depth given for the frames passed at construction or
    via ``set``; it is a way to plug ground truth into code written for an estimator.
    """

    kind = "metric"

    def __init__(self, depth: torch.Tensor | np.ndarray | None = None):
        self.depth = None if depth is None else torch.as_tensor(np.asarray(depth), dtype=torch.float32)

    def set(self, depth) -> None:
        self.depth = torch.as_tensor(np.asarray(depth), dtype=torch.float32)

    def __call__(self, frames) -> torch.Tensor:
        frames = _as_frames(frames)
        if self.depth is None:
            raise ValueError("KnownDepth has no depth; pass it at construction or with .set(depth)")
        depth = self.depth if self.depth.dim() == 3 else self.depth[None]
        if depth.shape != frames.shape[:3]:
            raise ValueError(f"known depth has shape {tuple(depth.shape)}, frames need {tuple(frames.shape[:3])}")
        return depth.clone()


class ConstantDepth:
    """Every pixel at the same depth: a plane facing the camera (tests, or no estimator at all)."""

    kind = "metric"

    def __init__(self, depth: float = 2.0):
        if not depth > 0:
            raise ValueError(f"depth must be positive, got {depth}")
        self.depth = float(depth)

    def __call__(self, frames) -> torch.Tensor:
        frames = _as_frames(frames)
        return torch.full(frames.shape[:3], self.depth, dtype=torch.float32)


def align_depth_scale(
    predicted: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: str = "metric",
    min_points: int = 4,
    fallback_scale: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Bring predicted depth (or disparity) to the scale of a reference depth.

    Fitted per leading index (per world) over all pixels where ``mask`` is True and
    both maps are finite and positive:

    - kind="metric": depth' = s * depth, ``s`` by least squares in log space
      (robust to the far pixels dominating a linear fit);
    - kind="disparity": disparity' = s * disparity + t matched to 1 / reference,
      then depth' = 1 / disparity' (+inf where it is <= 0).

    Args:
        predicted: (B, ..., h, w) estimator output.
        reference: (B, ..., h, w) depth of known scale (+inf where unknown).
        mask: (B, ..., h, w) bool, where the reference may be trusted (default: finite).
        kind: "metric" or "disparity".
        min_points: fewer valid pixels than this leave a world unaligned
            (scale ``fallback_scale``, or 1 / no shift).

    Returns:
        (depth (B, ..., h, w) float32, info dict with per-world "scale", "shift", "points").
    """
    if kind not in ("metric", "disparity"):
        raise ValueError(f"kind must be 'metric' or 'disparity', got {kind!r}")
    if predicted.shape != reference.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and reference {tuple(reference.shape)} must match")
    predicted = predicted.float()
    reference = reference.to(predicted.device, torch.float32)
    batch = predicted.shape[0]
    valid = torch.isfinite(reference) & (reference > 0) & torch.isfinite(predicted) & (predicted > 0)
    if mask is not None:
        if mask.shape != predicted.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match predicted {tuple(predicted.shape)}")
        valid &= mask.to(valid.device, torch.bool)
    valid = valid.reshape(batch, -1)
    pred = predicted.reshape(batch, -1)
    ref = reference.reshape(batch, -1)
    counts = valid.sum(1)
    enough = counts >= min_points
    w = valid.float()
    n = counts.clamp(min=1).float()
    if kind == "metric":
        log_ratio = torch.where(valid, torch.log(ref.clamp(min=1e-12)) - torch.log(pred.clamp(min=1e-12)), torch.zeros_like(ref))
        scale = torch.exp((log_ratio * w).sum(1) / n)
        shift = torch.zeros_like(scale)
        default = 1.0 if fallback_scale is None else float(fallback_scale)
        scale = torch.where(enough, scale, torch.full_like(scale, default))
        out = predicted * scale.view(batch, *([1] * (predicted.dim() - 1)))
        out = torch.where(torch.isfinite(out) & (out > 0), out, torch.full_like(out, math.inf))
    else:
        target = torch.where(valid, 1.0 / ref.clamp(min=1e-12), torch.zeros_like(ref))
        x = torch.where(valid, pred, torch.zeros_like(pred))
        mean_x, mean_y = (x * w).sum(1) / n, (target * w).sum(1) / n
        cov = ((x - mean_x[:, None]) * (target - mean_y[:, None]) * w).sum(1)
        var = (((x - mean_x[:, None]) ** 2) * w).sum(1)
        scale = torch.where(var > 1e-12, cov / var.clamp(min=1e-12), torch.ones_like(var))
        shift = mean_y - scale * mean_x
        default = 1.0 if fallback_scale is None else float(fallback_scale)
        scale = torch.where(enough, scale, torch.full_like(scale, default))
        shift = torch.where(enough, shift, torch.zeros_like(shift))
        view = (batch, *([1] * (predicted.dim() - 1)))
        disparity = predicted * scale.view(view) + shift.view(view)
        out = torch.where(disparity > 1e-6, 1.0 / disparity.clamp(min=1e-6), torch.full_like(disparity, math.inf))
    return out, {"scale": scale, "shift": shift, "points": counts, "aligned": enough}
