"""The shuffle buffer and the shuffle diagnostics (no images decoded)."""
import numpy as np
import pytest

from imagenet_seq.tools import diagnostics
from imagenet_seq.plan import order
from imagenet_seq.plan.shuffle import (DEFAULT_NODE_BUFFER_BYTES, buffer_records, buffered_shuffle)


@pytest.mark.parametrize("n,size", [(0, 5), (1, 5), (10, 3), (10, 10), (10, 50), (1000, 64)])
def test_buffer_emits_a_permutation(n, size):
    out = list(buffered_shuffle(range(n), size, np.random.default_rng(0)))
    assert sorted(out) == list(range(n))


def test_buffer_is_deterministic_and_mixes():
    a = list(buffered_shuffle(range(1000), 100, np.random.default_rng(1)))
    b = list(buffered_shuffle(range(1000), 100, np.random.default_rng(1)))
    c = list(buffered_shuffle(range(1000), 100, np.random.default_rng(2)))
    assert a == b and a != c
    assert a != list(range(1000))
    lag = np.arange(1000) - np.array(a)
    assert lag.min() >= -100  # record x is emitted no earlier than position x - size


def test_buffer_of_one_passes_through():
    assert list(buffered_shuffle(range(5), 1, np.random.default_rng(0))) == list(range(5))


def test_buffer_records_sizes():
    assert buffer_records(123, 10**9, 1000.0) == 123
    assert buffer_records(None, 10_000, 100.0) == 100
    default = buffer_records(None, None, 110_000.0)
    assert default == DEFAULT_NODE_BUFFER_BYTES // 110_000
    assert buffer_records(None, None, 110_000.0, local_world_size=8) == \
        DEFAULT_NODE_BUFFER_BYTES // 8 // 110_000
    assert buffer_records(None, None, 0.0) > 0  # unknown mean: ImageNet's
    with pytest.raises(ValueError, match="buffer_bytes=-1"):
        buffer_records(None, -1, 1.0)


def _labels(n=20_000, classes=100, seed=0):
    return np.random.default_rng(seed).permutation(np.arange(n) % classes)


def test_diagnostics_of_a_good_configuration():
    rep = diagnostics.shuffle_report(_labels(), batch_size=64, chunk_size=32, buffer_size=2000)
    assert rep.diversity_ratio >= 0.98
    assert rep.repetition < 0.01
    assert rep.full_shuffle_repetition == pytest.approx(63 / 19_999)
    assert "ratio" in str(rep)


def test_diagnostics_see_a_local_only_shuffle():
    # class-sorted file (as a plain ImageFolder dump would be) + small buffer: few labels per
    # batch, and the same neighbours co-batched every epoch
    sorted_labels = np.sort(_labels())
    rep = diagnostics.shuffle_report(sorted_labels, batch_size=64, chunk_size=1000,
                                     buffer_size=500)
    assert rep.diversity_ratio < 0.5
    no_buffer = diagnostics.shuffle_report(_labels(), batch_size=64, chunk_size=1000,
                                           buffer_size=0)
    assert no_buffer.repetition > 0.5


def test_full_shuffle_expectation_matches_simulation():
    labels = _labels(5000, 50)
    rng = np.random.default_rng(3)
    sims = [len(np.unique(labels[rng.permutation(5000)[:32]])) for _ in range(2000)]
    assert diagnostics.full_shuffle_distinct_labels(labels, 32) == \
        pytest.approx(np.mean(sims), rel=0.01)


def test_cobatch_repetition_counts_pairs():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert diagnostics.cobatch_repetition(a, a) == 1.0
    b = np.array([0, 1, 0, 1, 2, 2])
    assert diagnostics.cobatch_repetition(a, b) == pytest.approx(1 / 3)


def test_batch_ids_cover_all_ranks():
    ids = diagnostics.batch_ids(103, batch_size=10, world_size=4, chunk_size=8, buffer_size=5)
    assert (ids >= 0).sum() == 100  # tail of 103 % 4 records not read this epoch
    assert len(np.unique(ids[ids >= 0])) == 4 * 3  # 25 records per rank -> 3 batches each


def test_loader_report(sample_lmdb):
    from imagenet_seq.data import Loader

    ld = Loader(sample_lmdb, "train", batch_size=8, num_workers=0, chunk_size=4, buffer_size=8)
    rep = diagnostics.loader_report(ld)
    assert rep.num_records == 48 and rep.buffer_size == 8 and rep.chunk_size == 4
    assert 0 < rep.distinct_labels <= 4
    ids = diagnostics.batch_ids(48, batch_size=8, chunk_size=4, buffer_size=8)
    assert np.array_equal(ids[ld.epoch_order(0)], np.arange(48) // 8)
    assert order.DEFAULT_CHUNK_RECORDS >= 64  # long reads on a disk
