"""The on-disk format, defined once.

A split is ONE LMDB file (``subdir=False``), e.g. ``/lmdb/ILSVRC-train.lmdb``, holding:

* records under keys ``b"%08d" % i`` for ``i`` in ``0 .. num_records-1``, in the order they
  were written (train: sorted by a seeded hash of each source path, ``convert/write_order``;
  files written before it: a seeded permutation; val: sorted paths).
  Each value is ``RECORD_HEADER`` (little-endian uint32 label) followed by the raw JPEG bytes.
* ``__meta__``: JSON with the format name and ``FORMAT_VERSION``, class names, per-class counts,
  record count, total JPEG bytes, and the options used. Written last, in the final transaction.
* ``__labels__``: little-endian int32 array of every record's label, in record order, so order
  plans and shuffle diagnostics need no pass over the image bytes.
* ``__skip__%08d``: one JSON record per skipped source file (path, reason).
* ``__progress__``: only while a conversion is in progress (see ``writer.py``).
* ``__offsets__``: file offset and length of every record's value, in one transaction after
  ``__meta__`` (``offsets.py``); optional, readers without it walk the B-tree.

* ``__crc__``: a CRC-32 of every record's value, written at conversion (``checksums.py``);
  optional, ``imagenet-seq-verify --add-checksums`` adds it to older files.

Every environment is opened through :func:`open_env`, which first checks the file against its
LMDB header (:func:`check_file`): a file shorter than the pages LMDB will map (an interrupted
copy) is a :class:`DamagedFile` error naming its size, the size it should have and the fix,
not a SIGBUS on the first page touched past its end.

Keys starting with ``__`` sort after the digit keys, so a cursor walking the digit range sees
only records. LMDBs written by the original tool (tensorpack ``LMDBSerializer``: keys ``%08d``,
values serialized ``[uint8 JPEG array, label]``, a ``__keys__`` record) are recognised and read
through :func:`decode_legacy_value` without re-conversion.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from imagenet_seq.format.convlock import describe_unfinished
from imagenet_seq.format.lmdbdir import folder_error, is_env_folder
from imagenet_seq.format.lmdbfile import (REMEDY, DamagedFile, Tree, check_file, check_in_file, data_file,
                       map_base)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SPLITS", "MAX_RECORDS", "META_KEY", "LABELS_KEY",
           "PROGRESS_KEY", "SKIP_PREFIX", "LEGACY_KEYS_KEY", "OFFSETS_KEY", "CRC_KEY",
           "METADATA_KEYS", "RECORD_HEADER", "MAP_SIZE", "RecordError", "split_filename",
           "record_key", "skip_key", "encode_record", "decode_record", "TENSORPACK_PIP",
           "decode_legacy_value", "Metadata", "open_env", "damaged", "get_checked", "acquire_env",
           "release_env", "find_split", "read_metadata", "read_labels", "DamagedFile"]

FORMAT_NAME = "imagenet_seq"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
MAX_RECORDS = 10**8  # keys are %08d, as the original tool wrote them

META_KEY = b"__meta__"
LABELS_KEY = b"__labels__"
PROGRESS_KEY = b"__progress__"
SKIP_PREFIX = b"__skip__"
LEGACY_KEYS_KEY = b"__keys__"
OFFSETS_KEY = b"__offsets__"  # offsets.py
CRC_KEY = b"__crc__"  # checksums.py
# what readers look up at open: open_env checks LMDB's way to each before LMDB walks it
METADATA_KEYS = (META_KEY, LABELS_KEY, PROGRESS_KEY, LEGACY_KEYS_KEY, OFFSETS_KEY, CRC_KEY)

RECORD_HEADER = struct.Struct("<I")
# 1 TiB of address space: LMDB only reserves it; the file grows with the data (Linux, 64-bit).
MAP_SIZE = 1 << 40


class RecordError(RuntimeError):
    """One record is bad (fails to decode, checksum or label); ``key`` is its LMDB key."""

    def __init__(self, message: str, key: bytes = b"", index: int = -1):
        super().__init__(message)
        self.key = key
        self.index = index

    def __reduce__(self):  # keeps key and index across a process pool's pickling
        return type(self), (str(self), self.key, self.index)


def split_filename(split: str) -> str:
    """``'train'`` -> ``'ILSVRC-train.lmdb'`` (the names the original tool used)."""
    return f"ILSVRC-{split}.lmdb"


def record_key(index: int) -> bytes:
    return b"%08d" % index


def skip_key(index: int) -> bytes:
    return SKIP_PREFIX + b"%08d" % index


def encode_record(label: int, jpeg: bytes) -> bytes:
    return RECORD_HEADER.pack(label) + jpeg


def decode_record(value) -> Tuple[memoryview, int]:
    """Value -> (JPEG bytes view, label). Accepts bytes or a buffer (zero-copy)."""
    view = memoryview(value)
    (label,) = RECORD_HEADER.unpack_from(view, 0)
    return view[RECORD_HEADER.size:], label


TENSORPACK_PIP = 'pip install "imagenet_seq[tensorpack]"'


def _tensorpack_serialize(path: str = ""):
    """tensorpack's ``serialize`` module (heavy, optional: only original-tool files need it).

    Raises:
        ImportError: tensorpack is not installed; the message names the file and the pip line.
    """
    try:
        from tensorpack.utils import serialize
    except ImportError as e:
        what = f"{path} was" if path else "this record was"
        raise ImportError(f"{what} written by the original tool (tensorpack LMDBSerializer); "
                          f"reading it needs tensorpack: {TENSORPACK_PIP} (or re-convert the "
                          f"images with preprocess_sequential.py) [{e}]") from None
    return serialize


def decode_legacy_value(value) -> Tuple[bytes, int]:
    """A value written by tensorpack's ``LMDBSerializer`` -> (JPEG bytes, label)."""
    obj = _tensorpack_serialize().loads(bytes(value))
    if not isinstance(obj, (list, tuple)) or len(obj) < 2:
        raise ValueError(
            f"legacy record holds {type(obj).__name__}; expected [uint8 JPEG array, label] "
            "as written by the original tool's LMDBSerializer"
        )
    img, label = obj[0], obj[1]
    return np.asarray(img, dtype=np.uint8).tobytes(), int(label)


