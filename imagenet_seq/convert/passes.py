"""The two passes of a split's conversion (``writer`` runs them and owns the .partial's state).

Pass 1 (:func:`read_pass`): ONE reader thread reads the files not yet done in on-disk order
(``source_reader``), worker processes validate + normalise (``convert_workers``), the records
fill a run buffer that is sorted by plan position and written as one sequential temporary file
(``sort_runs``) by a thread (:class:`RunWriter`) while reading goes on into the next run; each
run is fsync'd, then listed in ``__progress__`` with the bitmap of plan positions done (its
records count only from then on) and the skip records, in one transaction. Pass 2
(:func:`merge_pass`): the runs merged by position into the LMDB (or the shards, one after the
other: ``shard_sink``), each commit storing the byte offset reached in every run. What the two
need in space is checked beforehand (``space``).
"""
from __future__ import annotations

import json
import os
import threading
from typing import Optional

from imagenet_seq.format import checksums
from imagenet_seq import format as fmt
from imagenet_seq.convert.workers import WINDOW, Workers, WorkerError, results
from imagenet_seq.malloc import trim
from imagenet_seq.convert.sort_runs import NO_ORIGIN, RunBuffer, merge
from imagenet_seq.convert.source_reader import CHUNK_BYTES, QUEUE_CHUNKS

__all__ = ["COMMIT_RECORDS", "COMMIT_BYTES", "DEFAULT_MEMORY", "RUN_RECORDS", "MAX_RUNS",
           "ConversionError", "PROCESS_BYTES", "WORKER_BYTES", "PER_IMAGE_BYTES", "MIN_BUFFER",
           "fixed_bytes", "buffer_bytes", "prepare_runs",
           "RunWriter", "read_pass", "merge_pass"]

COMMIT_RECORDS = 2000
COMMIT_BYTES = 64 << 20  # dirty pages of one transaction live in memory: bounds RSS
DEFAULT_MEMORY = 2_000_000_000
RUN_RECORDS: Optional[int] = None  # tests: runs of a few records, to cut a tiny split in many
MAX_RUNS = 500  # each is open during the merge (file descriptors; ulimit -n is often 1024)


class ConversionError(RuntimeError):
    """The conversion cannot go on; the message names the file or value and the fix."""


# Measured (benchmarks/convert_order.py, peak of RSS minus shared pages): the converter's own
# process ~64 MB with its libraries, each worker ~40 MB; the file list, its read order and the
# reader's item list ~600 bytes per image (Python tuples and strings).
PROCESS_BYTES = 80_000_000
WORKER_BYTES = 50_000_000
PER_IMAGE_BYTES = 600
MIN_BUFFER = 64_000_000


def fixed_bytes(workers: int, images: int = 0) -> int:
    """Memory besides the run / merge buffers: the processes themselves, one uncommitted
    transaction, the reader's queue, the chunks in flight to and from the workers
    (``convert_workers.WINDOW`` each) and the per-image lists."""
    return (PROCESS_BYTES + COMMIT_BYTES + QUEUE_CHUNKS * CHUNK_BYTES
            + max(1, workers) * (WORKER_BYTES + WINDOW * CHUNK_BYTES) + images * PER_IMAGE_BYTES)


def buffer_bytes(memory: int, workers: int, images: int = 0) -> int:
    """Run buffer (pass 1) = merge read buffers (pass 2): what ``memory`` leaves.

    Raises:
        ValueError: ``memory`` too small for the fixed part plus a 64 MB buffer.
    """
    rest = memory - fixed_bytes(workers, images)
    if rest < MIN_BUFFER:
        need = (fixed_bytes(workers, images) + MIN_BUFFER) // 1_000_000 + 1
        raise ValueError(f"--memory-mb {memory // 1_000_000}; expected at least {need} with "
                         f"--workers {workers}{f' and {images} images' if images else ''} "
                         f"(processes, queues and file list: "
                         f"{fixed_bytes(workers, images) // 1_000_000} MB)")
    return rest


def prepare_runs(run_dir: str, state: dict, partial: str) -> None:
    """Runs the resume state lists must be whole; any other file in ``run_dir`` is a run
    written after the last commit (or cut short): deleted, its records are read again."""
    os.makedirs(run_dir, exist_ok=True)
    listed = {name: size for name, _, size in state["runs"]}
    for name in os.listdir(run_dir):
        if name not in listed:
            os.remove(os.path.join(run_dir, name))
    for name, size in listed.items():
        path = os.path.join(run_dir, name)
        got = os.path.getsize(path) if os.path.exists(path) else None
        if got != size:
            raise ConversionError(
                f"{path} is {'missing' if got is None else f'{got} bytes, not {size}'}: the "
                f"temporary runs of {partial} were changed; pass --overwrite to start over")


