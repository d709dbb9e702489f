"""Latent memory against colour memory, head to head, in one run.

Why it is long: one file because it is one benchmark: the room, the loop, the per-setting run, the
summary, the plot and the options all describe the same measured run and its JSON.

    mirage-env bench memory --json memory_vs_colour.json --plot docs/memory_vs_colour.png
    python benchmarks/memory_vs_colour.py --json memory_vs_colour.json --plot docs/memory_vs_colour.png

A camera walks a closed loop (out from the start, around, back) of ``--segments``
segments through a box room whose depth and colours are exact (ray-cast here).
Each segment, both memories do what a world model's segment loop asks of them:

1. **read** at the segment's target cameras: the latent memory projects its
   entries at latent resolution (:class:`~mirage_env.memory.LatentSpatialMemory`);
   the colour memory renders its RGB cloud at image resolution and re-encodes the
   render with the VAE encoder (:class:`~mirage_env.baselines.colour_memory.ColourPointCloudMemory`);
2. **write** the generated segment: latent frames + depth for the latent memory,
   every decoded frame + full-resolution depth for the colour memory (appended).

Timed: read (+ render + VAE encode for colour) and write. Not timed, in both:
producing the segment (scene ray-casting, latents), the VAE *decode* and the depth
estimate, which a Mirage-style world needs for its own write too. Bytes: every
tensor each memory holds after the write.

Two settings in one run:

- ``wan``: the full-size Wan2.2-TI2V-5B VAE architecture (``AutoencoderKLWan``
  with the ``vae/config.json`` values: base_dim 160, z_dim 48, dim_mult
  [1, 2, 4, 4], 2 res blocks, residual, 2x2 patching, 16x spatial, 4x temporal;
  random weights, same cost as trained ones). The latent memory's latents are
  random tensors of the right shape (only memory cost is measured). Each segment
  writes ``--segment-frames`` video frames (33, as in the paper: 9 latent frames);
  both memories read the conditioning of the first ``--read-frames`` video frames
  of the segment (the same latent frames for both), because the full VAE encodes
  about a frame per 4 s on a laptop CPU. An end-to-end line adds the generation
  time of a tiny random ``WanTransformer3DModel`` (48 channels) with
  ``--steps`` denoising steps over the segment's latent frames plus 2 context frames.
- ``fast``: the default world's codec (:class:`~mirage_env.backends.codec.PatchDCTCodec`,
  8x, 48 channels, per frame), whose latents are the real encoding of the
  scene, run for ``--loops`` laps of the same path, so the plot shows the latent
  memory bounded by the explored space while the colour memory keeps growing.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..benchreport import header, write_json
from ..geometry import Camera, CameraRig
from ..memory import LatentSpatialMemory
from .colour_memory import ColourPointCloudMemory

__all__ = [
    "add_arguments",
    "build_parser",
    "main",
    "run_memory_bench",
    "wan22_vae_config",
    "wan_vae_encoder",
    "room_depth",
    "room_depth_and_colour",
    "loop_poses",
]

ROOM_HALF_EXTENT = (4.0, 1.5, 4.0)
LOOP_RADIUS = 1.5
ROOM_CENTRE = (0.0, 0.0, -LOOP_RADIUS)  # the loop starts at the world origin (the first camera)
FACE_COLOURS = torch.tensor(
    [[0.85, 0.35, 0.30], [0.30, 0.70, 0.35], [0.90, 0.90, 0.85], [0.45, 0.35, 0.25], [0.30, 0.45, 0.85], [0.85, 0.75, 0.30]]
)


# --------------------------------------------------------------------------- scene


def wan22_vae_config(full: bool = True) -> dict:
    """``AutoencoderKLWan`` kwargs: the Wan2.2-TI2V-5B VAE (``full``) or a tiny one of the same layout.

    The tiny config already has Wan2.2's layout (residual, 2x2 patching, 16x spatial,
    4x temporal, 48 latent channels); the full one restores the widths and depths of
    ``Wan-AI/Wan2.2-TI2V-5B-Diffusers/vae/config.json``. ``latents_mean`` /
    ``latents_std`` stay zeros / ones: they only shift and scale the output and cost nothing.
    """
    from ..backends.tiny import tiny_vae_config

    config = tiny_vae_config(48)
    if full:
        config.update(base_dim=160, decoder_base_dim=256, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], dropout=0.0)
    return config


def wan_vae_encoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a diffusers ``AutoencoderKLWan``: (T, 3, H, W) in [0, 1] -> (T_lat, C, h, w) latents.

    Raises a ValueError for frame counts and sizes the VAE would silently crop.
    """
    spatial = vae.config.scale_factor_spatial
    temporal = vae.config.scale_factor_temporal

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        frames, _, height, width = images.shape
        if (frames - 1) % temporal:
            raise ValueError(f"the Wan VAE needs 1 + {temporal}k frames, got {frames}")
        if height % spatial or width % spatial:
            raise ValueError(f"the Wan VAE needs sides divisible by {spatial}, got {width}x{height}")
        video = (2.0 * images - 1.0).permute(1, 0, 2, 3)[None]  # (1, 3, T, H, W) in [-1, 1]
        return vae.encode(video).latent_dist.mode()[0].permute(1, 0, 2, 3)

    return encode