@dataclass
class Metadata:
    """What ``__meta__`` holds. ``classes[i]`` is the folder name of label ``i``."""

    split: str
    classes: List[str]
    class_counts: List[int]
    num_records: int
    total_bytes: int
    order: str  # 'random' (seeded hash order, or permutation before it) or 'sorted'
    options: Dict[str, Any] = field(default_factory=dict)
    skipped: int = 0
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    legacy: bool = False  # True when read from an original-tool (tensorpack) LMDB

    def to_json(self) -> bytes:
        d = dict(self.__dict__)
        d.pop("legacy")
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, path: str) -> "Metadata":
        try:
            d = json.loads(bytes(raw))
        except ValueError as e:
            raise DamagedFile(f"{path}: __meta__ record is not valid JSON ({e}); "
                              f"{REMEDY}") from None
        if not isinstance(d, dict):
            raise DamagedFile(f"{path}: __meta__ holds a JSON {type(d).__name__}, not an "
                              f"object; {REMEDY}")
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: __meta__ names format {d.get('format')!r}, "
                             f"expected {FORMAT_NAME!r}")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {d.get('version')!r}, this imagenet_seq reads "
                f"version {FORMAT_VERSION}; re-run preprocess_sequential.py --overwrite with "
                "this version, or install the imagenet_seq version that wrote it")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        try:
            meta = cls(**known)
            sane = (meta.split in SPLITS and 0 <= int(meta.num_records) < MAX_RECORDS
                    and len(meta.class_counts) == len(meta.classes)
                    and sum(meta.class_counts) == meta.num_records)
        except (TypeError, ValueError):
            sane = False
        if not sane:
            raise DamagedFile(f"{path}: __meta__ is inconsistent (split, record count or class "
                              f"counts); {REMEDY}")
        return meta


