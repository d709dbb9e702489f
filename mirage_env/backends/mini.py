"""procedural-wan-mini: a small Wan-architecture world model trained on the procedural world.

No pretrained video model is small enough for a 2-core CPU, so the published
recipe (Wan2.2 base + memory branch + LoRA) runs here with a base trained from
scratch (stage 0) on clips exported from the procedural world
(mirage_env.dataset). Everything else is the code a GPU user runs on
Wan2.2-TI2V-5B: ``WanWorldModel``, the VACE memory branch, peft LoRA, the
flow-matching trainer, the diffusers file layout.

What differs, and why:

- latent space: the DCT codec as a diffusers autoencoder
  (``PatchDCTAutoencoder``: 8x spatial, no temporal compression, 48 channels,
  the channel count of Wan2.2's VAE). The procedural frames are made by
  decoding that codec, so it reconstructs them up to uint8 rounding;
- sizes: 64x64 frames (8x8 latents, 16 tokens a frame with patch (1, 2, 2)),
  segments of 4 frames with 2 clean context frames, a DiT of 6 layers of width
  256 (4 heads x 64) with memory-branch blocks at layers 0 and 5, 2 sampler
  steps (picked on validation clips), no text (empty-prompt embeddings).

This module holds the configuration, builds the untrained checkpoint folder
and runs one training stage on in-memory samples (``train_on_samples``, with
``wan_train.MemoryBranchTrainer``); ``benchmarks/learned_memory.py`` runs the
whole recipe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .wan_checkpoint import write_world_defaults

__all__ = ["MINI_NAME", "MINI_SETTINGS", "mini_transformer_config", "build_mini_checkpoint", "train_on_samples"]

MINI_NAME = "procedural-wan-mini"

# The settings WanWorldModel reads from the checkpoint (mirage_world.json).
MINI_SETTINGS = dict(
    image_size=[64, 64],
    frames_per_segment=4,
    # A starting point only: benchmarks/learned_memory.py picks steps and flow shift on
    # validation clips after training and writes them into the checkpoint. Few steps win
    # (a small model's extra steps add texture noise, not fidelity).
    num_inference_steps=4,
    context_frames=2,
    flow_shift=2.0,
    fov_degrees=90.0,
    # The procedural world's voxel at 64x64 (see ProceduralWorldModel.suggested_voxel_size).
    voxel_size=0.28125,
    text_encoder=False,
    # No text: the empty prompt's zero embeddings; one token keeps cross-attention cheap.
    max_sequence_length=1,
)


def mini_transformer_config(num_layers: int = 6, heads: int = 4, head_dim: int = 64, ffn_dim: int = 768,
                            latent_channels: int = 48, text_dim: int = 32) -> dict:
    """WanTransformer3DModel of a few million parameters for 8x8 latents.

    A token holds 2 x 2 x 48 = 192 latent values. At width 192 the stream has no room
    to carry the noisy input and the memory beside it, and the branch copied memory
    poorly. In a GPU sweep of the same recipe, width 256 had a stage-1 loss of 0.24
    against 0.35 at 90% of the stage (width 320: 0.23); on the CPU it lifted held-out
    revisits by 2 dB, at 1.45x the cost per step.
    """
    return dict(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=latent_channels,
        out_channels=latent_channels, text_dim=text_dim, freq_dim=256, ffn_dim=ffn_dim, num_layers=num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )


def build_mini_checkpoint(directory: str | os.PathLike, latents_mean: list[float], latents_std: list[float], *,
                          transformer_config: dict | None = None, seed: int = 0, settings: dict | None = None,
                          description: str = "") -> Path:
    """Write an untrained procedural-wan-mini checkpoint: DCT VAE, random DiT, scheduler, settings.

    Args:
        latents_mean / latents_std: per-channel statistics of the training latents (48 each).
        transformer_config: overrides ``mini_transformer_config()`` (tests use a tinier one).
        seed: torch seed of the DiT's initial weights.
        settings: overrides of ``MINI_SETTINGS``.
    """
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    from .dct_autoencoder import PatchDCTAutoencoder
    from .tiny import tiny_scheduler_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    settings = {**MINI_SETTINGS, **(settings or {})}
    PatchDCTAutoencoder(scale_factor_spatial=8, dct_keep=4, latents_mean=list(latents_mean),
                        latents_std=list(latents_std)).save_pretrained(directory / "vae")
    torch.manual_seed(seed)
    config = transformer_config or mini_transformer_config()
    WanTransformer3DModel(**config).save_pretrained(directory / "transformer")
    UniPCMultistepScheduler(**{**tiny_scheduler_config(), "flow_shift": settings["flow_shift"]}).save_pretrained(directory / "scheduler")
    index = {
        "_class_name": "WanPipeline",
        "expand_timesteps": True,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["mirage_env.backends.dct_autoencoder", "PatchDCTAutoencoder"],
        "text_encoder": [None, None],
        "tokenizer": [None, None],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_world_defaults(directory, name=MINI_NAME, description=description or (
        "procedural-wan-mini: a small Wan-architecture world model trained on mirage-env's procedural "
        "indoor world at 64x64 on a CPU; not Wan2.2"), **settings)
    return directory


def train_on_samples(model, samples, *, stage: int, steps: int, learning_rate: float, batch_size: int = 8,
                     lora_rank: int = 16, seed: int = 0, min_hit_fraction: float = 0.0,
                     mixed_precision: str = "auto", progress: bool = True) -> tuple[list[float], object]:
    """One stage of the recipe on prepared ``ClipSamples`` (held in memory: a few hundred MB at most).

    Stage 0 trains the whole DiT without memory (the samples' hit masks are zeroed),
    stage 1 the memory branch, stage 2 LoRA (rank ``lora_rank``) on the DiT. Minibatches
    and noise come from generators seeded by ``seed`` and the stage, so a run repeats.
    Stages 1 and 2 draw only samples where memory covers at least ``min_hit_fraction``
    of the target: where memory says little, the branch has nothing to learn from.

    Returns:
        The loss of every step and the ``MemoryBranchTrainer`` (its ``lora_config`` for saving).
    """
    import dataclasses

    import numpy as np
    from tqdm.auto import tqdm

    from ..clip_samples import ClipSamples
    from .wan_train import MemoryBranchTrainer, TrainArgs

    args = TrainArgs(
        checkpoint_dir=str(model.checkpoint_dir), stage=stage, learning_rate=learning_rate, max_steps=steps,
        warmup_steps=min(100, steps // 10), lr_schedule="cosine", batch_size=batch_size, past_frames=1,
        segment_frames=model.frames_per_segment, context_frames=model.context_frames, flow_shift=model.flow_shift,
        lora_rank=lora_rank, lora_alpha=float(lora_rank), seed=seed, max_sequence_length=model.max_sequence_length,
        mixed_precision=mixed_precision,
    )
    trainer = MemoryBranchTrainer(model, args)
    embeds = model.prompt_embeds([""])
    if stage == 0:
        samples = dataclasses.replace(samples, memory_mask=torch.zeros_like(samples.memory_mask))
    elif min_hit_fraction > 0:
        covered = samples.memory_mask.flatten(1).float().mean(1) >= min_hit_fraction
        if not covered.any():
            raise ValueError(f"no sample has memory on {min_hit_fraction:.0%} of its target; lower min_hit_fraction")
        samples = ClipSamples(**{f.name: getattr(samples, f.name)[covered] for f in dataclasses.fields(samples)})
    order = torch.Generator().manual_seed(seed + stage)
    noise = torch.Generator().manual_seed(seed + 100 + stage)
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"stage {stage}", disable=not progress)
    for _ in bar:
        index = torch.randint(len(samples), (batch_size,), generator=order)
        losses.append(trainer.train_step(samples.batch(index, embeds), noise))
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{trainer.learning_rate():.1e}")
    model.transformer.eval().requires_grad_(False)
    return losses, trainer