class _Run(RunBuffer):
    """A run being gathered, with what its records add to the resume state once it is on
    disk (until then a kill loses them, so the state must not count them)."""

    def __init__(self, max_bytes: int, max_records: Optional[int], classes: int):
        super().__init__(max_bytes, max_records)
        self.path: Optional[str] = None  # its file, once handed to the RunWriter
        self.class_counts = [0] * classes
        self.bytes = self.converted = 0


class RunWriter:
    """Writes a full run in a thread while pass 1 goes on reading into the next one: the
    source disk does not idle while a run is written and fsync'd (~6 s per 0.9 GB run on an
    HDD, ~170 times for ImageNet). The memory bound holds for both together: the write
    releases records as they reach the file (``RunBuffer.write``), and the run being filled is
    full when it and the rest of the one being written reach the budget. One write at a time;
    :meth:`wait` returns the finished run or raises its OSError."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._out: list = []
        self._run: Optional[_Run] = None
        self.path: Optional[str] = None  # of the run written last (named in its error)

    def pending_bytes(self) -> int:
        """Bytes the run being written still holds (0 when none is)."""
        run = self._run
        return run.nbytes if run is not None else 0

    def start(self, run: _Run) -> None:
        """Write ``run`` to ``run.path``."""
        assert self._thread is None, "wait() for the previous run first"
        self._run, self.path = run, run.path

        def write():
            try:
                self._out.append((run, None, run.write(run.path)))
            except BaseException as e:  # OSError (full disk), MemoryError: the caller's
                self._out.append(e)
            # the records were allocated by the reader's and the main thread (their malloc
            # arenas): give them back, or the next runs / the merge pile on top (+140 MB)
            trim()
        self._thread = threading.Thread(target=write, daemon=True,
                                        name="imagenet_seq-convert-run-writer")
        self._thread.start()

    def busy(self) -> bool:
        return self._thread is not None

    def wait(self, timeout: Optional[float] = None):
        """(run, its positions, (records, bytes)) of the write in flight, None if none or
        still running at ``timeout``. Raises what the write raised."""
        if self._thread is None:
            return None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        self._thread = self._run = None
        got = self._out.pop()
        if isinstance(got, BaseException):
            raise got
        return got


def read_pass(env, sweep, state, run_dir, opts, res, progress, start_progress,
              key_of) -> None:
    """Pass 1: the sweep's items from ``state["sweep"]`` on, in read order, into runs sorted by
    ``key_of(rel)`` (``write_order.sort_key``) and the sweep's sequence number.

    ``sweep`` (``sweep.FolderSweep``, ``tar_sweep.*``): ``chunks(cursor)`` gives chunks of
    ``(tag, rel, label, bytes or verdict)`` in read order, ``tag = (seq, token, origin)``;
    ``total`` the items expected (None: unknown, an archive before its sweep);
    ``describe(rel)`` names a file. A verdict is ``('skip', why)`` (a broken file: counted,
    ``--strict`` stops), ``('note', why)`` (reported, never stored, not counted), ``('mark',
    what)`` (what the sweep found out: a class, a nested tar: ``state["found"]``) or
    ``('error', message)``. Progress is committed as the sweep's cursor (the first item not
    yet in a run on disk), never as a list over the split's files."""
    cursor = state["sweep"]
    start = cursor["seq"]
    if start_progress:
        start_progress(sweep.total, start if sweep.total else 0, "read")
    run_bytes = buffer_bytes(opts.memory, opts.workers, getattr(sweep, "images", 0))
    run = _Run(run_bytes, RUN_RECORDS, 0)
    writer = RunWriter()
    workers = Workers(opts.workers) if opts.workers > 0 else None
    reader = sweep.reader(cursor, opts.read_ahead)
    txn = env.begin(write=True)
    last = [None]  # (seq, token) of the last item handled
    run.first = None

    def cursor_now():
        """The first item whose effect is not yet on disk: the run being written (before
        its commit) or being filled, else the one after the last item handled."""
        firsts = [r.first for r in (run,) if r.first is not None]
        if firsts:
            seq, token = firsts[0]
            return {"seq": seq, "token": token}
        if last[0] is None:
            return dict(state["sweep"])
        seq, token = last[0]
        return {"seq": seq + 1, "token": token}  # resume at it, dropping it (seq < cursor)

    def commit(written=None):
        """The progress record, with the run just written (if any), in one transaction."""
        nonlocal txn
        if written is not None:
            done_run, _, (n, size) = written
            state["runs"].append([os.path.basename(done_run.path), n, size])
            state["bytes"] += done_run.bytes
            state["converted"] += done_run.converted
        state["sweep"] = cursor_now()
        txn.put(fmt.PROGRESS_KEY, json.dumps(state).encode())
        txn.commit()
        txn = env.begin(write=True)

    def finish_write(timeout=None) -> bool:
        """Commit the run in flight once written; False if it is still being written."""
        if not writer.busy():
            return True
        try:
            got = writer.wait(timeout)
        except OSError as e:
            raise ConversionError(
                f"cannot write the temporary run {writer.path}: {e.strerror or e}; free "
                f"space in {run_dir} (or pass --tmp DIR on a disk with room), then run again "
                "with --resume") from None
        if got is None:
            return False
        commit(got)
        return True

    def hand_over():
        nonlocal run
        finish_write()  # one write at a time: the memory bound holds two runs
        run.path = os.path.join(run_dir, f"run-{len(state['runs']):05d}")
        writer.start(run)
        run = _Run(run_bytes, RUN_RECORDS, 0)
        run.first = None

    found = state.setdefault("found", {"classes": [], "containers": {}, "flags": []})
    classes = set(found["classes"])
    last_wins = getattr(sweep, "last_wins", False)
    describe = getattr(sweep, "describe_item", lambda rel, origin: sweep.describe(rel))
    try:
        for tag, status, payload, note in results(sweep.describe(""), reader, opts.max_size,
                                                  opts.quality, workers):
            seq, token, origin, rel, label = tag
            if seq < start:
                continue  # before the cursor: already in a committed run (a resumed sweep)
            last[0] = (seq, token)
            nbytes = 0
            if status == "error":
                raise ConversionError(payload)
            if status == "mark":
                if "class" in payload and payload["class"] not in classes:
                    classes.add(payload["class"])
                    found["classes"] = sorted(classes)
                if "container" in payload:
                    seqs = found["containers"].setdefault(payload["container"], [])
                    if seq not in seqs:
                        seqs.append(seq)
                if "flag" in payload and payload["flag"] not in found["flags"]:
                    found["flags"].append(payload["flag"])
                if "top" in payload:
                    found["top"] = max(found.get("top", -1), payload["top"])
                if "odd" in payload:  # a member kind not used: counted once per member
                    kind, name, shard = payload["odd"]
                    slot = found.setdefault("odd", {}).setdefault(kind, [0, name, shard, -1])
                    if seq > slot[3]:
                        slot[0], slot[3] = slot[0] + 1, seq
                continue
            if status in ("skip", "note"):
                if status == "skip" and opts.strict:
                    raise ConversionError(
                        f"{describe(rel, origin)}: {payload} (--strict stops at the "
                        "first broken file; remove or fix it, or run without --strict to "
                        "skip and report it)")
                if seq > state.get("last_skip", -1):  # not already put before a resume
                    row = {"path": rel, "reason": payload}
                    if last_wins:  # rows of one name met twice: the later settles (settle)
                        row["seq"] = seq
                    if status == "note":
                        row["note"] = True
                    if origin != NO_ORIGIN:
                        row["origin"] = origin
                    txn.put(fmt.skip_key(state["skipped"]), json.dumps(row).encode())
                    state["skipped"] += 1
                    state["last_skip"] = seq
                    if status == "skip":
                        res.skipped.append((rel, payload))
            else:  # payload: the JPEG to store; the run writes the record header before it
                if run.first is None:
                    run.first = (seq, token)
                run.add(key_of(rel), seq, payload, fmt.RECORD_HEADER.pack(label & 0xFFFFFFFF),
                        origin)
                nbytes = len(payload)
                run.bytes += nbytes
                run.converted += note is not None
            if progress:
                progress(1, nbytes, state["skipped"])
            if run.full():
                hand_over()
            elif writer.busy():
                # the memory bound: wait for the write when the run being filled and what the
                # one being written still holds reach it (reading faster than the run disk);
                # otherwise commit the written run as soon as it is on disk
                finish_write(None if run.nbytes + writer.pending_bytes() >= run_bytes else 0)
        if run.items:
            hand_over()
        finish_write()
        state["sweep"] = cursor_now()
        state["sweep"]["end"] = True
        txn.put(fmt.PROGRESS_KEY, json.dumps(state).encode())
        txn.commit()
        txn = env.begin(write=True)
    except WorkerError as e:
        raise ConversionError(str(e)) from None
    finally:
        if workers is not None:
            workers.close()  # first: kill, never wait for their cooperation
        reader.close()
        if txn is not None:
            txn.abort()  # a no-op after the last checkpoint's fresh transaction


