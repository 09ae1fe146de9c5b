"""Test shards without the converter: a converted one-file split re-written as K shard files.

``write_shards(src_root, dst_root, split, k)`` copies the records of ``src_root``'s
``ILSVRC-<split>.lmdb`` into ``ILSVRC-<split>-JJJJJ-of-KKKKK.lmdb`` files of the sharded
format (``imagenet_seq/format/manifest.py``): each a complete LMDB holding its records as its
own ``0 ..``, with ``__meta__`` (the usual metadata of its records plus the ``"shard"`` entry),
``__labels__``, ``__crc__`` (``format.checksums``) and ``__offsets__`` (``format.offsets``,
written last), then the manifest (``manifest.write_manifest``) in ``dst_root``. The records
and their order are the one file's, so a Loader over the shards must yield exactly what a
Loader over the file yields.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import List, Optional, Sequence

import numpy as np

from imagenet_seq import format as fmt
from imagenet_seq.format import checksums, manifest, offsets


def _records(path: str):
    env = fmt.acquire_env(path)  # shared with any reader of the file in this process
    try:
        with env.begin() as txn:
            meta = fmt.read_metadata(txn, path)
            values = [bytes(txn.get(fmt.record_key(i))) for i in range(meta.num_records)]
            labels = fmt.read_labels(txn, meta, path)
    finally:
        fmt.release_env(path)
    return meta, values, labels


def write_shard(path: str, meta: fmt.Metadata, values: Sequence[bytes], labels: np.ndarray,
                shard: Optional[dict], index: bool = True) -> Optional[manifest.Shard]:
    """One shard file at ``path`` holding ``values`` (labels ``labels``) as records 0..;
    ``shard`` is its ``"shard"`` entry (None: a one-file split, no entry). Returns its
    manifest row (None for a one-file split)."""
    counts = np.bincount(labels, minlength=len(meta.classes)).tolist()
    jpeg_bytes = sum(len(v) - fmt.RECORD_HEADER.size for v in values)
    mine = fmt.Metadata(split=meta.split, classes=list(meta.classes), class_counts=counts,
                        num_records=len(values), total_bytes=jpeg_bytes, order=meta.order,
                        options=dict(meta.options), skipped=0)
    doc = json.loads(mine.to_json())
    if shard is not None:
        doc["shard"] = shard
    env = fmt.open_env(path, readonly=False, lock=False)
    try:
        with env.begin(write=True) as txn:
            for i, value in enumerate(values):
                txn.put(fmt.record_key(i), value)
            txn.put(fmt.META_KEY, json.dumps(doc, sort_keys=True).encode())
            txn.put(fmt.LABELS_KEY, np.asarray(labels, "<i4").tobytes())
            txn.put(fmt.CRC_KEY, checksums.encode(
                np.array([zlib.crc32(v) for v in values], "<u4")))
        if index:
            offsets.write(env, path, len(values))  # last: it names the last transaction
        env.sync(True)
        with env.begin() as txn:
            digest = manifest.shard_checksum(txn)
    finally:
        env.close()
    if shard is None:
        return None
    return manifest.Shard(shard["index"], path, shard["first"], len(values), jpeg_bytes,
                          os.path.getsize(path), digest)


def write_shards(src_root: str, dst_root: str, split: str, k: int,
                 folders: Optional[Sequence[str]] = None, split_id: str = "test-conversion",
                 index: bool = True) -> str:
    """``src_root``'s ``split`` as ``k`` shards; shard ``j`` goes to ``folders[j % len]``
    (default: ``dst_root``), the manifest to ``dst_root``. Returns the manifest's path."""
    meta, values, labels = _records(fmt.find_split(src_root, split))
    return write_records_as_shards(meta, values, labels, dst_root, k, folders, split_id, index)


def write_records_as_shards(meta: fmt.Metadata, values: Sequence[bytes], labels: np.ndarray,
                            dst_root: str, k: int, folders: Optional[Sequence[str]] = None,
                            split_id: str = "test-conversion", index: bool = True) -> str:
    """Records ``values`` (labels ``labels``) of a split described by ``meta`` as ``k``
    shards (``values`` may be any sequence that slices into sequences, e.g. one made on the
    fly by a benchmark); as :func:`write_shards` from there on."""
    split = meta.split
    folders = list(folders or [dst_root])
    rows: List[manifest.Shard] = []
    for j, (first, count) in enumerate(manifest.shard_ranges(meta.num_records, k)):
        folder = folders[j % len(folders)]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, manifest.shard_filename(split, j, k))
        rows.append(write_shard(path, meta, values[first:first + count],
                                labels[first:first + count],
                                {"index": j, "count": k, "first": first, "split_id": split_id},
                                index))
    assert sum(r.bytes for r in rows) == meta.total_bytes
    totals = {"num_records": meta.num_records, "total_bytes": meta.total_bytes,
              "classes": list(meta.classes), "class_counts": list(meta.class_counts),
              "order": meta.order, "options": dict(meta.options), "skipped": meta.skipped}
    os.makedirs(dst_root, exist_ok=True)
    return manifest.write_manifest(dst_root, split, split_id, totals, rows)


def write_split_shards(src_root: str, dst_root: str, k: int, **kw) -> str:
    """Both splits of ``src_root`` as ``k`` shards each (val: as many as it has records, at
    most ``k``). Returns ``dst_root``."""
    for split in fmt.SPLITS:
        write_shards(src_root, dst_root, split, k, **kw)
    return dst_root
