"""What may enter memory: keep-masks at latent resolution, composable.

Every filter maps what the world loop knows about a generated segment to a
bool keep-mask (B, T, h, w); ``compose`` ANDs them. Filters are model-free: they
use depth, the memory's own prediction and the cameras, so they work for any
world model. A user-supplied mask (for example from a segmentation model) plugs
in as one more filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from .compiled import disable_kernels, kernel_module, kernels_enabled
from .geometry import Camera, invert_pose, unproject

__all__ = [
    "FilterInputs",
    "KeepFilter",
    "valid_depth",
    "consistent_with_memory",
    "consistent_across_frames",
    "user_mask",
    "compose",
    "default_filters",
]


@dataclass
class FilterInputs:
    """What a filter may look at, all at latent resolution.

    Attributes:
        depth: (B, T, h, w) z-depth of the generated segment (+inf = sky).
        poses: (B, T, 4, 4) camera-to-world poses of those latent frames.
        camera: intrinsics of the latent grid.
        predicted_depth: (B, T, h, w) depth memory predicted before generation (+inf = no hit).
        predicted_mask: (B, T, h, w) where memory had a prediction.
        model_keep: (B, T, h, w) the world model's own keep-mask, or None.
    """

    depth: torch.Tensor
    poses: torch.Tensor
    camera: Camera
    predicted_depth: torch.Tensor | None = None
    predicted_mask: torch.Tensor | None = None
    model_keep: torch.Tensor | None = None


class KeepFilter(Protocol):
    def __call__(self, inputs: FilterInputs) -> torch.Tensor: ...


_HOST_DTYPES = (torch.float32, torch.float64, torch.bool)


def _maths(tensor: torch.Tensor):
    """``tensor`` and the library to compute on it with: numpy for host tensors (at latent resolution a
    torch op costs several times its numpy twin; float32 elementwise maths and comparisons give the
    same bits), torch elsewhere."""
    if tensor.device.type == "cpu" and not tensor.requires_grad and tensor.dtype in _HOST_DTYPES:
        return tensor.numpy(), np
    return tensor, torch


def _tensor(mask) -> torch.Tensor:
    return torch.from_numpy(mask) if isinstance(mask, np.ndarray) else mask


# Filters are small frozen dataclasses rather than closures, so that a World (and the
# envs holding one) can be pickled with the standard ``pickle`` (for subprocess vector
# envs, SuperSuit, Ray); the lower-case factories below are the public names.


@dataclass(frozen=True)
class ValidDepth:
    max_depth: float = float("inf")
    min_depth: float = 1e-3

    def __call__(self, inputs: FilterInputs) -> torch.Tensor:
        depth, maths = _maths(inputs.depth)
        valid = maths.isfinite(depth) & (depth > self.min_depth)
        # Every finite depth is <= inf: the default's third comparison would keep all that pass the first.
        return _tensor(valid if self.max_depth == float("inf") else valid & (depth <= self.max_depth))


def valid_depth(max_depth: float = float("inf"), min_depth: float = 1e-3) -> KeepFilter:
    """Drop sky (+inf), invalid and far depth: far samples are coarse and unreliable."""
    return ValidDepth(max_depth, min_depth)


@dataclass(frozen=True)
class ConsistentWithMemory:
    relative_tolerance: float = 0.1

    def keeps_everything(self, inputs: FilterInputs) -> bool:
        return inputs.predicted_depth is None or inputs.predicted_mask is None

    def __call__(self, inputs: FilterInputs) -> torch.Tensor:
        if self.keeps_everything(inputs):
            return torch.ones_like(inputs.depth, dtype=torch.bool)
        depth, maths = _maths(inputs.depth)
        predicted, known = _maths(inputs.predicted_depth)[0], _maths(inputs.predicted_mask)[0]
        with np.errstate(invalid="ignore"):  # sky minus sky is NaN, which agrees with nothing, as in torch
            agree = maths.abs(depth - predicted) <= self.relative_tolerance * predicted
        return _tensor(~known | agree)


def consistent_with_memory(relative_tolerance: float = 0.1) -> KeepFilter:
    """Drop pixels whose depth disagrees with what memory predicted there.

    A thing that moved into view stands in front of where memory has the static
    world; writing it would leave a ghost. Pixels memory knows nothing about pass.
    """
    return ConsistentWithMemory(relative_tolerance)


@dataclass(frozen=True)
class ConsistentAcrossFrames:
    relative_tolerance: float = 0.1

    def keeps_everything(self, inputs: FilterInputs) -> bool:
        return inputs.depth.shape[1] < 2

    def __call__(self, inputs: FilterInputs) -> torch.Tensor:
        depth, poses, camera = inputs.depth, inputs.poses, inputs.camera
        batch, frames, h, w = depth.shape
        result = torch.ones_like(depth, dtype=torch.bool)
        if frames < 2:
            return result
        finite = torch.isfinite(depth)
        points = unproject(depth.masked_fill(~finite, 1.0), camera, poses.to(depth.device, torch.float64).float())
        for shift in (-1, 1):  # loop over two neighbours, not over pixels
            source = slice(max(0, -shift), frames - max(0, shift))
            target = slice(max(0, shift), frames - max(0, -shift))
            w2c = invert_pose(poses[:, target].to(depth.device, torch.float64)).float()
            src_points = points[:, source].reshape(batch, -1, h * w, 3)
            local = src_points @ w2c[:, :, :3, :3].transpose(-1, -2) + w2c[:, :, None, :3, 3]
            z = local[..., 2]
            u = camera.fx * local[..., 0] / z.clamp_min(1e-6) + camera.cx
            v = camera.fy * local[..., 1] / z.clamp_min(1e-6) + camera.cy
            column, row = u.floor().long(), v.floor().long()
            inside = (z > 1e-6) & (column >= 0) & (column < w) & (row >= 0) & (row < h)
            target_depth = depth[:, target].reshape(batch, -1, h * w)
            flat = (row.clamp(0, h - 1) * w + column.clamp(0, w - 1))
            observed = torch.gather(target_depth, 2, flat)
            disagree = inside & ((observed - z).abs() > self.relative_tolerance * z)
            result[:, source] &= ~disagree.reshape(batch, -1, h, w) | ~finite[:, source]
        return result


def consistent_across_frames(relative_tolerance: float = 0.1) -> KeepFilter:
    """Drop pixels whose 3D point is contradicted by a neighbouring frame of the segment.

    Each frame's points are projected into the previous and next frame; where one
    lands inside that frame and its depth there disagrees with the depth that frame
    observed, the content moved between the two frames. Catches moving things on
    first sight, before memory knows the place. Needs segments of 2+ frames.
    """
    return ConsistentAcrossFrames(relative_tolerance)


@dataclass(frozen=True)
class UserMask:
    function: Callable[[FilterInputs], torch.Tensor]

    def __call__(self, inputs: FilterInputs) -> torch.Tensor:
        mask = torch.as_tensor(self.function(inputs), device=inputs.depth.device)
        if mask.shape != inputs.depth.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"a user keep-mask must be a bool tensor of shape {tuple(inputs.depth.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        return mask


def user_mask(function: Callable[[FilterInputs], torch.Tensor]) -> KeepFilter:
    """Wrap a user's mask function (e.g. a segmentation model: True = may persist).
    The env pickles only if ``function`` does (a module-level function or a picklable object)."""
    return UserMask(function)


@dataclass(frozen=True)
class ModelMask:
    def keeps_everything(self, inputs: FilterInputs) -> bool:
        return inputs.model_keep is None

    def __call__(self, inputs: FilterInputs) -> torch.Tensor:
        if self.keeps_everything(inputs):
            return torch.ones_like(inputs.depth, dtype=torch.bool)
        return inputs.model_keep.bool()


def model_mask() -> KeepFilter:
    """The world model's own opinion (Segment.keep), where it has one."""
    return ModelMask()


