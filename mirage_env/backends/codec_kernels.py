"""The codec's pixel shuffles and uint8 quantisation as compiled CPU kernels (numba).

``PatchDCTCodec`` is two matrix products and, around them, reshapes that copy every
pixel (patches out of an image, an image out of patches) and three elementwise passes
to make uint8 frames. The products stay torch's (their rounding is the BLAS's); these
kernels do the copies and the quantisation, each float32 operation as torch does it:
``clamp(0, 1)``, then ``* 255``, then ``+ 0.5``, then truncation; and, between the two products of
the procedural model's segment, the latents' channel-first layout with memory pasted where the model
uses it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _frames_view(n, patches, factor, frames):
    zero, one = np.float32(0.0), np.float32(1.0)
    scale, half = np.float32(255.0), np.float32(0.5)
    h, w = patches.shape[2], patches.shape[3]
    for i in range(h):
        for a in range(factor):
            for j in range(w):
                for b in range(factor):
                    for c in range(3):
                        x = min(max(patches[n, c, i, j, a * factor + b], zero), one)
                        frames[n, i * factor + a, j * factor + b, c] = np.uint8(x * scale + half)


@njit(cache=True)
def _frames_serial(patches, factor, frames):
    for n in range(patches.shape[0]):
        _frames_view(n, patches, factor, frames)


@njit(cache=True, parallel=True)
def _frames_parallel(patches, factor, frames):
    for n in prange(patches.shape[0]):
        _frames_view(n, patches, factor, frames)


def frames_from_patches(patches, factor, parallel):
    """(N, 3, h, w, f*f) float32 decoded patches -> (N, h*f, w*f, 3) uint8 frames."""
    n, _, h, w, _ = patches.shape
    frames = np.empty((n, h * factor, w * factor, 3), np.uint8)
    (_frames_parallel if parallel and n > 1 else _frames_serial)(patches, factor, frames)
    return frames


@njit(cache=True)
def _latents_view(v, frames, coefficients, used, memory, use_memory, latents, decode_in):
    b = v // frames
    t = v - b * frames
    h, w, kept = coefficients.shape[2], coefficients.shape[3], coefficients.shape[4]
    for c in range(3):
        for k in range(kept):
            channel = c * kept + k
            for i in range(h):
                for j in range(w):
                    x = coefficients[v, c, i, j, k]
                    if use_memory and used[b, t, i, j]:
                        x = memory[b, t, channel, i, j]
                    latents[b, t, channel, i, j] = x
                    decode_in[v, c, i, j, k] = x


@njit(cache=True)
def _latents_serial(frames, coefficients, used, memory, use_memory, latents, decode_in):
    for v in range(coefficients.shape[0]):
        _latents_view(v, frames, coefficients, used, memory, use_memory, latents, decode_in)


@njit(cache=True, parallel=True)
def _latents_parallel(frames, coefficients, used, memory, use_memory, latents, decode_in):
    for v in prange(coefficients.shape[0]):
        _latents_view(v, frames, coefficients, used, memory, use_memory, latents, decode_in)


def latents_from_coefficients(coefficients, used, memory, use_memory, latents, decode_in, parallel):
    """The encoder's product (V, 3, h, w, k) -> ``latents`` (B, T, 3 * k, h, w) (V = B * T), with ``memory``
    (B, T, 3 * k, h, w) wherever ``used`` (B, T, h, w) and ``use_memory``; the same values into ``decode_in``
    (V, 3, h, w, k), the layout the decoder's product reads (``decode``'s permute, made contiguous)."""
    frames = latents.shape[1]
    kernel = _latents_parallel if parallel and coefficients.shape[0] > 1 else _latents_serial
    kernel(frames, coefficients, used, memory, use_memory, latents, decode_in)
