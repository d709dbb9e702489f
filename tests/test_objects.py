"""The object layer: moving things remembered in their own frame, predicted, forgotten, saved."""

import math

import numpy as np
import pytest
import torch

from mirage_env.geometry import Camera
from mirage_env.memory import LatentSpatialMemory, MemoryFileError, MemoryRead
from mirage_env.memory.objects import ObjectLayer, _likeness

CHANNELS = 4
CAMERA = Camera.from_fov(32, 32, 90.0)  # a latent grid of 32 x 32
WALL = 6.0
OBJECT_Z = 3.0
HALF = 0.3
LOOK = torch.tensor([1.0, -2.0, 0.5, 3.0])  # the object's latent, unlike the wall's
WALL_LOOK = torch.tensor([0.2, 0.2, 0.2, 0.2])


def facing(yaw_degrees: float = 0.0) -> torch.Tensor:
    """A camera at the origin, turned ``yaw_degrees`` about the vertical (0: looking along +z)."""
    a = math.radians(yaw_degrees)
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]],
                                dtype=torch.float64)
    return pose


def frame(x: float | None, yaw: float = 0.0):
    """One latent frame of a wall at z=6 with, if ``x`` is given, a square object centred at (x, 0, 3).

    Returns latents (1, 1, C, h, w), depth (1, 1, h, w), poses (1, 1, 4, 4) and the object's pixels.
    """
    h, w = CAMERA.height, CAMERA.width
    v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    rx, ry = (u - CAMERA.cx) / CAMERA.fx, (v - CAMERA.cy) / CAMERA.fy
    depth = torch.full((h, w), WALL)
    hit = torch.zeros(h, w, dtype=torch.bool)
    if x is not None and yaw == 0.0:
        hit = ((rx * OBJECT_Z - x).abs() <= HALF) & ((ry * OBJECT_Z).abs() <= HALF)
        depth[hit] = OBJECT_Z
    latents = torch.where(hit, LOOK[:, None, None], WALL_LOOK[:, None, None])
    return latents[None, None], depth[None, None], facing(yaw)[None, None], hit


def static_read() -> MemoryRead:
    """What a static memory holding the wall predicts for one frame."""
    h, w = CAMERA.height, CAMERA.width
    return MemoryRead(latents=WALL_LOOK[None, None, :, None, None].expand(1, 1, CHANNELS, h, w).clone(),
                      mask=torch.ones(1, 1, h, w, dtype=torch.bool), depth=torch.full((1, 1, h, w), WALL))


def see(layer: ObjectLayer, x: float | None, yaw: float = 0.0) -> None:
    """One frame through the layer, its object pixels rejected by the write filters (as the World does)."""
    latents, depth, poses, hit = frame(x, yaw)
    layer.observe(latents, depth, CAMERA, poses, hit[None, None], [0], predicted_depth=torch.full_like(depth, WALL))


def shown_at(layer: ObjectLayer, x: float) -> tuple[torch.Tensor, MemoryRead]:
    """The layer's read for the next frame (looking along +z), and where an object at ``x`` would be."""
    read = layer.compose(static_read(), CAMERA, facing()[None, None])
    return frame(x)[3], read


def new_layer(**options) -> ObjectLayer:
    return ObjectLayer(CHANNELS, 1, voxel_size=0.05, **options)


def test_an_object_seen_left_and_returned_to_is_shown_at_its_predicted_place_with_its_own_latents():
    layer = new_layer()
    speed = 0.1  # metres per frame, along x
    for t in range(5):
        see(layer, -1.0 + speed * t)
    for _ in range(3):  # the camera looks away: the object is out of view, so nothing says it left
        see(layer, None, yaw=180.0)
    assert layer.count() == 1 and not bool(layer.lost.any())
    where, read = shown_at(layer, -1.0 + speed * 8)  # frame 8, predicted by constant velocity
    object_pixels = read.depth[0, 0] < WALL - 1
    assert object_pixels.any()
    # Shown where the object now is (within a latent pixel at its edge), nowhere else.
    overlap = (object_pixels & where).sum() / object_pixels.sum()
    assert float(overlap) > 0.8
    assert (read.depth[0, 0][object_pixels] - OBJECT_Z).abs().max() < 0.05
    shown = read.latents[0, 0].movedim(0, -1)[object_pixels]
    assert torch.allclose(shown, LOOK.expand_as(shown), atol=1e-2)  # its own latents, not the wall's
    assert bool(read.mask[0, 0].all())  # the static read is kept where no object is
    assert torch.equal(read.latents[0, 0].movedim(0, -1)[~object_pixels],
                       WALL_LOOK.expand(int((~object_pixels).sum()), CHANNELS))
    centre = layer.last_shown["centre"][0, 0][layer.last_shown["pixels"][0, 0] > 0]
    assert centre.shape[0] == 1
    assert abs(float(centre[0, 0]) - (-1.0 + speed * 8)) < 0.1


