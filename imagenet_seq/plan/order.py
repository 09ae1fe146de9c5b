"""The epoch plan: which records a rank reads, in which order. A pure function, no data needed.

Train (``shuffle=True``): the file is cut into chunks of ``chunk_size`` consecutive records;
the chunks are permuted with ``(seed, epoch)`` -- the same permutation on every rank -- and the
permuted sequence is cut into ``world_size`` equal contiguous slices of ``N // world_size``
records. Rank ``r`` reads slice ``r`` chunk by chunk (each chunk one forward cursor walk: the
long sequential reads a disk serves at full speed), then a shuffle buffer of ``buffer_size``
records (:mod:`imagenet_seq.plan.shuffle`, seeded by ``(seed, epoch, rank)``) mixes the stream.
Hence, every epoch: ranks are disjoint; together they cover the file except a tail of
``N % world_size`` records (a different tail every epoch); every rank gets exactly the same
number of records (so the same number of batches: unequal counts hang DDP); a rank's share
changes with the epoch.

Train (``shuffle=False``): file order (the file itself was written in a seeded random order),
sliced the same way.

Val: rank ``r`` reads the contiguous slice ``[r*N//W, (r+1)*N//W)`` in file order; every record
is read by exactly one rank, nothing is padded; slices differ by at most one record.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from imagenet_seq.plan.shuffle import buffered_shuffle

#: Records per chunk: 1024 ImageNet records ~ 113 MB, one seek per ~0.75 s of HDD streaming.
#: Measured on the emulated HDD (benchmarks/results/slow_disk.md, 64 MB read-ahead): 1/2/4 ranks
#: keep 82/76/63 % of the disk's bandwidth vs 71/62/57 % with 256-record chunks, at the same
#: shuffle quality (benchmarks/results/shuffle.md).
DEFAULT_CHUNK_RECORDS = 1024
MODES = ("train", "val")

Span = Tuple[int, int]  # (first record, count): one contiguous forward read


def _check(num_records: int, mode: str, rank: int, world_size: int, seed: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of 'train', 'val'")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}; expected "
                         f"0 <= rank < world_size")
    if world_size > num_records:
        raise ValueError(f"world_size={world_size} is larger than the {num_records} records of "
                         "this split; use fewer ranks or a larger dataset")
    if seed < 0:
        raise ValueError(f"seed={seed}; expected a non-negative integer")


def rank_records(num_records: int, mode: str, rank: int = 0, world_size: int = 1) -> int:
    """Records rank ``rank`` reads per epoch (train: ``N // W`` on every rank; val: its slice)."""
    _check(num_records, mode, rank, world_size, 0)
    if mode == "train":
        return num_records // world_size
    return (rank + 1) * num_records // world_size - rank * num_records // world_size


def num_batches(count: int, batch_size: int, drop_last: bool) -> int:
    """Batches from ``count`` records: ``ceil`` (last batch partial) or ``floor`` (dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    return count // batch_size if drop_last else -(-count // batch_size)


def _chunk_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 0x43484E4B])  # same on every rank


def shuffle_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """The shuffle buffer's randomness for one rank and epoch."""
    return np.random.default_rng([seed, epoch, rank, 0x42554646])


def _chunks(start: int, stop: int, chunk_size: int) -> List[Span]:
    return [(s, min(chunk_size, stop - s)) for s in range(start, stop, chunk_size)]


def _slice_spans(spans: List[Span], begin: int, end: int) -> List[Span]:
    """Positions ``[begin, end)`` of the sequence the spans describe, as spans."""
    out, pos = [], 0
    for start, count in spans:
        lo, hi = max(begin, pos), min(end, pos + count)
        if lo < hi:
            out.append((start + lo - pos, hi - lo))
        pos += count
        if pos >= end:
            break
    return out


def read_spans(num_records: int, mode: str = "train", *, seed: int = 0, epoch: int = 0,
               rank: int = 0, world_size: int = 1, shuffle: bool = True,
               chunk_size: int = DEFAULT_CHUNK_RECORDS) -> List[Span]:
    """The contiguous reads of one rank in one epoch, in reading order.

    Args:
        num_records: records in the split.
        mode: ``'train'`` (equal shares, tail < world_size dropped) or ``'val'`` (slices).
        seed, epoch: the randomness; the same values give the same spans.
        rank, world_size: this rank's place in the job.
        shuffle: permute chunks (train default) or keep file order.
        chunk_size: records per chunk (one contiguous read when chunks are permuted).

    Returns:
        ``[(start, count), ...]``: read each with one forward cursor walk.
    """
    _check(num_records, mode, rank, world_size, seed)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected >= 1 records")
    if mode == "val":
        lo, hi = rank * num_records // world_size, (rank + 1) * num_records // world_size
        spans = _chunks(lo, hi, chunk_size)
        if shuffle:
            spans = [spans[i] for i in _chunk_rng(seed, epoch).permutation(len(spans))]
        return _merge(spans)
    spans = _chunks(0, num_records, chunk_size)
    if shuffle:
        spans = [spans[i] for i in _chunk_rng(seed, epoch).permutation(len(spans))]
    share = num_records // world_size
    return _merge(_slice_spans(spans, rank * share, (rank + 1) * share))


def _merge(spans: List[Span]) -> List[Span]:
    """Join spans that continue each other (fewer, longer reads)."""
    out: List[Span] = []
    for start, count in spans:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((start, count))
    return out


def epoch_order(num_records: int, mode: str = "train", *, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, shuffle: bool = True,
                chunk_size: int = DEFAULT_CHUNK_RECORDS, buffer_size: int = 0) -> np.ndarray:
    """Record indices in the order rank ``rank`` yields them in ``epoch`` (before batching).

    This is exactly the Loader's order for the same arguments (same code path), computed
    without reading the file; ``buffer_size`` applies only when ``shuffle``.
    """
    spans = read_spans(num_records, mode, seed=seed, epoch=epoch, rank=rank,
                       world_size=world_size, shuffle=shuffle, chunk_size=chunk_size)
    stream = np.concatenate([np.arange(s, s + c) for s, c in spans]) if spans else \
        np.empty(0, np.int64)
    if not shuffle or buffer_size <= 1:
        return stream.astype(np.int64)
    rng = shuffle_rng(seed, epoch, rank)
    return np.fromiter(buffered_shuffle(stream.tolist(), buffer_size, rng), np.int64,
                       count=len(stream))
