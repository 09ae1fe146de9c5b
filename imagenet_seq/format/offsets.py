"""Where each record's bytes sit in the LMDB file: the ``__offsets__`` record.

Finding a record through LMDB's B-tree reads a leaf page first, and after copy-on-write commits
many leaf pages lie far from the records they index (on the sample LMDB of
``benchmarks/slow_disk.py``, a fifth of the records have their leaf ~140 MB before them). On an
HDD each such page is a seek there and back, and with several DDP ranks on one disk it lands in
another rank's turn. So preprocess stores, once the file is complete, the file offset and length
of every record's value; the reader then reads a span's bytes with ``pread`` from exactly where
they are, and the disk sees nothing but the records, in order.

Value layout (little-endian): ``b"OFS1"``, uint32 page size, uint64 record count N, uint64 id
of the transaction that wrote it, int64[N] value offsets, uint32[N] value lengths. An offset of
-1 marks a value LMDB stored inside a leaf page (under ~2 KB; leaf pages move when the tree
changes), which the reader fetches through the B-tree instead. Files without the record (older
conversions, the original tool's) are read through the B-tree as before;
``python -m imagenet_seq.format.offsets /lmdb`` adds it to them.

The offsets stay valid because the file is read-only once converted: LMDB never moves a value
that is not rewritten. Any later write to the file makes a newer transaction than the one that
wrote the index, and the reader then ignores the index (with a warning naming the fix,
:func:`rebuild_command`) and reads through the B-tree; as a second guard it checks every
record's label against ``__labels__`` (on both paths) and, with the index, its JPEG marker.
Rewritten records move (to the file's end, or into freed pages); the rebuilt index gives their
new places, and the reader reads ahead each forward run of records in the order it needs them.
"""
from __future__ import annotations

import argparse
import os
import shlex
import struct
import sys
import warnings
from typing import List, Optional, Tuple

import lmdb
import numpy as np

from imagenet_seq import format as fmt
from imagenet_seq.format import map_base

__all__ = ["OFFSETS_KEY", "StaleOffsets", "compute", "encode", "decode", "read", "rebuild_command",
           "write", "add_to", "main"]

OFFSETS_KEY = fmt.OFFSETS_KEY
_HEAD = struct.Struct("<4sIQQ")
_MAGIC = b"OFS1"
_PAGE_HEADER = 16  # LMDB's page header: an overflow value starts this far into its first page


class StaleOffsets(fmt.DamagedFile):
    """The ``__offsets__`` record does not describe this file."""


def compute(env, path: str, num_records: int) -> Tuple[np.ndarray, np.ndarray]:
    """Offsets and lengths of records ``0 .. num_records-1`` of an open environment, found by
    walking its records once (this reads the leaf pages, not the values)."""
    base = map_base(path)
    if base is None:
        raise OSError(f"cannot find where {path} is mapped (/proc/self/maps); the offsets "
                      "index needs Linux")
    psize = env.stat()["psize"]
    offs = np.empty(num_records, np.int64)
    lens = np.empty(num_records, np.uint32)
    with env.begin(buffers=True) as txn:
        cur = txn.cursor()
        if num_records and not cur.set_key(fmt.record_key(0)):
            raise fmt.DamagedFile(f"{path}: record {fmt.record_key(0)!r} missing; {fmt.REMEDY}")
        for i in range(num_records):
            key, value = cur.item()
            if bytes(key) != fmt.record_key(i):
                raise fmt.DamagedFile(f"{path}: expected key {fmt.record_key(i)!r}, found "
                                      f"{bytes(key)!r}; {fmt.REMEDY}")
            off = np.frombuffer(value, np.uint8).ctypes.data - base  # the address; reads nothing
            offs[i] = off if off % psize == _PAGE_HEADER else -1  # else inside a leaf page
            lens[i] = len(value)
            if i + 1 < num_records and not cur.next():
                raise fmt.DamagedFile(f"{path}: the records end before record {i + 1}; "
                                      f"{fmt.REMEDY}")
    return offs, lens


def encode(psize: int, txn_id: int, offs: np.ndarray, lens: np.ndarray) -> bytes:
    return (_HEAD.pack(_MAGIC, psize, len(offs), txn_id) + offs.astype("<i8").tobytes()
            + lens.astype("<u4").tobytes())


