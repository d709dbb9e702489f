"""Train procedural-wan-mini (stages 0, 1, 2) on the CPU and measure whether it learned to use memory.

The whole published recipe at CPU scale, top to bottom:

1. export posed clips from the procedural world (train / test split by scene seed);
2. per-channel statistics of the DCT latents -> the autoencoder's normalisation;
3. stage 0: a small WanTransformer3DModel learns to continue a segment from two
   clean context frames, without memory;
4. stage 1: the VACE memory branch learns to read projected memory (base frozen);
5. stage 2: LoRA on the DiT (branch frozen);
6. the sampler's steps and flow shift, picked on validation clips (training seed
   range, never trained on) from a small grid;
7. evaluation on held-out scenes' revisits.

Evaluation (teacher-forced, the same samples for every variant): each test clip
visits a place, looks away for two segments, and returns to the visit's exact
poses. Memory is built from the clip's own frames as the World builds it
(segment by segment, unseen pixels, moving content filtered out) and the model
generates the return segment from the two frames before it plus the memory
read. Its frames are compared with the first visit's frames from the same poses:

- ``full_memory``: everything written so far is read;
- ``short_memory``: memory horizon 1, only what the last segment wrote or saw
  (the away phase, which looked elsewhere);
- ``no_memory``: the branch gets no memory (the generator alone);
- ``ceiling``: the procedural world's own return (its memory copies latents exactly).

PSNR/SSIM are over every pixel of the returning frames (``*_static`` leave out
pixels showing the moving crate in either frame: it really moved).

    python benchmarks/learned_memory.py --json benchmarks/results/learned_memory.json
    python benchmarks/learned_memory.py --no-train --json F    # evaluate the shipped weights
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mirage_env.backends.mini import (
    MINI_NAME,
    MINI_SETTINGS,
    build_mini_checkpoint,
    mini_transformer_config,
    train_on_samples,
)
from mirage_env.backends.wan_checkpoint import (
    SHIPPED_DIR,
    read_world_defaults,
    write_world_defaults,
)
from mirage_env.benchreport import header, write_json
from mirage_env.clip_samples import (
    ClipSamples,
    list_clips,
    load_clip,
    prepare_clip_samples,
)
from mirage_env.dataset import ExportConfig, export_dataset, revisit_pairs
from mirage_env.metrics import masked_psnr, psnr, ssim


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(SHIPPED_DIR / MINI_NAME), help="checkpoint folder to write (or read with --no-train)")
    p.add_argument("--data", default="runs/learned_memory/data", help="exported clips (made if missing)")
    p.add_argument("--train-clips", type=int, default=3072)
    p.add_argument("--test-clips", type=int, default=64)
    p.add_argument("--val-clips", type=int, default=64,
                   help="clips after the training ones (train seed range, never trained on) that pick the sampler settings")
    p.add_argument("--sampler-grid", default="2:2,2:4,3:4,4:2,4:4", metavar="STEPS:SHIFT,...",
                   help="sampler (steps, flow shift) settings tried on the validation clips after training; the best is shipped")
    p.add_argument("--steps", type=int, nargs=3, default=[1000, 4200, 400], metavar=("STAGE0", "STAGE1", "STAGE2"))
    p.add_argument("--lr", type=float, nargs=3, default=[1e-3, 2e-3, 5e-4], metavar=("STAGE0", "STAGE1", "STAGE2"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vace-every", type=int, default=5,
                   help="a branch block at DiT layers 0, k, 2k, ...; 5 on 6 layers puts one at the last layer, next to the output")
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--heads", type=int, default=4,
                   help="attention heads of 64 channels: the DiT's width is 64 x heads (256 copies memory far better than 192)")
    p.add_argument("--device", default="cpu", help="where stages 0-2 and the evaluation run (clips are prepared on the CPU)")
    p.add_argument("--precision", default="no", choices=["no", "bf16"],
                   help="mixed precision of training; 'no' keeps the CPU recipe's float32 numerics on any device")
    p.add_argument("--horizon", type=int, default=1, help="segments the short-term memory keeps")
    p.add_argument("--min-hit", type=float, default=0.5, help="stages 1-2 train on samples with at least this memory coverage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-train", action="store_true", help="evaluate the checkpoint at --out as it is")
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default="docs/learned_memory_revisit.png")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def latent_statistics(clips: list[Path], limit: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and ONE shared std of the raw DCT latents of (up to ``limit``) training clips.

    The DCT is orthonormal, so with a shared scale the flow-matching loss is the
    pixel-space error: the model spends its capacity where PSNR is measured, not on
    the tiny high-frequency coefficients a per-channel std would blow up to unit size.
    """
    from mirage_env.backends.dct_autoencoder import PatchDCTAutoencoder

    codec = PatchDCTAutoencoder()
    frames = torch.from_numpy(np.concatenate([load_clip(c)["frames"] for c in clips[:limit]]))
    video = frames.permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    z = codec.encode(video).latent_dist.mode()[0]  # (C, F, h, w)
    flat = z.reshape(z.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    shared = float((flat - mean).pow(2).mean().sqrt().clamp_min(1e-3))
    return mean[:, 0].tolist(), [shared] * z.shape[0]


def load_model(out: Path, memory: bool = True, vace_every: int = 2, device: str = "cpu", **options):
    from mirage_env.backends.depth import ConstantDepth
    from mirage_env.backends.wan import WanWorldModel

    # Training and the teacher-forced evaluation take depth from the clips, so the
    # model's own depth estimator is not needed (and not timed) here. float32 on every
    # device: a GPU run of the recipe then differs from the CPU one only in rounding.
    return WanWorldModel(out, memory_dir=options.pop("memory_dir", "auto" if memory else None), depth_estimator=ConstantDepth(),
                         vace_every=vace_every, device=device, dtype=torch.float32, **options)


def train(args, data: Path, out: Path, progress: bool) -> dict:
    from mirage_env.backends.wan_memory import save_lora, save_memory_branch
    from mirage_env.backends.wan_train import save_base_transformer

    timings = {}
    t0 = time.perf_counter()
    exported = list_clips(data / "train")
    if len(exported) < args.train_clips + args.val_clips:
        raise ValueError(f"{data} holds {len(exported)} training-range clips, need --train-clips + --val-clips = "
                         f"{args.train_clips + args.val_clips}; export to a new --data folder")
    clips, validation = exported[: args.train_clips], exported[args.train_clips : args.train_clips + args.val_clips]
    mean, std = latent_statistics(clips)
    depth_dir = out / "depth"
    settings = {**MINI_SETTINGS, "depth_estimator": "depth"} if depth_dir.is_dir() else dict(MINI_SETTINGS)
    config = mini_transformer_config(num_layers=args.layers, ffn_dim=args.ffn, heads=args.heads)
    for stale in ("transformer", "memory", "vae", "scheduler"):
        shutil.rmtree(out / stale, ignore_errors=True)
    build_mini_checkpoint(out, mean, std, transformer_config=config, seed=args.seed, settings=settings)
    # Samples are cut on the CPU: the memory replay is thousands of tiny operations.
    preparer = load_model(out, memory=False)
    samples = prepare_clip_samples(preparer, clips, voxel_size=preparer.suggested_voxel_size, progress=progress)
    timings["prepare_s"] = time.perf_counter() - t0
    model = preparer if args.device == "cpu" else load_model(out, memory=False, device=args.device)
    del preparer

    losses = {}
    options = dict(batch_size=args.batch, lora_rank=args.lora_rank, seed=args.seed, progress=progress,
                   mixed_precision=args.precision)
    t = time.perf_counter()
    losses[0], _ = train_on_samples(model, samples, stage=0, steps=args.steps[0], learning_rate=args.lr[0], **options)
    save_base_transformer(model.transformer, out / "transformer")
    timings["stage0_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model = load_model(out, memory=False, vace_every=args.vace_every, device=args.device)  # branch blocks start as copies of the *trained* DiT layers
    losses[1], _ = train_on_samples(model, samples, stage=1, steps=args.steps[1], learning_rate=args.lr[1],
                                    min_hit_fraction=args.min_hit, **options)
    save_memory_branch(model.transformer, out / "memory")
    timings["stage1_s"] = time.perf_counter() - t

    t = time.perf_counter()
    losses[2], trainer = train_on_samples(model, samples, stage=2, steps=args.steps[2], learning_rate=args.lr[2],
                                          min_hit_fraction=args.min_hit, **options)
    save_lora(model.transformer, out / "memory" / "lora", trainer.lora_config)
    timings["stage2_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sampler = pick_sampler(args, out, validation, progress)
    timings["sampler_s"] = time.perf_counter() - t

    # Trained in float32; shipped in float16 (half the bytes; WanWorldModel loads them back to float32).
    shipped_weights = [out / "transformer" / "diffusion_pytorch_model.safetensors", out / "memory" / "memory_branch.safetensors",
                       out / "memory" / "lora" / "lora.safetensors"]
    for path in shipped_weights:
        store_half(path)
    command = "python benchmarks/learned_memory.py " + " ".join(sys.argv[1:])
    write_world_defaults(out, **{**read_world_defaults_raw(out), "num_inference_steps": sampler["steps"],
                                 "flow_shift": sampler["shift"], "memory_dir": "memory", "training": {
        "command": command.strip(), "seed": args.seed, "steps": args.steps, "learning_rates": args.lr, "batch": args.batch,
        "train_clips": len(clips), "samples": len(samples), "lora_rank": args.lora_rank, "transformer": config,
        "final_loss": {str(k): float(np.mean(v[-100:])) for k, v in losses.items()},
        "validation_clips": len(validation), "sampler_validation_psnr": sampler["scores"],
        "minutes": round((time.perf_counter() - t0) / 60, 2), "machine": f"{platform.machine()} CPU, {args.threads} threads",
    }})
    (out / "TRAINING.md").write_text(
        f"# {MINI_NAME}\n\n"
        "A small Wan-architecture world model (WanTransformer3DModel + VACE memory branch + peft LoRA, DCT\n"
        "autoencoder) trained from scratch on a 2-core CPU on clips of mirage-env's procedural indoor world.\n"
        "It is NOT Wan2.2: it knows only 64x64 procedural rooms.\n\n"
        f"Remake it (seed {args.seed}; the clips are exported first if missing):\n\n    {command.strip()}\n\n"
        "Its training settings and losses are in mirage_world.json under \"training\"; its figures in\n"
        "benchmarks/results/learned_memory.json; the depth model in depth/ has its own TRAINING.md.\n")
    return {"timings": timings, "losses": {k: [float(x) for x in v] for k, v in losses.items()}, "sampler": sampler}


def pick_sampler(args, out: Path, validation: list[Path], progress: bool) -> dict:
    """The (steps, flow shift) of the grid with the best full-memory revisit PSNR on validation clips.

    Validation clips come from the training seed range but were never trained on, so the
    held-out test scenes play no part in the choice.
    """
    grid = [tuple(float(x) for x in pair.split(":")) for pair in args.sampler_grid.split(",") if pair]
    # The settings file does not name the memory folder yet at this point: name it, or the
    # candidates would be the base model without its branch and LoRA.
    memory_dir = out / "memory"
    model = load_model(out)
    last = [int(load_clip(validation[0])["frames"].shape[0] // model.latent_frames) - 1]
    samples = prepare_clip_samples(model, validation, voxel_size=model.suggested_voxel_size, segments=last, progress=False)
    scores = {}
    for steps, shift in tqdm(grid, desc="sampler", disable=not progress):
        candidate = load_model(out, memory_dir=memory_dir, device=args.device, num_inference_steps=int(steps), flow_shift=shift)
        frames, _ = generate_returns(candidate, samples, True, args.seed)
        scores[f"{int(steps)}:{shift:g}"] = revisit_scores(frames, validation, samples)["psnr"]
    best = max(scores, key=scores.get)
    steps, shift = best.split(":")
    return {"steps": int(steps), "shift": float(shift), "scores": scores}


def store_half(path: Path) -> None:
    """Rewrite a safetensors file with its float tensors in float16."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata=metadata)


def read_world_defaults_raw(out: Path) -> dict:
    return json.loads((out / "mirage_world.json").read_text())


@torch.no_grad()
def generate_returns(model, samples: ClipSamples, use_memory: bool, seed: int, chunk: int = 16) -> tuple[np.ndarray, float]:
    """Generated frames (N, T, H, W, 3) of every sample's target segment, and seconds spent."""
    from mirage_env.backends.base import Segment, SegmentRequest

    frames, seconds = [], 0.0
    for first in range(0, len(samples), chunk):
        part = samples.batch(torch.arange(first, min(first + chunk, len(samples))))
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(len(part["target"]))]
        request = SegmentRequest(
            poses=part["poses"], memory_latents=part["memory_latents"], memory_mask=part["memory_mask"],
            memory_depth=part["memory_depth"], generators=generators, use_memory=use_memory,
            previous=Segment(latents=part["context"], depth=torch.zeros(part["context"].shape[:2] + part["context"].shape[3:]),
                             poses=part["poses"][:, :1].expand(-1, part["context"].shape[1], -1, -1)),
        )
        t = time.perf_counter()
        frames.append(model.generate(request).frames.numpy())
        seconds += time.perf_counter() - t
    return np.concatenate(frames), seconds


def revisit_scores(generated: np.ndarray, clips: list[Path], samples: ClipSamples) -> dict:
    """Mean PSNR / SSIM of returning frames against the first visit from the same pose."""
    scores = {"psnr": [], "ssim": [], "psnr_static": []}
    n = generated.shape[1]
    for i, (clip_index, segment) in enumerate(zip(samples.clip.tolist(), samples.segment.tolist())):
        clip = load_clip(clips[clip_index])
        returns, visits = revisit_pairs(clips[clip_index])
        factor = clip["frames"].shape[1] // clip["moving"].shape[1]
        for r, v in zip(returns, visits):
            frame = generated[i, r - segment * n]
            first = clip["frames"][v]
            moving = np.kron(clip["moving"][r] | clip["moving"][v], np.ones((factor, factor), bool))
            scores["psnr"].append(min(psnr(frame, first), 100.0))
            scores["ssim"].append(ssim(frame, first))
            scores["psnr_static"].append(min(masked_psnr(frame, first, ~moving), 100.0))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def ground_truth_returns(clips: list[Path], samples: ClipSamples) -> np.ndarray:
    n = samples.target.shape[1]
    return np.stack([load_clip(clips[c])["frames"][s * n : (s + 1) * n] for c, s in zip(samples.clip.tolist(), samples.segment.tolist())])


def reconstruction_psnr(model, clips: list[Path]) -> float:
    frames = torch.from_numpy(np.stack([load_clip(c)["frames"] for c in clips]))
    decoded = model.decode(model.encode(frames)).numpy()
    return float(np.mean([min(psnr(a, b), 100.0) for a, b in zip(decoded.reshape(-1, *decoded.shape[2:]), frames.numpy().reshape(-1, *frames.shape[2:]))]))


def evaluate(args, data: Path, out: Path, progress: bool) -> tuple[dict, dict]:
    clips = list_clips(data / "test")
    preparer = load_model(out)
    last = [int(load_clip(clips[0])["frames"].shape[0] // preparer.latent_frames) - 1]
    voxel = preparer.suggested_voxel_size
    full = prepare_clip_samples(preparer, clips, voxel_size=voxel, segments=last, progress=progress)
    short = prepare_clip_samples(preparer, clips, voxel_size=voxel, segments=last, memory_options={"horizon": args.horizon}, progress=progress)
    model = preparer if args.device == "cpu" else load_model(out, device=args.device)
    frames = {}
    frames["full_memory"], seconds = generate_returns(model, full, True, args.seed)
    frames["short_memory"], _ = generate_returns(model, short, True, args.seed)
    frames["no_memory"], _ = generate_returns(model, full, False, args.seed)
    frames["ceiling"] = ground_truth_returns(clips, full)
    scores = {name: revisit_scores(f, clips, full) for name, f in frames.items()}
    result = {}
    for name in ("full_memory", "short_memory", "no_memory", "ceiling"):
        result[f"psnr_{name}"] = scores[name]["psnr"]
        result[f"ssim_{name}"] = scores[name]["ssim"]
        result[f"psnr_static_{name}"] = scores[name]["psnr_static"]
    result["memory_hit_full"] = float(full.memory_mask.float().mean())
    result["memory_hit_short"] = float(short.memory_mask.float().mean())
    result["recon_psnr"] = reconstruction_psnr(model, clips)
    result["s_per_frame"] = seconds / (len(full) * full.target.shape[1])
    result["test_clips"] = len(clips)
    return result, {"frames": frames, "clips": clips, "samples": full}


def save_figure(path: str, shown: dict, rows: int = 4) -> None:
    """Rows of (first visit | return, full memory | return, short memory | return, no memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips, samples, frames = shown["clips"], shown["samples"], shown["frames"]
    columns = [("first visit", None), ("return: full memory", "full_memory"), ("return: short memory", "short_memory"),
               ("return: no memory", "no_memory")]
    figure, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows))
    for row in range(rows):
        i = row * max(1, len(samples) // rows)
        returns, visits = revisit_pairs(clips[int(samples.clip[i])])
        t = len(returns) - 1  # the last returning frame: the visit's start
        first = load_clip(clips[int(samples.clip[i])])["frames"][visits[t]]
        offset = int(samples.segment[i]) * frames["full_memory"].shape[1]
        for col, (title, key) in enumerate(columns):
            image = first if key is None else frames[key][i, returns[t] - offset]
            ax = axes[row, col]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if key is not None:
                ax.set_xlabel(f"{min(psnr(image, first), 100):.1f} dB", fontsize=8)
    figure.suptitle("procedural-wan-mini on held-out scenes (CPU, 64x64, teacher-forced revisit)", fontsize=9)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        # The recipe's float32 numerics on a GPU too: no TF32 in convolutions (the patch
        # embedding) or matrix products, which would blur the copy of memory latents.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    progress = not args.quiet
    data, out = Path(args.data), Path(args.out)
    started = time.perf_counter()
    if not (data / "dataset.json").is_file():
        # Evaluating shipped weights needs only the held-out clips.
        train_clips = 0 if args.no_train else args.train_clips + args.val_clips
        export_dataset(data, ExportConfig(train_clips=train_clips, test_clips=args.test_clips), progress=progress)
    export_s = time.perf_counter() - started
    training = {}
    if not args.no_train:
        out.mkdir(parents=True, exist_ok=True)
        training = train(args, data, out, progress)
    train_minutes = (time.perf_counter() - started) / 60
    result, shown = evaluate(args, data, out, progress)
    if args.no_train:
        train_minutes = read_world_defaults(out).get("training", {}).get("minutes", float("nan"))
    result["train_minutes"] = train_minutes
    result["export_s"] = export_s
    result["total_minutes"] = (time.perf_counter() - started) / 60
    result["trained_now"] = not args.no_train
    result["threads"] = args.threads
    result["device"] = args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    if training:
        result["timings_s"] = training["timings"]
        result["final_loss"] = {k: float(np.mean(v[-100:])) for k, v in training["losses"].items()}
        result["sampler"] = training["sampler"]
    result["note"] = ("teacher-forced revisit of the last segment of held-out clips (scene seeds >= 1e6); "
                      "PSNR over all pixels of the returning frames vs the first visit from the same pose; "
                      "*_static leaves out the moving crate; ceiling = the procedural world's own return")
    if args.figure:
        save_figure(args.figure, shown)
    rows = [("full memory", "full_memory"), ("short memory (horizon %d)" % args.horizon, "short_memory"),
            ("no memory", "no_memory"), ("ceiling (procedural copy)", "ceiling")]
    print(f"\n{'revisit of held-out scenes':<30}{'PSNR dB':>10}{'SSIM':>8}{'static PSNR':>13}")
    for label, key in rows:
        print(f"{label:<30}{result['psnr_' + key]:>10.2f}{result['ssim_' + key]:>8.3f}{result['psnr_static_' + key]:>13.2f}")
    print(f"reconstruction PSNR {result['recon_psnr']:.2f} dB | training {result['train_minutes']:.1f} min | "
          f"{result['s_per_frame']:.3f} CPU s per generated frame ({args.threads} threads)")
    write_json(args.json, {**header(args), **result}, quiet=args.quiet)
    return result


if __name__ == "__main__":
    main()