def _folder_error(path: str) -> FileNotFoundError:
    """:func:`lmdbdir.folder_error`, told what the folder's ``data.mdb`` holds."""
    return folder_error(path, _env_folder_holds(path) if is_env_folder(path) else None)


def _env_folder_holds(path: str) -> Optional[str]:
    """What an LMDB environment folder's data.mdb holds, if it is something this package
    reads; None if not or if it cannot be told safely (its pages are checked before LMDB maps
    them)."""
    try:
        import lmdb

        tree = Tree(path)  # path/data.mdb, checked against its header
        try:
            for key in (META_KEY, LEGACY_KEYS_KEY):
                tree.check_lookup(key)
        finally:
            tree.close()
        env = lmdb.open(path, subdir=True, readonly=True, lock=False)
        try:
            with env.begin() as txn:
                meta = txn.get(META_KEY)
                if meta is not None:
                    got = Metadata.from_json(meta, path)
                    return f"an imagenet_seq {got.split} split ({got.num_records} records)"
                if txn.get(LEGACY_KEYS_KEY) is not None:
                    return "an LMDB written by the original tool (tensorpack LMDBSerializer)"
        finally:
            env.close()
    except Exception:  # noqa: BLE001 - only a hint: anything odd means "convert the images"
        return None
    return None


def open_env(path: str, readonly: bool = True, **kw):
    """Open one LMDB file, after :func:`check_file` (a new or empty file is fine for writing).
    Readers take no lock (read-only media, many processes).

    Raises:
        DamagedFile: the file is truncated, its B-tree is damaged on the way to the metadata,
            or LMDB refuses it (not an LMDB file).
        FileNotFoundError: a read-only open of a missing file, or ``path`` is a folder (an
            LMDB environment directory: ``lmdbdir.folder_error`` says what to do).
    """
    import lmdb

    if os.path.isdir(path):  # LMDB would say only "Is a directory"
        raise _folder_error(path)
    if readonly:
        tree = Tree(path)  # check_file, then the B-tree pages on the way to the metadata
        try:
            for key in METADATA_KEYS:
                tree.check_lookup(key)
        finally:
            tree.close()
    elif os.path.exists(data_file(path)) and os.path.getsize(data_file(path)) > 0:
        check_file(path)
    try:
        if readonly:
            return lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=True,
                             meminit=False, max_readers=1024, **kw)
        # sync=False: commits do not fsync (a kill -9 loses nothing committed; a power cut may
        # lose the last commits, which --resume redoes); the writer syncs once before the rename.
        return lmdb.open(path, subdir=False, map_size=MAP_SIZE, readonly=False, meminit=False,
                         sync=False, **kw)
    except (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError,
            lmdb.PageNotFoundError) as e:
        raise DamagedFile(f"{path}: LMDB cannot open it ({e}); {REMEDY}") from None


def damaged(path: str, e: Exception) -> DamagedFile:
    """An LMDB error met while reading ``path`` (a page not found, a corrupted page), as the
    error that names the file and the way out."""
    return DamagedFile(f"{path}: LMDB: {e}: the file is damaged; {REMEDY}")


def get_checked(txn, key: bytes, path: str):
    """``txn.get(key)`` of a ``buffers=True`` transaction, checked with :func:`check_in_file`
    (the few metadata records read at open; records themselves use the reader's own check)."""
    value = txn.get(key)
    if isinstance(value, memoryview):
        check_in_file(value, map_base(path), os.path.getsize(data_file(path)), path,
                      f"record {key!r}")
    return value


_SHARED: Dict[Tuple[int, str], list] = {}  # (pid, real path) -> [env, references]
_SHARED_LOCK = threading.Lock()


def acquire_env(path: str):
    """A read-only environment shared by every user of ``path`` in this process.

    LMDB allows one open environment per file and process, so two Loaders (or a Loader and a
    bench) of the same split share one, reference-counted; a forked child opens its own.
    Pair every call with :func:`release_env`.
    """
    key = (os.getpid(), os.path.realpath(path))
    with _SHARED_LOCK:
        entry = _SHARED.get(key)
        if entry is None:
            entry = _SHARED[key] = [open_env(path), 0]
        entry[1] += 1
        return entry[0]


