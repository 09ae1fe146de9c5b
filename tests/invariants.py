"""The one invariant helper every loader configuration is checked with.

Usage (any loader that has ``set_epoch``, ``len()``, ``batch_size``, ``drop_last``, ``mode``,
``shuffle``, ``rank``, ``world_size``, ``dataset_size`` and tells which records a batch held,
by default via ``loader.last_batch_records``)::

    from invariants import check_epochs, check_shards
    orders = check_epochs(lambda: Loader(root, 'train', batch_size=5), labels)

``labels[i]`` is the label of record ``i`` (``SplitReader(root, split).labels``).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch


def default_records(loader, images, targets) -> np.ndarray:
    return np.asarray(loader.last_batch_records, dtype=np.int64)


def run_epoch(loader, epoch: int, records_of: Callable = default_records,
              keep_images: bool = False):
    """Iterate one epoch; returns (list of record arrays per batch, list of targets, images)."""
    loader.set_epoch(epoch)
    recs: List[np.ndarray] = []
    tgts: List[np.ndarray] = []
    imgs: List[torch.Tensor] = []
    for images, targets in loader:
        recs.append(records_of(loader, images, targets))
        tgts.append(np.asarray(targets.cpu()))
        assert len(targets) == len(recs[-1]) == len(images), "images/targets/records disagree"
        if keep_images:
            imgs.append(images.cpu().contiguous())
    return recs, tgts, imgs


def expected_count(loader) -> int:
    """Records one rank must yield in an epoch (before ``drop_last``)."""
    n, w, r = loader.dataset_size, loader.world_size, loader.rank
    if loader.mode == "train":
        return n // w
    return (r + 1) * n // w - r * n // w


def check_epoch(loader, recs: Sequence[np.ndarray], tgts: Sequence[np.ndarray],
                labels: Optional[np.ndarray]) -> np.ndarray:
    """One epoch's invariants; returns the flat record order."""
    b = loader.batch_size
    assert len(recs) == len(loader), f"{len(recs)} batches, len(loader)={len(loader)}"
    for k, batch in enumerate(recs):
        if k < len(recs) - 1 or loader.drop_last:
            assert len(batch) == b, f"batch {k} has {len(batch)} records, batch_size={b}"
        else:
            assert 1 <= len(batch) <= b, f"last batch has {len(batch)} records"
    flat = np.concatenate(recs) if recs else np.empty(0, np.int64)
    assert len(np.unique(flat)) == len(flat), "a record was yielded twice in one epoch"
    assert flat.min(initial=0) >= 0 and flat.max(initial=0) < loader.dataset_size
    count = expected_count(loader)
    if loader.drop_last:
        assert len(flat) == count // b * b, f"{len(flat)} records with drop_last, expected " \
                                            f"{count // b * b}"
    else:
        assert len(flat) == count, f"{len(flat)} records, expected {count} (exact epoch)"
    if loader.mode == "val":
        n, w, r = loader.dataset_size, loader.world_size, loader.rank
        lo, hi = r * n // w, (r + 1) * n // w
        assert set(flat.tolist()) <= set(range(lo, hi)), "val record outside this rank's slice"
        if not loader.shuffle:
            assert list(flat) == list(range(lo, lo + len(flat))), "val not in file order"
    if labels is not None:
        got = np.concatenate(tgts) if tgts else np.empty(0, np.int64)
        assert np.array_equal(got, labels[flat]), "targets differ from the records' labels"
    return flat


def check_epochs(make_loader: Callable[[], object], labels: Optional[np.ndarray],
                 epochs: Sequence[int] = (0, 1), records_of: Callable = default_records,
                 check_plan: bool = True) -> Dict[int, np.ndarray]:
    """Exact epochs, deterministic under the seed, different across epochs, labels right.

    Args:
        make_loader: builds a fresh loader (called twice: determinism is checked across objects).
        labels: label of every record (``None`` skips the label check, e.g. legacy files).
        epochs: epochs to run (at least two to check that orders differ).
        records_of: ``(loader, images, targets) -> record indices`` of the batch just yielded.
        check_plan: also compare with ``loader.epoch_order(epoch)`` (the order computed
            without data) when the loader has it.

    Returns:
        ``{epoch: flat record order}``.
    """
    loader = make_loader()
    orders = {}
    for e in epochs:
        recs, tgts, _ = run_epoch(loader, e, records_of)
        orders[e] = check_epoch(loader, recs, tgts, labels)
        if check_plan and hasattr(loader, "epoch_order"):
            plan = loader.epoch_order(e)
            assert np.array_equal(plan[: len(orders[e])], orders[e]), "order differs from plan"
    again = make_loader()
    e = epochs[-1]
    recs, tgts, _ = run_epoch(again, e, records_of)
    assert np.array_equal(np.concatenate(recs), orders[e]), "same seed+epoch, different order"
    if loader.shuffle and len(epochs) > 1 and len(orders[epochs[0]]) > 2:
        assert not np.array_equal(orders[epochs[0]], orders[epochs[1]]), \
            "two epochs gave the same order"
    return orders


def check_shards(make_loader: Callable[[int, int], object], world_size: int,
                 labels: Optional[np.ndarray], epochs: Sequence[int] = (0, 1),
                 records_of: Callable = default_records) -> Dict[int, List[np.ndarray]]:
    """DDP invariants with explicit ranks: ``make_loader(rank, world_size)``.

    Train: equal batch counts, disjoint shards, union = dataset minus a tail < world_size,
    assignment changes with the epoch (when shuffled). Val: every record exactly once.
    """
    shards: Dict[int, List[np.ndarray]] = {}
    for e in epochs:
        loaders = [make_loader(r, world_size) for r in range(world_size)]
        flats = []
        for ld in loaders:
            recs, tgts, _ = run_epoch(ld, e, records_of)
            flats.append(check_epoch(ld, recs, tgts, labels))
        shards[e] = flats
        ld0 = loaders[0]
        allrec = np.concatenate(flats)
        assert len(np.unique(allrec)) == len(allrec), "ranks overlap"
        n = ld0.dataset_size
        if ld0.mode == "train":
            assert len({len(ld) for ld in loaders}) == 1, "ranks have different batch counts"
            if not ld0.drop_last:
                assert n - len(allrec) < world_size, "more than a tail < world_size missing"
        else:
            assert sorted(allrec.tolist()) == list(range(n)), "val not covered exactly once"
    if len(epochs) > 1 and make_loader(0, world_size).shuffle and world_size > 1:
        a, b = shards[epochs[0]][0], shards[epochs[1]][0]
        assert set(a.tolist()) != set(b.tolist()), "rank 0 got the same shard in two epochs"
    return shards