def _ray_cast_room(camera: Camera, poses: torch.Tensor, centre) -> tuple[torch.Tensor, ...]:
    """Where every pixel's ray leaves the box room.

    Returns z-depth (T, H, W) float64, the axis of the wall it leaves through (T, H, W),
    the world ray (T, H, W, 3) and the camera position relative to the centre (T, 1, 1, 3).
    """
    v, u = torch.meshgrid(torch.arange(camera.height) + 0.5, torch.arange(camera.width) + 0.5, indexing="ij")
    rays_camera = torch.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, torch.ones_like(u)], -1).double()
    poses = torch.as_tensor(poses, dtype=torch.float64)
    rays = torch.einsum("tij,hwj->thwi", poses[:, :3, :3], rays_camera)
    half = torch.tensor(ROOM_HALF_EXTENT, dtype=torch.float64)
    origin = (poses[:, :3, 3] - torch.as_tensor(centre, dtype=torch.float64))[:, None, None, :]
    bound = torch.where(rays > 0, half, -half)
    safe = torch.where(rays.abs() > 1e-12, rays, torch.full_like(rays, 1e-12))
    exits = ((bound - origin) / safe).masked_fill(rays.abs() <= 1e-12, math.inf)
    depth, axis = exits.min(-1)  # rays_camera has z = 1, so the ray parameter is the z-depth
    return depth, axis, rays, origin


def room_depth(camera: Camera, poses: torch.Tensor, centre=ROOM_CENTRE) -> torch.Tensor:
    """Exact z-depth (T, H, W) float32 of the box room centred at ``centre`` seen from ``poses`` (T, 4, 4) inside it."""
    return _ray_cast_room(camera, poses, centre)[0].float()


