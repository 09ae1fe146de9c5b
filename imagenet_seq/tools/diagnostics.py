"""Shuffle diagnostics: how close a configuration's batches are to a full random shuffle.

Computed from the order plan (:func:`imagenet_seq.plan.order.epoch_order`) and the labels stored in
the file: no image is read or decoded, so ImageNet-sized configurations take seconds.

* **label diversity**: mean number of distinct labels per batch, against the expectation for a
  full shuffle (batches drawn without replacement from the whole split).
* **co-batch repetition**: of the record pairs that shared a batch in epoch ``e``, the share that
  shares a batch again in epoch ``e + 1`` (full shuffle: ``(B - 1) / (N - 1)``, ~0.02 % for
  ImageNet at batch 256). A high value means the model sees the same groups of images together
  every epoch, i.e. the shuffle is only local.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np

from imagenet_seq.plan import order


def batch_ids(num_records: int, mode: str = "train", *, batch_size: int, seed: int = 0,
              epoch: int = 0, world_size: int = 1, shuffle: bool = True,
              chunk_size: int = order.DEFAULT_CHUNK_RECORDS, buffer_size: int = 0,
              drop_last: bool = False) -> np.ndarray:
    """Global batch id of every record in ``epoch`` (all ranks; ``-1``: not read this epoch)."""
    ids = np.full(num_records, -1, np.int64)
    offset = 0
    for rank in range(world_size):
        seq = order.epoch_order(num_records, mode, seed=seed, epoch=epoch, rank=rank,
                                world_size=world_size, shuffle=shuffle, chunk_size=chunk_size,
                                buffer_size=buffer_size)
        if drop_last:
            seq = seq[: len(seq) // batch_size * batch_size]
        ids[seq] = offset + np.arange(len(seq)) // batch_size
        offset += -(-len(seq) // batch_size)
    return ids


def mean_distinct_labels(ids: np.ndarray, labels: np.ndarray) -> float:
    """Mean number of distinct labels per batch, given each record's batch id."""
    seen = ids >= 0
    pairs = np.unique(np.stack([ids[seen], labels[seen]]), axis=1)
    per_batch = np.bincount(pairs[0])
    return float(per_batch[per_batch > 0].mean())


def full_shuffle_distinct_labels(labels: np.ndarray, batch_size: int) -> float:
    """Expected distinct labels in a batch drawn without replacement from all records."""
    n = len(labels)
    b = min(batch_size, n)
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    # P(class absent) = C(n - c, b) / C(n, b), via log-gamma
    absent = np.array([math.exp(math.lgamma(n - c + 1) - math.lgamma(n - c - b + 1)
                                - math.lgamma(n + 1) + math.lgamma(n - b + 1))
                       if n - c >= b else 0.0 for c in counts])
    return float(np.sum(1.0 - absent))


def cobatch_repetition(ids_a: np.ndarray, ids_b: np.ndarray) -> float:
    """Share of the pairs co-batched in epoch a that are co-batched again in epoch b."""
    both = (ids_a >= 0) & (ids_b >= 0)
    sizes_a = np.bincount(ids_a[ids_a >= 0])
    pairs_a = float(np.sum(sizes_a * (sizes_a - 1) / 2))
    if pairs_a == 0:
        return 0.0
    key = ids_a[both] * (int(ids_b.max()) + 1) + ids_b[both]
    _, k = np.unique(key, return_counts=True)
    return float(np.sum(k * (k - 1) / 2)) / pairs_a


@dataclass
class ShuffleReport:
    num_records: int
    batch_size: int
    world_size: int
    chunk_size: int
    buffer_size: int
    distinct_labels: float
    full_shuffle_distinct_labels: float
    diversity_ratio: float
    repetition: float
    full_shuffle_repetition: float

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"N={self.num_records} batch={self.batch_size} world={self.world_size} "
                f"chunk={self.chunk_size} buffer={self.buffer_size}: distinct labels/batch "
                f"{self.distinct_labels:.2f} vs {self.full_shuffle_distinct_labels:.2f} "
                f"(ratio {self.diversity_ratio:.4f}); co-batch repetition "
                f"{100 * self.repetition:.3f}% (full shuffle "
                f"{100 * self.full_shuffle_repetition:.3f}%)")


def shuffle_report(labels: np.ndarray, *, batch_size: int, mode: str = "train", seed: int = 0,
                   epoch: int = 0, world_size: int = 1, shuffle: bool = True,
                   chunk_size: int = order.DEFAULT_CHUNK_RECORDS, buffer_size: int = 0,
                   drop_last: bool = False) -> ShuffleReport:
    """Diversity of epoch ``epoch`` and repetition between ``epoch`` and ``epoch + 1``.

    Args:
        labels: label of every record, in file order (``SplitReader.labels``).
        other arguments: as for the Loader (``buffer_size`` in records).
    """
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    kw = dict(batch_size=batch_size, seed=seed, world_size=world_size, shuffle=shuffle,
              chunk_size=chunk_size, buffer_size=buffer_size, drop_last=drop_last)
    ids_a = batch_ids(n, mode, epoch=epoch, **kw)
    ids_b = batch_ids(n, mode, epoch=epoch + 1, **kw)
    got = mean_distinct_labels(ids_a, labels)
    ref = full_shuffle_distinct_labels(labels, batch_size)
    return ShuffleReport(n, batch_size, world_size, chunk_size, buffer_size, got, ref,
                         got / ref if ref else 1.0, cobatch_repetition(ids_a, ids_b),
                         (min(batch_size, n) - 1) / max(1, n - 1))


def loader_report(loader, epoch: Optional[int] = None) -> ShuffleReport:
    """:func:`shuffle_report` for a :class:`imagenet_seq.data.Loader`'s configuration.

    Raises:
        ValueError: the file stores no labels (original-tool LMDBs).
    """
    labels = loader.reader.labels
    if labels is None:
        raise ValueError(f"{loader.reader.path} stores no __labels__ record (an original-tool "
                         "LMDB); convert it with preprocess_sequential.py for diagnostics")
    return shuffle_report(labels, batch_size=loader.batch_size, mode=loader.mode,
                          seed=loader.seed, epoch=loader.epoch if epoch is None else epoch,
                          world_size=loader.world_size, shuffle=loader.shuffle,
                          chunk_size=loader.chunk_size, buffer_size=loader.buffer_size,
                          drop_last=loader.drop_last)
