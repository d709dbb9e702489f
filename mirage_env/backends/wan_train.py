"""Training the base continuation model (stage 0), the memory branch (stage 1) and LoRA (stage 2) on posed video.

Reads top to bottom like the published recipe:

- data: posed clips (``posed_clips.PosedClipDataset``: RealEstate10K camera files,
  frames, optional depth);
- a sample: ``past_frames`` frames written into a LatentSpatialMemory (VAE
  latents lifted with depth), then ``segment_frames`` target frames whose cameras
  read the memory back; the past's last ``context_frames`` latent frames are the
  clean context, exactly as at generation time (see wan.py);
- loss: flow matching (x_t = (1 - s) x_0 + s noise, the DiT predicts noise - x_0)
  on the target frames, with s drawn uniformly and shifted like the sampler;
- stage 0 (only where no pretrained base exists, e.g. procedural-wan-mini) trains
  the whole DiT as a memory-free continuation model: the branch is not run and
  the checkpoint holds ``transformer/`` (diffusers ``save_pretrained``);
- stage 1 trains only the branch (``vace_*``); stage 2 freezes it and trains LoRA
  (rank 32, alpha 32, attention q/k/v/out and FFN of the DiT blocks); lr 1e-5;
  bf16 autocast on GPU;
- checkpoints: branch and LoRA (safetensors; the directory is a valid
  ``memory_dir`` for WanWorldModel), optimizer state (safetensors) and
  ``trainer_state.json``; ``resume`` restores step, weights and optimizer.

One file because it is one recipe, read top to bottom: its arguments (``TrainArgs``),
its step (``MemoryBranchTrainer``) and its loop (``train``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..geometry import Camera
from .posed_clips import PosedClipDataset

__all__ = [
    "TrainArgs",
    "MemoryBranchTrainer",
    "save_base_transformer",
    "train",
    "main",
]


# --------------------------------------------------------------------------- arguments


@dataclass
class TrainArgs:
    checkpoint_dir: str
    data_dir: str | None = None
    output_dir: str = "wan-memory"
    stage: int = 1
    memory_dir: str | None = None  # stage 2 starts from a stage-1 branch
    resume: str | None = None
    image_size: tuple[int, int] = (704, 1280)
    past_frames: int = 5
    segment_frames: int = 33
    context_frames: int = 2
    frame_stride: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine": to 10% of learning_rate at max_steps
    weight_decay: float = 0.0
    lora_rank: int = 32
    lora_alpha: float = 32.0
    batch_size: int = 1
    max_steps: int = 1000
    save_every: int = 500
    flow_shift: float = 5.0
    voxel_size: float = 0.05
    vace_every: int = 2
    depth_model: str | None = None
    prompt: str = ""
    max_sequence_length: int = 512
    mixed_precision: str = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def check(self, temporal_factor: int = 4) -> None:
        """Validate; frame counts must be 1 + temporal_factor * k for the model's VAE."""
        if self.stage not in (0, 1, 2):
            raise ValueError(f"stage must be 0 (base), 1 (branch) or 2 (LoRA), got {self.stage}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.context_frames < 0:
            raise ValueError(f"context_frames must be >= 0, got {self.context_frames}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        for name in ("past_frames", "segment_frames"):
            value = getattr(self, name)
            if value < 1 or (value - 1) % temporal_factor:
                raise ValueError(f"{name} must be 1 + {temporal_factor}k for this VAE, got {value}")


# --------------------------------------------------------------------------- trainer


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class MemoryBranchTrainer:
    """One training stage of the memory branch (1) or of LoRA on the DiT (2).

    Args:
        model: a ``WanWorldModel`` (its VAE, text encoder, depth estimator and memory
            transformer are used; the transformer is trained in place).
        args: TrainArgs (stage, learning rate, LoRA rank, ...).
        accelerator: optional ``accelerate.Accelerator``; it then owns backward and
            device placement of the optimizer (multi-GPU, mixed precision).
    """

    def __init__(self, model, args: TrainArgs, accelerator=None):
        from .wan_memory import add_dit_lora, branch_parameters

        args.check(model.latent.temporal_factor)
        self.model, self.args, self.accelerator = model, args, accelerator
        self.transformer = model.transformer
        self.transformer.requires_grad_(False)
        self.lora_config = None
        if args.stage == 0:
            params = [p for n, p in self.transformer.named_parameters() if p not in set(branch_parameters(self.transformer))]
        elif args.stage == 1:
            params = branch_parameters(self.transformer)
        else:
            has_lora = any("lora_" in n for n, _ in self.transformer.named_parameters())
            if not has_lora:
                self.lora_config = add_dit_lora(self.transformer, rank=args.lora_rank, alpha=args.lora_alpha)
            else:
                self.lora_config = json.loads((Path(model.memory_dir) / "lora" / "lora_config.json").read_text())
            self.transformer.requires_grad_(False)
            params = [p for n, p in self.transformer.named_parameters() if "lora_" in n]
        for p in params:
            # Trainable weights in fp32 even when the frozen base is bf16: small lr updates
            # vanish in bf16.
            p.data = p.data.float()
            p.requires_grad_(True)
        self.params = params
        if args.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
        if accelerator is not None:
            self.transformer, self.optimizer = accelerator.prepare(self.transformer, self.optimizer)
        self.step = 0
        precision = args.mixed_precision
        if precision == "auto":
            precision = "bf16" if model.device.type == "cuda" else "no"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    # ---------------------------------------------------------------- batches

    @torch.no_grad()
    def prepare_batch(self, clips: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Posed clips -> tensors of one training step.

        Args:
            clips: ``frames`` uint8 (B, past + segment, H, W, 3), ``poses`` (B, F, 4, 4),
                ``intrinsics`` (B, 4) pixels, optional ``depth`` (B, F, H, W).

        Returns:
            ``context`` (B, Tc, C, h, w), ``target`` (B, T, C, h, w) normalised latents,
            ``memory_latents`` (B, T, C, h, w), ``memory_mask`` (B, T, h, w),
            ``prompt_embeds`` (B, L, D).
        """
        from ..memory import LatentSpatialMemory, pool_depth

        m, a = self.model, self.args
        frames = clips["frames"]
        batch, total = frames.shape[:2]
        if total != a.past_frames + a.segment_frames:
            raise ValueError(f"clips have {total} frames, need past_frames + segment_frames = {a.past_frames + a.segment_frames}")
        past, target = frames[:, : a.past_frames], frames[:, a.past_frames :]
        past_latents, target_latents = m.encode(past), m.encode(target)
        tp, tt = past_latents.shape[1], target_latents.shape[1]
        f = m.latent.spatial_factor
        past_index = m.latent.frame_indices(tp)
        target_index = [a.past_frames + i for i in m.latent.frame_indices(tt)]
        if "depth" in clips:
            depth = pool_depth(clips["depth"][:, past_index].float(), f)
        else:
            depth = m.estimate_depth(past.cpu(), tp)
        poses = clips["poses"].to(torch.float64)
        memory_latents, memory_mask = [], []
        for i in range(batch):
            fx, fy, cx, cy = clips["intrinsics"][i].tolist()
            camera = Camera(fx, fy, cx, cy, width=frames.shape[3], height=frames.shape[2]).scaled(1.0 / f)
            memory = LatentSpatialMemory(m.latent.channels, voxel_size=a.voxel_size, device=m.device)
            memory.write(past_latents[i].to(m.device), depth[i].to(m.device), camera, poses[i, past_index].to(m.device))
            read = memory.read(camera, poses[i, target_index].to(m.device))
            memory_latents.append(read.latents)
            memory_mask.append(read.mask)
        context = past_latents[:, tp - min(a.context_frames, tp) :] if a.context_frames else past_latents[:, :0]
        return {
            "context": context,
            "target": target_latents,
            "memory_latents": torch.stack(memory_latents),
            "memory_mask": torch.stack(memory_mask),
            "prompt_embeds": m.prompt_embeds([a.prompt] * batch),
        }

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching loss on the target frames of a prepared batch."""
        from .wan_memory import memory_control

        device = self.model.device
        context = batch["context"].to(device, torch.float32).transpose(1, 2)
        target = batch["target"].to(device, torch.float32).transpose(1, 2)
        b, c, tc = context.shape[:3]
        x0 = torch.cat([context, target], dim=2)
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(device)
        u = torch.rand(b, generator=generator, device=gen_device).to(device)
        # Same timestep shift as the sampler, so training sees the noise levels sampling visits.
        sigma = self.args.flow_shift * u / (1 + (self.args.flow_shift - 1) * u)
        s = sigma.view(b, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        xt[:, :, :tc] = context
        h, w = x0.shape[-2:]
        p_t, p_h, p_w = self.model.patch_size
        per_frame = (h // p_h) * (w // p_w)
        timestep = (sigma * 1000).view(b, 1).expand(b, x0.shape[2] * per_frame).clone()
        timestep[:, : tc * per_frame] = 0
        control = torch.zeros(b, 2 * c, x0.shape[2], h, w, device=device)
        control[:, :, tc:] = memory_control(batch["memory_latents"].to(device).float(), batch["memory_mask"].to(device))
        dtype = self.model.dtype
        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            if self.args.stage == 0:
                # The base alone: the memory transformer's DiT weights through WanTransformer3DModel's
                # forward, so the untrained branch costs nothing.
                from diffusers import WanTransformer3DModel

                pred = WanTransformer3DModel.forward(
                    self._unwrapped(), xt.to(dtype), timestep, batch["prompt_embeds"].to(device, dtype), return_dict=False
                )[0]
            else:
                pred = self.transformer(
                    xt.to(dtype), timestep, batch["prompt_embeds"].to(device, dtype), control_hidden_states=control.to(dtype),
                    return_dict=False,
                )[0]
        return torch.nn.functional.mse_loss(pred[:, :, tc:].float(), (noise - x0)[:, :, tc:])

    def learning_rate(self) -> float:
        """Learning rate of the next step: linear warm-up, then constant or cosine to 10%."""
        a = self.args
        if self.step < a.warmup_steps:
            return a.learning_rate * (self.step + 1) / a.warmup_steps
        if a.lr_schedule == "constant":
            return a.learning_rate
        progress = min(1.0, (self.step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps))
        return a.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> float:
        """One optimizer step on a prepared batch; returns the loss before the step."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        self.transformer.train()
        loss = self.loss(batch, generator)
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(loss.detach())

    # ---------------------------------------------------------------- checkpoints

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.transformer) if self.accelerator is not None else self.transformer

    def save(self, directory: str | os.PathLike) -> Path:
        """Write a checkpoint that is also a ``memory_dir`` for WanWorldModel."""
        from .wan_memory import save_lora, save_memory_branch

        directory = Path(directory)
        model = self._unwrapped()
        if self.args.stage == 0:
            save_base_transformer(model, directory / "transformer")
        else:
            save_memory_branch(model, directory)
        if self.lora_config is not None:
            save_lora(model, directory / "lora", self.lora_config)
        tensors, meta = _flatten_optimizer(self.optimizer.state_dict())
        save_file(tensors, directory / "optimizer.safetensors", metadata={"format": "pt"})
        state = {"step": self.step, "stage": self.args.stage, "optimizer": meta, "args": dataclasses.asdict(self.args)}
        (directory / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
        return directory

    def load(self, directory: str | os.PathLike) -> None:
        """Resume: weights of the trained parts, optimizer state and step."""
        from peft.utils import set_peft_model_state_dict

        from .wan_memory import BRANCH_WEIGHTS, LORA_WEIGHTS

        directory = Path(directory)
        state_path = directory / "trainer_state.json"
        if not state_path.is_file():
            raise FileNotFoundError(f"{directory} is not a training checkpoint (no trainer_state.json)")
        state = json.loads(state_path.read_text())
        if state["stage"] != self.args.stage:
            raise ValueError(f"checkpoint {directory} is from stage {state['stage']}, this trainer runs stage {self.args.stage}")
        model = self._unwrapped()
        device = next(model.parameters()).device
        trained = "transformer/diffusion_pytorch_model.safetensors" if self.args.stage == 0 else BRANCH_WEIGHTS
        branch = load_file(directory / trained, device=str(device))
        current = model.state_dict()
        with torch.no_grad():
            for key, value in branch.items():
                current[key].copy_(value)
        if self.lora_config is not None:
            set_peft_model_state_dict(model, load_file(directory / "lora" / LORA_WEIGHTS, device=str(device)))
        tensors = load_file(directory / "optimizer.safetensors")
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        self.step = int(state["step"])


def save_base_transformer(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write the DiT of a memory transformer, without its branch, as a diffusers ``WanTransformer3DModel``."""
    from diffusers import WanTransformer3DModel

    from .wan_memory import branch_state_dict

    branch = set(branch_state_dict(model))
    config = {k: v for k, v in model.config.items() if not k.startswith("_") and k not in ("vace_layers", "vace_in_channels")}
    base = WanTransformer3DModel(**config)
    state = {k: v for k, v in model.state_dict().items() if k not in branch and "lora_" not in k}
    base.load_state_dict(state, strict=True)
    base.save_pretrained(directory)
    return Path(directory)


# --------------------------------------------------------------------------- entry point


def train(args: TrainArgs) -> Path:
    """Run one stage from the arguments; returns the final checkpoint directory."""
    from accelerate import Accelerator

    from .wan import WanWorldModel

    args.check()
    if not args.data_dir:
        raise ValueError("data_dir is required: a folder of sequence folders (cameras.txt + frames/)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.mixed_precision if args.mixed_precision != "auto" else ("bf16" if device == "cuda" else "no")
    accelerator = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    torch.manual_seed(args.seed)
    model = WanWorldModel(
        args.checkpoint_dir, memory_dir=args.memory_dir, device=accelerator.device,
        dtype=torch.bfloat16 if precision == "bf16" else torch.float32, image_size=tuple(args.image_size),
        frames_per_segment=args.segment_frames, context_frames=args.context_frames, flow_shift=args.flow_shift,
        depth_estimator=args.depth_model, vace_every=args.vace_every, max_sequence_length=args.max_sequence_length,
    )
    trainer = MemoryBranchTrainer(model, args, accelerator=accelerator)
    if args.resume:
        trainer.load(args.resume)
    data = PosedClipDataset(args.data_dir, args.past_frames + args.segment_frames, tuple(args.image_size), args.frame_stride)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed + trainer.step))
    out = Path(args.output_dir)
    bar = tqdm(total=args.max_steps, initial=trainer.step, disable=not args.progress or not accelerator.is_main_process)
    while trainer.step < args.max_steps:
        for clips in loader:
            loss = trainer.train_step(trainer.prepare_batch(clips))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if accelerator.is_main_process and (trainer.step % args.save_every == 0 or trainer.step == args.max_steps):
                trainer.save(out / f"step-{trainer.step:07d}")
            if trainer.step >= args.max_steps:
                break
    bar.close()
    return out / f"step-{trainer.step:07d}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the Wan memory branch (stage 1) or LoRA (stage 2).")
    for f in dataclasses.fields(TrainArgs):
        name = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        if f.type in ("bool", bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "image_size":
            parser.add_argument(name, type=int, nargs=2, default=default, metavar=("HEIGHT", "WIDTH"))
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(name, type=kind, default=default, required=default is None and f.name == "checkpoint_dir")
    train(TrainArgs(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