def room_depth_and_colour(camera: Camera, poses: torch.Tensor, centre=ROOM_CENTRE) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact z-depth and colour of the box room seen from inside.

    Args:
        camera: image intrinsics (H, W).
        poses: (T, 4, 4) camera-to-world poses inside the room.
        centre: (3,) world position of the room's centre (default: the loop's centre).

    Returns:
        depth (T, H, W) float32 and frames (T, H, W, 3) uint8: a base colour per face
        with a 0.5 m checker, so renders have edges for the VAE to see.
    """
    depth, axis, rays, origin = _ray_cast_room(camera, poses, centre)
    hit = origin + depth[..., None] * rays
    face = 2 * axis + (torch.gather(rays, -1, axis[..., None])[..., 0] > 0).long()
    checker_coords = torch.floor(hit / 0.5).long()
    checker_coords.scatter_(-1, axis[..., None], 0)  # the coordinate across the face is constant
    checker = (checker_coords.sum(-1) % 2).double()
    colour = FACE_COLOURS.double()[face] * (0.55 + 0.45 * checker)[..., None]
    return depth.float(), (colour * 255).round().clamp(0, 255).to(torch.uint8)


def loop_poses(segments: int, frames_per_segment: int) -> torch.Tensor:
    """(segments, F, 4, 4) poses of a closed loop: out from the origin, around, back.

    The camera walks a circle of radius 1.5 m that passes through the origin and looks
    along its direction of travel, so over a loop it sees all four walls and returns
    exactly to its first pose; the last frame of a segment is the first of the next.
    """
    if segments < 1 or frames_per_segment < 1:
        raise ValueError(f"segments and frames_per_segment must be >= 1, got {segments}, {frames_per_segment}")
    steps = torch.linspace(0, 1, frames_per_segment, dtype=torch.float64)  # float64, as the poses are
    fractions = torch.arange(segments, dtype=torch.float64)[:, None] + steps[None, :]
    angles = 2 * math.pi * fractions / segments
    poses = []
    for angle in angles.reshape(-1).tolist():
        rig = CameraRig(LOOP_RADIUS * math.sin(angle), 0.0, LOOP_RADIUS * (math.cos(angle) - 1.0), yaw=angle + math.pi / 2)
        poses.append(torch.from_numpy(rig.c2w()))
    return torch.stack(poses).reshape(segments, frames_per_segment, 4, 4)


# --------------------------------------------------------------------------- one setting


@dataclass
class Setting:
    """One head-to-head configuration."""

    name: str
    image_size: int
    segments: int
    loops: int
    segment_frames: int  # video frames each segment writes
    read_frames: int  # video frames whose conditioning each read produces
    temporal_factor: int  # video frames per latent frame (after the first)
    voxel_size: float
    brick_size: int


def _latent_frame_indices(frames: int, temporal: int) -> list[int]:
    """Video frame each latent frame is paired with: 0, k, 2k, ... (causal first frame)."""
    return list(range(0, frames, temporal))


def _run_setting(setting: Setting, encoder, channels: int, factor: int, latents_for, progress: bool,
                 generate: Callable[[int], float] | None = None) -> dict:
    """Run both memories over ``setting.loops`` laps of the loop; per-segment timings and bytes."""
    camera = Camera.from_fov(setting.image_size, setting.image_size, 90.0)
    latent_camera = camera.scaled(1.0 / factor)
    path = loop_poses(setting.segments, setting.segment_frames)
    read_latent = _latent_frame_indices(setting.read_frames, setting.temporal_factor)
    write_latent = _latent_frame_indices(setting.segment_frames, setting.temporal_factor)
    latent_memory = LatentSpatialMemory(channels, voxel_size=setting.voxel_size, brick_size=setting.brick_size)
    colour_memory = ColourPointCloudMemory(encoder=encoder)

    # The episode starts from one image written to both memories (untimed), as a world starts.
    depth0, frame0 = room_depth_and_colour(camera, path[0, :1])
    latent_memory.write(latents_for(frame0, 1), depth0, camera, path[0, :1])
    colour_memory.write(frame0, depth0, camera, path[0, :1])
    # Warm-up (untimed) so first-call allocations and kernel selection count for neither side.
    encoder(torch.zeros(setting.read_frames, 3, setting.image_size, setting.image_size))
    latent_memory.read(latent_camera, path[0, read_latent])

    rows = []
    total = setting.loops * setting.segments
    bar = _progress(total, f"{setting.name}: segments", progress)
    for step in range(total):
        poses = path[step % setting.segments]
        # Read: conditioning for the segment's first read_frames video frames.
        start = time.perf_counter()
        latent_read = latent_memory.read(latent_camera, poses[read_latent])
        latent_read_s = time.perf_counter() - start
        start = time.perf_counter()
        render = colour_memory.render(camera, poses[: setting.read_frames])
        colour_render_s = time.perf_counter() - start
        start = time.perf_counter()
        colour_latents = encoder(render.images)
        colour_encode_s = time.perf_counter() - start
        if colour_latents.shape[0] != len(read_latent) or tuple(colour_latents.shape[1:]) != tuple(latent_read.latents.shape[1:]):
            raise RuntimeError(f"colour read gave {tuple(colour_latents.shape)}, latent read {tuple(latent_read.latents.shape)}")

        generation_s = generate(len(write_latent)) if generate is not None else 0.0
        # The generated segment (untimed: both pipelines need it, and its depth, anyway).
        depth, frames = room_depth_and_colour(camera, poses)
        latents = latents_for(frames[write_latent], len(write_latent))

        start = time.perf_counter()
        latent_memory.write(latents, depth[write_latent], camera, poses[write_latent])
        latent_write_s = time.perf_counter() - start
        start = time.perf_counter()
        colour_memory.write(frames, depth, camera, poses)
        colour_write_s = time.perf_counter() - start

        latent_stats, colour_stats = latent_memory.stats(bounds=False), colour_memory.stats()
        rows.append(dict(
            segment=step,
            latent_read_s=latent_read_s,
            latent_write_s=latent_write_s,
            latent_time_s=latent_read_s + latent_write_s,
            latent_bytes=latent_stats["bytes"],
            latent_entries=latent_stats["entries"],
            latent_hit_fraction=float(latent_read.mask.float().mean()),
            colour_render_s=colour_render_s,
            colour_encode_s=colour_encode_s,
            colour_write_s=colour_write_s,
            colour_time_s=colour_render_s + colour_encode_s + colour_write_s,
            colour_bytes=colour_stats["bytes"],
            colour_points=colour_stats["entries"],
            colour_coverage=float(render.coverage.float().mean()),
            generation_s=generation_s,
        ))
        bar.update(1)
        bar.set_postfix(colour=f"{rows[-1]['colour_time_s']:.2f}s", latent=f"{1e3 * rows[-1]['latent_time_s']:.1f}ms")
    bar.close()

    result = {key: [row[key] for row in rows] for key in rows[0]}
    last = rows[-1]
    after = rows[min(4, len(rows) - 1)]  # "after 5 segments", or the last one of a shorter run
    result.update(
        setting=asdict(setting),
        read_latent_frames=len(read_latent),
        write_latent_frames=len(write_latent),
        latent_grid=[latent_camera.height, latent_camera.width],
        speedup_time=last["colour_time_s"] / last["latent_time_s"],
        ratio_bytes=after["colour_bytes"] / after["latent_bytes"],
        ratio_bytes_segment=after["segment"] + 1,
        ratio_bytes_last=last["colour_bytes"] / last["latent_bytes"],
        speedup_time_without_encode=(last["colour_render_s"] + last["colour_write_s"]) / last["latent_time_s"],
    )
    if generate is not None:
        result["e2e_latent_s"] = [r["generation_s"] + r["latent_time_s"] for r in rows]
        result["e2e_colour_s"] = [r["generation_s"] + r["colour_time_s"] for r in rows]
        result["speedup_e2e"] = result["e2e_colour_s"][-1] / result["e2e_latent_s"][-1]
        result["memory_share_latent"] = last["latent_time_s"] / result["e2e_latent_s"][-1]
        result["memory_share_colour"] = last["colour_time_s"] / result["e2e_colour_s"][-1]
    return result


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _tiny_generator(channels: int, latent_grid: tuple[int, int], steps: int, context_frames: int = 2):
    """A timed stand-in for generation: ``steps`` forwards of a tiny random WanTransformer3DModel."""
    from diffusers import WanTransformer3DModel

    from ..backends.tiny import tiny_transformer_config

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**tiny_transformer_config(in_channels=channels)).eval()
    text = torch.zeros(1, 8, transformer.config.text_dim)

    @torch.no_grad()
    def generate(latent_frames: int) -> float:
        latents = torch.randn(1, channels, context_frames + latent_frames, *latent_grid)
        start = time.perf_counter()
        for step in range(steps):
            timestep = torch.tensor([1000.0 * (1 - step / steps)])
            latents = latents - 0.1 * transformer(latents, timestep, text, return_dict=False)[0]
        return time.perf_counter() - start

    generate(1)  # warm-up
    return generate


# --------------------------------------------------------------------------- the whole bench


def run_memory_bench(args: argparse.Namespace) -> dict:
    """Run both settings, write the JSON (and the plot); return the results dict."""
    _check_args(args)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict = header(args)  # command as typed, machine, options
    results.update({
        "device": "cpu",
        "included": (
            "latent: LatentSpatialMemory.read at latent resolution + write (median depth pooling, lift, voxel merge). "
            "colour: z-buffered render of the whole RGB cloud at image resolution + VAE encode of the render + "
            "append of every decoded frame (unproject at image resolution). Not timed in either: producing the "
            "segment, VAE decode, depth estimation. Bytes: every tensor each memory holds."
        ),
    })

    # ---- setting 1: the Wan2.2 VAE architecture
    from diffusers import AutoencoderKLWan

    build_start = time.perf_counter()
    vae = AutoencoderKLWan(**wan22_vae_config(full=args.vae == "full")).eval()
    build_s = time.perf_counter() - build_start
    encoder = wan_vae_encoder(vae)
    wan_setting = Setting(
        name="wan", image_size=args.image_size, segments=args.segments, loops=1,
        segment_frames=args.segment_frames, read_frames=args.read_frames, temporal_factor=4,
        voxel_size=args.voxel_size, brick_size=args.brick_size,
    )
    latent_grid = (args.image_size // 16, args.image_size // 16)
    random_latents = lambda frames, count: torch.randn(count, 48, *latent_grid)  # noqa: E731
    generate = _tiny_generator(48, latent_grid, args.steps) if args.steps > 0 else None
    wan = _run_setting(wan_setting, encoder, 48, 16, random_latents, not args.quiet, generate)
    wan["vae"] = {
        "config": "full Wan2.2-TI2V-5B" if args.vae == "full" else "tiny (test)",
        "parameters": sum(p.numel() for p in vae.parameters()),
        "encoder_parameters": sum(p.numel() for p in vae.encoder.parameters()),
        "build_s": build_s,
        "weights": "random (same cost as trained)",
    }
    if generate is not None:
        wan["generation"] = f"tiny WanTransformer3DModel (tiny_transformer_config(48)), {args.steps} steps over segment + 2 context latent frames"
    del vae, encoder

    # ---- setting 2: the default world's codec, several laps
    from ..backends.codec import PatchDCTCodec

    codec = PatchDCTCodec(factor=8, keep=4)
    fast_setting = Setting(
        name="fast", image_size=args.fast_image_size, segments=args.segments, loops=args.loops,
        segment_frames=args.fast_segment_frames, read_frames=args.fast_segment_frames, temporal_factor=1,
        voxel_size=args.voxel_size, brick_size=args.brick_size,
    )
    codec_latents = lambda frames, count: codec.encode(frames.permute(0, 3, 1, 2).float() / 255.0)  # noqa: E731
    fast = _run_setting(fast_setting, codec.encode, codec.channels, codec.factor, codec_latents, not args.quiet)

    results.update(
        speedup_time=wan["speedup_time"],
        ratio_bytes=wan["ratio_bytes"],
        segments=wan["segment"],
        latent_time_s=wan["latent_time_s"],
        colour_time_s=wan["colour_time_s"],
        latent_bytes=wan["latent_bytes"],
        colour_bytes=wan["colour_bytes"],
        wan=wan,
        fast=fast,
        wall_s=time.perf_counter() - started,
    )
    write_json(args.json, results, quiet=args.quiet)
    if args.plot:
        plot_results(results, args.plot)
    if not args.quiet:
        print(summary(results))
    return results


def summary(results: dict) -> str:
    wan, fast = results["wan"], results["fast"]
    s = wan["setting"]
    lines = [
        f"Wan2.2 VAE ({wan['vae']['config']}, {s['image_size']}x{s['image_size']}, {s['segments']} segments of "
        f"{s['segment_frames']} frames, reads of {s['read_frames']} frames = {wan['read_latent_frames']} latent frames):",
        f"  last segment: colour {wan['colour_time_s'][-1]:.3f} s (render {wan['colour_render_s'][-1]:.3f}, "
        f"encode {wan['colour_encode_s'][-1]:.3f}, write {wan['colour_write_s'][-1]:.3f}) vs latent "
        f"{1e3 * wan['latent_time_s'][-1]:.2f} ms -> speedup_time {wan['speedup_time']:.0f}x",
        f"  bytes after {wan['ratio_bytes_segment']} segments: colour {wan['colour_bytes'][wan['ratio_bytes_segment'] - 1] / 2**20:.1f} MiB "
        f"vs latent {wan['latent_bytes'][wan['ratio_bytes_segment'] - 1] / 2**20:.2f} MiB -> ratio_bytes {wan['ratio_bytes']:.0f}x",
    ]
    if "speedup_e2e" in wan:
        lines.append(
            f"  end to end with tiny-DiT generation: colour {wan['e2e_colour_s'][-1]:.3f} s vs latent "
            f"{wan['e2e_latent_s'][-1]:.3f} s per segment ({wan['speedup_e2e']:.1f}x); memory share "
            f"{100 * wan['memory_share_colour']:.1f}% vs {100 * wan['memory_share_latent']:.1f}%"
        )
    f = fast["setting"]
    lines += [
        f"Codec ({f['image_size']}x{f['image_size']}, {f['loops']} laps x {f['segments']} segments of {f['segment_frames']} frames):",
        f"  last segment: colour {fast['colour_time_s'][-1]:.3f} s vs latent {1e3 * fast['latent_time_s'][-1]:.2f} ms "
        f"-> {fast['speedup_time']:.0f}x; bytes colour {fast['colour_bytes'][-1] / 2**20:.1f} MiB vs latent "
        f"{fast['latent_bytes'][-1] / 2**20:.2f} MiB -> {fast['ratio_bytes_last']:.0f}x (after {fast['ratio_bytes_segment']} "
        f"segments: {fast['ratio_bytes']:.0f}x)",
        f"wall {results['wall_s']:.0f} s",
    ]
    return "\n".join(lines)


def plot_results(results: dict, path: str | os.PathLike) -> None:
    """Four panels (log y): time and bytes per segment, Wan2.2 VAE setting on top, codec laps below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wan, fast = results["wan"], results["fast"]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    mib = lambda values: [b / 2**20 for b in values]  # noqa: E731

    def panel(ax, x, data, key, labels, title, ylabel, xlabel):
        """Colour against latent memory for one quantity (``key``: "time_s" or "bytes")."""
        scale = mib if key == "bytes" else list
        ax.plot(x, scale(data[f"colour_{key}"]), label=labels[0], color="tab:red", marker="o", markersize=3)
        ax.plot(x, scale(data[f"latent_{key}"]), label=labels[1], color="tab:blue", marker="s", markersize=3)
        ax.set(title=title, ylabel=ylabel, xlabel=xlabel, yscale="log")

    s, f = wan["setting"], fast["setting"]
    segments = [i + 1 for i in wan["segment"]]
    laps = [(i + 1) / f["segments"] for i in fast["segment"]]
    timed = "latent memory: read + write"
    panel(axes[0, 0], segments, wan, "time_s", ("colour memory: render + VAE encode + append", timed),
          f"Wan2.2 VAE, {s['image_size']}px: time per segment ({wan['speedup_time']:.0f}x at the last)",
          "seconds per segment", "segment")
    if "e2e_colour_s" in wan:
        axes[0, 0].plot(segments, wan["e2e_colour_s"], "--", color="tab:red", alpha=0.6, label="colour + tiny-DiT generation")
        axes[0, 0].plot(segments, wan["e2e_latent_s"], "--", color="tab:blue", alpha=0.6, label="latent + tiny-DiT generation")
    panel(axes[0, 1], segments, wan, "bytes", ("colour memory (RGB points, appended)", "latent memory (voxel-merged)"),
          f"Wan2.2 VAE: memory held ({wan['ratio_bytes']:.0f}x after {wan['ratio_bytes_segment']} segments)",
          "MiB held", "segment")
    panel(axes[1, 0], laps, fast, "time_s", ("colour memory: render + codec encode + append", timed),
          f"Codec (8x, 48 ch), {f['image_size']}px, {f['loops']} laps: time per segment",
          "seconds per segment", "laps of the closed loop")
    panel(axes[1, 1], laps, fast, "bytes", ("colour memory", "latent memory"),
          f"Codec, {f['loops']} laps: memory held ({fast['ratio_bytes_last']:.0f}x at the end)",
          "MiB held", "laps of the closed loop")
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(
        f"Latent spatial memory vs colour point-cloud memory (CPU, {results['machine']['torch_threads']} threads)"
    )
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------- command line


