"""Tiny random-weight checkpoints of the real diffusers / transformers classes.

Tests and CPU benchmarks need a Wan2.2 checkpoint directory laid out exactly
like ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` (vae/, transformer/, text_encoder/,
tokenizer/, scheduler/, model_index.json) but small enough to build in well
under a second. The classes are the real ones, only the sizes are tiny, so the
loading, shape and memory-branch code paths are the same as with the 5B model.

The VAE follows Wan2.2's layout (residual, 2x2 pixel patching in front of the
encoder, 16x spatial, 4x temporal); only the channel widths shrink. The latent
channel count is a parameter because the 48 channels of the real model are the
main cost of the tiny DiT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = [
    "tiny_vae_config",
    "tiny_transformer_config",
    "tiny_text_encoder_config",
    "tiny_scheduler_config",
    "build_tiny_checkpoint",
    "build_tiny_depth_model",
    "TINY_VOCAB",
]

# Words the offline tokenizer knows; everything else maps to <unk>.
TINY_VOCAB = ["<pad>", "</s>", "<unk>", "a", "room", "street", "forest", "house", "kitchen", "walk", "through", "the", "bright", "dark"]


def tiny_vae_config(z_dim: int = 16) -> dict:
    """Wan2.2-style VAE (residual, patch 2, 16x spatial, 4x temporal) with 3 base channels."""
    return dict(
        base_dim=3,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )


def tiny_transformer_config(in_channels: int = 16, num_layers: int = 4, text_dim: int = 32) -> dict:
    """WanTransformer3DModel with 2 heads of 12 channels; patch (1, 2, 2) as in Wan2.2."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def tiny_text_encoder_config(d_model: int = 32) -> dict:
    return dict(
        vocab_size=len(TINY_VOCAB), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    )


def tiny_scheduler_config() -> dict:
    """Flow-matching UniPC as used by Wan2.2 (shift 5, flow prediction)."""
    return dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, num_train_timesteps=1000)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(TINY_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_tiny_checkpoint(
    directory: str | os.PathLike,
    *,
    z_dim: int = 16,
    num_layers: int = 4,
    seed: int = 0,
    text_encoder: bool = True,
    tokenizer: bool = True,
) -> Path:
    """Write a complete diffusers-format Wan checkpoint with tiny random weights.

    Args:
        directory: where to write (created; existing files are overwritten).
        z_dim: latent channels of the VAE (and in/out channels of the DiT).
        num_layers: DiT layers (the memory branch reads at every second one).
        seed: torch seed for the random weights.
        text_encoder / tokenizer: False leaves that subfolder out (for tests of
            prompt-embedding-only use and of the missing-component error).

    Returns:
        The directory, ready for ``WanWorldModel(directory)``.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    AutoencoderKLWan(**tiny_vae_config(z_dim)).save_pretrained(directory / "vae")
    text_dim = tiny_text_encoder_config()["d_model"]
    WanTransformer3DModel(**tiny_transformer_config(z_dim, num_layers, text_dim)).save_pretrained(directory / "transformer")
    UniPCMultistepScheduler(**tiny_scheduler_config()).save_pretrained(directory / "scheduler")
    if text_encoder:
        UMT5EncoderModel(UMT5Config(**tiny_text_encoder_config())).save_pretrained(directory / "text_encoder")
    if tokenizer:
        _tiny_tokenizer().save_pretrained(directory / "tokenizer")
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "expand_timesteps": True,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"] if text_encoder else [None, None],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"] if tokenizer else [None, None],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2))
    return directory


def build_tiny_depth_model(directory: str | os.PathLike, *, seed: int = 0, image_size: int = 28) -> Path:
    """Write a tiny random Depth Anything (DINOv2 backbone) model + image processor.

    It predicts relative disparity like the real Depth Anything V2 models, so the
    scale/shift alignment path is the one exercised.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    backbone = Dinov2Config(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, patch_size=14,
        image_size=image_size, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=16, patch_size=14, neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8, head_hidden_size=8, depth_estimation_type="relative",
    )
    DepthAnythingForDepthEstimation(config).save_pretrained(directory)
    processor = DPTImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, keep_aspect_ratio=False,
        ensure_multiple_of=14, do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(directory)
    return directory
