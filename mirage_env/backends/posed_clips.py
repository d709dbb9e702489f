"""Posed clips in RealEstate10K's camera-file format: read, write, a torch Dataset.

A camera file has an optional URL line, then one line per frame:
``timestamp fx fy cx cy k1 k2 w2c(3x4, row-major)`` with intrinsics normalised
by image width / height. A clip folder holds ``cameras.txt``, its frames as PNGs
(or one ``frames.npz``) and an optional ``depth.npz``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..geometry import Camera, invert_pose

__all__ = [
    "CameraTrack",
    "read_camera_file",
    "write_camera_file",
    "write_posed_clip",
    "read_clip_frames",
    "PosedClipDataset",
]


@dataclass
class CameraTrack:
    """One sequence of a RealEstate10K-style camera file.

    Attributes:
        timestamps: (N,) int64 microseconds.
        intrinsics: (N, 4) float64 fx, fy, cx, cy normalised by image width / height.
        w2c: (N, 4, 4) float64 world-to-camera (OpenCV axes).
        url: the first line of the file if it was not a camera line (the video URL).
    """

    timestamps: np.ndarray
    intrinsics: np.ndarray
    w2c: np.ndarray
    url: str = ""

    @property
    def c2w(self) -> np.ndarray:
        return invert_pose(torch.from_numpy(self.w2c)).numpy()

    def camera(self, index: int, width: int, height: int) -> Camera:
        fx, fy, cx, cy = self.intrinsics[index]
        return Camera(fx=fx * width, fy=fy * height, cx=cx * width, cy=cy * height, width=width, height=height)

    def __len__(self) -> int:
        return len(self.timestamps)


def read_camera_file(path: str | os.PathLike) -> CameraTrack:
    """Parse a RealEstate10K camera file (the optional URL line first, then 19 numbers a line)."""
    path = Path(path)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    url = ""
    rows = []
    for number, line in enumerate(lines):
        parts = line.split()
        if number == 0 and len(parts) != 19:
            url = line
            continue
        if len(parts) != 19:
            raise ValueError(f"{path}:{number + 1}: expected 19 numbers (timestamp fx fy cx cy k1 k2 + 12 of w2c), got {len(parts)}")
        try:
            rows.append([float(p) for p in parts])
        except ValueError:
            raise ValueError(f"{path}:{number + 1}: not a number in {line!r}") from None
    if not rows:
        raise ValueError(f"{path} has no camera lines")
    data = np.asarray(rows, dtype=np.float64)
    w2c = np.tile(np.eye(4), (len(data), 1, 1))
    w2c[:, :3, :4] = data[:, 7:19].reshape(-1, 3, 4)
    return CameraTrack(timestamps=data[:, 0].astype(np.int64), intrinsics=data[:, 1:5], w2c=w2c, url=url)


def write_camera_file(path: str | os.PathLike, c2w: np.ndarray, camera: Camera, timestamps=None, url: str = "") -> None:
    """Write poses (N, 4, 4) camera-to-world and one camera in RealEstate10K's format."""
    c2w = np.asarray(c2w, dtype=np.float64)
    w2c = invert_pose(torch.from_numpy(c2w)).numpy()
    timestamps = np.arange(len(c2w)) * 33_333 if timestamps is None else np.asarray(timestamps)
    intr = (camera.fx / camera.width, camera.fy / camera.height, camera.cx / camera.width, camera.cy / camera.height)
    lines = [url] if url else []
    for t, m in zip(timestamps, w2c):
        numbers = [int(t), *intr, 0.0, 0.0, *m[:3, :4].reshape(-1)]
        lines.append(" ".join(repr(float(x)) if i else str(x) for i, x in enumerate(numbers)))
    Path(path).write_text("\n".join(lines) + "\n")