def _check_args(args) -> None:
    if args.vae not in ("full", "tiny"):
        raise ValueError(f"--vae must be 'full' or 'tiny', got {args.vae!r}")
    if args.image_size % 16 or args.image_size <= 0:
        raise ValueError(f"--image-size must be a positive multiple of 16 (the Wan2.2 VAE factor), got {args.image_size}")
    if args.fast_image_size % 8 or args.fast_image_size <= 0:
        raise ValueError(f"--fast-image-size must be a positive multiple of 8 (the codec factor), got {args.fast_image_size}")
    for name in ("segment_frames", "read_frames"):
        value = getattr(args, name)
        if value < 1 or (value - 1) % 4:
            raise ValueError(f"--{name.replace('_', '-')} must be 1 + 4k (the Wan VAE's temporal factor is 4), got {value}")
    if args.read_frames > args.segment_frames:
        raise ValueError(f"--read-frames ({args.read_frames}) cannot exceed --segment-frames ({args.segment_frames})")
    if args.segments < 1 or args.loops < 1 or args.fast_segment_frames < 1:
        raise ValueError(f"--segments, --loops and --fast-segment-frames must be >= 1, got {args.segments}, {args.loops}, {args.fast_segment_frames}")
    if not args.voxel_size > 0:
        raise ValueError(f"--voxel-size must be positive, got {args.voxel_size}")


