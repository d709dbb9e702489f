"""The Wan2.2 world model: diffusers components + memory branch + LoRA, from local files.

Why it is long: one file because it is one class: loading, codec, text, sampler, depth, ``start`` and
``generate`` all use the modules ``WanWorldModel`` loaded, so a split would scatter one object.

Follows the published system (Mirage, microsoft/LatentSpatialMemory): base
Wan2.2-TI2V-5B (VAE 48 channels, 16x spatial, 4x temporal; DiT patch (1, 2, 2));
memory read by a VACE-style branch (see wan_memory); segments of 33 frames =
9 latent frames; the previous segment's last 2 latent frames are kept as clean
context; 20 steps of flow-matching UniPC (shift 5) without CFG.

How a segment is made (``generate``):

1. The previous segment's last ``context_frames`` latent frames are put in front
   of the noise as clean tokens: their per-token timestep is 0 (the way Wan2.2-TI2V
   conditions on its first image) and they are re-imposed after every step.
2. The branch reads ``control_hidden_states`` = memory latents ++ hit mask
   (zeros on the context frames, and everywhere when ``use_memory`` is False).
3. All B worlds are denoised in one transformer call per step; the noise of world
   i comes from ``generators[i]`` only.
4. Latents are decoded, depth is estimated on the frame each latent frame ends
   on (frame 4k for latent frame k), median-pooled to latent resolution and
   aligned to the scale of the memory's projected depth where memory hit.

Latents in and out are normalised with the VAE's ``latents_mean`` / ``latents_std``
(the DiT's space), (B, T, C, h, w) as in mirage_env.backends.base.

Nothing is downloaded: every component comes from ``from_pretrained(local_dir,
local_files_only=True)``; a missing piece raises :class:`CheckpointNotFoundError`
saying what is missing and how to get it.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..geometry import Camera, check_pose
from .base import LatentSpec, Segment, SegmentRequest
from .wan_checkpoint import (
    CheckpointNotFoundError,  # noqa: F401  (still importable from wan: users catch it here)
    _vae_class_name,
    check_checkpoint,
)

__all__ = [
    "WanWorldModel",
    "latent_frame_count",
]


def latent_frame_count(frames: int, temporal_factor: int = 4) -> int:
    """Latent frames of a video of ``frames`` = 1 + temporal_factor * k frames."""
    if frames < 1 or (frames - 1) % temporal_factor:
        raise ValueError(
            f"frames must be 1 + {temporal_factor} * k (1, {1 + temporal_factor}, {1 + 2 * temporal_factor}, ...), got {frames}"
        )
    return 1 + (frames - 1) // temporal_factor


class WanWorldModel:
    """Wan2.2 world model with a latent spatial memory branch (implements ``WorldModel``).

    Args:
        checkpoint_dir: diffusers-format Wan2.2 directory (vae/, transformer/, scheduler/,
            text_encoder/, tokenizer/), e.g. a local copy of ``Wan-AI/Wan2.2-TI2V-5B-Diffusers``,
            or the name of a shipped checkpoint ("procedural-wan-mini"). Settings left as
            None / "auto" below come from the checkpoint's ``mirage_world.json`` when it has
            one (see wan_checkpoint), else from the Wan2.2 defaults given here.
        memory_dir: trained memory branch (``memory_branch.safetensors`` + ``memory_branch.json``)
            and optional ``lora/``; None gives a zero-initialised branch (= base model).
        device: "cpu" or "cuda".
        dtype: DiT and text encoder dtype (bf16 on CUDA, fp32 on CPU by default); the VAE
            runs in ``vae_dtype`` (fp32: Wan's VAE is sensitive to low precision).
        offload: keep components on the CPU and move each to ``device`` only while it runs.
        image_size: (height, width) of frames; multiples of the VAE factor x DiT patch
            (32 for Wan2.2). Default (704, 1280).
        frames_per_segment: video frames per segment, 1 + 4k for Wan2.2's VAE (33 -> 9 latent
            frames, the default); any count for a VAE without temporal compression (the DCT
            autoencoder: frames = latent frames). Every segment, the first included, has exactly
            ``latent_frames`` latent frames: ``start`` / ``generate`` refuse other pose counts
            (the model is trained on, and its positions sized for, this length), and the envs
            step with ``latent_frames`` poses per step by default.
        num_inference_steps: UniPC steps per segment (default 20).
        context_frames: previous latent frames kept as clean context (default 2).
        flow_shift: timestep shift of the flow-matching schedule (default 5).
        camera: intrinsics of the frames (default: 60 degree horizontal field of view).
        depth_estimator: a DepthEstimator, a path to a local transformers depth model, or
            None (a constant-depth plane, with a warning: memory geometry is then wrong).
        tokenizer / text_encoder: "auto" loads them from the checkpoint; None skips them
            (then prompts must come as ``prompt_embeds``, or the empty prompt is zeros).
        default_prompt: prompt of worlds given none.
        max_sequence_length: text tokens (default 512, as Wan).
        vace_every: when building an untrained branch: one branch block every this many layers.
        progress: show tqdm bars over denoising steps.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        memory_dir: str | os.PathLike | None = "auto",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        offload: bool = False,
        image_size: tuple[int, int] | None = None,
        frames_per_segment: int | None = None,
        num_inference_steps: int | None = None,
        context_frames: int | None = None,
        flow_shift: float | None = None,
        camera: Camera | None = None,
        depth_estimator: Any = "auto",
        tokenizer: Any = "auto",
        text_encoder: Any = "auto",
        default_prompt: str = "",
        max_sequence_length: int | None = None,
        vace_every: int = 2,
        vae_dtype: torch.dtype = torch.float32,
        progress: bool = False,
    ):
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

        from .dct_autoencoder import PatchDCTAutoencoder
        from .wan_checkpoint import read_world_defaults, resolve_checkpoint
        from .wan_memory import build_memory_transformer, load_lora, load_memory_branch

        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.vae_dtype = vae_dtype
        self.offload = offload
        self.checkpoint_dir = resolve_checkpoint(checkpoint_dir)
        # Settings the checkpoint was trained with; explicit arguments win.
        trained = read_world_defaults(self.checkpoint_dir) if self.checkpoint_dir.is_dir() else {}
        pick = lambda given, key, fallback: given if given is not None else trained.get(key, fallback)  # noqa: E731
        image_size = pick(image_size, "image_size", (704, 1280))
        frames_per_segment = pick(frames_per_segment, "frames_per_segment", 33)
        num_inference_steps = pick(num_inference_steps, "num_inference_steps", 20)
        context_frames = pick(context_frames, "context_frames", 2)
        flow_shift = pick(flow_shift, "flow_shift", 5.0)
        max_sequence_length = pick(max_sequence_length, "max_sequence_length", 512)
        if isinstance(memory_dir, str) and memory_dir == "auto":
            memory_dir = trained.get("memory_dir")
        if isinstance(depth_estimator, str) and depth_estimator == "auto":
            depth_estimator = trained.get("depth_estimator")
        if trained.get("text_encoder") is False:
            tokenizer = None if isinstance(tokenizer, str) and tokenizer == "auto" else tokenizer
            text_encoder = None if isinstance(text_encoder, str) and text_encoder == "auto" else text_encoder
        if "voxel_size" in trained:
            self.suggested_voxel_size = float(trained["voxel_size"])
        self.memory_dir = None if memory_dir is None else Path(memory_dir)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if context_frames < 0:
            raise ValueError(f"context_frames must be >= 0, got {context_frames}")
        needed = ["vae", "transformer", "scheduler"]
        if isinstance(tokenizer, str) and tokenizer == "auto":
            needed.append("tokenizer")
        if isinstance(text_encoder, str) and text_encoder == "auto":
            needed.append("text_encoder")
        check_checkpoint(self.checkpoint_dir, needed)
        home = "cpu" if offload else self.device
        load = dict(local_files_only=True)
        vae_class = PatchDCTAutoencoder if _vae_class_name(self.checkpoint_dir) == "PatchDCTAutoencoder" else AutoencoderKLWan
        self.vae = vae_class.from_pretrained(self.checkpoint_dir / "vae", torch_dtype=vae_dtype, **load).to(home).eval()
        vae_config = self.vae.config
        self.latent = LatentSpec(
            channels=vae_config.z_dim,
            spatial_factor=int(vae_config.scale_factor_spatial),
            temporal_factor=int(vae_config.scale_factor_temporal),
        )
        base = WanTransformer3DModel.from_pretrained(self.checkpoint_dir / "transformer", torch_dtype=self.dtype, **load).to(home)
        if base.config.in_channels != self.latent.channels:
            raise ValueError(
                f"transformer in_channels={base.config.in_channels} does not match the VAE z_dim={self.latent.channels}; "
                f"{self.checkpoint_dir} mixes components of different models"
            )
        self.patch_size = tuple(base.config.patch_size)
        if self.memory_dir is None:
            self.transformer = build_memory_transformer(base, vace_every=vace_every)
        else:
            self.transformer = load_memory_branch(base, self.memory_dir)
            if (self.memory_dir / "lora").is_dir():
                load_lora(self.transformer, self.memory_dir / "lora")
        del base
        self.transformer.eval().requires_grad_(False)
        scheduler_config = UniPCMultistepScheduler.load_config(self.checkpoint_dir / "scheduler", **load)
        self.scheduler_config = dict(
            UniPCMultistepScheduler.from_config(
                scheduler_config, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift
            ).config
        )
        self.tokenizer = self._load_text_part("tokenizer", tokenizer, load)
        self.text_encoder = self._load_text_part("text_encoder", text_encoder, load)
        if self.text_encoder is not None and isinstance(self.text_encoder, torch.nn.Module):
            self.text_encoder.to(home).eval().requires_grad_(False)

        height, width = int(image_size[0]), int(image_size[1])
        multiple = self.latent.spatial_factor * self.patch_size[1]
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(
                f"image_size must be (height, width) with sides multiples of {multiple} (VAE factor "
                f"{self.latent.spatial_factor} x DiT patch {self.patch_size[1]}), got {image_size}"
            )
        self.image_size = (height, width)
        # Latent frames (poses) of every segment; an optional protocol attribute the envs read.
        self.latent_frames = latent_frame_count(frames_per_segment, self.latent.temporal_factor)
        self.frames_per_segment = frames_per_segment
        self.camera = camera or Camera.from_fov(width, height, float(trained.get("fov_degrees", 60.0)))
        if (self.camera.height, self.camera.width) != self.image_size:
            raise ValueError(f"camera is {self.camera.width}x{self.camera.height}, image_size is {width}x{height} (w x h)")
        self.latent_camera = self.latent.latent_camera(self.camera)
        self.num_inference_steps = num_inference_steps
        self.context_frames = context_frames
        self.flow_shift = float(flow_shift)
        self.default_prompt = default_prompt
        self.max_sequence_length = max_sequence_length
        self.progress = progress
        self.depth_estimator = self._make_depth_estimator(depth_estimator)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        # Prompt embeddings per world index (computed once at start, reused every segment).
        self._world_embeds: dict[int, torch.Tensor] = {}
        mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae_config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._latents_mean, self._latents_std = mean, std
        # Recorded in config() so that from_config rebuilds the same model.
        self.vace_every = vace_every

    # ------------------------------------------------------------------ loading helpers

    def _load_text_part(self, name: str, given, load: dict):
        if given is None or not (isinstance(given, str) and given == "auto"):
            return given
        if name == "tokenizer":
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.checkpoint_dir / "tokenizer", **load)
        from transformers import UMT5EncoderModel

        return UMT5EncoderModel.from_pretrained(self.checkpoint_dir / "text_encoder", dtype=self.dtype, **load)

    def _make_depth_estimator(self, given):
        from .depth import ConstantDepth, TransformersDepth

        if given is None:
            warnings.warn(
                "WanWorldModel has no depth estimator: using a constant-depth plane, so memory geometry "
                "is wrong. Pass depth_estimator=<local transformers depth model dir> or a DepthEstimator.",
                stacklevel=3,
            )
            return ConstantDepth()
        if isinstance(given, (str, os.PathLike)):
            return TransformersDepth(given, device=self.device)
        if not callable(given):
            raise ValueError(f"depth_estimator must be a DepthEstimator, a path or None, got {type(given).__name__}")
        return given

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module | None):
        """With offload, a component visits the accelerator only while it runs."""
        if module is None or not self.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")

    # ------------------------------------------------------------------ latent space

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, T, h, w) -> DiT space."""
        return (z.float() - self._latents_mean.to(z.device)) / self._latents_std.to(z.device)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z.float() * self._latents_std.to(z.device) + self._latents_mean.to(z.device)

    def check_frames(self, frames: torch.Tensor, name: str = "frames") -> torch.Tensor:
        """Validate uint8 (B, F, H, W, 3) video at this model's size; the VAE would crop silently."""
        frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
        if frames.dim() != 5 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8 (B, F, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
        if tuple(frames.shape[2:4]) != self.image_size:
            raise ValueError(f"{name} are {tuple(frames.shape[2:4])} (H, W); this model makes {self.image_size}")
        latent_frame_count(frames.shape[1], self.latent.temporal_factor)
        return frames

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, F, H, W, 3) video, F = 1 + 4k -> normalised latents (B, T, C, h, w)."""
        frames = self.check_frames(frames)
        with self._on_device(self.vae):
            video = frames.to(self.device).permute(0, 4, 1, 2, 3).to(self.vae_dtype) / 127.5 - 1.0
            z = self.vae.encode(video).latent_dist.mode()
        return self.normalise(z).transpose(1, 2).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, T, C, h, w) -> uint8 frames (B, 1 + 4 (T - 1), H, W, 3)."""
        if latents.dim() != 5 or latents.shape[2] != self.latent.channels:
            raise ValueError(f"latents must be (B, T, {self.latent.channels}, h, w), got {tuple(latents.shape)}")
        with self._on_device(self.vae):
            z = self.denormalise(latents.to(self.device).transpose(1, 2)).to(self.vae_dtype)
            video = self.vae.decode(z).sample
        video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return video.permute(0, 2, 3, 4, 1).cpu()

    # ------------------------------------------------------------------ text

    @torch.no_grad()
    def prompt_embeds(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_sequence_length, text_dim) embeddings; each distinct prompt is encoded once."""
        todo = sorted({p for p in prompts if p not in self._prompt_cache})
        if todo:
            if self.tokenizer is None or self.text_encoder is None:
                if any(todo):
                    raise ValueError(
                        f"prompts {todo} need a tokenizer and text encoder, which were not loaded; "
                        "load them (tokenizer='auto') or pass conditioning['prompt_embeds']"
                    )
                # The empty prompt without a text encoder: zero embeddings, as Wan pads with zeros.
                text_dim = self.transformer.config.text_dim
                self._prompt_cache[""] = torch.zeros(1, self.max_sequence_length, text_dim, dtype=self.dtype, device=self.device)
            else:
                tokens = self.tokenizer(
                    todo, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
                )
                with self._on_device(self.text_encoder):
                    states = self.text_encoder(tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)).last_hidden_state
                # Wan zeroes the states past each prompt's end instead of masking them.
                keep = tokens.attention_mask.to(self.device).bool().unsqueeze(-1)
                states = torch.where(keep, states, torch.zeros_like(states)).to(self.dtype)
                for prompt, state in zip(todo, states):
                    self._prompt_cache[prompt] = state[None]
        return torch.cat([self._prompt_cache[p] for p in prompts]).to(self.device)

    def _embeds_for(self, batch: int, conditioning: dict | None, per_world: list[dict] | None = None) -> torch.Tensor:
        conditioning = conditioning or {}
        if "prompt_embeds" in conditioning:
            embeds = torch.as_tensor(conditioning["prompt_embeds"]).to(self.device, self.dtype)
            if embeds.dim() != 3 or embeds.shape[0] not in (1, batch):
                raise ValueError(f"prompt_embeds must be (B or 1, L, text_dim), got {tuple(embeds.shape)}")
            return embeds.expand(batch, -1, -1)
        if per_world is not None:
            prompts = [c.get("prompt", self.default_prompt) if c else self.default_prompt for c in per_world]
        elif "prompts" in conditioning:
            prompts = list(conditioning["prompts"])
        elif all(i in self._world_embeds for i in range(batch)):
            return torch.cat([self._world_embeds[i] for i in range(batch)]).to(self.device)
        else:
            prompts = [self.default_prompt] * batch
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} worlds")
        return self.prompt_embeds(prompts)

    # ------------------------------------------------------------------ denoising

    def _noise(self, generators: list[torch.Generator], frames: int) -> torch.Tensor:
        h, w = self.latent_camera.height, self.latent_camera.width
        shape = (self.latent.channels, frames, h, w)
        # One draw per world from its own generator: world i's noise does not depend on the batch.
        return torch.stack([torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).to(self.device) for g in generators])

    @torch.no_grad()
    def denoise(
        self,
        noise: torch.Tensor,
        clean: torch.Tensor,
        clean_mask: torch.Tensor,
        control: torch.Tensor,
        prompt_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """Flow-matching UniPC sampling with clean frames held fixed.

        Args:
            noise: (B, C, T, h, w) initial noise.
            clean: (B, C, T, h, w) clean latents (used where ``clean_mask``).
            clean_mask: (B, T) bool, frames that are given (per-token timestep 0).
            control: (B, 2C, T, h, w) branch input.
            prompt_embeds: (B, L, text_dim).

        Returns:
            (B, C, T, h, w) denoised latents (float32).
        """
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(self.num_inference_steps, device=self.device)
        batch, _, frames, h, w = noise.shape
        p_t, p_h, p_w = self.patch_size
        frame_given = clean_mask.to(self.device)[:, :, None, None, None].transpose(1, 2)  # (B, 1, T, 1, 1)
        token_given = clean_mask.to(self.device)[:, :: p_t, None].expand(-1, -1, (h // p_h) * (w // p_w)).reshape(batch, -1)
        latents = torch.where(frame_given, clean.to(self.device), noise.to(self.device))
        control = control.to(self.device, self.dtype)
        with self._on_device(self.transformer):
            for t in tqdm(scheduler.timesteps, desc="denoise", disable=not self.progress, leave=False):
                timestep = torch.where(token_given, torch.zeros_like(token_given, dtype=torch.float32), t.float().expand(batch, token_given.shape[1]))
                flow = self.transformer(
                    latents.to(self.dtype), timestep, prompt_embeds, control_hidden_states=control, return_dict=False
                )[0]
                latents = scheduler.step(flow.float(), t, latents, return_dict=False)[0]
                latents = torch.where(frame_given, clean.to(self.device), latents)
        return latents

    # ------------------------------------------------------------------ depth

    @torch.no_grad()
    def estimate_depth(self, frames: torch.Tensor, latent_frames: int, reference: torch.Tensor | None = None,
                       reference_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Depth (B, T, h, w) at latent resolution from decoded frames (B, F, H, W, 3).

        The estimator runs on the frame each latent frame ends on; its output is
        median-pooled to latent resolution and aligned to ``reference`` (B, T, h, w)
        where ``reference_mask`` is True.
        """
        from ..memory import pool_depth
        from .depth import align_depth_scale

        index = self.latent.frame_indices(latent_frames)
        picked = frames[:, index]
        batch = picked.shape[0]
        raw = torch.as_tensor(self.depth_estimator(picked.reshape(-1, *picked.shape[2:]))).float()
        raw = raw.reshape(batch, latent_frames, *raw.shape[-2:]).to(self.device)
        pooled = pool_depth(raw, self.latent.spatial_factor)
        kind = getattr(self.depth_estimator, "kind", "metric")
        if reference is None:
            if kind == "metric":
                return pooled
            reference = torch.full_like(pooled, math.inf)
        aligned, _ = align_depth_scale(pooled, reference.to(pooled.device), reference_mask, kind=kind)
        return aligned

    # ------------------------------------------------------------------ protocol

    @staticmethod
    def _check_views(views: int) -> None:
        if views != 1:
            raise ValueError(f"the Wan world model renders one camera per world (its VAE mixes consecutive frames), "
                             f"got views={views}; give each agent its own world")

    def _check_poses(self, poses, generators) -> torch.Tensor:
        poses = check_pose(poses, "poses")
        if poses.dim() != 4:
            raise ValueError(f"poses must be (B, T, 4, 4), got {tuple(poses.shape)}")
        if len(generators) != poses.shape[0]:
            raise ValueError(f"need one torch.Generator per world: {poses.shape[0]} worlds, {len(generators)} generators")
        asked = poses.shape[1]
        if asked != self.latent_frames:
            raise ValueError(
                f"this Wan model makes segments of {self.latent_frames} latent frames (frames_per_segment="
                f"{self.frames_per_segment}, VAE temporal factor {self.latent.temporal_factor}), got poses for {asked}; "
                f"pass {self.latent_frames} poses per segment (the envs' default frames_per_step), or build the model "
                f"with frames_per_segment={self.latent.video_frames(asked) if asked >= 1 else 'N'} for {asked}"
            )
        return poses.to(torch.float64)

    def start(self, poses: torch.Tensor, generators: list[torch.Generator], conditioning: list[dict[str, Any]] | None = None,
              worlds: list[int] | None = None, views: int = 1) -> Segment:
        """First segment of n worlds seen from ``poses`` (n, T, 4, 4), T = ``latent_frames``.

        ``worlds`` are the indices of the restarted worlds in the full batch (default
        0..n-1); their prompt embeddings replace the cached ones.

        ``conditioning[i]`` may hold ``image`` (H, W, 3) uint8, the first frame of world i
        (encoded by the VAE, kept clean), ``depth`` (H, W) its known depth (sets the
        world's scale), ``prompt`` (str) and ``prompt_embeds`` (1, L, text_dim).
        Worlds without an image are generated from their prompt alone.
        """
        self._check_views(views)
        poses = self._check_poses(poses, generators)
        batch, frames = poses.shape[:2]
        conditioning = list(conditioning) if conditioning is not None else [{} for _ in range(batch)]
        if len(conditioning) != batch:
            raise ValueError(f"conditioning has {len(conditioning)} entries for {batch} worlds")
        h, w = self.latent_camera.height, self.latent_camera.width
        channels = self.latent.channels
        clean = torch.zeros(batch, channels, frames, h, w, device=self.device)
        clean_mask = torch.zeros(batch, frames, dtype=torch.bool)
        reference = torch.full((batch, frames, h, w), math.inf, device=self.device)
        with_image = [i for i, c in enumerate(conditioning) if c and c.get("image") is not None]
        if with_image:
            images = []
            for i in with_image:
                image = torch.as_tensor(np.asarray(conditioning[i]["image"]))
                if image.shape != (*self.image_size, 3) or image.dtype != torch.uint8:
                    raise ValueError(
                        f"conditioning[{i}]['image'] must be uint8 {(*self.image_size, 3)}, got {image.dtype} {tuple(image.shape)}"
                    )
                images.append(image)
            first = self.encode(torch.stack(images)[:, None])  # (n, 1, C, h, w)
            clean[with_image, :, 0] = first[:, 0]
            clean_mask[with_image, 0] = True
            for i in with_image:
                if conditioning[i].get("depth") is not None:
                    from ..memory import pool_depth

                    known = torch.as_tensor(np.asarray(conditioning[i]["depth"]), dtype=torch.float32)
                    if known.shape != self.image_size:
                        raise ValueError(f"conditioning[{i}]['depth'] must be {self.image_size}, got {tuple(known.shape)}")
                    reference[i, 0] = pool_depth(known, self.latent.spatial_factor).to(self.device)
        worlds = list(range(batch)) if worlds is None else [int(w) for w in worlds]
        if len(worlds) != batch:
            raise ValueError(f"worlds has {len(worlds)} entries for {batch} poses")
        embeds = torch.cat([self._embeds_for(1, c or {}, [c or {}]) for c in conditioning])
        for world, embed in zip(worlds, embeds):
            self._world_embeds[world] = embed[None]
        control = torch.zeros(batch, 2 * channels, frames, h, w, device=self.device)
        if frames > 1:
            control = self._start_memory_control(control, clean[:, :, 0], reference[:, 0], poses)
        latents = self.denoise(self._noise(generators, frames), clean, clean_mask, control, embeds)
        latents = latents.transpose(1, 2).contiguous()
        decoded = self.decode(latents)
        if with_image:
            # The given image is the first frame as is, not its VAE round trip.
            decoded[with_image, 0] = torch.stack([torch.as_tensor(np.asarray(conditioning[i]["image"])) for i in with_image])
        has_reference = torch.isfinite(reference)
        depth = self.estimate_depth(decoded, frames, reference if has_reference.any() else None, has_reference)
        depth = torch.where(has_reference, reference, depth)
        return Segment(latents=latents.cpu(), depth=depth.cpu(), poses=poses, frames=decoded)

    def _start_memory_control(self, control: torch.Tensor, first: torch.Tensor, first_depth: torch.Tensor,
                              poses: torch.Tensor) -> torch.Tensor:
        """Branch input for a start segment: a given first image with known depth is the memory
        of the frames after it, exactly as the World would hand it over one step later.

        Args:
            control: (B, 2C, T, h, w) zeros; first: (B, C, h, w) first-frame latents;
            first_depth: (B, h, w) its depth (+inf where unknown); poses: (B, T, 4, 4).
        """
        from ..memory import LatentSpatialMemory
        from .wan_memory import memory_control

        known = torch.isfinite(first_depth).flatten(1).any(1)
        if not bool(known.any()):
            return control
        rows = torch.nonzero(known).flatten()
        voxel = float(self.suggested_voxel_size)
        memory = LatentSpatialMemory(self.latent.channels, voxel_size=voxel, num_worlds=len(rows), device=self.device)
        memory.write(first[rows, None], first_depth[rows, None], self.latent_camera, poses[rows, :1].to(self.device))
        read = memory.read(self.latent_camera, poses[rows, 1:].to(self.device))
        control[rows, :, 1:] = memory_control(read.latents, read.mask).to(control.dtype)
        return control

    def generate(self, request: SegmentRequest) -> Segment:
        """The next segment of each world (T = ``latent_frames`` poses), conditioned on projected memory and the previous tail."""
        self._check_views(request.views)
        poses = self._check_poses(request.poses, request.generators)
        batch, frames = poses.shape[:2]
        h, w = self.latent_camera.height, self.latent_camera.width
        channels = self.latent.channels
        expected = (batch, frames, channels, h, w)
        if tuple(request.memory_latents.shape) != expected:
            raise ValueError(f"memory_latents must be {expected}, got {tuple(request.memory_latents.shape)}")
        for name in ("memory_mask", "memory_depth"):
            if tuple(getattr(request, name).shape) != (batch, frames, h, w):
                raise ValueError(f"{name} must be {(batch, frames, h, w)}, got {tuple(getattr(request, name).shape)}")
        from .wan_memory import memory_control

        context = None
        if request.previous is not None and self.context_frames > 0:
            context = request.previous.latents[:, -self.context_frames :].to(self.device, torch.float32)
            if context.shape[0] != batch or tuple(context.shape[2:]) != (channels, h, w):
                raise ValueError(f"previous segment latents {tuple(request.previous.latents.shape)} do not fit {expected}")
        n_ctx = 0 if context is None else context.shape[1]
        total = n_ctx + frames
        clean = torch.zeros(batch, channels, total, h, w, device=self.device)
        clean_mask = torch.zeros(batch, total, dtype=torch.bool)
        if n_ctx:
            clean[:, :, :n_ctx] = context.transpose(1, 2)
            clean_mask[:, :n_ctx] = True
        memory_latents = request.memory_latents.to(self.device, torch.float32)
        memory_mask = request.memory_mask.to(self.device, torch.bool)
        if not request.use_memory:
            memory_latents, memory_mask = torch.zeros_like(memory_latents), torch.zeros_like(memory_mask)
        control = torch.zeros(batch, 2 * channels, total, h, w, device=self.device)
        control[:, :, n_ctx:] = memory_control(memory_latents, memory_mask)
        embeds = self._embeds_for(batch, request.conditioning)
        latents = self.denoise(self._noise(request.generators, total), clean, clean_mask, control, embeds)
        latents = latents[:, :, n_ctx:].transpose(1, 2).contiguous()
        decoded = self.decode(latents)
        reference = request.memory_depth.to(self.device, torch.float32) if request.use_memory else None
        depth = self.estimate_depth(decoded, frames, reference, memory_mask if request.use_memory else None)
        return Segment(latents=latents.cpu(), depth=depth.cpu(), poses=poses, frames=decoded)

    # Optional protocol attribute: metres-scale scenes (RealEstate10K-like).
    suggested_voxel_size = 0.05

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per-world prompt embeddings, so a loaded world needs no text encoder.

        ``prompt_embeds`` (W, L, text_dim) for worlds 0..W-1 and ``prompt_embeds_set`` (W,) bool,
        False for a world not started yet (its row is zeros).
        """
        if not self._world_embeds:
            return {}
        count = max(self._world_embeds) + 1
        some = next(iter(self._world_embeds.values()))
        embeds = torch.zeros(count, *some.shape[1:], dtype=some.dtype)
        given = torch.zeros(count, dtype=torch.bool)
        for world, embed in self._world_embeds.items():
            embeds[world], given[world] = embed[0].cpu(), True
        return {"prompt_embeds": embeds, "prompt_embeds_set": given}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` saved (every cached world embedding is replaced)."""
        unknown = sorted(set(state) - {"prompt_embeds", "prompt_embeds_set"})
        if unknown:
            raise ValueError(f"unknown Wan model state {unknown}; expected prompt_embeds and prompt_embeds_set")
        embeds = state.get("prompt_embeds")
        if embeds is None:
            self._world_embeds = {}
            return
        text_dim = self.transformer.config.text_dim
        if embeds.dim() != 3 or embeds.shape[-1] != text_dim:
            raise ValueError(f"saved prompt_embeds must be (worlds, L, {text_dim}) for this model's text_dim, "
                             f"got {tuple(embeds.shape)}; the world was saved with another model")
        given = state.get("prompt_embeds_set", torch.ones(embeds.shape[0], dtype=torch.bool))
        if tuple(given.shape) != (embeds.shape[0],):
            raise ValueError(f"prompt_embeds_set must be ({embeds.shape[0]},), got {tuple(given.shape)}")
        self._world_embeds = {i: embeds[i : i + 1].to(self.device, self.dtype) for i in range(embeds.shape[0]) if given[i]}

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides) -> "WanWorldModel":
        """Rebuild from ``config()``; keyword arguments (device, depth_estimator, ...) override it.

        A depth estimator that was a local model folder or a ``ConstantDepth`` is rebuilt; any
        other (an object the caller made) must be passed as ``depth_estimator``, since a different
        one would change the world's depth and break a bit-exact resume.
        """
        from .depth import ConstantDepth

        dtype = getattr(torch, config.get("dtype", "float32"))
        vae_dtype = getattr(torch, config.get("vae_dtype", "float32"))
        text = config.get("text_encoder", True)
        options = dict(
            memory_dir=config.get("memory_dir"), dtype=dtype, vae_dtype=vae_dtype, image_size=tuple(config["image_size"]),
            frames_per_segment=config["frames_per_segment"], num_inference_steps=config["num_inference_steps"],
            context_frames=config["context_frames"], flow_shift=config["flow_shift"], camera=Camera.from_dict(config["camera"]),
            default_prompt=config.get("default_prompt", ""), max_sequence_length=config["max_sequence_length"],
            vace_every=config.get("vace_every", 2), device=config.get("device", "cpu"),
            tokenizer="auto" if text else None, text_encoder="auto" if text else None,
        )
        if "depth_estimator" not in overrides:
            depth = config.get("depth_estimator")
            if isinstance(depth, dict) and depth.get("name") == "ConstantDepth":
                options["depth_estimator"] = ConstantDepth(float(depth["depth"]))
            elif isinstance(depth, str) and os.path.isdir(depth):
                options["depth_estimator"] = depth
            else:
                raise ValueError(
                    f"the saved Wan model used the depth estimator {depth!r}, which cannot be rebuilt from its config; "
                    f"pass it: WanWorldModel.from_config(config, depth_estimator=...), or World.load(path, model=...)"
                )
        options.update(overrides)
        return cls(config["checkpoint_dir"], **options)

    def _depth_config(self) -> str | dict[str, Any]:
        """The depth estimator as from_config can rebuild it: a model folder, a constant, else its class name."""
        from .depth import ConstantDepth

        if type(self.depth_estimator) is ConstantDepth:  # a subclass may estimate otherwise
            return {"name": "ConstantDepth", "depth": self.depth_estimator.depth}
        return getattr(self.depth_estimator, "path", type(self.depth_estimator).__name__)

    def config(self) -> dict[str, Any]:
        return {
            "name": "wan",
            "device": str(self.device),
            "checkpoint_dir": str(self.checkpoint_dir),
            "memory_dir": None if self.memory_dir is None else str(self.memory_dir),
            "image_size": list(self.image_size),
            "frames_per_segment": self.frames_per_segment,
            "num_inference_steps": self.num_inference_steps,
            "context_frames": self.context_frames,
            "flow_shift": self.flow_shift,
            "camera": self.camera.to_dict(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vae_dtype": str(self.vae_dtype).removeprefix("torch."),
            "default_prompt": self.default_prompt,
            "max_sequence_length": self.max_sequence_length,
            "vace_every": self.vace_every,
            "text_encoder": self.tokenizer is not None and self.text_encoder is not None,
            "depth_estimator": self._depth_config(),
            "latent": {"channels": self.latent.channels, "spatial_factor": self.latent.spatial_factor,
                       "temporal_factor": self.latent.temporal_factor},
        }
