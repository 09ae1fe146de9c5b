"""Checking a sharded split: every shard alone (``verify.verify_split``), and the manifest.

The manifest's report (its path is the manifest's) holds what no single shard can tell: a
shard the manifest names but that is nowhere (its folder, ``shard_dirs``, beside the
manifest), a shard that is not the one the manifest recorded (its ``__meta__``'s ``"shard"``
key: index, count, first record, split id; its records, JPEG bytes, file size and
``shard_checksum``), a shard with damaged records (named, counted; the records are listed
under the shard's own report), and the split's totals against the shards' sum. Each problem
says the fix: name the folder of a moved disk, copy the shard back, or convert again.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, List, Optional, Sequence

from imagenet_seq import format as fmt
from imagenet_seq.format import manifest as mf
from imagenet_seq.tools.verify import SplitReport, verify_split

__all__ = ["verify_manifest"]


def _fix(doc: dict, folder: str) -> str:
    return (f"copy it back from where it was written, or convert the {doc['split']} split "
            f"again: preprocess_sequential.py SRC {folder} --splits {doc['split']} --overwrite "
            f"--shards {len(doc['shards'])} (with the same --shard-dirs)")


def _compare(report: SplitReport, shard: SplitReport, row: dict, j: int, doc: dict,
             path: str, folder: str) -> None:
    """The shard against its manifest row: problems go to the manifest's ``report``."""
    key = f"shard {j}"
    size = os.path.getsize(path)
    if row["file_bytes"] and size != row["file_bytes"]:
        report.add(key, f"{path}: file size {size}, the manifest recorded {row['file_bytes']} "
                        f"(an interrupted copy, or a changed file); {_fix(doc, folder)}")
    if not shard.ok:
        report.add(key, f"{path}: {shard.problem_count} damaged record(s) or metadata (listed "
                        f"under it below); {_fix(doc, folder)}")
        if shard.shard is None:
            return  # its metadata could not be read: said under it
    want = {"index": j, "count": len(doc["shards"]), "first": int(row["first"]),
            "split_id": doc["split_id"]}
    got = shard.shard
    if got is None or any(got.get(k) != v for k, v in want.items()):
        report.add(key, f"{path} is not shard {j} of this split: its __meta__ says "
                        f"{got or 'it is not a shard'}, the manifest expects {want} (a shard of "
                        f"another conversion, or put in the wrong place); {_fix(doc, folder)}")
        return
    for what, have, recorded in (("records", shard.records, row["records"]),
                                 ("checksum of __crc__ + __labels__", shard.checksum,
                                  row.get("checksum"))):
        if recorded is not None and have != recorded:
            report.add(key, f"{path}: {what} {have}, the manifest recorded {recorded} (a "
                            f"changed file); {_fix(doc, folder)}")


def verify_manifest(path: str, shard_dirs: Sequence[str] = (), decode: bool = False,
                    bar: Optional[Callable[[str], object]] = None) -> List[SplitReport]:
    """Check a sharded split: ``[the manifest's report] + [one report per shard found]``;
    never raises for a damaged or incomplete split.

    Args:
        path: the ``ILSVRC-<split>.manifest.json``.
        shard_dirs: folders to look in for shards not where the manifest says (a moved disk).
        decode: also decode every JPEG.
        bar: ``bar(shard path)`` gives a context manager with ``update(nbytes)`` (progress).
    """
    t0 = time.perf_counter()
    report = SplitReport(path)
    out = [report]
    try:
        doc = mf.read_manifest(path)
    except (fmt.DamagedFile, ValueError, OSError) as e:
        report.add("file", str(e))
        return out
    here = os.path.dirname(os.path.abspath(path))
    report.split, report.records = doc["split"], int(doc["num_records"])
    report.checksums, report.decoded, report.shards = True, decode, len(doc["shards"])
    one = os.path.join(here, fmt.split_filename(doc["split"]))
    if os.path.exists(one):
        report.add("file", f"{one} lies beside {path}: two {doc['split']} splits in one folder "
                           "(readers take the manifest's shards); move or delete the one you "
                           "do not want")
    counts, all_read = [0] * len(doc["classes"]), True
    for j, row in enumerate(doc["shards"]):
        shard_path = mf.find_shard(here, row, shard_dirs)
        folder = here if row["folder"] == "." else row["folder"]
        if shard_path is None:
            all_read = False
            report.add(f"shard {j}", (
                f"{row['name']} (shard {j} of {len(doc['shards'])}, records {row['first']}.."
                f"{int(row['first']) + int(row['records']) - 1}) is missing: not in {folder}"
                + (f" nor in {', '.join(shard_dirs)}" if shard_dirs else "")
                + "; if its disk is mounted elsewhere, name that folder (--shard-dirs DIR; "
                f"the Loader: shard_dirs=[...]), else {_fix(doc, here)}"))
            continue
        with (bar(shard_path) if bar else contextlib.nullcontext()) as b:
            shard = verify_split(shard_path, decode=decode,
                                 progress=b.update if b is not None else None)
        out.append(shard)
        report.checked += shard.checked
        report.bytes += shard.bytes
        report.checksums = report.checksums and shard.checksums
        _compare(report, shard, row, j, doc, shard_path, here)
        try:
            env = fmt.open_env(shard_path)
            try:
                with env.begin(buffers=True) as txn:
                    meta = fmt.read_metadata(txn, shard_path)
            finally:
                env.close()
            if shard.shard is not None and meta.total_bytes != row["bytes"]:
                report.add(f"shard {j}", f"{shard_path}: {meta.total_bytes} bytes of images, the "
                                         f"manifest recorded {row['bytes']} (a changed file); "
                                         f"{_fix(doc, here)}")
            if len(meta.class_counts) == len(counts):
                counts = [a + b for a, b in zip(counts, meta.class_counts)]
            else:
                all_read = False
        except (fmt.DamagedFile, ValueError, OSError):
            all_read = False  # the shard's own report says why
    if all_read and counts != list(doc["class_counts"]):
        report.add("file", f"{path}: class counts {doc['class_counts']}, the shards hold "
                           f"{counts}; {_fix(doc, here)}")
    report.seconds = time.perf_counter() - t0
    return out