def _add_memory_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write the plot here (PNG)")
    parser.add_argument("--vae", default="full", help="full (the Wan2.2-TI2V-5B VAE architecture) | tiny (tests)")
    parser.add_argument("--image-size", type=int, default=256, help="Wan setting: square image side (multiple of 16)")
    parser.add_argument("--segments", type=int, default=5, help="segments per lap of the closed loop")
    parser.add_argument("--segment-frames", type=int, default=33, help="Wan setting: video frames each segment writes (1 + 4k)")
    parser.add_argument("--read-frames", type=int, default=5, help="Wan setting: video frames rendered and re-encoded per read (1 + 4k)")
    parser.add_argument("--steps", type=int, default=20, help="tiny-DiT denoising steps for the end-to-end line (0: skip)")
    parser.add_argument("--fast-image-size", type=int, default=128, help="codec setting: square image side (multiple of 8)")
    parser.add_argument("--fast-segment-frames", type=int, default=9, help="codec setting: frames per segment")
    parser.add_argument("--loops", type=int, default=10, help="codec setting: laps of the closed loop")
    parser.add_argument("--voxel-size", type=float, default=0.25, help="latent memory voxel edge (m)")
    parser.add_argument("--brick-size", type=int, default=4, help="latent memory voxels per brick side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mirage-env bench``: one sub-command per benchmark (``memory``)."""
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    memory = benchmarks.add_parser("memory", help="latent memory vs colour point-cloud memory, time and bytes")
    _add_memory_options(memory)


def build_parser(prog: str) -> argparse.ArgumentParser:
    """A standalone parser of the head-to-head options (``benchmarks/memory_vs_colour.py`` uses it)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    _add_memory_options(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    """Entry point of ``mirage-env bench ...``."""
    if getattr(args, "benchmark", "memory") != "memory":
        raise ValueError(f"unknown benchmark {args.benchmark!r}; available: memory")
    run_memory_bench(args)
