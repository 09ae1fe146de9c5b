"""A split as shards: ``ILSVRC-<split>.manifest.json`` naming ``ILSVRC-<split>-JJJJJ-of-KKKKK.lmdb``.

A split is an ordered list of shards. Each shard is a complete LMDB of this package's format
(``format/__init__``; ``imagenet-seq-verify`` checks one alone) holding a contiguous range of the
split's records: shard ``j`` holds the split's records ``first_j .. first_j + records_j - 1`` as
its own records ``0 .. records_j - 1``, so the split's order is the shards' orders one after the
other, whatever the shard count. A shard's ``__meta__`` is the usual one for its own records
plus ``"shard": {"index": j, "count": K, "first": first_j, "split_id": ...}``.

The manifest (JSON, written last and atomically, in the output folder) holds the split's totals
(records, JPEG bytes, classes and per-class counts, options, skipped count), a ``split_id``
that every shard's ``__meta__`` repeats (a shard of another conversion is refused), and per
shard: its file name, its folder (``"."`` = the manifest's folder, else an absolute path: shards
may lie on several disks), first record, record count, JPEG bytes, file size and a checksum of
its ``__crc__`` + ``__labels__`` records (:func:`shard_checksum`; the records' own CRCs cover
their bytes).

One file, ``ILSVRC-<split>.lmdb`` without a manifest, is the 1-shard split: :func:`open_split`
gives the same :class:`Split` for it (one :class:`Shard`, no manifest, no checksum), so readers
have one code path.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from imagenet_seq import format as fmt
from imagenet_seq.format.lmdbfile import DamagedFile

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "manifest_filename", "shard_filename",
           "Shard", "Split", "shard_ranges", "shard_count", "shard_checksum", "write_manifest",
           "read_manifest", "find_shard", "open_split"]

MANIFEST_FORMAT = "imagenet_seq-manifest"
MANIFEST_VERSION = 1
_TOTALS = ("num_records", "total_bytes", "classes", "class_counts", "order", "options",
           "skipped")


def manifest_filename(split: str) -> str:
    return f"ILSVRC-{split}.manifest.json"


def shard_filename(split: str, index: int, count: int) -> str:
    """``ILSVRC-train-00000-of-00003.lmdb``: index from 0, as WebDataset/HF shards are named."""
    return f"ILSVRC-{split}-{index:05d}-of-{count:05d}.lmdb"


@dataclass
class Shard:
    """One shard file: the split's records ``first .. first + records - 1``."""

    index: int
    path: str
    first: int
    records: int
    bytes: int = 0  # JPEG bytes (values), as the shard's __meta__ total_bytes
    file_bytes: int = 0  # the .lmdb file's size when it was written (0: not known)
    checksum: Optional[str] = None  # shard_checksum() at conversion (None: one-file split)

    @property
    def device(self) -> int:
        """``st_dev`` of the shard's file: shards on one device share one reader."""
        return os.stat(self.path).st_dev


@dataclass
class Split:
    """A split's shards, in record order; ``manifest`` is None for a one-file split."""

    split: str
    shards: List[Shard]
    manifest: Optional[str] = None
    totals: Dict[str, Any] = field(default_factory=dict)  # the manifest's totals (empty: none)

    @property
    def num_records(self) -> int:
        return sum(s.records for s in self.shards)

    @property
    def paths(self) -> List[str]:
        return [s.path for s in self.shards]

    def locate(self, record: int) -> Tuple[int, int]:
        """``(shard index, record within the shard)`` of the split's record ``record``."""
        if not 0 <= record < self.num_records:
            raise IndexError(f"record {record} of a split of {self.num_records}")
        firsts = [s.first for s in self.shards]
        j = bisect.bisect_right(firsts, record) - 1
        return j, record - self.shards[j].first

    def cut(self, spans: Sequence[Tuple[int, int]]) -> List[Tuple[int, int, int]]:
        """Spans of split records ``(first, count)`` -> ``(shard, first within it, count)``,
        in the same order, a span crossing a shard boundary cut in two."""
        out = []
        for first, count in spans:
            while count > 0:
                j, local = self.locate(first)
                n = min(count, self.shards[j].records - local)
                out.append((j, local, n))
                first, count = first + n, count - n
        return out


def shard_ranges(num_records: int, count: int) -> List[Tuple[int, int]]:
    """``(first, records)`` of ``count`` shards over ``num_records`` records: sizes differ by at
    most one, the larger first."""
    if count < 1:
        raise ValueError(f"shards={count}; expected at least 1")
    base, extra = divmod(num_records, count)
    out, first = [], 0
    for j in range(count):
        n = base + (1 if j < extra else 0)
        out.append((first, n))
        first += n
    return out


