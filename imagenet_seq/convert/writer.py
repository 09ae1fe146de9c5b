"""Convert one split in two passes: read in on-disk order into sorted runs, merge into the LMDB.

The data path: ONE reader (``source_reader``) reads the files in the order they lie on the disk
(``disk_order``) → N worker processes validate + normalise (``convert_workers``) → pass 1: the
records, tagged with their position in the plan (``plan_order``: a seeded permutation for train,
sorted for val), fill a run buffer that is sorted and written as one sequential temporary file
when full (``sort_runs``) → pass 2: the runs are merged by position and appended, in plan order,
to ``ILSVRC-<split>.lmdb.partial``, renamed to ``ILSVRC-<split>.lmdb`` at the end. The output is
exactly what the one-pass converter wrote (same plan, same records, same order).

Crash safety: ``__progress__`` in the .partial says where the conversion stands, committed in
the same transaction as what it describes. Pass 1: which plan positions are done (a bitmap), the
finished runs (name, records, bytes; each fsync'd before it is listed), skip records. Pass 2: the
byte offset reached in each run and the records written. ``resume=True`` deletes runs that no
commit lists, re-reads what pass 1 had not committed and ends with the records of a clean run.
One conversion at a time per output folder: the folder's lock (``format.convlock``) is held
throughout, and the .partial is checked to be the file this conversion opened before it is
renamed, so no conversion reports success over a file it did not write.

Memory (``Options.memory``, default 2 GB): pass 1 holds one run buffer and pass 2 the runs'
read buffers, each ``memory - fixed_bytes(workers)``; fixed: one uncommitted transaction
(``COMMIT_BYTES``), the reader's queue (32 MiB) and the chunks in flight to the workers
(``workers * 8`` chunks of <= 1 MiB); the plan (~150 bytes per image) grows with the dataset.
Temporary space: about the split's source bytes, in ``Options.tmp`` (default: the output
folder), checked against free space before the run and deleted at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

from imagenet_seq import format as fmt
from imagenet_seq.format import offsets
from imagenet_seq.convert.passes import (DEFAULT_MEMORY, MAX_RUNS,  # noqa: F401
                             ConversionError, merge_pass, pack, prepare_runs, read_pass,
                             space_check, unpack)
from imagenet_seq.format.convlock import ABANDONED, Busy, ConversionLock
from imagenet_seq.format.lmdbdir import in_place_of_output
from imagenet_seq.format.lmdbfile import DamagedFile
from imagenet_seq.convert.scan import Scan
from imagenet_seq.convert.source_reader import FolderSource

__all__ = ["Options", "Result", "plan_order", "fingerprint", "convert_split"]


@dataclass
class Options:
    seed: int = 0
    max_size: Optional[int] = None
    quality: int = 95
    workers: int = 0
    strict: bool = False
    memory: int = DEFAULT_MEMORY  # bytes: the buffers' bound (module docstring)
    tmp: Optional[str] = None  # folder for the sorted runs (default: the output folder)
    read_order: str = "auto"  # disk_order method: auto (FIEMAP, else inode), inode, name
    read_ahead: Optional[int] = None  # source reads in flight (None: source_reader.READ_AHEAD)

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
    read_order: str = "-"  # how the source was ordered (disk_order): fiemap, inode, name
    runs: int = 0
    tmp_bytes: int = 0  # temporary bytes written (the runs)
    read_s: float = 0.0  # wall seconds of pass 1 (read, validate, write the runs)
    merge_s: float = 0.0  # wall seconds of pass 2 (merge into the LMDB, offsets index)
    read_cpu_s: float = 0.0  # CPU seconds of this process (all its threads) in pass 1
    merge_cpu_s: float = 0.0  # and in pass 2 (workers not included)


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
                  start_progress: Optional[Callable[[int, int, str], None]] = None,
                  notice: Optional[Callable[[str], None]] = None) -> Result:
    """Write ``out_dir/ILSVRC-<split>.lmdb`` from ``scan``.

    ``progress(n_done_delta, bytes_delta, skipped_total)`` is called as records land;
    ``start_progress(total, initial, pass_name)`` before each pass ('read', 'merge');
    ``notice(text)`` with the statement of sizes and free space before the run.

    The output folder's conversion lock (``format.convlock``) is held throughout (the CLI
    already holds it for the whole run); another live conversion into ``out_dir`` is a
    ConversionError naming its PID, before anything is written.
    """
    final = os.path.join(out_dir, fmt.split_filename(split))
    for path in (final, final + ".partial"):
        if os.path.isdir(path):
            raise ConversionError(in_place_of_output(path))
    try:
        lock = ConversionLock(out_dir)
        lock.acquire()
    except Busy as e:
        raise ConversionError(str(e)) from None
    try:
        return _convert(src_root, out_dir, split, scan, opts, overwrite, resume, progress,
                        start_progress, notice)
    finally:
        lock.release()


def _check_same_file(partial: str, ino: int, out_dir: str) -> None:
    """The .partial must still be the file this conversion opened: never report success
    over a file another process put there (the lock prevents it where flock works)."""
    try:
        now = os.stat(partial).st_ino
    except FileNotFoundError:
        now = None
    if now != ino:
        raise ConversionError(
            f"{partial} was {'deleted' if now is None else 'replaced'} by another process "
            f"while this conversion wrote it (another conversion into {out_dir}?): what this "
            "one wrote is lost and nothing was renamed; when no other conversion runs there, "
            "run again (--resume continues whatever .partial is there)")


def _adopt_runs(old: str, run_dir: str) -> bool:
    """Whether the runs recorded at ``old`` were moved to ``run_dir`` (the output folder, or
    --tmp, moved as a whole): they are used there; ``prepare_runs`` checks every size."""
    return old != run_dir and os.path.isdir(run_dir) and not os.path.exists(old)


def _convert(src_root, out_dir, split, scan, opts, overwrite, resume, progress,
             start_progress, notice) -> Result:
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
    run_dir = os.path.join(os.path.abspath(opts.tmp or out_dir), os.path.basename(partial)
                           + ".runs")
    if opts.tmp is not None:  # a shared scratch folder: one run folder per output file
        run_dir += "-" + hashlib.sha1(os.path.abspath(partial).encode()).hexdigest()[:8]
    if os.path.exists(partial) and not resume:
        if not overwrite:
            raise ConversionError(f"{partial} is an unfinished conversion; "
                                  f"{ABANDONED}. Pass --resume to continue it or "
                                  "--overwrite to start over")
        _remove(partial)
    if not resume and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)

    plan = plan_order(scan, split, opts.seed)
    fp = fingerprint(plan, scan.classes, opts)
    split_dir = os.path.join(src_root, split)
    os.makedirs(out_dir, exist_ok=True)
    if opts.tmp is not None and not os.path.isdir(opts.tmp):
        raise ConversionError(f"--tmp {opts.tmp} is not a folder; create it or pass another")
    env = _open(partial, f"It is an unfinished conversion: delete {partial} and convert again "
                "(or pass --overwrite instead of --resume)", readonly=False, lock=False)
    ino = os.stat(partial).st_ino
    try:
        finished = None
        state = {"fingerprint": fp, "phase": "read", "run_dir": run_dir, "runs": [],
                 "done": pack(np.zeros(len(plan), bool)), "written": 0, "bytes": 0,
                 "converted": 0, "skipped": 0, "class_counts": [0] * len(scan.classes)}
        with env.begin() as txn:
            raw = txn.get(fmt.PROGRESS_KEY)
            if raw is not None:
                old = json.loads(bytes(raw))
                if old.get("fingerprint") != fp:
                    raise ConversionError(
                        f"{partial} was started with other inputs or options (file list, seed, "
                        "--max-size or --quality differ); run with the same ones, or pass "
                        "--overwrite to start over")
                if "phase" not in old:
                    raise ConversionError(
                        f"{partial} was started by an older version of the converter (one "
                        "pass, no sorted runs); pass --overwrite to start over")
                if _adopt_runs(old["run_dir"], run_dir):
                    old["run_dir"] = run_dir  # committed with the next progress record
                elif old["run_dir"] != run_dir:
                    raise ConversionError(
                        f"{partial} keeps its temporary runs in {old['run_dir']}; pass --tmp "
                        f"{os.path.dirname(old['run_dir'])} to continue it (or move that "
                        f"folder: `mv {shlex.quote(old['run_dir'])} {shlex.quote(run_dir)}`), "
                        "or --overwrite to start over")
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
            _check_same_file(partial, ino, out_dir)
            os.replace(partial, final)  # lock=False: renaming the open file is safe
            _remove(partial)
            shutil.rmtree(run_dir, ignore_errors=True)
            res.written, res.bytes, res.resumed_at = (finished.num_records, finished.total_bytes,
                                                       len(plan))
            return res
        res.resumed_at = state["written"] if state["phase"] == "merge" else int(
            unpack(state["done"], len(plan)).sum())
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        space_check(scan, plan, state, run_dir, out_dir, split, opts.memory, opts.workers,
                    notice)
        prepare_runs(run_dir, state, partial)
        t0 = time.perf_counter()
        skipped_pos = set()
        for d in _committed_skips(env):
            skipped_pos.add(d["pos"])
            res.skipped.append((d["path"], d["reason"]))
        if state["phase"] == "read":
            rels = [rel for rel, _ in plan]
            source = scan.source or FolderSource(split_dir)
            read_order, res.read_order = source.order(
                rels, [scan.inode_size(r)[0] for r in rels], opts.read_order)
            t1, c1 = time.perf_counter(), time.process_time()
            read_pass(env, source, plan, read_order, state, run_dir, opts, res, progress,
                      start_progress)
            res.read_s, res.read_cpu_s = time.perf_counter() - t1, time.process_time() - c1
            skipped_pos = {d["pos"] for d in _committed_skips(env)}
        if len(state["runs"]) > MAX_RUNS:
            raise ConversionError(f"{len(state['runs'])} runs for {split}, more than {MAX_RUNS}"
                                  " can be merged at once; pass a larger --memory-mb")

        def finish(txn):
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
            txn.delete(fmt.PROGRESS_KEY)
            txn.put(fmt.META_KEY, meta.to_json())  # metadata last

        t1, c1 = time.perf_counter(), time.process_time()
        merge_pass(env, state, run_dir, opts, partial, finish, progress, start_progress,
                   len(plan))
        # where every record's bytes landed, so readers need no B-tree lookups (offsets.py)
        _write_offsets(env, partial, state["written"])
        res.merge_s, res.merge_cpu_s = time.perf_counter() - t1, time.process_time() - c1
        env.sync(True)
    finally:
        env.close()
    _check_same_file(partial, ino, out_dir)
    os.replace(partial, final)
    _remove(partial)
    res.runs = len(state["runs"])
    res.tmp_bytes = sum(r[2] for r in state["runs"])
    shutil.rmtree(run_dir, ignore_errors=True)  # after the rename: a kill before keeps them
    res.written = state["written"]
    res.bytes = state["bytes"]
    res.converted = state["converted"]
    res.seconds = time.perf_counter() - t0
    return res
