"""A fixed latent codec with the shape of a real video VAE.

``PatchDCTCodec`` cuts an image into ``factor`` x ``factor`` patches and keeps,
per patch and colour channel, the ``keep`` x ``keep`` lowest-frequency
coefficients of an orthonormal 2-D DCT. With the defaults (8x, keep 4) an RGB
image of H x W becomes a (48, H/8, W/8) latent: the channel count of Wan2.2's
VAE at the spatial factor of Wan2.1's. Decoding is the transpose, so
``decode(encode(x))`` is the orthogonal projection onto what the latent can
say (a smooth, JPEG-like image) and ``encode(decode(z)) == z``.

The latent channel order is (colour, frequency row, frequency column); channel
0 is the red patch mean times ``factor``.
"""

from __future__ import annotations

import math

import torch

from ..compiled import disable_kernels, kernel_module, kernels_enabled, parallel_kernels


def dct_basis(size: int, keep: int) -> torch.Tensor:
    """(size*size, keep*keep) orthonormal 2-D DCT-II basis vectors of the lowest frequencies."""
    n = torch.arange(size, dtype=torch.float64)
    k = torch.arange(keep, dtype=torch.float64)
    one_d = torch.cos(math.pi * (n[:, None] + 0.5) * k[None, :] / size) * math.sqrt(2.0 / size)
    one_d[:, 0] = 1.0 / math.sqrt(size)
    # Outer product over (row, column) pixel and (row, column) frequency.
    return torch.einsum("ik,jl->ijkl", one_d, one_d).reshape(size * size, keep * keep)


class PatchDCTCodec:
    """Per-patch orthonormal DCT codec.

    Args:
        factor: spatial compression (patch side in pixels).
        keep: coefficients kept per patch side; channels = 3 * keep * keep.
    """

    def __init__(self, factor: int = 8, keep: int = 4, device: str | torch.device = "cpu"):
        if not 1 <= keep <= factor:
            raise ValueError(f"keep must be in [1, factor={factor}], got {keep}")
        self.factor = factor
        self.keep = keep
        self.channels = 3 * keep * keep
        self.basis = dct_basis(factor, keep).to(device=device, dtype=torch.float32)

    def _check(self, height: int, width: int) -> None:
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the codec factor {self.factor}; "
                f"use sides that are multiples of {self.factor}"
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) float images in [0, 1] -> (..., C, H/f, W/f) latents."""
        *lead, colours, height, width = images.shape
        if colours != 3:
            raise ValueError(f"images must have 3 colour channels first, got shape {tuple(images.shape)}")
        self._check(height, width)
        f, h, w = self.factor, height // self.factor, width // self.factor
        patches = images.reshape(-1, 3, h, f, w, f).permute(0, 1, 2, 4, 3, 5).reshape(-1, 3, h, w, f * f)
        return self.encode_patches(patches).reshape(*lead, self.channels, h, w)

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w, f*f) images cut into patches (row-major within a patch) -> (N, C, h, w) latents."""
        n, _, h, w, _ = patches.shape
        coefficients = patches @ self.basis  # (N, 3, h, w, keep*keep)
        return coefficients.permute(0, 1, 4, 2, 3).reshape(n, self.channels, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(..., C, h, w) latents -> (..., 3, H, W) images clamped to [0, 1]."""
        *lead, channels, h, w = latents.shape
        if channels != self.channels:
            raise ValueError(f"latents have {channels} channels, this codec makes {self.channels}")
        f = self.factor
        coefficients = latents.reshape(-1, 3, self.keep * self.keep, h, w).permute(0, 1, 3, 4, 2)
        patches = coefficients @ self.basis.T  # (N, 3, h, w, f*f)
        images = patches.reshape(-1, 3, h, w, f, f).permute(0, 1, 2, 4, 3, 5).reshape(*lead, 3, h * f, w * f)
        return images.clamp(0.0, 1.0)

    def decode_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        """(..., C, h, w) latents -> (..., H, W, 3) uint8 frames."""
        if latents.dtype == torch.float32 and kernels_enabled(latents.device):
            frames = self._compiled_decode_uint8(latents)
            if frames is not None:
                return frames
        images = self.decode(latents)
        return (images * 255.0 + 0.5).to(torch.uint8).movedim(-3, -1)

    def _compiled_decode_uint8(self, latents: torch.Tensor) -> torch.Tensor | None:
        """``decode_uint8`` with the product in torch and the pixel shuffle and quantisation by
        :mod:`.codec_kernels` (None: the kernel could not be built)."""
        *lead, channels, h, w = latents.shape
        if channels != self.channels:
            raise ValueError(f"latents have {channels} channels, this codec makes {self.channels}")
        codec_kernels = kernel_module(f"{__package__}.codec_kernels")
        if codec_kernels is None:
            return None
        coefficients = latents.reshape(-1, 3, self.keep * self.keep, h, w).permute(0, 1, 3, 4, 2)
        patches = (coefficients @ self.basis.T).contiguous()  # (N, 3, h, w, f*f), as decode computes it
        try:
            frames = codec_kernels.frames_from_patches(patches.numpy(), self.factor, parallel_kernels())
        except Exception as error:
            disable_kernels(f"{type(error).__name__}: {error}")
            return None
        return torch.from_numpy(frames).reshape(*lead, h * self.factor, w * self.factor, 3)