def shard_count(total_bytes: int, shard_gb: float) -> int:
    """Shards of at most ``shard_gb`` GB (10^9 bytes) each for ``total_bytes``."""
    if not shard_gb > 0:
        raise ValueError(f"--shard-gb {shard_gb}; expected a size in GB above 0, e.g. 100")
    return max(1, -(-int(total_bytes) // int(shard_gb * 1e9)))


def shard_checksum(txn) -> str:
    """SHA-1 of a shard's ``__crc__`` and ``__labels__`` values (empty where absent): with the
    per-record CRCs it stands for the shard's content, and costs no pass over the records."""
    h = hashlib.sha1()
    for key in (fmt.CRC_KEY, fmt.LABELS_KEY):
        raw = txn.get(key)
        h.update(len(raw if raw is not None else b"").to_bytes(8, "little"))
        h.update(raw if raw is not None else b"")  # a buffer: no copy of the file's size
    return h.hexdigest()


def write_manifest(out_dir: str, split: str, split_id: str, totals: Dict[str, Any],
                   shards: Sequence[Shard]) -> str:
    """Write ``out_dir/ILSVRC-<split>.manifest.json`` atomically (temporary file, fsync,
    rename). ``totals`` holds :data:`_TOTALS`; a shard's folder is stored as ``"."`` when it
    is ``out_dir``, else absolute. Returns the manifest's path."""
    missing = [k for k in _TOTALS if k not in totals]
    if missing:
        raise ValueError(f"manifest totals lack {', '.join(missing)}")
    here = os.path.realpath(out_dir)
    rows = []
    for s in shards:
        folder = os.path.realpath(os.path.dirname(os.path.abspath(s.path)))
        rows.append({"name": os.path.basename(s.path),
                     "folder": "." if folder == here else folder,
                     "first": s.first, "records": s.records, "bytes": s.bytes,
                     "file_bytes": s.file_bytes, "checksum": s.checksum})
    doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "split": split,
           "split_id": split_id, **{k: totals[k] for k in _TOTALS}, "shards": rows}
    path = os.path.join(out_dir, manifest_filename(split))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _damaged(path: str, what: str) -> DamagedFile:
    return DamagedFile(f"{path}: {what}; the manifest is written last by the conversion: "
                       "convert again with preprocess_sequential.py --resume (or --overwrite)")


def read_manifest(path: str) -> Dict[str, Any]:
    """The manifest's JSON, its structure checked (format, version, contiguous shards)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except ValueError as e:
        raise _damaged(path, f"not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise _damaged(path, f"not an {MANIFEST_FORMAT} file")
    if doc.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path} has manifest version {doc.get('version')!r}, this imagenet_seq "
                         f"reads version {MANIFEST_VERSION}; install the imagenet_seq version "
                         "that wrote it, or convert again with this one")
    try:
        rows = doc["shards"]
        first = 0
        for j, r in enumerate(rows):
            if int(r["first"]) != first or int(r["records"]) < 0 or not r["name"]:
                raise ValueError(f"shard {j} starts at {r['first']}, expected {first}")
            first += int(r["records"])
        if not rows or first != int(doc["num_records"]):
            raise ValueError(f"the shards hold {first} records, the total says "
                             f"{doc['num_records']}")
        for k in _TOTALS + ("split", "split_id"):
            doc[k]  # noqa: B018 - KeyError when absent
    except (KeyError, TypeError, ValueError) as e:
        raise _damaged(path, f"inconsistent ({type(e).__name__}: {e})") from None
    return doc


def _find_shard(root: str, row: Dict[str, Any], shard_dirs: Sequence[str]) -> Optional[str]:
    folder = row["folder"]
    places = [root if folder == "." else folder, *shard_dirs, root]
    for place in places:
        path = os.path.join(place, row["name"])
        if os.path.isfile(path):
            return path
    return None


def find_shard(root: str, row: Dict[str, Any], shard_dirs: Sequence[str] = ()) -> Optional[str]:
    """The path of the shard a manifest row names (looked for as :func:`open_split` does),
    or None; ``root``: the manifest's folder."""
    return _find_shard(root, row, shard_dirs)


def _one_file(path: str) -> "Split":
    env = fmt.acquire_env(path)
    try:
        with env.begin(buffers=True) as txn:
            meta = fmt.read_metadata(txn, path)
    finally:
        fmt.release_env(path)
    return Split(meta.split, [Shard(0, path, 0, meta.num_records, meta.total_bytes)])


def open_split(root: str, split: str, shard_dirs: Sequence[str] = ()) -> Split:
    """The shards of ``split`` under ``root`` (a folder with a manifest or one split file; or
    the .lmdb / manifest file itself).

    A shard is looked for in the folder the manifest names, then in each of ``shard_dirs`` (a
    moved disk), then beside the manifest.

    Raises:
        FileNotFoundError: no split there, or a shard found nowhere (naming it, the folders
            searched and the fix).
        DamagedFile: a manifest that does not parse, or a shard whose size differs from the
            size the manifest recorded (a partial copy).
    """
    manifest = root if root.endswith(".manifest.json") and os.path.isfile(root) else \
        os.path.join(root, manifest_filename(split)) if os.path.isdir(root) else None
    if manifest is None or not os.path.isfile(manifest):
        return _one_file(fmt.find_split(root, split))
    doc = read_manifest(manifest)
    if doc["split"] != split:
        raise ValueError(f"{manifest} describes the {doc['split']!r} split, but mode={split!r} "
                         f"was asked; pass mode={doc['split']!r}")
    here = os.path.dirname(os.path.abspath(manifest))
    shards = []
    for j, row in enumerate(doc["shards"]):
        path = _find_shard(here, row, shard_dirs)
        if path is None:
            where = here if row["folder"] == "." else row["folder"]
            raise FileNotFoundError(
                f"shard {j} of {len(doc['shards'])} of {split} ({row['name']}) is not in "
                f"{where}{' nor in ' + ', '.join(shard_dirs) if shard_dirs else ''}; if its "
                f"disk is mounted elsewhere, name the folder (Loader(..., shard_dirs=[...]) or "
                f"--shard-dirs), else copy the shard back from where it was written")
        size = os.path.getsize(path)
        if row["file_bytes"] and size != row["file_bytes"]:
            raise _damaged(path, f"is {size} bytes, the manifest {manifest} recorded "
                                 f"{row['file_bytes']} (an interrupted copy?)")
        shards.append(Shard(j, path, int(row["first"]), int(row["records"]), int(row["bytes"]),
                            int(row["file_bytes"]), row.get("checksum")))
    return Split(split, shards, manifest, {k: doc[k] for k in _TOTALS + ("split_id",)})
