"""The memory branch: a VACE-style side network that reads projected memory.

The Wan2.2 DiT is turned into a ``diffusers`` ``WanVACETransformer3DModel``:
the base weights are copied unchanged and a branch of VACE blocks (one at every
``vace_every``-th DiT layer) reads ``control_hidden_states`` = projected memory
latents (C channels) concatenated with the hit mask broadcast to C channels
(``vace_in_channels = 2C``). Each branch block's output is added to the DiT
hidden state through ``proj_out``; diffusers initialises those with the default
``nn.Linear`` init, so here they are zeroed: an untrained branch leaves the base
model's output unchanged bit for bit.

Wan2.2-TI2V conditions on clean frames through per-token timesteps (a clean
frame's tokens get t = 0). diffusers' VACE forward only takes one timestep per
sample, so :class:`MemoryWanTransformer3DModel` (a subclass, same weights and
config) adds per-token timesteps for both the DiT blocks and the branch blocks.

Saved artefacts (safetensors + JSON, never pickles):

- the branch alone (``save_memory_branch`` / ``load_memory_branch``): only the
  branch's weights and its config, so a memory checkpoint is megabytes next to
  the 10 GB base it plugs into;
- the whole model with ``save_pretrained`` / ``from_pretrained`` (diffusers);
- LoRA adapters (``save_lora`` / ``load_lora``): peft config JSON + weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan_vace import WanVACETransformer3DModel, WanVACETransformerBlock
from safetensors.torch import load_file, save_file

__all__ = [
    "MemoryWanTransformer3DModel",
    "build_memory_transformer",
    "memory_control",
    "branch_parameters",
    "branch_state_dict",
    "save_memory_branch",
    "load_memory_branch",
    "DIT_LORA_TARGETS",
    "add_dit_lora",
    "save_lora",
    "load_lora",
    "BRANCH_WEIGHTS",
    "BRANCH_CONFIG",
    "LORA_WEIGHTS",
    "LORA_CONFIG",
]

BRANCH_WEIGHTS = "memory_branch.safetensors"
BRANCH_CONFIG = "memory_branch.json"
LORA_WEIGHTS = "lora.safetensors"
LORA_CONFIG = "lora_config.json"
_BRANCH_PREFIXES = ("vace_patch_embedding.", "vace_blocks.")

# LoRA goes on the DiT's own blocks only (not the branch): attention projections
# of self- and cross-attention and both FFN linears. peft full-matches the regex
# against module names, so "vace_blocks.*" never matches "blocks.*".
DIT_LORA_TARGETS = r"blocks\.\d+\.(?:attn1|attn2)\.(?:to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(?:0\.proj|2)"


def _vace_block_forward(
    block: WanVACETransformerBlock,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    control_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    rotary_emb,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A VACE block that also accepts per-token modulation ``temb`` (batch, tokens, 6, dim)."""
    if temb.ndim == 3:
        return block(hidden_states, encoder_hidden_states, control_hidden_states, temb, rotary_emb)
    if block.proj_in is not None:
        control_hidden_states = block.proj_in(control_hidden_states) + hidden_states
    modulation = block.scale_shift_table.unsqueeze(0).to(temb.device) + temb.float()
    shift, scale, gate, c_shift, c_scale, c_gate = (m.squeeze(2) for m in modulation.chunk(6, dim=2))
    x = control_hidden_states
    normed = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
    x = (x.float() + block.attn1(normed, None, None, rotary_emb) * gate).type_as(x)
    x = x + block.attn2(block.norm2(x.float()).type_as(x), encoder_hidden_states, None, None)
    normed = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
    x = (x.float() + block.ffn(normed).float() * c_gate).type_as(x)
    hint = block.proj_out(x) if block.proj_out is not None else None
    return hint, x


