"""The DCT codec behind the interface of a diffusers video VAE.

The small learned world model (``procedural-wan-mini``) needs a latent space
that really autoencodes, because memory stores the generator's latents and an
agent sees them decoded. Its training frames come from the procedural world,
which *makes* every frame by decoding ``PatchDCTCodec`` latents; so that codec
reproduces them up to uint8 rounding, with nothing to train. A small
``AutoencoderKLWan`` trained here for minutes would be lossier and cost the
budget the generator needs.

``PatchDCTAutoencoder`` wraps the codec as a diffusers model (config, save /
load with ``save_pretrained`` / ``from_pretrained``) with the call signature
``WanWorldModel`` uses for ``AutoencoderKLWan``:

    encode(video (B, 3, F, H, W) in [-1, 1]).latent_dist.mode() -> (B, C, F, h, w)
    decode(z (B, C, F, h, w)).sample -> (B, 3, F, H, W) in [-1, 1]

It has no temporal compression (``scale_factor_temporal = 1``): every frame is
one latent frame. ``latents_mean`` / ``latents_std`` are per-channel statistics
of the training data, so the DiT sees unit-scale inputs (the DC channels are
about 10x the high-frequency ones).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

from .codec import dct_basis

__all__ = ["PatchDCTAutoencoder", "ExactLatent"]


class ExactLatent:
    """A deterministic 'distribution': the codec has one latent per image."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def mode(self) -> torch.Tensor:
        return self.latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents


class PatchDCTAutoencoder(ModelMixin, ConfigMixin):
    """Per-patch orthonormal DCT as a diffusers autoencoder (see mirage_env.backends.codec).

    Args:
        scale_factor_spatial: patch side in pixels (the spatial compression).
        dct_keep: low-frequency coefficients kept per patch side; ``z_dim = 3 * dct_keep**2``.
        latents_mean / latents_std: per-channel normalisation into the DiT's space
            (defaults 0 / 1).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        scale_factor_spatial: int = 8,
        dct_keep: int = 4,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        z_dim: int | None = None,
        scale_factor_temporal: int = 1,
    ):
        super().__init__()
        if not 1 <= dct_keep <= scale_factor_spatial:
            raise ValueError(f"dct_keep must be in [1, scale_factor_spatial={scale_factor_spatial}], got {dct_keep}")
        channels = 3 * dct_keep * dct_keep
        if z_dim is not None and z_dim != channels:
            raise ValueError(f"z_dim={z_dim} does not match 3 * dct_keep**2 = {channels}")
        if scale_factor_temporal != 1:
            raise ValueError("the DCT autoencoder codes each frame alone: scale_factor_temporal must be 1")
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if values is not None and len(values) != channels:
                raise ValueError(f"{name} has {len(values)} values for {channels} latent channels")
        if latents_std is not None and min(latents_std) <= 0:
            raise ValueError("latents_std must be positive")
        # Written into the config so readers of AutoencoderKLWan's fields find them.
        self.register_to_config(
            z_dim=channels,
            latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * channels,
            latents_std=list(latents_std) if latents_std is not None else [1.0] * channels,
        )
        # Recomputed, never loaded: a checkpoint cannot change the transform.
        self.register_buffer("basis", dct_basis(scale_factor_spatial, dct_keep).float(), persistent=False)
        self.factor, self.keep, self.channels = scale_factor_spatial, dct_keep, channels

    @classmethod
    def from_pretrained(cls, directory, torch_dtype: torch.dtype | None = None, **kwargs) -> "PatchDCTAutoencoder":
        """Rebuild from ``config.json`` alone: the transform has no learned weights to load."""
        config = cls.load_config(directory, local_files_only=True)
        return cls.from_config(config)

    def _check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, F, H, W), got {tuple(video.shape)}")
        height, width = video.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(f"frame size {height}x{width} is not divisible by the spatial factor {self.factor}")

    def encode(self, video: torch.Tensor, return_dict: bool = True):
        """(B, 3, F, H, W) in [-1, 1] -> latents (B, C, F, H/f, W/f) (unnormalised)."""
        self._check_video(video)
        b, _, frames, height, width = video.shape
        f, h, w = self.factor, height // self.factor, width // self.factor
        images = (video.float() + 1.0) / 2.0
        patches = images.permute(0, 2, 1, 3, 4).reshape(-1, 3, h, f, w, f).permute(0, 1, 2, 4, 3, 5)
        coefficients = patches.reshape(-1, 3, h, w, f * f) @ self.basis  # (N, 3, h, w, keep^2)
        latents = coefficients.permute(0, 1, 4, 2, 3).reshape(b, frames, self.channels, h, w).transpose(1, 2)
        distribution = ExactLatent(latents.contiguous())
        return AutoencoderKLOutput(latent_dist=distribution) if return_dict else (distribution,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Latents (B, C, F, h, w) -> video (B, 3, F, H, W) in [-1, 1]."""
        if z.dim() != 5 or z.shape[1] != self.channels:
            raise ValueError(f"latents must be (B, {self.channels}, F, h, w), got {tuple(z.shape)}")
        b, _, frames, h, w = z.shape
        f = self.factor
        coefficients = z.float().transpose(1, 2).reshape(-1, 3, self.keep * self.keep, h, w).permute(0, 1, 3, 4, 2)
        patches = coefficients @ self.basis.T  # (N, 3, h, w, f*f)
        images = patches.reshape(-1, 3, h, w, f, f).permute(0, 1, 2, 4, 3, 5).reshape(b, frames, 3, h * f, w * f)
        video = (images.clamp(0.0, 1.0) * 2.0 - 1.0).transpose(1, 2).contiguous()
        return DecoderOutput(sample=video) if return_dict else (video,)
