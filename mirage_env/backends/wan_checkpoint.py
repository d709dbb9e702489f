"""Where a Wan checkpoint lives and the world-model settings it carries.

A checkpoint is a diffusers-format directory (vae/, transformer/, scheduler/,
...). It may also hold ``mirage_world.json``: the settings the model was
trained with (frame size, segment length, sampler steps, memory branch and
depth model folders), so ``WanWorldModel(checkpoint)`` runs as trained without
the caller repeating them. Arguments given explicitly still win.

Checkpoints shipped inside the package are found by name, e.g.
``checkpoint="procedural-wan-mini"``. ``check_checkpoint`` says which component
files a directory lacks and how to get them (nothing is downloaded at run time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "HF_REPO",
    "SHIPPED_CHECKPOINTS",
    "WORLD_DEFAULTS_FILE",
    "CheckpointNotFoundError",
    "check_checkpoint",
    "resolve_checkpoint",
    "read_world_defaults",
    "write_world_defaults",
]

WORLD_DEFAULTS_FILE = "mirage_world.json"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
# name -> what it is, said where users pick it (README, errors).
SHIPPED_CHECKPOINTS = {
    "procedural-wan-mini": "a 64x64 Wan-architecture model (a few M parameters) trained on this "
                           "project's procedural indoor world, not Wan2.2",
}

# field -> (type check, what it must be)
_FIELDS: dict[str, tuple[Any, str]] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "image_size": (lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v),
                   "[height, width] positive integers"),
    "frames_per_segment": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "num_inference_steps": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "context_frames": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "flow_shift": (lambda v: isinstance(v, (int, float)) and v > 0, "a positive number"),
    "fov_degrees": (lambda v: isinstance(v, (int, float)) and 0 < v < 180, "a number in (0, 180)"),
    "voxel_size": (lambda v: isinstance(v, (int, float)) and v > 0, "a positive number"),
    "memory_dir": (lambda v: v is None or isinstance(v, str), "a folder name inside the checkpoint, or null"),
    "depth_estimator": (lambda v: v is None or isinstance(v, str), "a folder name inside the checkpoint, or null"),
    "text_encoder": (lambda v: isinstance(v, bool), "true or false"),
    "max_sequence_length": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "training": (lambda v: isinstance(v, dict), "an object"),
}


HF_REPO = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"

# What each component folder must hold to be loadable (any one of the alternatives).
_COMPONENT_FILES = {
    "vae": (["config.json"], ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"]),
    "transformer": (["config.json"], ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"]),
    "scheduler": (["scheduler_config.json"], None),
    "text_encoder": (["config.json"], ["model.safetensors", "model.safetensors.index.json"]),
    "tokenizer": (["tokenizer_config.json"], ["tokenizer.json", "spiece.model"]),
}


class CheckpointNotFoundError(FileNotFoundError):
    """A Wan checkpoint directory is missing or lacks components."""


def check_checkpoint(directory: str | os.PathLike, components=("vae", "transformer", "scheduler", "text_encoder", "tokenizer")) -> Path:
    """Raise CheckpointNotFoundError listing every missing file of ``components``."""
    directory = Path(directory)
    how = (
        f"Get the weights on a machine with internet access with\n"
        f"    huggingface-cli download {HF_REPO} --local-dir {directory}\n"
        f"and copy the directory here (nothing is downloaded at run time)."
    )
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"Wan checkpoint directory {directory} does not exist.\n{how}")
    missing = []
    for name in components:
        required, any_of = _COMPONENT_FILES[name]
        if name == "vae" and _vae_class_name(directory) == "PatchDCTAutoencoder":
            any_of = None  # a fixed transform: its config is the whole model
        folder = directory / name
        for file in required:
            if not (folder / file).is_file():
                missing.append(f"{name}/{file}")
        if any_of and not any((folder / f).is_file() for f in any_of):
            missing.append(f"{name}/{' or '.join(any_of)}")
    if missing:
        raise CheckpointNotFoundError(
            f"Wan checkpoint {directory} is incomplete; missing: {', '.join(missing)}.\n{how}"
        )
    return directory


def _vae_class_name(directory: Path) -> str | None:
    try:
        return json.loads((Path(directory) / "vae" / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """A directory as given, or the shipped checkpoint of that name."""
    path = Path(checkpoint)
    if not path.exists() and str(checkpoint) in SHIPPED_CHECKPOINTS:
        shipped = SHIPPED_DIR / str(checkpoint)
        if not (shipped / WORLD_DEFAULTS_FILE).is_file():
            raise FileNotFoundError(
                f"the shipped checkpoint {checkpoint!r} is not in this installation ({shipped}); "
                f"reinstall mirage-env, or remake it with: python benchmarks/learned_memory.py --out {shipped}"
            )
        return shipped
    return path


def read_world_defaults(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``mirage_world.json``, validated field by field ({} if absent).

    Folder fields (``memory_dir``, ``depth_estimator``) come back as absolute paths.
    """
    directory = Path(directory)
    path = directory / WORLD_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it from the checkpoint's source") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{path} has unknown fields {unknown}; known: {sorted(_FIELDS)}")
    for key, value in data.items():
        check, what = _FIELDS[key]
        if not check(value):
            raise ValueError(f"{path}: {key} must be {what}, got {value!r}")
    for key in ("memory_dir", "depth_estimator"):
        if data.get(key):
            folder = (directory / data[key]).resolve()
            if directory.resolve() not in folder.parents:
                raise ValueError(f"{path}: {key} must name a folder inside the checkpoint, got {data[key]!r}")
            if not folder.is_dir():
                raise FileNotFoundError(f"{path} names {key}={data[key]!r}, but {folder} does not exist")
            data[key] = str(folder)
    return data


def write_world_defaults(directory: str | os.PathLike, **settings: Any) -> Path:
    """Write ``mirage_world.json`` (validated by reading it back)."""
    path = Path(directory) / WORLD_DEFAULTS_FILE
    path.write_text(json.dumps(settings, indent=2) + "\n")
    read_world_defaults(directory)
    return path