def decode(raw, num_records: int, last_txn: int, path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Offsets and lengths from a stored ``__offsets__`` value: views of ``raw`` (``bytes``,
    or a view of the file from ``mapped.get``; never a transaction's buffer, which dies with
    the transaction).

    Raises:
        StaleOffsets: it does not describe this file as it is now.
    """
    if len(raw) < _HEAD.size:
        raise StaleOffsets(f"{path}: __offsets__ is truncated")
    magic, _, n, txn_id = _HEAD.unpack_from(raw)
    if magic != _MAGIC or n != num_records or len(raw) != _HEAD.size + 12 * n:
        raise StaleOffsets(f"{path}: __offsets__ ({magic!r}, {n} records, {len(raw)} bytes) does "
                           f"not match the file's {num_records} records")
    if txn_id != last_txn:
        raise StaleOffsets(f"{path} was written to after its offsets index (transaction "
                           f"{last_txn}, index from {txn_id})")
    offs = np.frombuffer(raw, "<i8", n, _HEAD.size)
    lens = np.frombuffer(raw, "<u4", n, _HEAD.size + 8 * n)
    return offs, lens


def read(env, num_records: int, path: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The index of an open environment: None when the file has none, or (with a warning that
    names the fix) when it no longer describes the file. The arrays are read-only views of
    the file (``mapped.py``): every process reading the file shares one copy."""
    from imagenet_seq.format import mapped

    with env.begin(buffers=True) as txn:
        raw = mapped.get(txn, OFFSETS_KEY, path)
        if raw is None:
            return None
        try:
            return decode(raw, num_records, env.info()["last_txnid"], path)
        except StaleOffsets as e:
            warnings.warn(f"{e}; reading through the B-tree (slower from an HDD). Rebuild the "
                          f"index: {rebuild_command(path)}", stacklevel=3)
            return None


def rebuild_command(path: str) -> str:
    """The shell command that rebuilds ``path``'s index (the path quoted for a shell)."""
    return f"python -m imagenet_seq.format.offsets --rebuild {shlex.quote(path)}"


def write(env, path: str, num_records: int) -> None:
    """Compute the index of a complete file and store it (one more transaction)."""
    offs, lens = compute(env, path, num_records)
    with env.begin(write=True) as txn:  # moves B-tree pages, never a record's value
        txn.put(OFFSETS_KEY, encode(env.stat()["psize"], txn.id(), offs, lens))


def add_to(path: str, rebuild: bool = False) -> str:
    """Add ``__offsets__`` to a converted split that lacks it (or, with ``rebuild``, replace
    it); needs write access. Returns what was done, for the command line.

    Raises:
        DamagedFile: the file is truncated or its B-tree damaged (naming the way out).
    """
    try:
        return _add_to(path, rebuild)
    except lmdb.Error as e:
        raise fmt.damaged(path, e) from None


def _add_to(path: str, rebuild: bool) -> str:
    tree = fmt.Tree(path)  # every B-tree page checked before LMDB walks them all below
    try:
        for _ in tree.keys():
            pass
    finally:
        tree.close()
    env = fmt.open_env(path, readonly=False, lock=False)
    try:
        with env.begin(buffers=True) as txn:
            meta = fmt.read_metadata(txn, path)
            if meta.legacy:
                raise ValueError(f"{path} was written by the original tool; its records are "
                                 "read through the B-tree (convert with preprocess_sequential.py "
                                 "for the offsets index)")
            had = txn.get(OFFSETS_KEY) is not None
            if had and not rebuild:
                return f"{path}: already has an offsets index (--rebuild recomputes it)"
        write(env, path, meta.num_records)
        env.sync(True)
    finally:
        env.close()
    return f"{path}: offsets index {'rebuilt' if had else 'added'} ({meta.num_records} records)"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m imagenet_seq.format.offsets",
        description="Add the record offsets index to LMDBs converted by an older imagenet_seq "
                    "(the reader then reads records without B-tree lookups).")
    p.add_argument("root", help="output folder of preprocess_sequential.py, or one .lmdb file")
    p.add_argument("--splits", default="train,val", help="splits to index under a folder")
    p.add_argument("--rebuild", action="store_true",
                   help="recompute an existing index (after the file was changed, e.g. compacted)")
    args = p.parse_args(argv)
    paths = [args.root] if os.path.isfile(args.root) else [
        os.path.join(args.root, fmt.split_filename(s)) for s in args.splits.split(",")]
    paths = [q for q in paths if os.path.exists(q)]
    if not paths:
        print(f"error: no {' or '.join(fmt.split_filename(s) for s in args.splits.split(','))} "
              f"in {args.root}", file=sys.stderr)
        return 2
    for q in paths:
        try:
            print(add_to(q, rebuild=args.rebuild))
        except (ValueError, OSError, KeyError, lmdb.Error) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
