"""Importing a DiffSynth-named memory branch (the published system's) into our diffusers one.

The DiffSynth side is written out by hand here, from the published
``VaceWanAttentionBlock(DiTBlock)`` (microsoft/LatentSpatialMemory,
src/mirage/spatia/wan_video_{vace,dit}.py), not derived from the importer's
table, so a wrong rename fails these tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from safetensors.torch import save_file  # noqa: E402

from mirage_env.backends.tiny import build_tiny_checkpoint  # noqa: E402

# One branch block: DiffSynth name -> this project's diffusers name (shapes are equal).
DIFFSYNTH_BLOCK = {
    "modulation": "scale_shift_table",  # (1, 6, dim)
    "self_attn.q.weight": "attn1.to_q.weight",
    "self_attn.q.bias": "attn1.to_q.bias",
    "self_attn.k.weight": "attn1.to_k.weight",
    "self_attn.k.bias": "attn1.to_k.bias",
    "self_attn.v.weight": "attn1.to_v.weight",
    "self_attn.v.bias": "attn1.to_v.bias",
    "self_attn.o.weight": "attn1.to_out.0.weight",
    "self_attn.o.bias": "attn1.to_out.0.bias",
    "self_attn.norm_q.weight": "attn1.norm_q.weight",
    "self_attn.norm_k.weight": "attn1.norm_k.weight",
    "cross_attn.q.weight": "attn2.to_q.weight",
    "cross_attn.q.bias": "attn2.to_q.bias",
    "cross_attn.k.weight": "attn2.to_k.weight",
    "cross_attn.k.bias": "attn2.to_k.bias",
    "cross_attn.v.weight": "attn2.to_v.weight",
    "cross_attn.v.bias": "attn2.to_v.bias",
    "cross_attn.o.weight": "attn2.to_out.0.weight",
    "cross_attn.o.bias": "attn2.to_out.0.bias",
    "cross_attn.norm_q.weight": "attn2.norm_q.weight",
    "cross_attn.norm_k.weight": "attn2.norm_k.weight",
    "norm3.weight": "norm2.weight",  # the cross-attention norm: norm3 in Wan/DiffSynth, norm2 in diffusers
    "norm3.bias": "norm2.bias",
    "ffn.0.weight": "ffn.net.0.proj.weight",
    "ffn.0.bias": "ffn.net.0.proj.bias",
    "ffn.2.weight": "ffn.net.2.weight",
    "ffn.2.bias": "ffn.net.2.bias",
    "after_proj.weight": "proj_out.weight",
    "after_proj.bias": "proj_out.bias",
}
DIFFSYNTH_FIRST_BLOCK_ONLY = {"before_proj.weight": "proj_in.weight", "before_proj.bias": "proj_in.bias"}
DIFFSYNTH_PATCH_EMBEDDING = {"vace_patch_embedding.weight": "vace_patch_embedding.weight",
                             "vace_patch_embedding.bias": "vace_patch_embedding.bias"}
DIM, FFN_DIM, CHANNELS = 24, 32, 16  # the tiny DiT's width, FFN width and latent channels


def diffsynth_names(num_blocks: int) -> dict[str, str]:
    """Every DiffSynth branch key -> our key, for ``num_blocks`` branch blocks."""
    names = dict(DIFFSYNTH_PATCH_EMBEDDING)
    for n in range(num_blocks):
        block = {**DIFFSYNTH_BLOCK, **(DIFFSYNTH_FIRST_BLOCK_ONLY if n == 0 else {})}
        names.update({f"vace_blocks.{n}.{ds}": f"vace_blocks.{n}.{ours}" for ds, ours in block.items()})
    return names


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("wan") / "ckpt", z_dim=CHANNELS, num_layers=4,
                                 text_encoder=False, tokenizer=False)


@pytest.fixture(scope="module")
def base(checkpoint):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(checkpoint / "transformer").eval()


@pytest.fixture(scope="module")
def trained(base):
    """A memory transformer whose branch has random non-zero weights (stands in for a trained one)."""
    from mirage_env.backends.wan_memory import branch_parameters, build_memory_transformer

    torch.manual_seed(1)
    model = build_memory_transformer(base, vace_every=2).eval()
    with torch.no_grad():
        for parameter in branch_parameters(model):
            parameter.normal_(std=0.1)
    return model


@pytest.fixture(scope="module")
def diffsynth_state(trained) -> dict[str, torch.Tensor]:
    """The trained branch under its published DiffSynth names."""
    from mirage_env.backends.wan_memory import branch_state_dict

    ours = branch_state_dict(trained)
    return {ds: ours[key].clone() for ds, key in diffsynth_names(len(trained.vace_blocks)).items()}


def _inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, CHANNELS, 3, 4, 4, generator=generator)
    text = torch.randn(1, 8, 32, generator=generator)
    control = torch.randn(1, 2 * CHANNELS, 3, 4, 4, generator=generator)
    return x, torch.tensor([500.0]), text, control


def test_published_names_and_shapes_cover_every_branch_key_with_equal_values(base, trained, diffsynth_state):
    from mirage_env.backends.wan_import import convert_diffsynth_branch
    from mirage_env.backends.wan_memory import branch_state_dict, build_memory_transformer

    # The published shapes: Conv3d patch embedding, modulation (1, 6, dim), Linear (out, in).
    assert diffsynth_state["vace_patch_embedding.weight"].shape == (DIM, 2 * CHANNELS, 1, 2, 2)
    assert diffsynth_state["vace_blocks.1.modulation"].shape == (1, 6, DIM)
    assert diffsynth_state["vace_blocks.0.before_proj.weight"].shape == (DIM, DIM)
    assert "vace_blocks.1.before_proj.weight" not in diffsynth_state  # block 0 only
    assert diffsynth_state["vace_blocks.1.ffn.0.weight"].shape == (FFN_DIM, DIM)
    assert diffsynth_state["vace_blocks.1.norm3.weight"].shape == (DIM,)

    fresh = build_memory_transformer(base, vace_every=2).eval()
    converted = convert_diffsynth_branch(diffsynth_state, fresh)
    expected = branch_state_dict(trained)
    assert set(converted) == set(branch_state_dict(fresh)) == set(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)

    x, t, text, control = _inputs()
    with torch.no_grad():
        untrained = fresh(x, t, text, control_hidden_states=control).sample
        assert torch.equal(untrained, base(x, t, text).sample)  # a zero branch is a no-op ...
        fresh.load_state_dict(converted, strict=False)
        imported = fresh(x, t, text, control_hidden_states=control).sample
    assert not torch.allclose(imported, untrained)  # ... the imported one is not,
    with torch.no_grad():
        assert torch.equal(imported, trained(x, t, text, control_hidden_states=control).sample)  # and it is the trained one


def _diffsynth_block_reference(w: dict[str, torch.Tensor], c, x, context, t_mod, heads: int, first: bool):
    """One DiffSynth VaceWanAttentionBlock forward, written from the published code (RoPE left out).

    c, x: (batch, tokens, dim); context: (batch, text_tokens, dim); t_mod: (batch, 6, dim).
    Returns (hint, c), each (batch, tokens, dim).
    """
    F = torch.nn.functional
    dim = c.shape[-1]

    def attention(prefix, queries, keys_values):
        rms = lambda y, weight: y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * weight  # noqa: E731
        q = rms(F.linear(queries, w[f"{prefix}.q.weight"], w[f"{prefix}.q.bias"]), w[f"{prefix}.norm_q.weight"])
        k = rms(F.linear(keys_values, w[f"{prefix}.k.weight"], w[f"{prefix}.k.bias"]), w[f"{prefix}.norm_k.weight"])
        v = F.linear(keys_values, w[f"{prefix}.v.weight"], w[f"{prefix}.v.bias"])
        split = lambda y: y.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
        return F.linear(out, w[f"{prefix}.o.weight"], w[f"{prefix}.o.bias"])

    if first:
        c = F.linear(c, w["before_proj.weight"], w["before_proj.bias"]) + x
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (w["modulation"] + t_mod).chunk(6, dim=1)
    h = F.layer_norm(c, (dim,), eps=1e-6) * (1 + scale_msa) + shift_msa  # norm1: no affine
    c = c + gate_msa * attention("self_attn", h, h)
    c = c + attention("cross_attn", F.layer_norm(c, (dim,), w["norm3.weight"], w["norm3.bias"], eps=1e-6), context)
    h = F.layer_norm(c, (dim,), eps=1e-6) * (1 + scale_mlp) + shift_mlp  # norm2: no affine
    hidden = F.gelu(F.linear(h, w["ffn.0.weight"], w["ffn.0.bias"]), approximate="tanh")
    ffn = F.linear(hidden, w["ffn.2.weight"], w["ffn.2.bias"])
    c = c + gate_mlp * ffn
    return F.linear(c, w["after_proj.weight"], w["after_proj.bias"]), c


def test_a_diffsynth_block_computes_what_its_converted_diffusers_block_computes(base, diffsynth_state):
    from mirage_env.backends.wan_import import convert_diffsynth_branch
    from mirage_env.backends.wan_memory import build_memory_transformer

    model = build_memory_transformer(base, vace_every=2).eval()
    model.load_state_dict(convert_diffsynth_branch(diffsynth_state, model), strict=False)
    generator = torch.Generator().manual_seed(3)
    c, x = torch.randn(2, 10, DIM, generator=generator), torch.randn(2, 10, DIM, generator=generator)
    context, t_mod = torch.randn(2, 5, DIM, generator=generator), torch.randn(2, 6, DIM, generator=generator)
    head_dim = DIM // model.config.num_attention_heads
    no_rope = (torch.ones(1, 10, 1, head_dim), torch.zeros(1, 10, 1, head_dim))  # cos = 1, sin = 0
    for n, block in enumerate(model.vace_blocks):
        weights = {k.split(".", 2)[2]: v for k, v in diffsynth_state.items() if k.startswith(f"vace_blocks.{n}.")}
        with torch.no_grad():
            hint, control = block(x, context, c, t_mod, no_rope)
        heads = model.config.num_attention_heads
        ref_hint, ref_control = _diffsynth_block_reference(weights, c, x, context, t_mod, heads, first=n == 0)
        assert torch.allclose(control, ref_control, atol=1e-5), n
        assert torch.allclose(hint, ref_hint, atol=1e-5), n


def test_wrapper_prefixes_are_stripped_and_base_dit_keys_ignored(base, trained, diffsynth_state):
    from mirage_env.backends.wan_import import convert_diffsynth_branch
    from mirage_env.backends.wan_memory import branch_state_dict, build_memory_transformer

    # As DiffSynth's trainer and accelerate/FSDP save them, beside a whole Wan-VACE file's base DiT.
    wrapped = {f"module.pipe.vace.{k}": v for k, v in diffsynth_state.items()}
    wrapped["blocks.0.self_attn.q.weight"] = torch.zeros(DIM, DIM)
    wrapped["head.modulation"] = torch.zeros(1, 2, DIM)
    converted = convert_diffsynth_branch(wrapped, build_memory_transformer(base, vace_every=2))
    expected = branch_state_dict(trained)
    assert set(converted) == set(expected) and all(torch.equal(converted[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.pop("vace_blocks.1.cross_attn.o.bias"), "vace_blocks.1.attn2.to_out.0.bias"),
        (lambda s: s.pop("vace_blocks.0.before_proj.weight"), "vace_blocks.0.proj_in.weight"),
        (lambda s: s.__setitem__("vace_patch_embedding.weight", torch.zeros(DIM, 96, 1, 2, 2)),
         "vace_patch_embedding.weight (24, 96, 1, 2, 2)"),
        (lambda s: s.__setitem__("vace_blocks.0.modulation", torch.zeros(6, DIM)), "vace_blocks.0.modulation (6, 24)"),
        (lambda s: s.__setitem__("vace_blocks.1.before_proj.weight", torch.zeros(DIM, DIM)),
         "vace_blocks.1.before_proj.weight"),
        (lambda s: s.__setitem__("vace_blocks.0.norm2.weight", torch.zeros(DIM)), "vace_blocks.0.norm2.weight"),
        (lambda s: s.__setitem__("vace_blocks.2.modulation", torch.zeros(1, 6, DIM)), "vace_blocks.2.modulation"),
        (lambda s: s.__setitem__("vace.depth_adapter.0.weight", torch.zeros(64, 16, 3, 3, 3)), "vace.depth_adapter.0.weight"),
    ],
    ids=["missing", "missing-before-proj", "patch-channels", "modulation-shape", "before-proj-past-block-0",
         "affine-ffn-norm", "extra-block", "depth-adapter"],
)
def test_a_missing_misshapen_or_unknown_key_is_named(base, diffsynth_state, change, named):
    from mirage_env.backends.wan_import import convert_diffsynth_branch
    from mirage_env.backends.wan_memory import build_memory_transformer

    state = dict(diffsynth_state)
    change(state)
    with pytest.raises(ValueError, match="does not fit") as error:
        convert_diffsynth_branch(state, build_memory_transformer(base, vace_every=2))
    assert named in str(error.value)


def test_branch_spacing_is_inferred_as_the_published_system_places_it():
    from mirage_env.backends.wan_import import infer_vace_every

    assert infer_vace_every(15, 30) == 2  # Wan2.2-TI2V-5B
    assert infer_vace_every(8, 40) == 5  # 14B
    assert infer_vace_every(2, 4) == 2  # the tiny DiT (3 would also give 2 blocks; 2 spreads them evenly)
    assert infer_vace_every(4, 4) == 1
    with pytest.raises(ValueError, match="vace_every=\\[3, 4\\]"):
        infer_vace_every(2, 5)
    with pytest.raises(ValueError, match="at most 4"):
        infer_vace_every(5, 4)


def test_cli_imports_a_published_file_into_a_memory_dir_the_world_model_uses(
    tmp_path, checkpoint, base, trained, diffsynth_state, capsys
):
    from mirage_env.backends.depth import ConstantDepth
    from mirage_env.backends.wan import WanWorldModel
    from mirage_env.backends.wan_memory import BRANCH_CONFIG, BRANCH_WEIGHTS, branch_state_dict, load_memory_branch
    from mirage_env.cli import main

    # In bf16, as the published exporter writes it, next to two base-DiT tensors.
    source = tmp_path / "vace.safetensors"
    published = {k: v.to(torch.bfloat16) for k, v in diffsynth_state.items()}
    base_dit = {"blocks.0.self_attn.q.weight": torch.zeros(DIM, DIM), "patch_embedding.bias": torch.zeros(DIM)}
    save_file({**published, **base_dit}, source)
    out = tmp_path / "memory"
    assert main(["import-branch", str(source), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"imported {len(published)} branch tensors" in said and "skipped 2 non-branch" in said and "[0, 2]" in said
    assert (out / BRANCH_WEIGHTS).is_file() and (out / BRANCH_CONFIG).is_file()

    loaded = branch_state_dict(load_memory_branch(base, out))
    expected = branch_state_dict(trained)
    assert set(loaded) == set(expected)
    # bf16 -> the base's fp32 is exact, so the values are the bf16-rounded trained ones.
    assert all(torch.equal(loaded[k], expected[k].to(torch.bfloat16).to(loaded[k].dtype)) for k in expected)
    world = WanWorldModel(checkpoint, memory_dir=out, image_size=(64, 64), frames_per_segment=5,
                          tokenizer=None, text_encoder=None, max_sequence_length=8, depth_estimator=ConstantDepth())
    used = branch_state_dict(world.transformer)
    assert all(torch.equal(used[k].float(), loaded[k].float()) for k in expected)


def test_cli_refuses_pickles_and_a_wrong_spacing_before_loading_anything(tmp_path, checkpoint, diffsynth_state, capsys):
    from mirage_env.cli import main

    pickle = tmp_path / "vace.pt"
    pickle.write_bytes(b"not read")
    assert main(["import-branch", str(pickle), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m")]) == 2
    error = capsys.readouterr().err
    assert "pickle" in error and "safetensors" in error and "weights_only=True" in error

    source = tmp_path / "vace.safetensors"
    save_file(diffsynth_state, source)
    assert main(["import-branch", str(source), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m"),
                 "--vace-every", "1"]) == 2
    assert "vace_every=1 does not place the source's 2 branch blocks" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
