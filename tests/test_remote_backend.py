"""A served world model (``backend="remote"``) makes exactly the worlds a local one makes.

These run without Ray: the server is in this process (``serve_in_process`` /
``LocalTransport``, every call and reply pickled as Ray would). ``test_rllib.py``
repeats the key checks through a Ray actor.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mirage_env.backends.model_server import ModelServer
from mirage_env.backends.procedural import ProceduralWorldModel
from mirage_env.backends.remote import (LocalTransport, ModelCall, RemoteWorldModel, serve_in_process,
                                        stop_serving_in_process)
from mirage_env.env import MirageEnv
from mirage_env.multi_agent import MirageParallelEnv
from mirage_env.vector import MirageVectorEnv

SIZE = 32


@pytest.fixture
def served():
    """A procedural model served in this process as "rooms"; yields its transport (stats on ``.server``)."""
    transport = serve_in_process("rooms", ProceduralWorldModel(image_size=(SIZE, SIZE)))
    yield transport
    stop_serving_in_process("rooms")


def env_pair(**options):
    local = MirageEnv(image_size=SIZE, **options)
    remote = MirageEnv(image_size=SIZE, backend="remote", checkpoint="rooms", **options)
    return local, remote


def assert_same(a, b, where=""):
    if isinstance(a, (tuple, list)) and not isinstance(a[0] if a else None, np.ndarray):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


def test_a_served_world_gives_the_local_worlds_frames_rewards_and_infos_bit_for_bit(served):
    local, remote = env_pair(task="pointnav", max_episode_steps=12, observations=("rgb", "pose", "depth", "latent"))
    actions = np.random.default_rng(3).integers(0, 9, size=40)
    for env in (local, remote):
        env.trace = [env.reset(seed=5)]
        for action in actions:  # several episodes: the autoreset worlds are drawn from the env's generator
            step = env.step(int(action))
            env.trace.append(step)
            if step[2] or step[3]:
                env.trace.append(env.reset())
    assert len(local.trace) == len(remote.trace) > 40
    for i, (a, b) in enumerate(zip(local.trace, remote.trace)):
        for part_a, part_b in zip(a, b):
            assert_same(part_a, part_b, f"step {i}")
    # The collision checks ran on the served model's geometry (rebuilt beside the client from its
    # config and the client's rows), not on a depth fallback, and needed no call to the server.
    assert "blocked" in vars(remote.world.model)
    assert served.server.stats["blocked"]["model_calls"] == 0
    assert served.server.stats["generate"]["model_calls"] == 40


def test_a_served_world_saved_and_resumed_continues_bit_for_bit(served, tmp_path):
    local, remote = env_pair(task="explore")
    actions = [1, 1, 5, 1, 6, 1, 1, 2, 5, 5, 1, 1]
    for env in (local, remote):
        env.reset(seed=11)
        for action in actions[:6]:
            env.step(action)
    remote.save_world(tmp_path / "world.safetensors")
    expected = [remote.step(a)[0]["rgb"] for a in actions[6:]]
    assert_same(expected, [local.step(a)[0]["rgb"] for a in actions[6:]], "served vs local")

    resumed = MirageEnv(image_size=SIZE, task="explore", backend="remote", checkpoint="rooms")
    resumed.reset(seed=999)  # another world first: the load must replace all of it
    resumed.load_world(tmp_path / "world.safetensors")
    assert_same(expected, [resumed.step(a)[0]["rgb"] for a in actions[6:]], "resumed")

    snapshot = remote.snapshot()
    again = [remote.step(a)[0]["rgb"] for a in actions]
    remote.restore(snapshot)
    assert_same(again, [remote.step(a)[0]["rgb"] for a in actions], "restored snapshot")


def test_batched_worlds_and_shared_worlds_are_served_in_one_call_each_and_match_local(served):
    local = MirageVectorEnv(3, image_size=SIZE, task="pointnav", max_episode_steps=8)
    remote = MirageVectorEnv(3, image_size=SIZE, task="pointnav", max_episode_steps=8, backend="remote",
                             checkpoint="rooms")
    actions = np.random.default_rng(0).integers(0, 9, size=(20, 3))
    assert_same(local.reset(seed=2)[0], remote.reset(seed=2)[0], "reset")
    served.server.stats["generate"].update(model_calls=0, requests=0, worlds=0)
    for t, action in enumerate(actions):
        assert_same(local.step(action)[:4], remote.step(action)[:4], f"step {t}")
    assert served.server.stats["generate"] == {"model_calls": 20, "requests": 20, "worlds": 60}

    team_local = MirageParallelEnv(n_agents=2, image_size=SIZE, max_episode_steps=6)
    team_remote = MirageParallelEnv(n_agents=2, image_size=SIZE, max_episode_steps=6, backend="remote",
                                    checkpoint="rooms")
    assert_same(team_local.reset(seed=4)[0], team_remote.reset(seed=4)[0], "team reset")
    while team_local.agents:
        moves = {agent: (1 if agent == "camera_0" else 5) for agent in team_local.agents}
        assert_same(team_local.step(moves)[:4], team_remote.step(moves)[:4], "team step")


class PairingTransport:
    """Holds each call until ``clients`` calls are waiting, then runs them as ONE server batch."""

    def __init__(self, server: ModelServer, clients: int):
        self.inner = LocalTransport(server)
        self.server, self.clients = server, clients
        self.pending, self.condition = [], threading.Condition()
        self.replies: dict[int, object] = {}

    def describe(self):
        return self.inner.describe()

    def call(self, call: ModelCall):
        wire = self.inner._wire
        with self.condition:
            ticket = id(call)
            self.pending.append((ticket, wire(call)))
            if len(self.pending) == self.clients:
                batch, self.pending = self.pending, []
                for (key, _), reply in zip(batch, self.server.run([c for _, c in batch])):
                    self.replies[key] = reply
                self.condition.notify_all()
            elif not self.condition.wait_for(lambda: ticket in self.replies, timeout=60):
                raise RuntimeError("the other client never called")
            reply = self.replies.pop(ticket)
        if isinstance(reply, Exception):
            raise reply
        return wire(reply)


def test_calls_of_different_clients_batched_together_give_each_client_its_own_world():
    server = ModelServer(ProceduralWorldModel(image_size=(SIZE, SIZE)))
    transport = PairingTransport(server, clients=2)
    from mirage_env.world import World

    # Collisions answered by the server too (local_geometry=False), so those calls are batched as well.
    clients = [MirageEnv(image_size=SIZE, task="explore",
                         world=World(RemoteWorldModel(transport, local_geometry=False))) for _ in range(2)]
    twins = [MirageEnv(image_size=SIZE, task="explore") for _ in range(2)]
    actions = [1, 5, 1, 1, 6, 2, 1, 7, 1, 1]  # the same moves: both clients make the same kinds of calls in step
    frames: list[list] = [[], []]

    def play(i):
        clients[i].reset(seed=100 + i)
        frames[i] = [clients[i].step(a)[0]["rgb"] for a in actions]

    threads = [threading.Thread(target=play, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i, twin in enumerate(twins):
        twin.reset(seed=100 + i)
        assert_same(frames[i], [twin.step(a)[0]["rgb"] for a in actions], f"client {i}")
    assert not np.array_equal(frames[0][-1], frames[1][-1])  # two different worlds shared each call
    assert server.stats["generate"] == {"model_calls": len(actions), "requests": 2 * len(actions),
                                        "worlds": 2 * len(actions)}
    assert server.stats["start"]["requests"] == 2 * server.stats["start"]["model_calls"]
    moves = sum(a in (1, 2) for a in actions)  # translations: the steps that ask about collisions
    assert server.stats["blocked"] == {"model_calls": moves, "requests": 2 * moves, "worlds": 2 * moves}


class Recorder:
    """A transport that only keeps the calls it is given (to build server batches by hand)."""

    def __init__(self, server):
        self.server, self.calls = server, []

    def describe(self):
        return self.server.describe()

    def call(self, call):
        self.calls.append(call)
        return self.server.run([call])[0]


def test_a_bad_call_batched_with_good_ones_fails_alone():
    server = ModelServer(ProceduralWorldModel(image_size=(SIZE, SIZE)))
    recorder = Recorder(server)
    client = RemoteWorldModel(recorder)
    generators = [torch.Generator().manual_seed(1)]
    client.start(torch.eye(4, dtype=torch.float64)[None, None], generators)
    good = recorder.calls[-1]
    bad = ModelCall(good.kind, good.worlds, good.state, good.rng, {**good.inputs, "poses": good.inputs["poses"] * np.nan})
    replies = server.run([good, bad])
    assert isinstance(replies[1], ValueError) and "NaN" in str(replies[1])
    np.testing.assert_array_equal(replies[0].output.frames, server.run([good])[0].output.frames)


def test_remote_backend_errors_say_what_to_do(served):
    with pytest.raises(ValueError, match="makes 32x32 frames"):
        RemoteWorldModel("rooms", image_size=64)
    with pytest.raises(ValueError, match="needs checkpoint=NAME"):
        MirageEnv(backend="remote")
    with pytest.raises(ValueError, match="takes no backend options"):
        from mirage_env.backends import make_model

        make_model("remote", image_size=SIZE, checkpoint="rooms", scene="outdoor")
    client = RemoteWorldModel("rooms")
    with pytest.raises(ValueError, match="missing"):
        client.load_state_dict({"time": torch.zeros(1, dtype=torch.int64)})