def write_posed_clip(root: str | os.PathLike, name: str, frames: np.ndarray, c2w: np.ndarray, camera: Camera,
                     depth: np.ndarray | None = None, png: bool = True) -> Path:
    """Write one clip: ``cameras.txt``, ``frames/NNNNN.png`` (or ``frames.npz``) and optional ``depth.npz``.

    Args:
        frames: uint8 (N, H, W, 3).
        c2w: (N, 4, 4) camera-to-world poses.
        camera: pixel intrinsics of the frames.
        depth: optional (N, H, W) z-depth.
    """
    import imageio.v3 as iio

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    clip = Path(root) / name
    clip.mkdir(parents=True, exist_ok=True)
    write_camera_file(clip / "cameras.txt", c2w, camera)
    if png:
        (clip / "frames").mkdir(exist_ok=True)
        for i, frame in enumerate(frames):
            iio.imwrite(clip / "frames" / f"{i:05d}.png", frame)
    else:
        np.savez_compressed(clip / "frames.npz", frames=frames)
    if depth is not None:
        np.savez_compressed(clip / "depth.npz", depth=np.asarray(depth, dtype=np.float32))
    return clip


def read_clip_frames(folder: str | os.PathLike, picks: np.ndarray) -> np.ndarray:
    """uint8 (len(picks), H, W, 3) frames of a clip folder (``frames.npz`` or ``frames/*.png|jpg``)."""
    folder = Path(folder)
    if (folder / "frames.npz").is_file():
        with np.load(folder / "frames.npz") as data:
            return data["frames"][picks]
    import imageio.v3 as iio

    files = sorted((folder / "frames").glob("*.png")) + sorted((folder / "frames").glob("*.jpg"))
    return np.stack([iio.imread(files[i])[..., :3] for i in picks])


class PosedClipDataset(torch.utils.data.Dataset):
    """Fixed-length posed clips cut from every sequence folder under ``root``.

    A sequence folder holds ``cameras.txt`` (RealEstate10K format) and its frames as
    ``frames/*.png`` sorted by name (RealEstate10K names them by timestamp) or
    ``frames.npz``; optionally ``depth.npz``. Frames are resized to ``image_size``
    (intrinsics are normalised, so the camera follows). Poses are returned relative
    to the clip's first camera (the world frame of an episode).

    Items: ``frames`` uint8 (F, H, W, 3), ``poses`` float64 (F, 4, 4),
    ``intrinsics`` float64 (4,) in pixels (fx, fy, cx, cy), and ``depth`` float32
    (F, H, W) when the sequence has it.
    """

    def __init__(self, root: str | os.PathLike, clip_frames: int, image_size: tuple[int, int], stride: int = 1):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset directory {self.root} does not exist")
        self.clip_frames, self.stride = clip_frames, stride
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.sequences = sorted(p.parent for p in self.root.glob("*/cameras.txt"))
        if not self.sequences:
            raise FileNotFoundError(f"no sequence folders with cameras.txt under {self.root}")
        self.items: list[tuple[int, int]] = []
        span = (clip_frames - 1) * stride + 1
        for index, folder in enumerate(self.sequences):
            count = len(read_camera_file(folder / "cameras.txt"))
            self.items += [(index, start) for start in range(0, count - span + 1, span)]
        if not self.items:
            raise ValueError(f"no sequence under {self.root} has {span} frames for clips of {clip_frames} (stride {stride})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        index, start = self.items[item]
        folder = self.sequences[index]
        track = read_camera_file(folder / "cameras.txt")
        picks = start + np.arange(self.clip_frames) * self.stride
        frames = torch.from_numpy(read_clip_frames(folder, picks))
        height, width = self.image_size
        resize = tuple(frames.shape[1:3]) != (height, width)
        if resize:
            x = frames.permute(0, 3, 1, 2).float()
            x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
            frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        c2w = torch.from_numpy(track.c2w[picks])
        poses = invert_pose(c2w[:1]) @ c2w
        cam = track.camera(int(picks[0]), width, height)
        out = {"frames": frames.contiguous(), "poses": poses, "intrinsics": torch.tensor([cam.fx, cam.fy, cam.cx, cam.cy], dtype=torch.float64)}
        if (folder / "depth.npz").is_file():
            with np.load(folder / "depth.npz") as data:
                depth = torch.from_numpy(data["depth"][picks].astype(np.float32))
            if resize:
                depth = torch.nn.functional.interpolate(depth[:, None], size=(height, width), mode="nearest")[:, 0]
            out["depth"] = depth
        return out
