"""The ``mirage-env`` command line: rollout | eval | bench | train | evaluate | serve | import-branch."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .cli_types import non_negative_int, output_file, positive_int, video_file


def _make_env(args, **overrides):
    """The env of ``--env`` with the command's env flags (one EnvConfig, as gym.make would build it)."""
    import gymnasium as gym

    import mirage_env  # noqa: F401  (registers the ids)
    from mirage_env.config import options_from_args
    from mirage_env.env import MirageEnv

    try:
        spec = gym.spec(args.env)
    except gym.error.Error:
        spec = None
    if spec is None or spec.entry_point != "mirage_env.env:registered_env":
        ids = sorted(i for i, s in gym.registry.items() if s.entry_point == "mirage_env.env:registered_env")
        raise ValueError(f"--env {args.env!r} is not a Mirage env id; choose from {', '.join(ids)}")
    options = {**spec.kwargs, **options_from_args(args), "render_mode": "rgb_array", **overrides}
    # max_episode_steps None (no --max-episode-steps): the whole run is one episode. The env is
    # built directly, not by gym.make, so a given limit reaches the env itself.
    if getattr(args, "scene", None):
        scene = {"scene": "indoor", "busy": True} if args.scene == "busy" else {"scene": args.scene}
        options["backend_options"] = {**options.get("backend_options", {}), **scene}
    if getattr(args, "motion_mask", "off") == "on":
        options["backend_options"] = {**options.get("backend_options", {}), "motion_mask": True}
    return MirageEnv(**options)


def _policy(args):
    from mirage_env.agents.evaluate import load_policy

    policy, _ = load_policy(args.policy, seed=args.seed, trust_pickle=args.trust_pickle)
    return policy


def _write_video(path: str, frames: list[np.ndarray], fps: int) -> None:
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stack = np.stack(frames)
    if path.suffix.lower() == ".gif":
        iio.imwrite(path, stack, duration=1000 / fps, loop=0)
    else:
        # macro_block_size=1 keeps the exact size (ffmpeg would otherwise resize to multiples of 16).
        iio.imwrite(path, stack, fps=fps, macro_block_size=1)


def rollout(args) -> dict:
    """Drive a policy through a world, write a video, print a one-line summary."""
    from tqdm import tqdm

    env = _make_env(args)
    if args.load_world:
        env.reset(seed=args.seed)
        env.load_world(args.load_world)
        observation = {"rgb": env.render()}
        info = {}
    else:
        observation, info = env.reset(seed=args.seed, options=_start_options(args, env))
    policy = _policy(args)

    def video_frame(frame):
        if args.map:  # the map after the step, beside each of the step's frames
            frame = np.concatenate([frame, step_map], axis=1)
        return _upscale(frame, args.video_scale)

    step_map = env.top_down_map() if args.map else None
    frames = [video_frame(env.render())]
    start = time.perf_counter()
    total_reward, episodes = 0.0, 1
    for step in tqdm(range(args.steps), desc="rollout", unit="step", disable=args.quiet):
        observation, reward, terminated, truncated, info = env.step(policy(observation, info))
        total_reward += reward
        step_map = env.top_down_map() if args.map else None
        frames.extend(video_frame(frame) for frame in env.step_frames())
        if (terminated or truncated) and step + 1 < args.steps:
            observation, info = env.reset()
            episodes += 1
    elapsed = time.perf_counter() - start
    if args.out:
        _write_video(args.out, frames, args.fps)
    if args.save_world:
        env.save_world(args.save_world)
    stats = env.world.memory.stats(bounds=False)
    summary = {
        "steps": args.steps,
        "episodes": episodes,
        "steps_per_s": args.steps / elapsed if elapsed > 0 else math.inf,
        "reward": total_reward,
        "memory_entries": stats["entries"],
        "memory_bytes": stats["bytes"],
        "video": args.out,
    }
    print(f"{args.steps} steps ({episodes} episode{'s' if episodes > 1 else ''}) in {elapsed:.2f} s ({summary['steps_per_s']:.0f} steps/s), reward {total_reward:.2f}, "
          f"memory {stats['entries']:,} entries / {stats['bytes'] / 2**20:.2f} MiB"
          + (f", video {args.out}" if args.out else "") + (f", world saved to {args.save_world}" if args.save_world else ""))
    return summary