def test_an_object_that_stopped_is_not_shown_where_constant_velocity_would_put_it():
    layer = new_layer()
    for t in range(5):
        see(layer, -1.0 + 0.1 * t)
    for _ in range(4):  # it stopped at x = -0.7 and the camera sees it stand there
        see(layer, -0.7)
    for _ in range(2):
        see(layer, None, yaw=180.0)
    extrapolated, read = shown_at(layer, -1.0 + 0.1 * 11)
    object_pixels = read.depth[0, 0] < WALL - 1
    assert not bool((object_pixels & extrapolated & ~frame(-0.7)[3]).any())


def test_an_object_whose_place_is_seen_empty_is_not_shown_there():
    layer = new_layer()
    for t in range(5):
        see(layer, -1.0 + 0.1 * t)
    see(layer, None)  # it changed course out of sight: its predicted place shows the wall
    assert bool(layer.lost.any())
    _, read = shown_at(layer, -1.0 + 0.1 * 6)
    assert not bool((read.depth[0, 0] < WALL - 1).any())


def test_an_uncertain_object_is_not_shown():
    layer = new_layer(max_uncertainty=0.1)
    for t in range(3):
        see(layer, -1.0 + 0.1 * t)
    for _ in range(40):  # long unseen: the acceleration the model cannot see makes it too uncertain
        see(layer, None, yaw=180.0)
    assert layer.count() == 1
    _, read = shown_at(layer, -1.0 + 0.1 * 43)
    assert not bool((read.depth[0, 0] < WALL - 1).any())


def test_a_static_group_the_filters_doubted_is_never_shown():
    layer = new_layer()
    for _ in range(6):
        see(layer, 0.2)
    _, read = shown_at(layer, 0.2)
    assert layer.count() == 1 and not bool(layer.moved.any())
    assert not bool((read.depth[0, 0] < WALL - 1).any())


FRESH = torch.tensor([-1.0, 2.0, 0.5, -3.0])  # a look the generator made up, unlike LOOK


def see_animated(layer: ObjectLayer, x: float | None, yaw: float = 0.0) -> None:
    """One frame through the layer with the world model's motion mask flagging the object's pixels."""
    latents, depth, poses, hit = frame(x, yaw)
    layer.observe(latents, depth, CAMERA, poses, hit[None, None], [0], predicted_depth=torch.full_like(depth, WALL),
                  animated=hit[None, None])


def generated_back(x: float, look: torch.Tensor = FRESH):
    """A generated frame with the object at ``x`` in ``look``: latents, depth, poses, the model's motion mask."""
    latents, depth, poses, hit = frame(x)
    latents = torch.where(hit, look[:, None, None], latents[0, 0])[None, None]
    return latents, depth, poses, hit


def recall_at(layer: ObjectLayer, x: float, look: torch.Tensor = FRESH):
    latents, depth, poses, hit = generated_back(x, look)
    shown = layer.compose(static_read(), CAMERA, poses)
    again = layer.recall(shown, latents, depth, hit[None, None], CAMERA, poses, [0],
                         predicted_depth=torch.full_like(depth, WALL))
    return again, hit


def test_the_models_motion_mask_makes_an_object_moving_at_once():
    layer = new_layer()
    see_animated(layer, -0.5)
    assert layer.count() == 1 and bool(layer.moved.any())  # no track needed: the generator says it moves
    plain = new_layer()
    see(plain, -0.5)
    assert plain.count() == 1 and not bool(plain.moved.any())


def test_an_object_back_after_too_long_to_predict_is_refound_where_the_generator_put_it():
    layer = new_layer()
    for t in range(3):
        see_animated(layer, -0.8 + 0.1 * t)
    for _ in range(40):  # away for long: constant velocity can no longer place it
        see(layer, None, yaw=180.0)
    _, read = shown_at(layer, 0.6)
    assert not bool((read.depth[0, 0] < WALL - 1).any())  # compose does not show it
    again, hit = recall_at(layer, 0.6)  # the generator drew it back 1.2 m away, in a new look
    assert again is not None
    # Its own latents on exactly the pixels the generator animated, at the depth it gave them.
    assert torch.equal(again.mask[0, 0], torch.ones_like(hit))
    shown = again.latents[0, 0].movedim(0, -1)[hit]
    assert torch.allclose(shown, LOOK.expand_as(shown), atol=1e-2)
    assert torch.equal(again.depth[0, 0][hit], torch.full((int(hit.sum()),), OBJECT_Z))
    assert torch.equal(again.latents[0, 0].movedim(0, -1)[~hit], WALL_LOOK.expand(int((~hit).sum()), CHANNELS))
    centre = layer.last_shown["centre"][0, 0][layer.last_shown["pixels"][0, 0] > 0]
    assert centre.shape[0] == 1 and abs(float(centre[0, 0]) - 0.6) < 0.1