@dataclass(frozen=True)
class Composed:
    filters: tuple[KeepFilter, ...]

    def __call__(self, inputs: FilterInputs) -> torch.Tensor:
        fused = self._fused_on_host(inputs)
        if fused is not None:
            return fused
        masks = [f(inputs) for f in self.filters if not _keeps_everything(f, inputs)]
        if not masks:
            return torch.ones_like(inputs.depth, dtype=torch.bool)
        # A new tensor, never one a filter handed back (that may be a mask someone else holds: model_keep);
        # the first AND makes it when the first two are full bool masks, saving the all-True start.
        full = lambda mask: mask.dtype == torch.bool and mask.shape == inputs.depth.shape  # noqa: E731
        if len(masks) > 1 and full(masks[0]) and full(masks[1]):
            result, rest = masks[0] & masks[1], masks[2:]
        else:
            result, rest = torch.ones_like(inputs.depth, dtype=torch.bool), masks
        for keep in rest:
            result &= keep
        return result

    def _fused_on_host(self, inputs: FilterInputs) -> torch.Tensor | None:
        """The chain when it starts with ``valid_depth`` and ``consistent_with_memory`` (as the default does) on
        host arrays: those two by one compiled kernel (mirage_env.filter_kernels), then the rest; None where
        the kernels do not run or the inputs do not fit them (the filters run one by one)."""
        if len(self.filters) < 2 or type(self.filters[0]) is not ValidDepth:
            return None
        valid, consistent = self.filters[0], self.filters[1]
        if type(consistent) is not ConsistentWithMemory or consistent.keeps_everything(inputs):
            return None
        depth, predicted, known = inputs.depth, inputs.predicted_depth, inputs.predicted_mask
        if not (depth.dtype == predicted.dtype == torch.float32 and known.dtype == torch.bool
                and depth.is_cpu and predicted.is_cpu and known.is_cpu and not depth.requires_grad
                and depth.shape == predicted.shape == known.shape
                and depth.is_contiguous() and predicted.is_contiguous() and known.is_contiguous()
                and kernels_enabled("cpu")):
            return None
        kernels = kernel_module("mirage_env.filter_kernels")
        if kernels is None:
            return None
        out = np.empty(depth.shape, np.bool_)
        try:
            kernels.valid_and_consistent(depth.numpy(), predicted.numpy(), known.numpy(), float(valid.min_depth),
                                         float(valid.max_depth), float(consistent.relative_tolerance), out)
        except Exception as error:  # numba broken: the filters one by one, for good
            disable_kernels(f"{type(error).__name__}: {error}")
            return None
        result = torch.from_numpy(out)
        for f in self.filters[2:]:
            if not _keeps_everything(f, inputs):
                result &= f(inputs)
        return result


def _keeps_everything(f: KeepFilter, inputs: FilterInputs) -> bool:
    """Whether ``f`` would keep every pixel of ``inputs`` (then composing skips it: no mask, no AND)."""
    says = getattr(f, "keeps_everything", None)
    return says is not None and says(inputs)


def compose(*filters: KeepFilter) -> KeepFilter:
    """A filter that keeps what every one of ``filters`` keeps."""
    return Composed(tuple(filters))


def default_filters(max_depth: float = float("inf"), relative_tolerance: float = 0.1) -> KeepFilter:
    """Valid depth, agreement with memory and with neighbouring frames, and the model's mask."""
    return compose(
        valid_depth(max_depth),
        consistent_with_memory(relative_tolerance),
        consistent_across_frames(relative_tolerance),
        model_mask(),
    )