def _start_options(args, env) -> dict | None:
    """Reset options that start a generated world from a procedural scene's first view (--start procedural)."""
    if getattr(args, "start", None) != "procedural":
        return None
    import torch

    from mirage_env.backends.procedural import ProceduralWorldModel

    camera = env.world.camera
    fov = math.degrees(2 * math.atan(0.5 * camera.width / camera.fx))
    scene = ProceduralWorldModel(image_size=(camera.height, camera.width), fov_degrees=fov)
    view = scene.start(torch.eye(4, dtype=torch.float64)[None, None], [torch.Generator().manual_seed(args.seed)])
    return {"image": view.frames[0, 0].numpy(), "depth": view.image_depth[0, 0].numpy()}


def _upscale(frame: np.ndarray, scale: int) -> np.ndarray:
    return frame if scale <= 1 else frame.repeat(scale, axis=0).repeat(scale, axis=1)


def eval_consistency(args) -> dict:
    """Closed loop out, around and back: does the world look the same on return?

    Three runs of the same episodes: memory on (with the object layer unless
    ``--object-memory off``), memory on without the object layer (keys ``*_no_objects``:
    static memory alone, the figures before the layer), and memory off. On the procedural
    world, ``psnr_dynamic_*`` scores the pixels of the returning view that show a moving
    thing seen earlier in the episode against the same view with every moving thing in
    the look it had when first seen (:mod:`mirage_env.object_eval`), and
    ``object_position_error_m`` the centres of the objects the layer showed in the
    returning view against the true ones.
    """
    from mirage_env.agents.scripted import closed_loop_moves

    results = {}
    moves = closed_loop_moves(args.side_steps)
    runs = [("memory_on", True, args.object_memory == "on")]
    if args.object_memory == "on":
        runs.append(("memory_on_no_objects", True, False))
    runs.append(("memory_off", False, False))
    for tag, memory_on, objects in runs:
        results.update(_consistency_run(args, moves, tag, memory_on, objects))
    results.update({"episodes": args.episodes, "loop_steps": len(moves), "image_size": args.image_size,
                    "env": args.env, "scene": args.scene or "indoor", "object_memory": args.object_memory,
                    "motion_mask": args.motion_mask,
                    "note": f"PSNR capped at {PSNR_CAP:g} dB for identical frames; psnr_static_* leaves out pixels "
                            "showing moving content in either frame (it really moved); psnr_dynamic_* scores the "
                            "returning view's pixels showing a moving thing seen before against that view with "
                            "each face of a moving thing in its first look; psnr_moving_ceiling is psnr_* of a perfect "
                            "memory (every surface in its first look, moving things where they are now): more means "
                            "moving things shown where they no longer are (procedural world only)"})
    static = (f" (static content {results['psnr_static_memory_on']:.2f} dB)" if "psnr_static_memory_on" in results else "")
    dynamic = (f", moving things {results['psnr_dynamic_memory_on']:.2f} dB"
               if results.get("psnr_dynamic_memory_on") is not None else "")
    print(f"revisit after a {len(moves)}-step closed loop, {args.episodes} episodes: "
          f"memory on PSNR {results['psnr_memory_on']:.2f} dB{static}{dynamic} SSIM {results['ssim_memory_on']:.4f} | "
          f"memory off PSNR {results['psnr_memory_off']:.2f} dB SSIM {results['ssim_memory_off']:.4f}")
    if results.get("psnr_moving_ceiling") is not None:
        print(f"a perfect memory of moving things would score {results['psnr_moving_ceiling']:.2f} dB on every pixel "
              f"(they moved between the two views)")
    if results["blocked_seeds"]:
        print(f"seeds {results['blocked_seeds']} skipped: a wall blocked the loop in those rooms")
    if "psnr_memory_on_no_objects" in results:
        error = results.get("object_position_error_m")
        shown = results.get("objects_shown")
        print(f"object layer: {shown} objects shown on return"
              + (f", centre error {error:.3f} m" if error is not None else "")
              + f"; without it: PSNR {results['psnr_memory_on_no_objects']:.2f} dB"
              + (f" (static content {results['psnr_static_memory_on_no_objects']:.2f} dB)"
                 if "psnr_static_memory_on_no_objects" in results else "")
              + (f", moving things {results['psnr_dynamic_memory_on_no_objects']:.2f} dB"
                 if results.get("psnr_dynamic_memory_on_no_objects") is not None else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def _consistency_run(args, moves, tag: str, memory_on: bool, objects: bool) -> dict:
    """One pass over the episodes; keys ``psnr_{tag}``, ``ssim_{tag}``, ``psnr_static_{tag}``, ``psnr_dynamic_{tag}``."""
    import torch

    from mirage_env.metrics import masked_psnr, psnr, ssim

    env = _make_env(args, use_memory=memory_on, memory_options={"objects": objects})
    procedural = env.world.model.config().get("name") == "procedural"
    psnrs, ssims, static_psnrs, dynamic_psnrs, ideal_psnrs, errors, blocked = [], [], [], [], [], [], []
    # A room where a wall blocks the loop cannot be scored (the camera never returns), so
    # such seeds are skipped and named; motion does not depend on memory, so every run
    # skips the same seeds.
    for seed in range(args.seed, args.seed + 10 * args.episodes):
        if len(psnrs) == args.episodes:
            break
        env.reset(seed=seed)
        looks = None
        if procedural:
            from mirage_env.object_eval import FirstLooks

            looks = FirstLooks(env.world.model)
            looks.update()
        first, first_moving = env.render(), _moving_pixels(env)
        for move in moves:
            env.step(move)
            if looks is not None:
                looks.update()
        returned, returned_moving = env.render(), _moving_pixels(env)
        if not np.allclose(env.batch.rigs[0], env.batch.start_rigs[0], atol=1e-6):
            blocked.append(seed)
            continue
        psnrs.append(psnr(first, returned))
        ssims.append(ssim(first, returned))
        if first_moving is not None:
            static_psnrs.append(masked_psnr(first, returned, ~(first_moving | returned_moving)))
        info = env.batch.last_step.segment.info
        if looks is not None and "object_ids" in info:
            seen = _upsampled(env, looks.seen(info["object_ids"][0, -1].cpu().numpy()))
            pose = torch.as_tensor(env.batch.last_step.poses[0, -1], dtype=torch.float64)
            if seen.any():
                dynamic_psnrs.append(masked_psnr(looks.reference(pose), returned, seen))
            ideal_psnrs.append(psnr(first, looks.ideal(pose)))
            from mirage_env.object_eval import shown_position_errors

            errors += shown_position_errors(env.world.memory.objects, info["object_centres"])
    if len(psnrs) < args.episodes:
        raise RuntimeError(f"walls blocked the {len(moves)}-step closed loop in {len(blocked)} of "
                           f"{len(blocked) + len(psnrs)} rooms; use a smaller --side-steps")
    capped = lambda values: float(np.mean(np.minimum(values, PSNR_CAP))) if values else None  # noqa: E731
    result = {
        "blocked_seeds": blocked,
        f"psnr_{tag}": capped(psnrs),
        f"ssim_{tag}": float(np.mean(ssims)),
        f"psnr_{tag}_per_episode": [round(float(min(p, PSNR_CAP)), 2) for p in psnrs],
    }
    if static_psnrs:
        result[f"psnr_static_{tag}"] = capped(static_psnrs)
    if procedural:
        result[f"psnr_dynamic_{tag}"] = capped(dynamic_psnrs)
        result[f"dynamic_episodes_{tag}"] = len(dynamic_psnrs)
        # One exact episode (capped at PSNR_CAP) moves a mean of 8 by ~10 dB: the episodes say how it was made.
        result[f"psnr_dynamic_{tag}_per_episode"] = [round(float(min(p, PSNR_CAP)), 2) for p in dynamic_psnrs]
        if tag == "memory_on":  # the same for every run: the world, not the memory
            result["psnr_moving_ceiling"] = capped(ideal_psnrs)
    if tag == "memory_on" and objects:
        result["object_position_error_m"] = float(np.mean(errors)) if errors else None
        result["objects_shown"] = len(errors)
    return result


def _upsampled(env, latent_mask: np.ndarray) -> np.ndarray:
    factor = env.world.model.latent.spatial_factor
    return np.kron(latent_mask, np.ones((factor, factor), dtype=bool)).astype(bool)


PSNR_CAP = 100.0


def _moving_pixels(env) -> np.ndarray | None:
    """(H, W) bool: image pixels of the last frame whose latent pixel shows moving content, if the model says."""
    moving = env.batch.last_step.segment.info.get("moving")
    if moving is None:
        return None
    factor = env.world.model.latent.spatial_factor
    block = np.ones((factor, factor), dtype=bool)
    return np.kron(moving[0, -1].cpu().numpy(), block).astype(bool)


def _add_env_arguments(parser: argparse.ArgumentParser) -> None:
    from mirage_env.config import add_env_arguments

    parser.add_argument("--env", default="Mirage/Explore-v0", help="registered env id")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--scene", default=None, choices=["indoor", "outdoor", "busy"],
                        help="procedural scene kind (busy: indoor with four moving crates)")
    # Every EnvConfig option with a command-line spelling; no episode limit unless asked.
    add_env_arguments(parser, defaults={"max_episode_steps": None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirage-env", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("rollout", help="run a policy and write a video")
    _add_env_arguments(p)
    from mirage_env.agents.scripted import POLICIES

    p.add_argument("--policy", default="random", help=f"{' | '.join(POLICIES)} | NAME of a policy saved by mirage-env train")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow --policy X.zip (a Stable-Baselines3 pickle: loading it can run code)")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--out", type=video_file, default="rollout.mp4", help="video path (.mp4 or .gif; \"\" for none)")
    p.add_argument("--fps", type=positive_int, default=15)
    p.add_argument("--video-scale", type=positive_int, default=4, help="nearest-neighbour upscaling of the video")
    p.add_argument("--map", action="store_true",
                   help="put the top-down map of memory (agent, goals) beside each frame of the video")
    p.add_argument("--start", default=None, choices=["procedural"],
                   help="backend wan: start from the first view (and depth) of a procedural scene of --seed")
    p.add_argument("--save-world", type=output_file, default=None, help="save the world here at the end")
    p.add_argument("--load-world", default=None, help="resume a saved world instead of starting one")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=rollout)

    p = commands.add_parser("eval", help="evaluations")
    evals = p.add_subparsers(dest="evaluation", required=True)
    c = evals.add_parser("consistency", help="revisit PSNR/SSIM after a closed loop, memory on vs off")
    _add_env_arguments(c)
    c.add_argument("--episodes", type=positive_int, default=5)
    c.add_argument("--side-steps", type=positive_int, default=4)
    c.add_argument("--json", type=output_file, default=None)
    c.add_argument("--object-memory", default="on", choices=["on", "off"],
                   help="memory on with the object layer for moving things (off: static memory only)")
    c.add_argument("--motion-mask", default="off", choices=["on", "off"],
                   help="procedural world: the generator reports the pixels it animated (Segment.keep), as a "
                        "motion segmenter would; moving things then stay out of static memory")
    c.set_defaults(func=eval_consistency)

    p = commands.add_parser("import-branch", help="import a memory branch trained in DiffSynth naming (the published one)")
    p.add_argument("source", help="safetensors file with DiffSynth keys (vace_blocks.N.self_attn.q.weight, ...)")
    p.add_argument("--checkpoint", required=True, help="local Wan2.2 diffusers directory the branch was trained on")
    p.add_argument("--out", required=True, help="memory_dir to write (memory_branch.safetensors + .json)")
    p.add_argument("--vace-every", type=positive_int, default=None, help="branch spacing in DiT layers (default: inferred)")
    p.set_defaults(func=import_branch)

    _add_optional_commands(commands)
    return parser


def _add_optional_commands(commands) -> None:
    """Commands whose modules may bring heavy imports register here, imported lazily."""
    for module_name, command, help_text in (
        ("mirage_env.baselines.memory_bench", "bench", "benchmarks: bench memory (latent vs colour memory)"),
        ("mirage_env.dataset", "dataset", "posed-video datasets from the procedural world: dataset export"),
        ("mirage_env.agents.train", "train", "train an agent with Stable-Baselines3 (or --engine rllib)"),
        ("mirage_env.backends.model_server", "serve", "serve a world model to backend=remote envs from a Ray actor"),
        ("mirage_env.agents.evaluate", "evaluate", "evaluate a policy over K episodes"),
    ):
        try:
            module = __import__(module_name, fromlist=["add_arguments"])
        except ImportError:
            continue
        p = commands.add_parser(command, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.main)


def import_branch(args) -> None:
    """Write a memory_dir from a DiffSynth-named branch file (see backends/wan_import.py)."""
    from mirage_env.backends.wan_import import import_diffsynth_branch

    result = import_diffsynth_branch(args.source, args.checkpoint, args.out, vace_every=args.vace_every)
    print(f"imported {result.tensors} branch tensors ({result.dtype}) at DiT layers {result.vace_layers} into "
          f"{result.out_dir}; skipped {result.ignored} non-branch tensors. Use it with "
          f"WanWorldModel({args.checkpoint!r}, memory_dir={str(result.out_dir)!r})")


def main(argv: list[str] | None = None) -> int:
    """Run a command; any failure is one line on stderr and exit status 2 (MIRAGE_DEBUG=1 shows the traceback)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"mirage-env {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001  (the CLI's edge: one line, never a traceback)
        if os.environ.get("MIRAGE_DEBUG"):
            raise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        message = lines[0] if lines else type(error).__name__
        print(f"mirage-env {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
