"""Posed clips exported from the procedural world (mirage_env.dataset)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mirage_env.backends.posed_clips import PosedClipDataset, read_camera_file
from mirage_env.dataset import TEST_SEED_OFFSET, TRAJECTORY_KINDS, ExportConfig, export_dataset, make_trajectory, revisit_pairs
from mirage_env.geometry import poses_from_rigs
from mirage_env.metrics import psnr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips") / "data"
    export_dataset(root, ExportConfig(train_clips=4, test_clips=4, batch=4), progress=False)
    return root


@pytest.mark.parametrize("kind", TRAJECTORY_KINDS)
def test_every_trajectory_returns_to_the_visit_and_looks_away_in_between(kind):
    rigs = make_trajectory(kind, np.random.default_rng(3), segment_frames=4, segments=4)
    assert rigs.shape == (16, 6) and np.isfinite(rigs).all()
    visit, away_last, back = rigs[:4], rigs[8:12], rigs[12:]
    # The return poses are visit poses, float for float.
    assert all(any(np.array_equal(b, v) for v in visit) for b in back)
    # The last away segment looks more than a field of view (90 degrees) away from every visit view.
    gap = np.abs(np.angle(np.exp(1j * (away_last[:, None, 3] - visit[None, :, 3]))))
    assert gap.min() > np.radians(100), np.degrees(gap.min())
    # Stays near the start (clear of the scene's boxes).
    assert np.abs(rigs[:, [0, 2]]).max() < 1.0


def test_unknown_kind_and_bad_config_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown trajectory kind"):
        make_trajectory("spiral", np.random.default_rng(0))
    with pytest.raises(ValueError, match="segments must be >= 3"):
        export_dataset(tmp_path / "x", ExportConfig(segments=2), progress=False)
    with pytest.raises(ValueError, match="kinds"):
        export_dataset(tmp_path / "x", ExportConfig(kinds=("spiral",)), progress=False)


def test_export_writes_realestate10k_clips_split_by_scene_seed(dataset):
    info = json.loads((dataset / "dataset.json").read_text())
    train = sorted((dataset / "train").iterdir())
    test = sorted((dataset / "test").iterdir())
    assert len(train) == 4 and len(test) == 4
    train_seeds = {json.loads((c / "clip.json").read_text())["scene_seed"] for c in train}
    test_seeds = {json.loads((c / "clip.json").read_text())["scene_seed"] for c in test}
    assert max(train_seeds) < TEST_SEED_OFFSET <= min(test_seeds), "no test scene may be trained on"
    assert info["test_seeds"][0] == TEST_SEED_OFFSET
    clip = train[1]
    track = read_camera_file(clip / "cameras.txt")
    assert len(track) == 16
    with np.load(clip / "frames.npz") as f, np.load(clip / "depth.npz") as d, np.load(clip / "masks.npz") as m:
        assert f["frames"].shape == (16, 64, 64, 3) and f["frames"].dtype == np.uint8
        assert d["depth"].shape == (16, 64, 64) and (d["depth"] > 0).all()
        assert m["moving"].shape == (16, 8, 8) and m["sky"].dtype == bool
    # The camera file holds the trajectory the clip was made from.
    kind = json.loads((clip / "clip.json").read_text())["kind"]
    rigs = make_trajectory(kind, np.random.default_rng(1), 4, 4)
    np.testing.assert_allclose(track.c2w, poses_from_rigs(rigs), atol=1e-9)
    # The trainer's dataset reads it.
    item = PosedClipDataset(dataset / "train", 16, (64, 64))[0]
    assert item["frames"].shape == (16, 64, 64, 3) and item["depth"].shape == (16, 64, 64)


def test_returns_match_the_first_visit_and_differ_from_the_away_views(dataset):
    for clip in sorted((dataset / "test").iterdir()):
        frames = np.load(clip / "frames.npz")["frames"]
        returns, visits = revisit_pairs(clip)
        assert list(returns) == [12, 13, 14, 15]
        same = np.mean([psnr(frames[r], frames[v]) for r, v in zip(returns, visits)])
        other = np.mean([psnr(frames[r], frames[a]) for r in returns for a in range(8, 12)])
        assert same > other + 5, (clip.name, same, other)


def test_export_never_overwrites_a_dataset(dataset):
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        export_dataset(dataset, ExportConfig(train_clips=1, test_clips=0), progress=False)


def test_cli_exports(tmp_path):
    from mirage_env.cli import main

    main(["dataset", "export", "--out", str(tmp_path / "d"), "--clips", "2", "--test-clips", "1", "--quiet", "--png"])
    clip = tmp_path / "d" / "train" / "clip-000001"
    assert len(list((clip / "frames").glob("*.png"))) == 16
    assert torch.as_tensor(PosedClipDataset(tmp_path / "d" / "train", 16, (64, 64))[1]["frames"]).dtype == torch.uint8


def test_a_clip_does_not_depend_on_what_was_exported_before_it(tmp_path):
    """Same scene seed, same clip, whether the batch before it held other scenes or none."""
    export_dataset(tmp_path / "a", ExportConfig(train_clips=6, test_clips=2, batch=4), progress=False)
    export_dataset(tmp_path / "b", ExportConfig(train_clips=0, test_clips=2, batch=4), progress=False)
    for i in range(2):
        a = np.load(tmp_path / "a" / "test" / f"clip-{i:06d}" / "frames.npz")["frames"]
        b = np.load(tmp_path / "b" / "test" / f"clip-{i:06d}" / "frames.npz")["frames"]
        assert np.array_equal(a, b)
