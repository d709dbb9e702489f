"""Import a memory branch trained in DiffSynth naming (the published system's) into ours.

The published latent-spatial-memory system (microsoft/LatentSpatialMemory, after
Spatia and DiffSynth-Studio) trains its VACE branch as a DiffSynth ``VaceWanModel``
and exports ``vace.safetensors`` with keys like ``vace_blocks.3.self_attn.q.weight``.
Our branch is the same network inside a ``diffusers`` ``WanVACETransformer3DModel``
(:mod:`mirage_env.backends.wan_memory`), so importing is a rename with no reshaping:

=====================================  ======================================  =====================
DiffSynth (per ``vace_blocks.N.``)     diffusers (per ``vace_blocks.N.``)       shape
=====================================  ======================================  =====================
``modulation``                         ``scale_shift_table``                   (1, 6, dim)
``before_proj.{weight,bias}`` (N = 0)  ``proj_in.{weight,bias}``               (dim, dim), (dim,)
``after_proj.{weight,bias}``           ``proj_out.{weight,bias}``              (dim, dim), (dim,)
``self_attn.{q,k,v}.*``                ``attn1.to_{q,k,v}.*``                  (dim, dim), (dim,)
``self_attn.o.*``                      ``attn1.to_out.0.*``                    (dim, dim), (dim,)
``self_attn.norm_{q,k}.weight``        ``attn1.norm_{q,k}.weight``             (dim,)
``cross_attn.*`` (same as above)       ``attn2.*``
``cross_attn.{k,v}_img.*``             ``attn2.add_{k,v}_proj.*``              (I2V models only)
``cross_attn.norm_k_img.weight``       ``attn2.norm_added_k.weight``           (I2V models only)
``norm3.{weight,bias}``                ``norm2.{weight,bias}``                 (dim,)
``ffn.0.*``                            ``ffn.net.0.proj.*``                    (ffn_dim, dim), (ffn_dim,)
``ffn.2.*``                            ``ffn.net.2.*``                         (dim, ffn_dim), (dim,)
=====================================  ======================================  =====================

plus ``vace_patch_embedding.{weight,bias}`` unchanged: a Conv3d of weight
(dim, vace_in_channels, p_t, p_h, p_w) in both. Things to know:

- The norms are named in a different order. Original Wan / DiffSynth apply
  ``norm1`` (self-attn), ``norm3`` (cross-attn, the only one with affine weights)
  and ``norm2`` (FFN); diffusers calls them ``norm1, norm2, norm3`` in order of use.
  So DiffSynth ``norm3`` is diffusers ``norm2``; a DiffSynth ``norm2.weight`` can
  not occur (it has no affine parameters) and is reported as unmapped.
- Blocks are numbered by position in both (``vace_blocks.N`` is the N-th branch
  block, not the DiT layer it sits beside). Which DiT layers they read at
  (DiffSynth ``vace_layers``) is not in the file; the published rule is every 2nd
  layer for a 30-layer DiT (Wan2.2-TI2V-5B) and every 5th for a 40-layer one,
  i.e. evenly spaced from layer 0 with ``num_layers / blocks`` between them, which
  :func:`infer_vace_every` recovers.
- Only block 0 has ``before_proj`` (diffusers ``proj_in``); it adds the DiT's
  patch-embedded hidden state to the branch input.
- Exporters wrap keys in prefixes (``module.``, ``model.``, ``pipe.vace.``,
  ``vace.``, ``_fsdp_wrapped_module.``, ``diffusion_model.``); they are removed.

Nothing here unpickles: the source must be a safetensors file.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .wan_memory import MemoryWanTransformer3DModel, branch_state_dict, build_memory_transformer, save_memory_branch

__all__ = [
    "DIFFSYNTH_BLOCK_RENAMES",
    "BranchImport",
    "convert_diffsynth_branch",
    "diffsynth_to_diffusers_key",
    "import_diffsynth_branch",
    "infer_vace_every",
]

# Wrapper prefixes that DiffSynth, accelerate/FSDP and the published exporter put in
# front of the VaceWanModel's own names; stripped repeatedly, in any order.
_WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "model.", "diffusion_model.", "pipe.vace.", "vace.")

# Sub-module of a DiffSynth VaceWanAttentionBlock -> the same sub-module of a
# diffusers WanVACETransformerBlock. Parameter names (weight, bias) are unchanged.
DIFFSYNTH_BLOCK_RENAMES: dict[str, str] = {
    "before_proj": "proj_in",
    "after_proj": "proj_out",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    # DiffSynth's norm3 normalises the cross-attention input; diffusers calls that norm2.
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# Parameters that sit directly on the block (not in a sub-module).
_BLOCK_PARAMETER_RENAMES = {"modulation": "scale_shift_table"}

_BLOCK_KEY = re.compile(r"vace_blocks\.(\d+)\.(.+)")
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
# Modules DiffSynth variants put in a VACE branch that ours does not have; their
# keys are branch keys (so they are reported, not silently dropped).
_FOREIGN_BRANCH_PREFIXES = ("depth_adapter.",)
_SHOWN = 8  # keys listed per problem in an error message


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _is_branch_key(key: str) -> bool:
    """A key of the VACE branch (after wrapper prefixes are stripped), mappable or not."""
    return key.startswith("vace_") or key.startswith(_FOREIGN_BRANCH_PREFIXES)


def diffsynth_to_diffusers_key(key: str) -> str | None:
    """This project's diffusers name for one DiffSynth branch key, or None if it has none.

    ``key`` may carry wrapper prefixes (``pipe.vace.vace_blocks.0.modulation``).
    Returns e.g. ``"vace_blocks.0.scale_shift_table"``; None for keys this
    importer does not know (non-branch keys included).
    """
    key = _strip_wrappers(key)
    if key in ("vace_patch_embedding.weight", "vace_patch_embedding.bias"):
        return key
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        return None
    index, rest = match.groups()
    if rest in _BLOCK_PARAMETER_RENAMES:
        return f"vace_blocks.{index}.{_BLOCK_PARAMETER_RENAMES[rest]}"
    module, _, parameter = rest.rpartition(".")
    if module not in DIFFSYNTH_BLOCK_RENAMES or parameter not in ("weight", "bias"):
        return None
    return f"vace_blocks.{index}.{DIFFSYNTH_BLOCK_RENAMES[module]}.{parameter}"


def _source_block_count(keys) -> int:
    """1 + the largest ``vace_blocks.N`` index among ``keys`` (0 if there is none)."""
    indices = [int(m.group(1)) for k in keys if (m := _BLOCK_KEY.fullmatch(_strip_wrappers(k)))]
    return 1 + max(indices) if indices else 0


def infer_vace_every(num_blocks: int, num_layers: int) -> int:
    """The spacing of ``num_blocks`` branch blocks over a ``num_layers``-layer DiT.

    Branch blocks read at layers 0, every, 2 * every, ... (as the published
    system and :func:`build_memory_transformer` place them). When several
    spacings give ``num_blocks`` blocks, the one that spreads them evenly over
    the DiT (``every * num_blocks == num_layers``, the published rule: 2 for 30
    layers, 5 for 40) is taken; otherwise the caller must say.
    """
    if num_blocks < 1:
        raise ValueError("the source has no vace_blocks.N keys, so it holds no memory branch")
    candidates = [every for every in range(1, num_layers + 1) if len(range(0, num_layers, every)) == num_blocks]
    if not candidates:
        raise ValueError(
            f"the source has {num_blocks} branch blocks but a {num_layers}-layer DiT fits at most {num_layers}, "
            "evenly spaced from layer 0; it was trained for a different base model"
        )
    even = [every for every in candidates if every * num_blocks == num_layers]
    if len(candidates) == 1 or even:
        return (even or candidates)[0]
    raise ValueError(
        f"{num_blocks} branch blocks fit a {num_layers}-layer DiT with any of vace_every={candidates}; "
        "pass the spacing it was trained with (vace_every=..., --vace-every)"
    )


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def convert_diffsynth_branch(
    state_dict: dict[str, torch.Tensor], model: MemoryWanTransformer3DModel
) -> dict[str, torch.Tensor]:
    """Rename a DiffSynth VACE branch state dict to ``model``'s branch keys, checking every shape.

    Args:
        state_dict: DiffSynth names -> tensors, e.g. ``vace_blocks.0.modulation``
            (1, 6, dim), ``vace_patch_embedding.weight`` (dim, 2C, 1, 2, 2). Keys
            may carry wrapper prefixes (``pipe.vace.``, ``module.``, ...). Keys
            outside the branch (the base DiT's ``blocks.N...``, ``head``, ...) are
            ignored: the base comes from the diffusers checkpoint.
        model: the memory transformer the branch is for; its branch keys
            (``branch_state_dict(model)``) are the targets.

    Returns:
        ``model``'s branch keys -> tensors, every target key present, each cast
        to the dtype of the parameter it replaces. Load with
        ``model.load_state_dict(result, strict=False)``.

    Raises:
        ValueError: naming branch keys with no diffusers counterpart, target keys
            the source lacks and shape mismatches, with what to do about each.
    """
    targets = branch_state_dict(model)
    branch = {k: v for k, v in state_dict.items() if _is_branch_key(_strip_wrappers(k))}
    converted: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}  # target key -> the source key that filled it
    unmapped, duplicated, mismatched = [], [], {}
    for key, value in branch.items():
        target = diffsynth_to_diffusers_key(key)
        if target is None or target not in targets:
            unmapped.append(key)
        elif target in source_of:
            duplicated.append(f"{source_of[target]} and {key} -> {target}")
        elif tuple(value.shape) != tuple(targets[target].shape):
            source_of[target] = key
            mismatched[target] = f"{key} {tuple(value.shape)} -> {target} {tuple(targets[target].shape)}"
        else:
            source_of[target] = key
            converted[target] = value.to(targets[target].dtype)
    missing = [k for k in targets if k not in source_of]

    problems = []
    layers, blocks = list(model.config.vace_layers), _source_block_count(branch)
    if blocks != len(layers):
        # Said first: it explains the long key lists below.
        problems.append(
            f"the source has {blocks} branch blocks, the memory transformer {len(layers)} (at DiT layers {layers}); "
            "build it with the vace_every the branch was trained with"
        )
    if unmapped:
        problems.append(
            f"{len(unmapped)} source branch keys have no counterpart in this memory branch: {_listed(unmapped)} "
            "(a DiffSynth module our WanVACETransformerBlock lacks, e.g. depth_adapter or before_proj past block 0, "
            "or a block index past the last one; such a branch cannot be imported as is)"
        )
    if duplicated:
        problems.append(f"{len(duplicated)} target keys are given twice (under two wrapper prefixes): {_listed(duplicated)}")
    if missing:
        problems.append(
            f"{len(missing)} memory-branch keys are missing from the source: {_listed(missing)} "
            "(export the whole branch: every vace_blocks.* and vace_patch_embedding.* tensor)"
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} shapes differ (source -> target): {_listed(list(mismatched.values()))} "
            "(the branch was trained for another base model, or for a control input with other channels: "
            f"ours reads vace_in_channels={model.config.vace_in_channels} = memory latents ++ hit mask)"
        )
    if problems:
        raise ValueError("the DiffSynth branch does not fit the memory transformer:\n- " + "\n- ".join(problems))
    return converted


@dataclass(frozen=True)
class BranchImport:
    """What :func:`import_diffsynth_branch` did.

    Attributes:
        out_dir: the memory_dir written (``memory_branch.safetensors`` + ``.json``).
        tensors: branch tensors imported.
        ignored: source tensors outside the branch (e.g. the base DiT), not read.
        vace_layers: DiT layers the branch blocks read at.
        dtype: dtype of the source's branch tensors (the base was loaded in it).
    """

    out_dir: Path
    tensors: int
    ignored: int
    vace_layers: list[int]
    dtype: torch.dtype


def _open_safetensors(source_file: Path):
    from safetensors import SafetensorError, safe_open

    if not source_file.is_file():
        raise FileNotFoundError(f"no branch file at {source_file}")
    if source_file.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(
            f"{source_file} is a pickle (torch.save); loading one runs whatever code it holds, so this project "
            "reads safetensors only. Convert it once, where you trust the file: "
            "python -c \"import sys, torch; from safetensors.torch import save_file; "
            "s = torch.load(sys.argv[1], map_location='cpu', weights_only=True); "
            "save_file({k: v.contiguous() for k, v in s.items()}, sys.argv[2])\" "
            f"{source_file} {source_file.with_suffix('.safetensors')}"
        )
    try:
        return safe_open(str(source_file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{source_file} is not a readable safetensors file ({error})") from error


def import_diffsynth_branch(
    source_file: str | os.PathLike,
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    vace_every: int | None = None,
) -> BranchImport:
    """Turn a DiffSynth-named branch file into a ``memory_dir`` for ``WanWorldModel``.

    Args:
        source_file: safetensors with DiffSynth branch keys (e.g. the published
            ``vace.safetensors``); other keys (a whole Wan-VACE checkpoint's base
            DiT) are counted and skipped without being read.
        checkpoint_dir: the diffusers Wan checkpoint the branch was trained on;
            its ``transformer/`` is the base (loaded with ``local_files_only``).
        out_dir: where to write; ``WanWorldModel(checkpoint_dir, memory_dir=out_dir)``
            then uses the imported branch.
        vace_every: branch spacing in DiT layers; None infers it from the number
            of source blocks (:func:`infer_vace_every`), a value is checked against it.

    Returns:
        A :class:`BranchImport` saying what was written.
    """
    from diffusers import WanTransformer3DModel

    source_file, transformer_dir = Path(source_file), Path(checkpoint_dir) / "transformer"
    config_file = transformer_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found; checkpoint_dir must be a diffusers Wan checkpoint, e.g. "
            "huggingface-cli download Wan-AI/Wan2.2-TI2V-5B-Diffusers --local-dir DIR"
        )
    with _open_safetensors(source_file) as reader:
        keys = list(reader.keys())
        branch_keys = [k for k in keys if _is_branch_key(_strip_wrappers(k))]
        # Only the branch is read: a full Wan-VACE file is mostly base DiT.
        state = {k: reader.get_tensor(k) for k in branch_keys}
    # Checked before the base is loaded (tens of GB for the real model), so a wrong
    # spacing fails in a second.
    num_layers, blocks = json.loads(config_file.read_text())["num_layers"], _source_block_count(branch_keys)
    if vace_every is None:
        vace_every = infer_vace_every(blocks, num_layers)
    elif vace_every < 1 or len(range(0, num_layers, vace_every)) != blocks:
        raise ValueError(
            f"vace_every={vace_every} does not place the source's {blocks} branch blocks on a {num_layers}-layer DiT "
            "(it must be >= 1 and give that many layers 0, vace_every, 2 * vace_every, ...); leave it out to infer it"
        )
    floating = Counter(v.dtype for v in state.values() if v.is_floating_point())
    dtype = floating.most_common(1)[0][0] if floating else torch.float32

    # Loaded in the source's dtype, so a bf16 branch neither doubles the 5B base
    # in memory nor gets saved at a precision it was never trained in.
    base = WanTransformer3DModel.from_pretrained(transformer_dir, torch_dtype=dtype, local_files_only=True)
    model = build_memory_transformer(base, vace_every=vace_every)
    del base
    converted = convert_diffsynth_branch(state, model)
    model.load_state_dict(converted, strict=False)
    out_dir = save_memory_branch(model, out_dir)
    return BranchImport(out_dir, len(converted), len(keys) - len(branch_keys), list(model.config.vace_layers), dtype)
