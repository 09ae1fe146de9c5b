"""Pass 1: one sweep's items into sorted runs, for one split or several at once.

``read_pass`` takes the sweep (``sweep``, ``tar_sweep``, ``tree_tar_sweep``, ``wds_sweep``)
and one :class:`Split` per split it feeds (a tar of a tree feeds train and val from one read
of the archive). Each split keeps its own run buffer, run writer thread, .partial and progress
record; the memory bound is shared out between them. Progress is the sweep's cursor: the first
item whose effect is not yet on disk (in a run not yet written, or being written); a split with
nothing pending moves its cursor on whenever another split commits, so a resumed sweep starts
at the smallest cursor of the splits and each split drops the items before its own.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from imagenet_seq import format as fmt
from imagenet_seq.convert import passes
from imagenet_seq.convert.passes import ConversionError
from imagenet_seq.convert.sort_runs import NO_ORIGIN

__all__ = ["Split", "read_pass"]


class Split:
    """One split's side of pass 1: its .partial's ``env``, progress ``state``, runs."""

    def __init__(self, env, state: dict, run_dir: str, res, seq_base: int = 0,
                 keys: bool = False):
        self.env, self.state, self.run_dir, self.res = env, state, run_dir, res
        # a distributed conversion (``dist_split``): each process sweeps a part of the
        # sources; ``seq_base`` puts its records' sequence numbers after the parts before
        # it (the one-process sweep's order), ``keys`` writes each run's keys file
        self.seq_base, self.keys = seq_base, keys
        self.start = state["sweep"]["seq"]
        self.txn = None
        self.run = None
        self.writing_first = None  # (seq, token) of the run being written, until committed
        self.committed_run = False  # a run was committed since the last look (read_pass)
        self.writer = passes.RunWriter()
        found = state.setdefault("found", {"classes": [], "containers": {}, "flags": []})
        self.classes = set(found["classes"])

    # -- progress
    def cursor(self, last) -> dict:
        """The first item whose effect is not yet on disk, else the one after ``last``."""
        for first in (self.writing_first, self.run.first if self.run.items else None):
            if first is not None:
                return {"seq": first[0], "token": first[1]}
        if last is None:
            return dict(self.state["sweep"])
        return {"seq": last[0] + 1, "token": last[1]}  # resume at it, dropping it

    def commit(self, last, written=None) -> None:
        """The progress record, with the run just written (if any), in one transaction."""
        state = self.state
        if written is not None:
            done_run, _, (n, size) = written
            state["runs"].append([os.path.basename(done_run.path), n, size])
            state["bytes"] += done_run.bytes
            state["converted"] += done_run.converted
            self.writing_first = None
            self.committed_run = True
        state["sweep"] = self.cursor(last)
        self.txn.put(fmt.PROGRESS_KEY, json.dumps(state).encode())
        self.txn.commit()
        self.txn = self.env.begin(write=True)

    def finish_write(self, last, timeout=None) -> bool:
        """Commit the run in flight once written; False if it is still being written."""
        if not self.writer.busy():
            return True
        try:
            got = self.writer.wait(timeout)
        except OSError as e:
            raise ConversionError(
                f"cannot write the temporary run {self.writer.path}: {e.strerror or e}; free "
                f"space in {self.run_dir} (or pass --tmp DIR on a disk with room), then run "
                "again with --resume") from None
        if got is None:
            return False
        self.commit(last, got)
        return True

    def new_run(self, run_bytes: int) -> None:
        self.run = passes._Run(run_bytes, passes.RUN_RECORDS, 0)
        self.run.first = None

    def hand_over(self, last, run_bytes: int) -> None:
        self.finish_write(last)  # one write at a time: the memory bound holds two runs
        self.run.path = os.path.join(self.run_dir, f"run-{len(self.state['runs']):05d}")
        if self.keys:
            self.run.keys_path = self.run.path + ".keys"
        self.writing_first = self.run.first
        self.writer.start(self.run)
        self.new_run(run_bytes)

    # -- items
    def mark(self, seq: int, what: dict) -> None:
        """What the sweep found out (idempotent: a resumed sweep tells it again)."""
        found = self.state["found"]
        if "class" in what and what["class"] not in self.classes:
            self.classes.add(what["class"])
            found["classes"] = sorted(self.classes)
        if "container" in what:
            seqs = found["containers"].setdefault(what["container"], [])
            if seq not in seqs:
                seqs.append(seq)
        if "flag" in what and what["flag"] not in found["flags"]:
            found["flags"].append(what["flag"])
        if "top" in what:
            found["top"] = max(found.get("top", -1), what["top"])
        if "first" in what and what["first"] not in found.setdefault("first", []) \
                and len(found["first"]) < 3:
            found["first"].append(what["first"])
        if "root" in what:
            found.setdefault("roots", {})[what["root"][0]] = what["root"][1]
        if "odd" in what:  # a member kind not used: counted once per member
            kind, name, shard = what["odd"]
            slot = found.setdefault("odd", {}).setdefault(kind, [0, name, shard, -1])
            if seq > slot[3]:
                slot[0], slot[3] = slot[0] + 1, seq

    def row(self, seq: int, rel: str, why, origin: int, counted: bool, last_wins: bool):
        """A report row (a skip record), unless a commit before a resume holds it already."""
        state = self.state
        if seq <= state.get("last_skip", -1):
            return
        row = {"path": rel}
        if isinstance(why, dict):  # settled at the end (settle.settle_skips)
            row["reason"], row["if_flat"] = why["else"], why["if_flat"]
        else:
            row["reason"] = why
        if last_wins:  # rows of one name met twice: the later settles (settle)
            row["seq"] = self.seq_base + seq
        if not counted:
            row["note"] = True
        if origin != NO_ORIGIN:
            row["origin"] = origin
        self.txn.put(fmt.skip_key(state["skipped"]), json.dumps(row).encode())
        state["skipped"] += 1
        state["last_skip"] = seq
        if counted:
            self.res.skipped.append((rel, row["reason"]))


def read_pass(splits: Dict[Optional[str], Split], sweep, opts, progress, start_progress,
              key_of) -> None:
    """Pass 1: the sweep's items, from the smallest cursor of ``splits`` on, into each
    split's runs sorted by ``key_of(split, rel)`` and the sweep's sequence number.

    ``sweep.reader(cursor, read_ahead[, found])`` gives chunks of ``(tag, rel, label, bytes
    or verdict)``, ``tag = (seq, token, origin, rel, label[, split])`` (no split: the one
    split of ``splits``). A verdict is ``('skip', why)`` (a broken file: counted,
    ``--strict`` stops), ``('note', why)`` (reported, never stored, not counted), ``('mark',
    what)`` (what the sweep found out: a class, a nested tar, a split's folder; every split
    keeps it in ``state["found"]``) or ``('error', message)``."""
    ctxs = list(splits.values())
    only = ctxs[0] if len(ctxs) == 1 else None
    first = min(ctxs, key=lambda c: c.start)
    start = first.start
    if start_progress:
        start_progress(sweep.total, start if sweep.total else 0, "read")
    run_bytes = passes.buffer_bytes(opts.memory, opts.workers, getattr(sweep, "images", 0)) \
        // len(ctxs)  # each split: a run being filled and one being written within its share
    last_wins = getattr(sweep, "last_wins", False)
    describe = getattr(sweep, "describe_item", lambda rel, origin: sweep.describe(rel))
    for c in ctxs:
        c.new_run(run_bytes)
        c.txn = c.env.begin(write=True)
    workers = None
    reader = None
    last = None
    try:
        workers = passes.Workers(opts.workers) if opts.workers > 0 else None
        found_all: dict = {}
        for c in ctxs:  # what a resumed sweep must know from before its cursor (roots)
            for k, v in c.state["found"].get("roots", {}).items():
                found_all.setdefault("roots", {})[k] = v
        reader = sweep.reader(dict(first.state["sweep"]), opts.read_ahead, found_all) \
            if getattr(sweep, "wants_found", False) else \
            sweep.reader(dict(first.state["sweep"]), opts.read_ahead)
        for tag, status, payload, note in passes.results(sweep.describe(""), reader,
                                                         opts.max_size, opts.quality, workers):
            seq, token, origin, rel, label = tag[:5]
            if seq < start:
                continue  # before every cursor: already on disk (a resumed sweep)
            last = (seq, token)
            if status == "error":
                raise ConversionError(payload)
            if status == "mark":
                for c in ctxs:
                    if seq >= c.start:
                        c.mark(seq, payload)
                continue
            c = only if only is not None else splits[tag[5]]
            if seq < c.start:
                continue
            nbytes = 0
            if status in ("skip", "note"):
                if status == "skip" and opts.strict:
                    raise ConversionError(
                        f"{describe(rel, origin)}: {payload} (--strict stops at the "
                        "first broken file; remove or fix it, or run without --strict to "
                        "skip and report it)")
                c.row(seq, rel, payload, origin, status == "skip", last_wins)
            else:  # payload: the JPEG to store; the run writes the record header before it
                run = c.run
                if run.first is None:
                    run.first = (seq, token)
                run.add(key_of(c, rel), c.seq_base + seq, payload,
                        fmt.RECORD_HEADER.pack(label & 0xFFFFFFFF), origin)
                nbytes = len(payload)
                run.bytes += nbytes
                run.converted += note is not None
            if progress:
                progress(1, nbytes, sum(x.state["skipped"] for x in ctxs))
            if c.run.full():
                c.hand_over(last, run_bytes)
            elif c.writer.busy():
                # the memory bound: wait for the write when the run being filled and what the
                # one being written still holds reach it (reading faster than the run disk);
                # otherwise commit the written run as soon as it is on disk
                c.finish_write(last, None if c.run.nbytes + c.writer.pending_bytes()
                               >= run_bytes else 0)
            if c.committed_run:
                c.committed_run = False
                for o in ctxs:  # a split with nothing pending moves its cursor on too
                    if o is not c and not o.writer.busy() and not o.run.items:
                        o.commit(last)
        for c in ctxs:
            if c.run.items:
                c.hand_over(last, run_bytes)
        for c in ctxs:
            c.finish_write(last)
            c.state["sweep"] = c.cursor(last)
            c.state["sweep"]["end"] = True
            c.txn.put(fmt.PROGRESS_KEY, json.dumps(c.state).encode())
            c.txn.commit()
            c.txn = None
    except passes.WorkerError as e:
        raise ConversionError(str(e)) from None
    finally:
        if workers is not None:
            workers.close()  # first: kill, never wait for their cooperation
        if reader is not None:
            reader.close()
        for c in ctxs:
            if c.txn is not None:
                c.txn.abort()  # a no-op after the last checkpoint's fresh transaction
                c.txn = None


