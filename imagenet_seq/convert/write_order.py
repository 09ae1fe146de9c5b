"""The write order of a split, computable from each record alone.

Train: records sorted by :func:`train_key`, a seeded 64-bit BLAKE2b hash of the record's
relative path (``<class>/<file>`` for trees, tars and ImageNet's tar of tars alike; ties,
which need a 64-bit collision, by the path). Val: sorted relative paths.

Because a record's place depends on its own path and the seed only, the order is the same
whatever form the sources come in, however they are split into shards, and in whatever order
or by however many processes they are read: records from any part of the sources can be
sorted into runs as they arrive, and dropping a file leaves the others in the same relative
order. Class labels are the sorted class names, as before.
"""
from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple

__all__ = ["ORDER_VERSION", "train_key", "sort_key", "write_order"]

ORDER_VERSION = 2  # 1: a numpy permutation of the sorted file list (files written before 0.6)


def train_key(rel: str, seed: int) -> bytes:
    """8 bytes whose byte order is the record's place in the train order for ``seed``.

    Non-UTF-8 names (lone surrogates from ``os.listdir``) hash as their bytes on disk."""
    data = b"%d\0" % int(seed) + rel.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(data, digest_size=8).digest()


VAL_PREFIX = bytes(8)


def sort_key(rel: str, split: str, seed: int) -> bytes:
    """The bytes records are sorted by: 8 bytes (train: ``train_key``, val: zeros) + the
    path (UTF-8, non-UTF-8 names as their bytes), which the merge recovers from the key
    (``passes.merge_pass``)."""
    raw = rel.encode("utf-8", "surrogateescape")
    return (train_key(rel, seed) if split == "train" else VAL_PREFIX) + raw


def write_order(entries: Sequence[Tuple[str, int]], split: str,
                seed: int) -> List[Tuple[str, int]]:
    """``entries`` ((relative path, label)) in the order they are written: train by
    :func:`sort_key`, as an archive's records are merged; val by path as ``str`` (the order
    torchvision's ``ImageFolder`` lists a folder in)."""
    if split == "train":
        return sorted(entries, key=lambda e: sort_key(e[0], split, seed))
    return sorted(entries, key=lambda e: e[0])