def release_env(path: str) -> None:
    key = (os.getpid(), os.path.realpath(path))
    with _SHARED_LOCK:
        entry = _SHARED.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _SHARED[key]


def find_split(root: str, split: str) -> str:
    """Path of ``split``'s LMDB under ``root`` (a folder, or the .lmdb file itself).

    Raises:
        ValueError: unknown split.
        FileNotFoundError: naming what is there and how to make the file.
    """
    if split not in SPLITS:
        raise ValueError(f"mode/split={split!r}; expected one of {', '.join(map(repr, SPLITS))}")
    if os.path.isfile(root):
        return root
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"{root!r} does not exist; pass the output folder of "
            "`python preprocess_sequential.py /imagenet /lmdb`")
    path = os.path.join(root, split_filename(split))
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):  # e.g. an LMDB made with lmdb.open's default subdir=True
        raise _folder_error(path)
    if is_env_folder(root):  # the split's "file" passed itself, and it is a folder
        raise _folder_error(root)
    found = sorted(os.listdir(root))
    own = split_filename(split) + ".partial"
    partial = [own] if own in found else [f for f in found if f.endswith(".partial")]
    hint = (f" ({partial[0]} is an unfinished conversion: "
            f"{describe_unfinished(os.path.join(root, partial[0]))})") if partial else ""
    raise FileNotFoundError(
        f"no {split_filename(split)} in {root} (found: {', '.join(found) or 'nothing'}){hint}; "
        f"run `python preprocess_sequential.py /path/to/imagenet {root}` first")


def read_metadata(txn, path: str) -> Metadata:
    """Metadata of an open LMDB: ours (version checked) or the original tool's (legacy)."""
    raw = get_checked(txn, META_KEY, path)
    if raw is not None:
        return Metadata.from_json(raw, path)
    if get_checked(txn, PROGRESS_KEY, path) is not None:
        raise ValueError(f"{path} is an unfinished conversion: {describe_unfinished(path)}")
    keys = get_checked(txn, LEGACY_KEYS_KEY, path)
    if keys is None and path.endswith(".partial"):  # before the converter's first commit
        raise ValueError(f"{path} is an unfinished conversion: {describe_unfinished(path)}")
    if keys is None:
        raise ValueError(
            f"{path} is an LMDB without an imagenet_seq __meta__ record or the original tool's "
            "__keys__ record; convert the images with preprocess_sequential.py")
    n = len(_tensorpack_serialize(path).loads(bytes(keys)))
    split = "train" if "train" in os.path.basename(path) else "val"
    return Metadata(split=split, classes=[], class_counts=[], num_records=n, total_bytes=0,
                    order="unknown", legacy=True)


def read_labels(txn, meta: Metadata, path: str = "") -> Optional[np.ndarray]:
    """Every record's label (int32, record order), or None for legacy files. With ``path``
    and a ``buffers=True`` transaction, a read-only view of the file (``mapped.py``: shared
    by every process that reads it), else a copy.

    Raises:
        DamagedFile: a wrong count, or a label outside ``[0, len(meta.classes))``.
    """
    from imagenet_seq.format import mapped

    raw = mapped.get(txn, LABELS_KEY, path) if path else txn.get(LABELS_KEY)
    if raw is None:
        return None
    labels = np.frombuffer(raw if path else bytes(raw), dtype="<i4")
    if len(labels) != meta.num_records:
        raise DamagedFile(f"{path}: __labels__ holds {len(labels)} labels for "
                          f"{meta.num_records} records; {REMEDY}")
    if not len(labels) or (labels.min() >= 0 and labels.max() < len(meta.classes)):
        return labels  # (no temporary arrays of the file's size)
    bad = np.flatnonzero((labels < 0) | (labels >= len(meta.classes)))
    if meta.classes and len(bad):
        raise DamagedFile(f"{path}: __labels__ gives record {bad[0]} label {labels[bad[0]]}, "
                          f"outside 0..{len(meta.classes) - 1} ({len(bad)} such); {REMEDY}")
    return labels