def merge_pass(sink, state, run_dir, opts, progress, start_progress, images: int,
               decide) -> None:
    """Pass 2: the runs merged by (key, sequence) into the shards, one after the other; the
    merge order is the record index.

    ``decide(rel, label, seq, origin, replaced, prev)`` -> (label to store, None) or (None,
    the report row's reason); ``prev``: the origin of the record merged just before when its
    key is the same (a name met before), else None: the labels a sweep could not know before its end (a tar's classes)
    and the copies an archive replaced (a name met again later, a nested tar replaced by a
    later one of its name) are settled here. ``sink`` (``shards.ShardSink``) is the shard
    being written: merged items before ``sink.end`` (counted over every run record, dropped
    copies included) go into ``sink.env``; the first one past it ends that shard (the next
    shard's ``.partial`` made first, then this shard's final transaction, then ``seal``).
    Every commit stores the runs' offsets with its records (a resume continues from them)."""
    state["phase"] = "merge"
    state.setdefault("offsets", [0] * len(state["runs"]))
    state.setdefault("merged", state.get("written", 0))
    total = sum(r[1] for r in state["runs"])
    if start_progress:
        start_progress(total, state["merged"], "merge")
    crcs = checksums.Log(sink.local(state["written"]))  # records before it: committed
    paths = [os.path.join(run_dir, r[0]) for r in state["runs"]]
    sink.load_labels()
    txn = sink.env.begin(write=True)
    pending_n = pending_b = 0
    before = [None, None]  # key and origin of the record merged last

    def end_shard():
        """The shard's last transaction (a kill leaves either its progress or its
        metadata), then the next shard's first."""
        nonlocal txn, crcs, pending_n, pending_b
        if not sink.last:
            sink.hand_over(txn)
        crcs.finish(txn, sink.local(state["written"]))
        sink.finish(txn)
        txn.commit()
        txn = None
        sink.seal()
        if sink.env is not None:
            crcs = checksums.Log(0)
            txn = sink.env.begin(write=True)
            pending_n = pending_b = 0

    try:
        for key, seq, origin, payload, i, after, replaced in merge(
                paths, state["offsets"], buffer_bytes(opts.memory, opts.workers, images)):
            while state["merged"] >= sink.end:  # a shard whose images were all dropped: empty
                payload = bytes(payload)  # one record's copy: its read buffer outlives nothing
                end_shard()
            state["merged"] += 1
            state["offsets"][i] = after
            rel = (key[8:] if sink.layout.split == "train" else key).decode(
                "utf-8", "surrogateescape")
            (raw,) = fmt.RECORD_HEADER.unpack_from(payload, 0)
            label, why = decide(rel, raw, seq, origin, replaced,
                                before[1] if before[0] == key else None)
            before[:] = [key, origin]
            if why is not None:
                row = {"path": rel, "reason": why, "seq": seq, "note": True}
                if label is not None:  # stored: a marker that earlier rows were replaced
                    row["marker"], why = True, None
                txn.put(fmt.skip_key(state["skipped"]), json.dumps(row).encode())
                state["skipped"] += 1
            if why is not None:
                nbytes = 0
            else:
                if label != raw:  # settled here (a tar's classes): the header rewritten
                    if not isinstance(payload, bytearray) and (
                            not isinstance(payload, memoryview) or payload.readonly):
                        payload = bytearray(payload)
                    fmt.RECORD_HEADER.pack_into(payload, 0, label)
                txn.put(fmt.record_key(sink.local(state["written"])), payload)
                crcs.add(payload)  # checksum while the bytes are in hand (checksums.py)
                sink.labels.append(label)
                state["written"] += 1
                nbytes = len(payload) - fmt.RECORD_HEADER.size
                state["shard"]["bytes"] += nbytes
            pending_n += 1
            pending_b += nbytes
            if progress:
                progress(1, nbytes, state["skipped"])
            if pending_n >= COMMIT_RECORDS or pending_b >= COMMIT_BYTES:
                txn.put(fmt.PROGRESS_KEY, json.dumps(state).encode())
                crcs.commit(txn)  # with their records: a resume keeps them
                txn.commit()
                txn = sink.env.begin(write=True)
                pending_n = pending_b = 0
        if state["merged"] != total:
            raise ConversionError(f"internal: merged {state['merged']} of {total} records; "
                                  "run again with --overwrite")
        while txn is not None:  # this shard and any (empty) after it
            end_shard()
    except ValueError as e:  # a run cut short (sort_runs.RunReader)
        if isinstance(e, fmt.DamagedFile):
            raise
        raise ConversionError(f"{e}: the temporary runs of "
                              f"{sink.layout.partial(sink.index)} were changed; pass "
                              "--overwrite to start over") from None
    finally:
        if txn is not None:
            txn.abort()