def test_recall_leaves_alone_what_already_looks_like_itself_is_too_far_or_was_in_view():
    def away_layer(**options):
        layer = new_layer(**options)
        for t in range(3):
            see_animated(layer, -0.8 + 0.1 * t)
        for _ in range(40):
            see(layer, None, yaw=180.0)
        return layer

    assert recall_at(away_layer(), 0.6, look=LOOK)[0] is None  # the generator kept its look
    assert recall_at(away_layer(reacquire_radius=1.0), 0.6)[0] is None  # farther than it could be found
    layer = away_layer()
    see_animated(layer, 0.6)  # seen in the last frame: the generator carries its look on from its context
    assert recall_at(layer, 0.6)[0] is None


def test_object_memory_stays_bounded_over_a_long_episode():
    layer = new_layer(max_objects=4, forget_after=20)
    bytes_before = layer.nbytes()
    generator = torch.Generator().manual_seed(0)
    for t in range(300):
        # A new thing somewhere every frame, each seen once; and the camera sometimes looks away.
        x = float(torch.rand(1, generator=generator)) * 3 - 1.5
        see(layer, x if t % 7 else None, yaw=0.0)
        assert layer.count() <= 4
        assert int(layer.entry_count.max()) <= layer.max_entries
    assert layer.nbytes() == bytes_before
    for _ in range(21):
        see(layer, None, yaw=180.0)
    assert layer.count() == 0  # forgotten after forget_after frames unseen


def test_a_memory_counts_its_objects_in_stats_and_bytes():
    with_layer = LatentSpatialMemory(CHANNELS, objects=True)
    without = LatentSpatialMemory(CHANNELS)
    assert without.objects is None and without.stats()["objects"] is None
    assert with_layer.stats()["bytes"] == without.stats()["bytes"] + with_layer.objects.nbytes()
    see(with_layer.objects, 0.0)
    assert with_layer.stats()["objects"] == 1 and with_layer.stats()["object_entries"] > 0


def _world_with_objects():
    from mirage_env.env import MirageEnv

    env = MirageEnv(max_episode_steps=None, memory_options={"objects": True})
    env.reset(seed=5)
    for move in [1, 1, 3, 3, 3, 1, 2, 2, 4, 4, 4, 4, 0, 0]:  # the crate moves past remembered walls
        env.step(move)
    return env


def test_save_and_resume_of_a_world_with_objects_is_bit_exact(tmp_path):
    env = _world_with_objects()
    layer = env.world.memory.objects
    assert layer.count() > 0
    path = tmp_path / "world.safetensors"
    env.save_world(path)
    from mirage_env.env import MirageEnv

    resumed = MirageEnv(max_episode_steps=None, memory_options={"objects": True})
    resumed.reset(seed=99)
    resumed.load_world(path)
    for name, tensor in layer.state_tensors("").items():
        assert torch.equal(tensor, resumed.world.memory.objects.state_tensors("")[name]), name
    for move in [3, 3, 1, 4, 4]:
        a, *_ = env.step(move)
        b, *_ = resumed.step(move)
        assert np.array_equal(a["rgb"], b["rgb"])
    for name, tensor in layer.state_tensors("").items():
        assert torch.equal(tensor, resumed.world.memory.objects.state_tensors("")[name]), name


def test_a_saved_object_layer_is_validated_and_a_refused_one_changes_nothing():
    memory = LatentSpatialMemory(CHANNELS, objects=True)
    see(memory.objects, 0.0)
    tensors = memory.state_tensors(copy=True)
    config = memory.config()
    assert LatentSpatialMemory.from_state(config, tensors).objects.count() == 1
    bad = dict(tensors)
    bad["memory.objects.track_len"] = torch.zeros_like(tensors["memory.objects.track_len"])
    with pytest.raises(MemoryFileError, match="objects.track_len"):
        LatentSpatialMemory.from_state(config, bad)
    bad = dict(tensors)
    bad["memory.objects.entry_points"] = tensors["memory.objects.entry_points"][:, :, :3]
    with pytest.raises(MemoryFileError, match="objects.entry_points"):
        LatentSpatialMemory.from_state(config, bad)
    with pytest.raises(MemoryFileError, match="config.objects"):
        LatentSpatialMemory.from_state({**config, "objects": {"max_entries": 10**9}}, tensors)
    with pytest.raises(MemoryFileError, match="objects"):
        LatentSpatialMemory.from_state({**config, "objects": False}, tensors)
    assert memory.objects.count() == 1  # the memory the state came from is untouched


def test_a_new_look_in_near_colours_does_not_pass_for_the_remembered_one():
    from mirage_env.backends.codec import PatchDCTCodec

    codec = PatchDCTCodec()
    latent = lambda rgb: codec.encode(torch.tensor(rgb)[:, None, None].expand(3, 8, 8).contiguous())[:, 0, 0]  # noqa: E731
    remembered, new = latent((0.6, 0.45, 0.3)), latent((0.45, 0.5, 0.4))
    # Their cosine cannot tell them apart (the per-colour means dominate); recall's likeness can.
    assert torch.nn.functional.cosine_similarity(remembered, new, dim=0) > 0.95
    assert _likeness(new[None], remembered[None]) < 0.8
    assert _likeness((remembered * 1.02)[None], remembered[None]) > 0.95  # the kept look, a little off
