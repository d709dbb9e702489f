import json

import imageio.v3 as iio

from mirage_env.cli import main


def test_rollout_writes_a_video_and_resumes_a_saved_world(tmp_path, capsys):
    video, world = tmp_path / "out.mp4", tmp_path / "world.safetensors"
    assert main(["rollout", "--policy", "loop", "--steps", "12", "--out", str(video), "--save-world", str(world),
                 "--quiet", "--video-scale", "2"]) == 0
    frames = iio.imread(video)
    assert frames.shape == (13, 128, 128, 3)
    assert "steps/s" in capsys.readouterr().out
    gif = tmp_path / "more.gif"
    assert main(["rollout", "--policy", "orbit", "--steps", "3", "--load-world", str(world), "--out", str(gif),
                 "--quiet", "--video-scale", "1"]) == 0
    assert iio.imread(gif).shape[0] == 4


def test_rollout_reports_bad_policy_clearly(capsys):
    assert main(["rollout", "--policy", "teleport", "--steps", "1", "--out", ""]) == 2
    assert "unknown policy" in capsys.readouterr().err


def test_consistency_eval_writes_json(tmp_path):
    out = tmp_path / "consistency.json"
    assert main(["eval", "consistency", "--episodes", "1", "--side-steps", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {"psnr_memory_on", "psnr_memory_off", "ssim_memory_on", "ssim_memory_off"} <= set(results)
    assert results["psnr_memory_on"] > results["psnr_memory_off"]


def test_consistency_eval_skips_rooms_whose_walls_block_the_loop_and_names_them(tmp_path):
    out = tmp_path / "consistency.json"
    assert main(["eval", "consistency", "--episodes", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["blocked_seeds"] == [0]  # the default loop hits a wall in room 0
    assert len(results["psnr_memory_on_per_episode"]) == 2


def test_consistency_eval_says_what_to_change_when_walls_block_every_loop(capsys):
    assert main(["eval", "consistency", "--episodes", "1", "--side-steps", "40", "--image-size", "32"]) == 2
    assert "use a smaller --side-steps" in capsys.readouterr().err