class MemoryWanTransformer3DModel(WanVACETransformer3DModel):
    """``WanVACETransformer3DModel`` that also takes per-token timesteps (Wan2.2-TI2V style).

    ``timestep`` may be (batch,) as in diffusers, or (batch, tokens) where tokens =
    frames * (height / 2) * (width / 2) after patching; clean context frames get 0.
    ``control_hidden_states`` is (batch, vace_in_channels, frames, height, width).
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        control_hidden_states: torch.Tensor | None = None,
        control_hidden_states_scale: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ):
        if timestep.ndim < 2:
            return super().forward(
                hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                control_hidden_states, control_hidden_states_scale, return_dict, attention_kwargs,
            )
        if attention_kwargs:
            raise ValueError("attention_kwargs (LoRA scale) is not supported with per-token timesteps; set adapter scales with set_adapters")
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        tokens = grid[0] * grid[1] * grid[2]
        if timestep.shape != (batch, tokens):
            raise ValueError(f"per-token timestep must have shape {(batch, tokens)}, got {tuple(timestep.shape)}")
        layers = list(self.config.vace_layers)
        scales = control_hidden_states_scale
        if scales is None:
            scales = hidden_states.new_ones(len(layers))

        rotary_emb = self.rope(hidden_states)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        control = self.vace_patch_embedding(control_hidden_states).flatten(2).transpose(1, 2)
        if control.shape[1] != tokens:
            raise ValueError(
                f"control_hidden_states give {control.shape[1]} tokens, hidden_states {tokens}; "
                "they must have the same frames, height and width"
            )
        temb, timestep_proj, encoder_hidden_states, image_states = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=tokens
        )
        timestep_proj = timestep_proj.unflatten(2, (6, -1))
        if image_states is not None:
            encoder_hidden_states = torch.cat([image_states, encoder_hidden_states], dim=1)

        checkpoint = torch.is_grad_enabled() and self.gradient_checkpointing
        run = self._gradient_checkpointing_func if checkpoint else (lambda f, *a: f(*a))
        hints = []
        for block in self.vace_blocks:
            hint, control = run(_vace_block_forward, block, x, encoder_hidden_states, control, timestep_proj, rotary_emb)
            hints.append(hint)
        for i, block in enumerate(self.blocks):
            x = run(block, x, encoder_hidden_states, timestep_proj, rotary_emb)
            if i in layers:
                j = layers.index(i)
                x = x + hints[j].to(x.device) * scales[j]

        shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
        x = (self.norm_out(x.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(x)
        x = self.proj_out(x)
        x = x.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        output = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def build_memory_transformer(base: WanTransformer3DModel, vace_every: int = 2) -> MemoryWanTransformer3DModel:
    """The base DiT plus a zero-initialised memory branch.

    Args:
        base: the Wan DiT; its weights are copied (``base`` itself is not modified).
        vace_every: a branch block reads at DiT layers 0, vace_every, 2 * vace_every, ...

    Returns:
        A ``MemoryWanTransformer3DModel`` (a ``WanVACETransformer3DModel``) with
        ``vace_in_channels = 2 * in_channels`` whose output equals ``base``'s for any
        control input until the branch is trained.
    """
    if vace_every < 1:
        raise ValueError(f"vace_every must be >= 1, got {vace_every}")
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    config["vace_layers"] = list(range(0, config["num_layers"], vace_every))
    config["vace_in_channels"] = 2 * config["in_channels"]
    from accelerate import init_empty_weights

    # Built empty and given the base's tensors (assign=True), so the 5B base is
    # shared, not copied: only the branch takes new memory.
    with init_empty_weights():
        model = MemoryWanTransformer3DModel(**config)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False, assign=True)
    if unexpected or any(not k.startswith(_BRANCH_PREFIXES) for k in missing):
        raise RuntimeError(f"base weights do not fit the memory transformer: missing={missing}, unexpected={unexpected}")
    device = base.device
    model.vace_patch_embedding.to_empty(device=device)
    model.vace_patch_embedding.reset_parameters()
    with torch.no_grad():
        for block, layer in zip(model.vace_blocks, config["vace_layers"]):
            block.to_empty(device=device)
            # Branch blocks start as copies of the DiT layer they sit beside (as in
            # VACE), so they begin with features the DiT understands.
            dit_block = model.blocks[layer]
            for name in ("attn1", "attn2", "ffn", "norm2"):
                getattr(block, name).load_state_dict(getattr(dit_block, name).state_dict())
            block.scale_shift_table.copy_(dit_block.scale_shift_table)
            if block.proj_in is not None:
                block.proj_in.reset_parameters()
            # The zero output projection is what makes an untrained branch a no-op.
            block.proj_out.weight.zero_()
            block.proj_out.bias.zero_()
    keep_fp32 = tuple(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        if name.startswith(_BRANCH_PREFIXES):
            fp32 = any(part in keep_fp32 for part in name.split("."))
            param.data = param.data.to(torch.float32 if fp32 else base.dtype)
    # init_empty_weights leaves buffers (the rotary tables) where they were made, on the CPU.
    return model.to(device)


def memory_control(memory_latents: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
    """Branch input: memory latents ++ hit mask broadcast to C channels.

    Args:
        memory_latents: (batch, frames, channels, height, width).
        memory_mask: (batch, frames, height, width) bool.

    Returns:
        (batch, 2 * channels, frames, height, width) float, zeros where memory missed.
    """
    if memory_latents.dim() != 5 or memory_mask.shape != (*memory_latents.shape[:2], *memory_latents.shape[3:]):
        raise ValueError(
            f"memory_latents (B, T, C, h, w) and memory_mask (B, T, h, w) disagree: "
            f"{tuple(memory_latents.shape)} vs {tuple(memory_mask.shape)}"
        )
    mask = memory_mask.to(memory_latents.dtype).unsqueeze(2)
    latents = memory_latents * mask
    return torch.cat([latents, mask.expand_as(latents)], dim=2).transpose(1, 2)


def branch_parameters(model: WanVACETransformer3DModel) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.startswith(_BRANCH_PREFIXES) and "lora_" not in n]


def branch_state_dict(model: WanVACETransformer3DModel) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(_BRANCH_PREFIXES) and "lora_" not in k
    }


def save_memory_branch(model: WanVACETransformer3DModel, directory: str | os.PathLike) -> Path:
    """Write the branch weights (safetensors) and the config that places them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k.replace(".base_layer.", "."): v.cpu() for k, v in branch_state_dict(model).items()}
    save_file(state, directory / BRANCH_WEIGHTS, metadata={"format": "pt"})
    meta = {
        "vace_layers": list(model.config.vace_layers),
        "vace_in_channels": model.config.vace_in_channels,
        "inner_dim": model.config.num_attention_heads * model.config.attention_head_dim,
        "num_layers": model.config.num_layers,
    }
    (directory / BRANCH_CONFIG).write_text(json.dumps(meta, indent=2))
    return directory


