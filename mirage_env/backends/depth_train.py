"""Train a small metric depth estimator on procedural frames, for learned world models.

Why it is long: one file because it is one recipe: the data, model, metrics and training loop share the
constants below (depth range, sky threshold, patch size, seeds) that the choices explain.

A learned world model (the CPU-scale Wan path) knows no depth, yet memory must
lift every generated frame. This module trains a tiny ``transformers``
``DepthAnythingForDepthEstimation`` (DINOv2 backbone + DPT neck, metric head) on
frames of ``ProceduralWorldModel`` with their exact z-depth, and saves it as a
local model directory that ``TransformersDepth(path, max_depth=SKY_DEPTH_THRESHOLD)``
loads (see mirage_env.backends.depth).

Choices, and why:

- **One token per latent pixel.** Patch side 8 on frames fed at their own size
  (64x64 -> an 8x8 token grid), the world model's spatial factor: every 8x8
  block a memory entry stands for gets its own token, and the DPT neck
  upsamples back to full resolution, so no resampling is needed anywhere
  (the processor's resize to 64x64 is the identity on 64x64 frames). This is
  the token count of a 112-pixel input with patch 14, without the resampling.
- **Metric depth, sky at the ceiling.** The metric head is ``sigmoid * max_depth``
  (``MAX_DEPTH`` = 200 m: the outdoor ground plane's extent). Training targets
  are the exact depth clamped to [``MIN_DEPTH``, ``FAR_DEPTH``] (beyond 100 m fog
  leaves under 2 % of a surface's colour) and ``MAX_DEPTH`` for sky, so a
  prediction at or above ``SKY_DEPTH_THRESHOLD`` (150 m, between the two in log
  space) means sky; ``TransformersDepth(max_depth=SKY_DEPTH_THRESHOLD)`` maps it
  back to +inf. The threshold is also written into the model config as
  ``sky_depth_threshold``.
- **L1 on log-depth** over every pixel: relative error is what memory feels
  (a 10 cm error matters at 1 m, not at 50 m), and L1 is robust to edge pixels
  whose depth jumps between two surfaces.
- **Held-out scenes.** Training scenes are drawn from seeds in
  ``TRAIN_SCENE_SEEDS`` (< 1,000,000); evaluation uses seeds from
  ``HELD_OUT_SCENE_SEED_START`` (>= 1,000,000), so the figures are measured on
  layouts the model never saw. Camera poses are random inside each scene:
  anywhere at least ``CLEARANCE`` from walls and boxes, yaw anywhere, height,
  pitch and roll spread around the agent's (1.5 m up, level).
- **Sized for a CPU.** ~330k parameters (1.3 MB of safetensors); the default
  run (benchmarks/train_depth.py) takes about four minutes on one core. With
  that budget the model is compute-bound (train and held-out loss stay level
  with each other), so the learning rate (1e-3) was picked by short sweeps and
  the neck is He-initialised (see ``_initialise_convolutions``).

Shapes: frames are uint8 (N, H, W, 3), depth is float32 (N, H, W) z-depth with
+inf for sky, as everywhere in mirage_env.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..geometry import poses_from_rigs
from .procedural import SCENES, ProceduralWorldModel

__all__ = [
    "TRAIN_SCENE_SEEDS", "HELD_OUT_SCENE_SEED_START", "MAX_DEPTH", "FAR_DEPTH", "MIN_DEPTH",
    "SKY_DEPTH_THRESHOLD", "PATCH_SIZE", "CLEARANCE", "ProceduralDepthPairs", "build_depth_model",
    "build_depth_processor", "depth_targets", "log_depth_l1", "predict_depth", "depth_metrics",
    "constant_depth_metrics", "evaluate_depth_model",
    "train_procedural_depth",
]

TRAIN_SCENE_SEEDS = range(0, 1_000_000)
HELD_OUT_SCENE_SEED_START = 1_000_000
MAX_DEPTH = 200  # metres; the metric head's ceiling (an int: transformers' config requires it)
FAR_DEPTH = 100.0  # finite depths are trained (and scored) up to here
MIN_DEPTH = 0.05
SKY_DEPTH_THRESHOLD = 150.0  # predictions at or above it are sky: TransformersDepth(max_depth=this)
PATCH_SIZE = 8  # one token per latent pixel of the procedural world (spatial factor 8)
LATENT_FACTOR = 8
EVAL_POSE_SEED = 12345  # held-out poses are the same whatever the training seed, so runs compare
CLEARANCE = 0.5  # metres between a camera and any wall or box, as an agent keeps its distance
HEIGHT_SPREAD = 0.1
PITCH_SPREAD_DEGREES = 10.0
ROLL_SPREAD_DEGREES = 1.0
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


# ---------------------------------------------------------------------- data


class ProceduralDepthPairs:
    """Frames with exact z-depth from procedural scenes, seen from random cameras.

    Args:
        scenes: scene kinds to draw from (see ``procedural.SCENES``); batches mix them equally.
        image_size: side of the square frames (a multiple of 8).
    """

    def __init__(self, scenes: Iterable[str] = SCENES, image_size: int = 64):
        scenes = tuple(scenes)
        unknown = [s for s in scenes if s not in SCENES]
        if not scenes or unknown:
            raise ValueError(f"scenes must be a non-empty selection of {SCENES}, got {scenes}")
        if image_size <= 0 or image_size % LATENT_FACTOR:
            raise ValueError(f"image_size must be a positive multiple of {LATENT_FACTOR}, got {image_size}")
        self.scenes = scenes
        self.image_size = int(image_size)
        self.models = {s: ProceduralWorldModel(image_size=(image_size, image_size), scene=s) for s in scenes}
        # A layout depends on the seed only, so an 8x8 model draws it for a fraction of the cost.
        self.layouts = {s: ProceduralWorldModel(image_size=(LATENT_FACTOR, LATENT_FACTOR), scene=s) for s in scenes}

    def render(self, scene: str, seeds: Iterable[int], frames_per_scene: int,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Render ``frames_per_scene`` random views of each scene seed.

        Returns:
            frames (N, H, W, 3) uint8 and depth (N, H, W) float32 (+inf = sky),
            N = len(seeds) * frames_per_scene, scene-major.
        """
        model, layout = self.models[scene], self.layouts[scene]
        seeds = [int(s) for s in seeds]
        identity = torch.eye(4, dtype=torch.float64).repeat(len(seeds), 1, 1, 1)
        # First the layouts alone, to place the cameras in free space; then the views.
        layout.start(identity, [torch.Generator().manual_seed(s) for s in seeds])
        rigs = self._sample_rigs(layout, scene, len(seeds), frames_per_scene, rng)
        poses = torch.from_numpy(poses_from_rigs(rigs.reshape(-1, 6))).reshape(len(seeds), frames_per_scene, 4, 4)
        segment = model.start(poses, [torch.Generator().manual_seed(s) for s in seeds])
        size = self.image_size
        return segment.frames.reshape(-1, size, size, 3), segment.image_depth.reshape(-1, size, size).float()

    def batch(self, batch_size: int, rng: np.random.Generator, seeds: range = TRAIN_SCENE_SEEDS
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` views, one per scene seed drawn from ``seeds``, scenes mixed equally."""
        frames, depth = [], []
        counts = [len(part) for part in np.array_split(np.arange(batch_size), len(self.scenes))]
        for scene, count in zip(self.scenes, counts):
            if count:
                f, d = self.render(scene, rng.integers(seeds.start, seeds.stop, count), 1, rng)
                frames.append(f)
                depth.append(d)
        return torch.cat(frames), torch.cat(depth)

    def held_out(self, frames_per_scene_kind: int, first_seed: int = HELD_OUT_SCENE_SEED_START,
                 pose_seed: int = EVAL_POSE_SEED) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per scene kind, one view of each of ``frames_per_scene_kind`` held-out scenes (seeds from ``first_seed``)."""
        if first_seed < HELD_OUT_SCENE_SEED_START:
            raise ValueError(f"held-out seeds start at {HELD_OUT_SCENE_SEED_START}, got first_seed={first_seed}")
        rng = np.random.default_rng(pose_seed)
        seeds = range(first_seed, first_seed + frames_per_scene_kind)
        return {scene: self.render(scene, seeds, 1, rng) for scene in self.scenes}

    @staticmethod
    def _sample_rigs(model: ProceduralWorldModel, scene: str, worlds: int, frames: int,
                     rng: np.random.Generator, candidates: int = 16) -> np.ndarray:
        """(worlds, frames, 6) rigs: x, y, z in the scene's free space, yaw anywhere, pitch and roll near level.

        Up to ``candidates`` positions are tried per frame; the first outside every box
        wins, and the start position (free by construction of the scenes) if none is.
        """
        room_lo = model.room_lo[:worlds].double().numpy()[:, None, None]  # (W, 1, 1, 3)
        room_hi = model.room_hi[:worlds].double().numpy()[:, None, None]
        shape = (worlds, frames, candidates)
        if scene == "indoor":
            span = room_hi - room_lo - 2 * CLEARANCE
            x = room_lo[..., 0] + CLEARANCE + rng.random(shape) * span[..., 0]
            z = room_lo[..., 2] + CLEARANCE + rng.random(shape) * span[..., 2]
            y = np.clip(rng.normal(0.0, HEIGHT_SPREAD, shape), room_lo[..., 1] + 0.3, room_hi[..., 1] - 0.4)
        else:  # the buildings stand within 25 m of the start, plus their half-width
            x, z = rng.uniform(-30.0, 30.0, shape), rng.uniform(-30.0, 30.0, shape)
            y = np.clip(rng.normal(0.0, 2 * HEIGHT_SPREAD, shape), -2.0, 0.8)  # 0.7 to 3.5 m above the ground
        position = np.stack([x, y, z], -1)  # (W, F, C, 3)
        box_lo = model.box_lo[:worlds].double().numpy()[:, None, None] - CLEARANCE  # (W, 1, 1, K, 3)
        box_hi = model.box_hi[:worlds].double().numpy()[:, None, None] + CLEARANCE
        inside = ((position[..., None, :] > box_lo) & (position[..., None, :] < box_hi)).all(-1).any(-1)
        free = ~inside
        first_free = free.argmax(-1)
        chosen = np.take_along_axis(position, first_free[..., None, None], axis=2)[:, :, 0]
        chosen = np.where(free.any(-1)[..., None], chosen, 0.0)
        yaw = rng.uniform(-math.pi, math.pi, (worlds, frames))
        spread = lambda degrees, limit: np.clip(  # noqa: E731
            rng.normal(0.0, math.radians(degrees), (worlds, frames)), -math.radians(limit), math.radians(limit))
        pitch, roll = spread(PITCH_SPREAD_DEGREES, 45.0), spread(ROLL_SPREAD_DEGREES, 10.0)
        return np.concatenate([chosen, np.stack([yaw, pitch, roll], -1)], -1)


# ---------------------------------------------------------------------- model


def build_depth_model(image_size: int = 64, *, hidden_size: int = 64, layers: int = 4, heads: int = 4,
                      mlp_ratio: int = 4, fusion_hidden_size: int = 16,
                      neck_hidden_sizes: tuple[int, ...] = (16, 16, 32, 64), head_hidden_size: int = 16):
    """A small metric ``DepthAnythingForDepthEstimation`` for (image_size x image_size) frames.

    The DINOv2 backbone cuts frames into ``PATCH_SIZE`` patches (one per latent pixel),
    the DPT neck reassembles its four stages at 4x, 2x, 1x and 1/2x the token grid,
    and the head predicts ``sigmoid * MAX_DEPTH`` at full resolution.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    if image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a multiple of the patch size {PATCH_SIZE}, got {image_size}")
    if layers < 4:
        raise ValueError(f"the DPT neck reads four backbone stages; layers must be >= 4, got {layers}")
    stages = [f"stage{layers * (k + 1) // 4}" for k in range(4)]  # evenly spread, the last always included
    backbone = Dinov2Config(
        hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=mlp_ratio,
        patch_size=PATCH_SIZE, image_size=image_size, out_features=stages, reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=hidden_size, patch_size=PATCH_SIZE,
        neck_hidden_sizes=list(neck_hidden_sizes), fusion_hidden_size=fusion_hidden_size,
        head_hidden_size=head_hidden_size, depth_estimation_type="metric", max_depth=MAX_DEPTH,
        sky_depth_threshold=SKY_DEPTH_THRESHOLD,
    )
    model = DepthAnythingForDepthEstimation(config)
    _initialise_convolutions(model)
    return model


def _initialise_convolutions(model) -> None:
    """He-initialise the neck and head, and start the prediction near a room's depth.

    transformers (5.x) draws every convolution from N(0, 0.02), right for a ViT's linear
    layers but not for a stack of ~15 narrow convolutions trained from scratch: each
    shrinks the signal about fourfold, so the head starts with nothing to read and
    learns slowly. Each residual unit's last convolution starts at zero (the unit
    is the identity, as in ResNet's zero-gamma trick), and the final bias puts the
    first prediction at about 3 m instead of sigmoid(0) * MAX_DEPTH = 100 m.
    """
    for name, module in [*model.neck.named_modules(), *model.head.named_modules()]:
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
            if name.endswith("convolution2"):
                torch.nn.init.zeros_(module.weight)
    torch.nn.init.normal_(model.head.conv3.weight, std=1e-3)
    torch.nn.init.constant_(model.head.conv3.bias, math.log(3.0 / (MAX_DEPTH - 3.0)))


def build_depth_processor(image_size: int = 64):
    """The image processor saved beside the model: resize to the training size, ImageNet normalisation."""
    from transformers import DPTImageProcessor

    return DPTImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, keep_aspect_ratio=False,
        ensure_multiple_of=PATCH_SIZE, do_rescale=True, do_normalize=True, image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )


def predict_depth(model, processor, frames: torch.Tensor) -> torch.Tensor:
    """Raw metric depth (N, H, W) for uint8 frames (N, H, W, 3), as TransformersDepth computes it.

    The processor runs exactly as at inference; the prediction is resized back to
    the frames' size bilinearly (the identity when the processor keeps the size).
    """
    inputs = processor(images=list(frames.cpu().numpy()), return_tensors="pt")
    predicted = model(pixel_values=inputs["pixel_values"]).predicted_depth
    if predicted.shape[-2:] != frames.shape[1:3]:
        predicted = torch.nn.functional.interpolate(predicted[:, None], size=tuple(frames.shape[1:3]),
                                                    mode="bilinear", align_corners=False)[:, 0]
    return predicted


def depth_targets(depth: torch.Tensor) -> torch.Tensor:
    """Training targets (N, H, W): depth clamped to [MIN_DEPTH, FAR_DEPTH], sky (+inf) at MAX_DEPTH."""
    return torch.where(torch.isinf(depth), torch.full_like(depth, float(MAX_DEPTH)),
                       depth.clamp(MIN_DEPTH, FAR_DEPTH))


def log_depth_l1(predicted: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Mean |log predicted - log target| over all pixels (see ``depth_targets``); a scalar."""
    return (predicted.clamp(min=1e-6).log() - depth_targets(depth).log()).abs().mean()


# ---------------------------------------------------------------------- evaluation


def depth_metrics(predicted: torch.Tensor, depth: torch.Tensor, sky_threshold: float = SKY_DEPTH_THRESHOLD
                  ) -> dict[str, float]:
    """Standard monocular-depth figures of raw predictions against exact depth.

    Args:
        predicted: (N, H, W) raw metric prediction (finite; sky near MAX_DEPTH).
        depth: (N, H, W) exact z-depth, +inf for sky.

    Returns:
        ``abs_rel`` (mean |pred - gt| / gt), ``delta1`` (share with max(pred/gt, gt/pred) < 1.25)
        and ``log_error`` (mean |ln pred - ln gt|) over pixels with gt in [MIN_DEPTH, FAR_DEPTH],
        at full resolution and at latent resolution (both median-pooled by 8, as memory sees
        depth: ``latent_*``);
        ``sky_accuracy`` (pixels whose sky / not-sky call is right) and ``sky_iou``,
        or None where the frames show no sky; ``pixels`` scored.
    """
    from ..memory import pool_depth

    def scores(pred: torch.Tensor, gt: torch.Tensor) -> tuple[float, float, float, int]:
        valid = torch.isfinite(gt) & (gt >= MIN_DEPTH) & (gt <= FAR_DEPTH)
        p, g = pred[valid].double().clamp(min=1e-6), gt[valid].double()
        if g.numel() == 0:
            return math.nan, math.nan, math.nan, 0
        ratio = torch.maximum(p / g, g / p)
        return (((p - g).abs() / g).mean().item(), (ratio < 1.25).double().mean().item(),
                ratio.log().mean().item(), int(g.numel()))

    predicted, depth = predicted.detach().float().cpu(), depth.float().cpu()
    abs_rel, delta1, log_error, pixels = scores(predicted, depth)
    latent_abs_rel, latent_delta1, latent_log_error, latent_pixels = scores(
        pool_depth(predicted, LATENT_FACTOR), pool_depth(depth, LATENT_FACTOR))
    sky, called_sky = torch.isinf(depth), predicted >= sky_threshold
    has_sky = bool(sky.any())
    union = (sky | called_sky).sum().item()
    return {
        "abs_rel": abs_rel, "delta1": delta1, "log_error": log_error, "pixels": pixels,
        "latent_abs_rel": latent_abs_rel, "latent_delta1": latent_delta1, "latent_log_error": latent_log_error,
        "latent_pixels": latent_pixels,
        "sky_accuracy": (sky == called_sky).double().mean().item() if has_sky else None,
        "sky_iou": (sky & called_sky).sum().item() / union if has_sky and union else None,
    }


def constant_depth_metrics(depth: torch.Tensor) -> dict[str, float]:
    """The same figures for the best single depth (the median of the scored pixels): a floor to beat."""
    valid = torch.isfinite(depth) & (depth >= MIN_DEPTH) & (depth <= FAR_DEPTH)
    guess = depth[valid].median() if valid.any() else torch.tensor(1.0)
    return depth_metrics(torch.full_like(depth, guess.item()), depth)


def evaluate_depth_model(model_dir: str | os.PathLike, held_out: dict[str, tuple[torch.Tensor, torch.Tensor]]
                         ) -> dict[str, dict]:
    """Score a saved model directory, loaded as the world model loads it (``TransformersDepth``).

    Args:
        held_out: scene kind -> (frames (N, H, W, 3) uint8, depth (N, H, W)), e.g. from
            ``ProceduralDepthPairs.held_out``.

    Returns:
        {"all": figures, "<scene>": figures, ..., "constant": figures of the best constant
        depth over all frames}, figures as in ``depth_metrics``.
    """
    from .depth import TransformersDepth

    # max_depth=inf keeps the raw prediction, so sky calls and depth errors are scored apart.
    estimator = TransformersDepth(model_dir, max_depth=math.inf)
    predictions = {scene: estimator(frames) for scene, (frames, _) in held_out.items()}
    results = {scene: depth_metrics(predictions[scene], depth) for scene, (_, depth) in held_out.items()}
    all_depth = torch.cat([depth for _, depth in held_out.values()])
    results["all"] = depth_metrics(torch.cat(list(predictions.values())), all_depth)
    results["constant"] = constant_depth_metrics(all_depth)
    return results


# ---------------------------------------------------------------------- training


def train_procedural_depth(
    out_dir: str | os.PathLike,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    image_size: int = 64,
    scenes: Iterable[str] = ("indoor", "outdoor"),
    progress: bool = True,
    learning_rate: float = 1e-3,
    eval_frames: int = 128,
    model_options: dict | None = None,
) -> dict:
    """Train a small metric depth model on procedural frames, save it, and measure it on held-out scenes.

    Every step renders ``batch_size`` fresh views (one per training scene seed, the
    scene kinds mixed equally) and takes one AdamW step on ``log_depth_l1``, with a
    linear warm-up and cosine decay of the learning rate.

    Args:
        out_dir: directory to write (config.json, model.safetensors, preprocessor_config.json,
            metrics.json); created if missing.
        steps: optimiser steps.
        batch_size: views per step.
        seed: seeds the initial weights, the training scene seeds and the camera poses.
        image_size: side of the square training frames (multiple of 8).
        scenes: scene kinds to train and evaluate on.
        progress: show a tqdm bar.
        learning_rate: peak AdamW learning rate.
        eval_frames: held-out views per scene kind.
        model_options: overrides for ``build_depth_model`` (e.g. ``hidden_size``).

    Returns:
        The figures also written to ``out_dir/metrics.json``: held-out ``abs_rel``,
        ``delta1``, ``log_error``, their ``latent_*`` twins, ``sky_accuracy``, ``sky_iou``
        (all scenes), ``by_scene`` and ``constant`` (the best constant depth, for scale),
        ``train_seconds``, ``steps``, ``batch_size``, ``seed``, ``parameters``,
        ``weights_bytes``, ``final_loss``, and the settings needed to remake the model.
    """
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if eval_frames < 1:
        raise ValueError(f"eval_frames must be >= 1, got {eval_frames}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = ProceduralDepthPairs(scenes, image_size)
    model = build_depth_model(image_size, **(model_options or {}))
    processor = build_depth_processor(image_size)
    parameters = sum(p.numel() for p in model.parameters())
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))

    # Channels-last lets oneDNN run the neck's narrow convolutions about a third faster on a CPU.
    model.to(memory_format=torch.channels_last).train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="depth", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        frames, depth = pairs.batch(batch_size, rng)
        loss = log_depth_l1(predict_depth(model, processor, frames), depth)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    train_seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)

    figures = evaluate_depth_model(out_dir, pairs.held_out(eval_frames))
    overall = figures.pop("all")
    constant = figures.pop("constant")
    weights = out_dir / "model.safetensors"
    results = {
        **{k: overall[k] for k in ("abs_rel", "delta1", "log_error", "latent_abs_rel", "latent_delta1",
                                   "latent_log_error", "sky_accuracy", "sky_iou")},
        "by_scene": figures,
        "constant": constant,
        "held_out_views": eval_frames * len(pairs.scenes),
        "held_out_scene_seeds": [HELD_OUT_SCENE_SEED_START, HELD_OUT_SCENE_SEED_START + eval_frames],
        "train_scene_seeds": [TRAIN_SCENE_SEEDS.start, TRAIN_SCENE_SEEDS.stop],
        "train_seconds": train_seconds,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "learning_rate": learning_rate,
        "image_size": image_size,
        "scenes": list(pairs.scenes),
        "parameters": parameters,
        "weights_bytes": weights.stat().st_size if weights.is_file() else None,
        "final_loss": float(np.mean(losses[-20:])),
        "max_depth": MAX_DEPTH,
        "far_depth": FAR_DEPTH,
        "sky_depth_threshold": SKY_DEPTH_THRESHOLD,
        "model_options": model_options or {},
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
