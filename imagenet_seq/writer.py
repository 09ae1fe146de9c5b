"""Convert one split: N worker processes read + validate + normalise, ONE writer appends.

Crash safety: records go into ``ILSVRC-<split>.lmdb.partial``; every commit carries a
``__progress__`` record (plan position, counts, a fingerprint of the inputs and options) in the
same transaction, so the file always describes exactly what it holds. The final transaction
writes ``__labels__`` and ``__meta__`` and drops ``__progress__``; only then is the file renamed
to ``ILSVRC-<split>.lmdb``. A killed run never leaves a file that looks complete, and
``resume=True`` continues from the last commit, ending with the record set a clean run writes.

Memory: at most ``workers * 8`` chunks of 32 images are in flight (``convert_workers``) and one uncommitted
transaction holds at most ``COMMIT_BYTES`` of records; nothing else grows
with the dataset except the label list (4 bytes per image).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

from . import checksums
from . import format as fmt
from . import offsets
from .convert_workers import Workers, WorkerError, results
from .lmdbfile import DamagedFile
from .scan import Scan

COMMIT_RECORDS = 2000
COMMIT_BYTES = 64 << 20  # dirty pages of one transaction live in memory: bounds RSS


class ConversionError(RuntimeError):
    """The conversion cannot go on; the message names the file or value and the fix."""


@dataclass
class Options:
    seed: int = 0
    max_size: Optional[int] = None
    quality: int = 95
    workers: int = 0
    strict: bool = False

    def content(self) -> dict:
        """Options that change what is written (workers do not)."""
        return {"seed": self.seed, "max_size": self.max_size, "quality": self.quality}


@dataclass
class Result:
    split: str
    path: str
    written: int = 0
    converted: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    resumed_at: int = 0
    already_complete: bool = False
    report: Optional[str] = None  # the skipped-files report the CLI wrote


def plan_order(scan: Scan, split: str, seed: int) -> List[Tuple[str, int]]:
    """Write order: train = seeded random permutation, val = sorted paths."""
    if split == "train":
        perm = np.random.default_rng(seed).permutation(len(scan.entries))
        return [scan.entries[i] for i in perm]
    return list(scan.entries)


def fingerprint(plan: List[Tuple[str, int]], classes: List[str], opts: Options) -> str:
    h = hashlib.sha1(json.dumps([classes, opts.content()]).encode())
    for path, label in plan:
        # surrogateescape: names that are not UTF-8 (listed by os.listdir as lone surrogates,
        # as torchvision's ImageFolder lists them) hash as their bytes on disk
        h.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _committed_skips(env):
    with env.begin() as txn:
        cur = txn.cursor()
        if not cur.set_range(fmt.SKIP_PREFIX):
            return
        for k, v in cur:
            if not bytes(k).startswith(fmt.SKIP_PREFIX):
                return
            yield json.loads(bytes(v))


def _write_offsets(env, path: str, num_records: int) -> None:
    """The offsets index (``offsets.py``); where it cannot be made (no ``/proc/self/maps``) the
    file is complete without it and readers use the B-tree: warn, do not fail the conversion."""
    try:
        offsets.write(env, path, num_records)
    except OSError as e:
        warnings.warn(f"{path}: no offsets index written ({e}); readers will walk the B-tree "
                      "(slower from an HDD)")


def _open(path: str, way_out: str, **kw):
    """``fmt.open_env``, whose size check refuses a file shorter than its LMDB header says
    (LMDB would SIGBUS on it), as a ConversionError the CLI prints with ``way_out``."""
    try:
        return fmt.open_env(path, **kw)
    except DamagedFile as e:
        raise ConversionError(f"{e}. {way_out}") from None


def _complete(final: str, res: Result) -> Result:
    """``--resume`` over a finished split: keep it, and report what it skipped."""
    env = _open(final, "--resume keeps finished files: pass --overwrite to convert it again")
    try:
        with env.begin() as txn:
            meta = fmt.read_metadata(txn, final)
        res.skipped = [(d["path"], d["reason"]) for d in _committed_skips(env)]
    except ValueError as e:
        raise ConversionError(f"{e} (found by --resume, which keeps finished files; pass "
                              "--overwrite to convert it again)") from None
    finally:
        env.close()
    res.already_complete = True
    res.written, res.bytes = meta.num_records, meta.total_bytes
    return res


def _remove(path: str) -> None:
    for p in (path, path + "-lock"):
        if os.path.exists(p):
            os.remove(p)


def convert_split(src_root: str, out_dir: str, split: str, scan: Scan, opts: Options,
                  overwrite: bool = False, resume: bool = False,
                  progress: Optional[Callable[[int, int, int], None]] = None,
                  start_progress: Optional[Callable[[int, int], None]] = None) -> Result:
    """Write ``out_dir/ILSVRC-<split>.lmdb`` from ``scan``.

    ``progress(n_done_delta, bytes_delta, skipped_total)`` is called as records land;
    ``start_progress(total, initial)`` once before the first.
    """
    final = os.path.join(out_dir, fmt.split_filename(split))
    partial = final + ".partial"
    res = Result(split, final)
    if len(scan.entries) >= fmt.MAX_RECORDS:
        raise ConversionError(f"{len(scan.entries)} images in {split}; the format holds at most "
                              f"{fmt.MAX_RECORDS - 1}")
    if os.path.exists(final):
        if resume and not overwrite:
            return _complete(final, res)
        if not overwrite:
            raise ConversionError(f"{final} already exists; pass --overwrite to replace it "
                                  "(or --resume to keep it and finish the other splits)")
    if os.path.exists(partial) and not resume:
        if not overwrite:
            raise ConversionError(f"{partial} is an unfinished conversion; pass --resume to "
                                  "continue it or --overwrite to start over")
        _remove(partial)

    plan = plan_order(scan, split, opts.seed)
    fp = fingerprint(plan, scan.classes, opts)
    split_dir = os.path.join(src_root, split)
    os.makedirs(out_dir, exist_ok=True)
    env = _open(partial, f"It is an unfinished conversion: delete {partial} and convert again "
                "(or pass --overwrite instead of --resume)", readonly=False, lock=False)
    try:
        finished = None
        state = {"fingerprint": fp, "plan_pos": 0, "written": 0, "bytes": 0, "converted": 0,
                 "skipped": 0, "class_counts": [0] * len(scan.classes)}
        with env.begin() as txn:
            raw = txn.get(fmt.PROGRESS_KEY)
            if raw is not None:
                old = json.loads(bytes(raw))
                if old.get("fingerprint") != fp:
                    raise ConversionError(
                        f"{partial} was started with other inputs or options (file list, seed, "
                        "--max-size or --quality differ); run with the same ones, or pass "
                        "--overwrite to start over")
                state = old
            elif txn.get(fmt.META_KEY) is not None:
                finished = fmt.read_metadata(txn, partial)  # killed just before the rename
                has_offsets = txn.get(offsets.OFFSETS_KEY) is not None
            elif txn.stat()["entries"] and txn.get(fmt.record_key(0)) is not None:
                raise ConversionError(f"{partial} holds records but no progress record; "
                                      "pass --overwrite to start over")
        if finished is not None:
            if finished.classes != scan.classes or finished.options != opts.content():
                raise ConversionError(
                    f"{partial} is a finished conversion of other inputs or options (classes, "
                    "seed, --max-size or --quality differ); run with the same ones, or pass "
                    "--overwrite to start over")
            res.skipped = [(d["path"], d["reason"]) for d in _committed_skips(env)]
            if not has_offsets:
                _write_offsets(env, partial, finished.num_records)
            env.sync(True)
            os.replace(partial, final)  # lock=False: renaming the open file is safe
            _remove(partial)
            res.written, res.bytes, res.resumed_at = (finished.num_records, finished.total_bytes,
                                                       len(plan))
            return res
        res.resumed_at = state["plan_pos"]
        crcs = checksums.Log(state["written"])  # records before it: checksums committed
        t0 = time.perf_counter()
        if start_progress:
            start_progress(len(plan), state["plan_pos"])
        # records written == plan positions done minus skipped, so labels follow from the plan
        skipped_pos = set()
        for d in _committed_skips(env):
            skipped_pos.add(d["pos"])
            res.skipped.append((d["path"], d["reason"]))

        workers = Workers(opts.workers) if opts.workers > 0 else None
        txn = None
        pending_n = pending_b = 0
        try:
            txn = env.begin(write=True)
            for pos, status, payload, note in results(split_dir, plan, state["plan_pos"],
                                                      opts.max_size, opts.quality, workers):
                rel, label = plan[pos]
                if status == "error":
                    raise ConversionError(payload)
                if status == "skip":
                    if opts.strict:
                        raise ConversionError(
                            f"{os.path.join(split_dir, rel)}: {payload} (--strict stops at the "
                            "first broken file; remove or fix it, or run without --strict to "
                            "skip and report it)")
                    txn.put(fmt.skip_key(state["skipped"]),
                            json.dumps({"path": rel, "reason": payload, "pos": pos}).encode())
                    state["skipped"] += 1
                    skipped_pos.add(pos)
                    res.skipped.append((rel, payload))
                    nbytes = 0
                else:
                    txn.put(fmt.record_key(state["written"]), payload)
                    crcs.add(payload)  # checksum while the bytes are in hand (checksums.py)
                    state["written"] += 1
                    state["class_counts"][label] += 1
                    nbytes = len(payload) - fmt.RECORD_HEADER.size
                    state["bytes"] += nbytes
                    state["converted"] += note is not None
                state["plan_pos"] = pos + 1
                pending_n += 1
                pending_b += nbytes
                if progress:
                    progress(1, nbytes, state["skipped"])
                if pending_n >= COMMIT_RECORDS or pending_b >= COMMIT_BYTES:
                    txn.put(fmt.PROGRESS_KEY, json.dumps(state).encode())
                    crcs.commit(txn)  # with their records: a resume keeps them
                    txn.commit()
                    txn = env.begin(write=True)
                    pending_n = pending_b = 0
            labels = np.array([lab for p, (_, lab) in enumerate(plan) if p not in skipped_pos],
                              dtype="<i4")
            if len(labels) != state["written"]:
                raise ConversionError(f"internal: {len(labels)} labels for {state['written']} "
                                      "records; run again with --overwrite")
            meta = fmt.Metadata(
                split=split, classes=scan.classes, class_counts=state["class_counts"],
                num_records=state["written"], total_bytes=state["bytes"],
                order="random" if split == "train" else "sorted",
                options=opts.content(), skipped=state["skipped"])
            txn.put(fmt.LABELS_KEY, labels.tobytes())
            crcs.finish(txn, state["written"])
            txn.delete(fmt.PROGRESS_KEY)
            txn.put(fmt.META_KEY, meta.to_json())  # metadata last
            txn.commit()
            txn = None
            # where every record's bytes landed, so readers need no B-tree lookups (offsets.py)
            _write_offsets(env, partial, state["written"])
        except WorkerError as e:
            raise ConversionError(str(e)) from None
        finally:
            if workers is not None:
                workers.close()  # first: kill, never wait for their cooperation
            if txn is not None:
                # keep what is committed; a clean abort of the open transaction loses only
                # records since the last commit, which --resume rewrites
                txn.abort()
        env.sync(True)
    finally:
        env.close()
    os.replace(partial, final)
    _remove(partial)
    res.written = state["written"]
    res.bytes = state["bytes"]
    res.converted = state["converted"]
    res.seconds = time.perf_counter() - t0
    return res