def load_memory_branch(base: WanTransformer3DModel, directory: str | os.PathLike) -> MemoryWanTransformer3DModel:
    """Build the memory transformer on ``base`` and load a saved branch into it."""
    directory = Path(directory)
    weights, meta_path = directory / BRANCH_WEIGHTS, directory / BRANCH_CONFIG
    missing = [p.name for p in (weights, meta_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"memory branch directory {directory} lacks {missing}; write one with save_memory_branch")
    meta = json.loads(meta_path.read_text())
    inner = base.config.num_attention_heads * base.config.attention_head_dim
    if meta["num_layers"] != base.config.num_layers or meta["inner_dim"] != inner:
        raise ValueError(
            f"memory branch in {directory} was trained for a DiT with {meta['num_layers']} layers of width "
            f"{meta['inner_dim']}, the base has {base.config.num_layers} of width {inner}"
        )
    layers = meta["vace_layers"]
    every = layers[1] - layers[0] if len(layers) > 1 else base.config.num_layers
    model = build_memory_transformer(base, vace_every=every)
    if list(model.config.vace_layers) != layers:
        raise ValueError(f"memory branch layers {layers} are not evenly spaced from 0; cannot rebuild them")
    state = load_file(weights, device=str(base.device))
    expected = set(branch_state_dict(model))
    if set(state) != expected:
        raise ValueError(f"memory branch file {weights} has keys {sorted(set(state) ^ expected)[:5]}... that do not fit")
    model.load_state_dict(state, strict=False)
    return model


def add_dit_lora(model: torch.nn.Module, rank: int = 32, alpha: float = 32.0, adapter_name: str = "default") -> dict:
    """Add LoRA (peft) to the DiT blocks; returns the JSON-able LoRA config."""
    from peft import LoraConfig

    config = dict(r=rank, lora_alpha=alpha, target_modules=DIT_LORA_TARGETS, init_lora_weights=True, lora_dropout=0.0)
    model.add_adapter(LoraConfig(**config), adapter_name=adapter_name)
    return config


def save_lora(model: torch.nn.Module, directory: str | os.PathLike, config: dict, adapter_name: str = "default") -> Path:
    """Write LoRA weights (safetensors, peft key names) and their config (JSON)."""
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, directory / LORA_WEIGHTS, metadata={"format": "pt"})
    (directory / LORA_CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def load_lora(model: torch.nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> dict:
    """Add the saved LoRA to ``model`` and load its weights; returns its config."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    directory = Path(directory)
    missing = [n for n in (LORA_WEIGHTS, LORA_CONFIG) if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"LoRA directory {directory} lacks {missing}; write one with save_lora")
    config = json.loads((directory / LORA_CONFIG).read_text())
    model.add_adapter(LoraConfig(**config), adapter_name=adapter_name)
    state = load_file(directory / LORA_WEIGHTS, device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA file {directory / LORA_WEIGHTS} has keys that fit no module: {unexpected[:5]}")
    return config
