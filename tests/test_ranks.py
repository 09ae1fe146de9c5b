"""Ranks on this node (the shuffle memory a machine's ranks share), from torchrun's variables."""
import pytest

from imagenet_seq.loader.ranks import local_world_size, resolve_rank


@pytest.mark.parametrize("env,world,want", [
    ({}, 8, 8),  # nothing known: assume every rank is here (the safe budget)
    ({"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}, 8, 4),  # torchrun, 2 nodes x 4
    ({"LOCAL_WORLD_SIZE": "x"}, 8, 8),
    ({"LOCAL_WORLD_SIZE": "16", "WORLD_SIZE": "16"}, 8, 8),  # out of range: ignored
    # PyTorch's example with --multiprocessing-distributed: torchrun started 1 process per
    # node (LOCAL_WORLD_SIZE=1, WORLD_SIZE=nodes), which spawned one rank per GPU
    ({"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "1"}, 8, 8),
    ({"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"}, 16, 8),
    ({"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "3"}, 8, 1),  # not a multiple: torchrun's word
])
def test_local_world_size(monkeypatch, env, world, want):
    for k in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert local_world_size(world) == want


def test_explicit_ranks_use_the_same_rule(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    info = resolve_rank(3, 8)
    assert (info.rank, info.world_size, info.local_world_size) == (3, 8, 8)
