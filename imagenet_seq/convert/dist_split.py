"""One split converted by every process of a distributed conversion (``dist_cli``).

The steps, each ended by a barrier (``dist_job``):

1. **start** (rank 0): what earlier runs left (``resume.existing``: a finished split is kept
   with --resume; another layout's files refused or, with --overwrite, deleted), the job's
   record ``job.json`` in the shared temporary folder ``<--tmp or output>/ILSVRC-<split>.dist``
   (its fingerprint covers every part's sources, the options, the shard layout and the number
   of processes: a --resume with other ones is refused, naming them).
2. **read** (every rank): pass 1 over its part (``dist_parts``) into sorted runs with their
   keys files, in ``part-RRRRR.runs/``; the part's progress (cursor, runs, report rows) in
   ``part-RRRRR.lmdb``, committed with each run as in a one-process conversion (a killed
   process resumes from its last run); at the end ``part-RRRRR.json`` says the part is done.
3. **plan** (rank 0): the parts' findings put together (classes, report rows, then settled as
   a one-process sweep's end settles them, into shard 0's ``.partial``), and each shard's
   starting point in every run (``dist_plan.cut_points``), written to ``plan.json``.
4. **merge** (every rank): the shards ``j = rank, rank + world, ...``, each from its starting
   point to the next shard's, into its own ``.partial`` (its progress committed with its
   records), finished, indexed and renamed as in a one-process conversion.
5. **finish** (rank 0): every shard checked, the manifest written last (``shard_sink``), the
   temporary folder deleted.

The shard files hold the records, order, labels and report rows of the one-process
conversion of the same sources, whatever the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Optional

from imagenet_seq import format as fmt
from imagenet_seq.format import manifest as mf
from imagenet_seq.convert import shards as sh
from imagenet_seq.convert.dist_parts import partition
from imagenet_seq.convert.dist_plan import cut_points, merge_found
from imagenet_seq.convert.options import Options, Result
from imagenet_seq.convert.pass1 import Split, read_pass
from imagenet_seq.convert.passes import MAX_RUNS, ConversionError, merge_pass, prepare_runs
from imagenet_seq.convert.prepare import _shard_count
from imagenet_seq.convert.resume import existing, open_partial
from imagenet_seq.convert.settle import decider, settle_skips
from imagenet_seq.convert.shard_sink import ShardSink, finish_split, seal, skips
from imagenet_seq.convert.space import outputs, shard_estimates, space_check
from imagenet_seq.convert.write_order import ORDER_VERSION, sort_key
from imagenet_seq.convert.writer import _folder_keys
from imagenet_seq.format import offsets

__all__ = ["convert_split_dist"]


def _write_json(path: str, doc: dict) -> None:
    """``doc`` at ``path`` whole or not at all (a temporary file fsync'd, then renamed)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path} cannot be read ({e}): the shared temporary folder was "
                              "changed; pass --overwrite to start over") from None


def _state(txn) -> Optional[dict]:
    raw = txn.get(fmt.PROGRESS_KEY)
    return None if raw is None else json.loads(bytes(raw))


class _Counts:
    """This rank's progress, published by the job's watcher (rank 0 shows the sums)."""

    def __init__(self, job, split: str):
        self.job, self.split = job, split

    def phase(self, name: str) -> None:
        """A new pass: its counters from 0; the last pass's kept under ``passes`` (what
        ``--json`` shows per rank)."""
        old = self.job.counts
        done = dict(old.get("passes", {})) if old.get("split") == self.split else {}
        if old.get("split") == self.split and old.get("phase") in ("read", "merge"):
            done[old["phase"]] = {"images": old["images"], "bytes": old["bytes"],
                                  "seconds": round(time.time() - old["t0"], 3)}
        self.job.counts = {"split": self.split, "phase": name, "images": 0, "bytes": 0,
                           "t0": time.time(), "passes": done, "rank": self.job.rank,
                           "host": self.job.host}

    def __call__(self, n: int, nbytes: int, skipped: int) -> None:
        c = self.job.counts
        c["images"] += n
        c["bytes"] += nbytes


def convert_split_dist(job, src_root: str, out_dir: str, split: str, scan, opts: Options,
                       overwrite: bool, resume: bool, notice) -> Optional[Result]:
    """This rank's share of ``split``'s conversion (module docstring); rank 0 returns the
    split's :class:`Result`, the others None."""
    t0 = time.perf_counter()
    stream = getattr(scan, "sweep", None)
    images = None if stream is not None else len(scan.entries)
    src_bytes = stream.source_bytes if stream is not None else \
        sum(scan.inode_size(r)[1] for r, _ in scan.entries)
    count = _shard_count(opts, images, src_bytes, split)
    layout = sh.Layout.make(split, count, out_dir, opts.shard_dirs, max(images or 0, count))
    tmp = os.path.join(os.path.abspath(opts.tmp or out_dir), f"ILSVRC-{split}.dist")
    parts = partition(scan, split, os.path.join(src_root, split), job.world, opts.read_order,
                      job.rank)
    part = parts[job.rank]
    key_of = _folder_keys(scan, split, opts.seed) if stream is None else \
        (lambda c, rel, seed=opts.seed: sort_key(rel, split, seed))
    fp = hashlib.sha1(json.dumps(
        [ORDER_VERSION, opts.content(), scan.classes if stream is None else None,
         [p.identity for p in parts], count, layout.used_folders, job.world]).encode()
    ).hexdigest()
    counts = _Counts(job, split)
    if job.rank == 0 and notice:
        notice(f"{split}: {job.world} processes, each reading one part of the sources "
               f"({parts[0].what} for rank 0); {layout.describe()}"
               + (f"; only {count} of the {job.world} processes will write (one shard "
                  "each): --shards K >= the process count spreads the merge over all"
                  if count < job.world
                  else ""))

    # 1. start
    if job.rank == 0:
        status = _start(job, layout, tmp, fp, overwrite, resume)
        if status == "go":  # the space the whole job needs, in the shared folders
            per = shard_estimates(src_bytes, images, count)
            fresh = {"runs": [], "phase": "read", "shard": {"bytes": 0}}
            space_check(src_bytes, sum(per), fresh, tmp, outputs(layout, per, fresh, 0),
                        split, images or 0, opts.memory, opts.workers, notice)
        job.store.set(f"imagenet_seq/{split}/status", status)
        job.store.set(f"imagenet_seq/{split}/fingerprint", fp)
    job.barrier(f"{split}/start")
    status = job.store.get(f"imagenet_seq/{split}/status").decode()
    if job.store.get(f"imagenet_seq/{split}/fingerprint").decode() != fp:
        raise ConversionError(
            f"rank {job.rank} sees other sources, options or shard folders for {split} than "
            f"rank 0 ({parts[job.rank].what} in its part): every process must see the same "
            "files (one shared folder, mounted alike on every node) and run the same command")
    if status == "complete":
        return _kept(layout, split, opts) if job.rank == 0 else None

    # 2. read
    counts.phase("read")
    done_path = os.path.join(tmp, f"part-{job.rank:05d}.json")
    # the part's own read order too: a resumed part's cursor is a place in it
    part_fp = hashlib.sha1(f"{fp}:{job.rank}:".encode()
                           + part.sweep.identity().encode("utf-8", "surrogateescape")
                           ).hexdigest()
    done = _read_json(done_path)
    if done is None or done.get("fingerprint") != part_fp:
        _read_part(part, tmp, part_fp, opts, counts, key_of, done_path)
    job.barrier(f"{split}/read")

    # 3. plan
    plan_path = os.path.join(tmp, "plan.json")
    if job.rank == 0:
        plan = _read_json(plan_path)
        if plan is None or plan.get("fingerprint") != fp:
            _plan(job, layout, tmp, fp, scan, stream, plan_path)
    job.barrier(f"{split}/plan")
    plan = _read_json(plan_path)

    # 4. merge
    counts.phase("merge")
    decide = decider(plan["classes"], plan["found"], plan["skip_last"],
                     stream.resolver(plan["found"]) if stream is not None else None,
                     getattr(stream, "repeat", None))
    layout = sh.Layout(split, count, layout.folders, tuple(tuple(r) for r in plan["ranges"]))
    most = max(n for _, n in layout.ranges)
    for j in range(job.rank, count, job.world):
        _merge_shard(layout, j, tmp, fp, plan, opts, counts, decide, most)
    job.barrier(f"{split}/merge")
    counts.phase("done")
    if job.rank != 0:
        return None

    # 5. finish
    res = Result(split, layout.final(0) if count == 1 else layout.manifest)
    res.shards, res.skipped, res.manifest = finish_split(layout, plan["split_id"])
    res.written = sum(r["records"] for r in res.shards)
    res.bytes = sum(r["bytes"] for r in res.shards)
    res.converted = plan["converted"]
    res.runs = len(plan["runs"])
    res.tmp_bytes = sum(r[2] for r in plan["runs"])
    res.read_order = f"{job.world} parts"
    shutil.rmtree(tmp, ignore_errors=True)
    res.seconds = time.perf_counter() - t0
    return res


def _start(job, layout: sh.Layout, tmp: str, fp: str, overwrite: bool, resume: bool) -> str:
    """Rank 0: "complete" (kept by --resume) or "go", the job's record in place."""
    if existing(layout, tmp, overwrite, resume):
        return "complete"
    job_path = os.path.join(tmp, "job.json")
    doc = _read_json(job_path) if resume else None
    if doc is not None and doc.get("fingerprint") != fp:
        raise ConversionError(
            f"{tmp} holds a conversion started with "
            + (f"{doc.get('world')} processes; this run has {job.world}: run with "
               f"{doc.get('world')} (torchrun --nnodes x --nproc_per_node = {doc.get('world')})"
               if doc.get("world") != job.world else
               "other inputs, options or shards: run with the same ones")
            + ", or pass --overwrite to start over")
    if doc is None:
        if os.path.isdir(tmp) and resume:
            raise ConversionError(f"{tmp} is an unfinished conversion's temporary folder "
                                  "without its job record; pass --overwrite to start over")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _write_json(job_path, {"fingerprint": fp, "world": job.world,
                               "split_id": uuid.uuid4().hex})
    return "go"


def _kept(layout: sh.Layout, split: str, opts: Options) -> Result:
    from imagenet_seq.convert.prepare import _complete
    return _complete(layout, Result(split, layout.final(0) if layout.count == 1
                                    else layout.manifest), opts.shard_dirs)


def _read_part(part, tmp: str, part_fp: str, opts: Options, counts, key_of,
               done_path: str) -> None:
    """Pass 1 over this rank's part (resumed from its progress record), then its summary."""
    name = f"part-{part.index:05d}"
    path = os.path.join(tmp, name + ".lmdb")
    run_dir = os.path.join(tmp, name + ".runs")
    env = open_partial(path, f"Delete {path}, or pass --overwrite to start over",
                       readonly=False, lock=False)
    try:
        with env.begin() as txn:
            state = _state(txn)
        if state is not None and state.get("fingerprint") != part_fp:
            raise ConversionError(f"{path} is another conversion's part; pass --overwrite "
                                  "to start over")
        if state is None:
            state = {"fingerprint": part_fp, "phase": "read", "run_dir": run_dir, "runs": [],
                     "sweep": {"seq": 0, "token": None}, "bytes": 0, "converted": 0,
                     "skipped": 0, "found": {"classes": [], "containers": {}, "flags": []}}
        prepare_runs(run_dir, state, path, keys=True)
        if not state["sweep"].get("end"):
            c = Split(env, state, run_dir, Result("", ""), seq_base=part.seq_base, keys=True)
            c.split = None
            t1 = time.perf_counter()
            read_pass({None: c}, part.sweep, opts, counts, None, key_of)
            state["read_s"] = time.perf_counter() - t1
        with env.begin() as txn:
            rows = [d for _, d in skips(txn)]
        _write_json(done_path, {
            "fingerprint": part_fp, "found": state["found"], "bytes": state["bytes"],
            "converted": state["converted"], "rows": rows, "what": part.what,
            "read_s": state.get("read_s", 0.0),
            "runs": [[f"{name}.runs/{r[0]}", r[1], r[2]] for r in state["runs"]]})
    finally:
        env.close()


def _plan(job, layout: sh.Layout, tmp: str, fp: str, scan, stream, plan_path: str) -> None:
    """Rank 0, after every part's pass 1: classes, report rows into shard 0's .partial,
    settled; each shard's starting point; ``plan.json``."""
    docs = [_read_json(os.path.join(tmp, f"part-{r:05d}.json")) for r in range(job.world)]
    if any(d is None for d in docs):
        raise ConversionError(f"{tmp}: a part's summary is missing after every process "
                              "finished reading; pass --overwrite to start over")
    found = merge_found([d["found"] for d in docs])
    classes = scan.classes if stream is None else stream.classes(found)
    runs = [r for d in docs for r in d["runs"]]
    total = sum(r[1] for r in runs)
    if total < layout.count and layout.count > 1:
        raise ConversionError(
            f"--shards {layout.count} for the {total} images of {layout.split}; a shard holds "
            "at least one image's place: pass --overwrite and fewer shards")
    if len(runs) > MAX_RUNS:
        raise ConversionError(f"{len(runs)} runs for {layout.split} from {job.world} "
                              f"processes, more than {MAX_RUNS} can be merged at once; pass "
                              "a larger --memory-mb")
    ranges = mf.shard_ranges(total, layout.count)
    split_id = _read_json(os.path.join(tmp, "job.json"))["split_id"]
    partial = layout.partial(0)
    sh.remove_files([partial, partial + "-lock"])
    os.makedirs(os.path.dirname(partial), exist_ok=True)
    env = open_partial(partial, "Pass --overwrite to start over", readonly=False, lock=False)
    try:
        state = {"fingerprint": fp, "phase": "merge", "run_dir": tmp, "runs": runs,
                 "offsets": [0] * len(runs), "merged": 0, "written": 0, "skipped": 0,
                 "bytes": sum(d["bytes"] for d in docs), "found": found, "classes": classes,
                 "converted": sum(d["converted"] for d in docs), "split_id": split_id,
                 "shard": {"index": 0, "first": 0, "bytes": 0}}
        with env.begin(write=True) as txn:
            for d in docs:
                for row in d["rows"]:
                    txn.put(fmt.skip_key(state["skipped"]), json.dumps(row).encode())
                    state["skipped"] += 1
        settle_skips(env, found, state)  # commits the state too
        decide = decider(classes, found, state["skip_last"],
                         stream.resolver(found) if stream is not None else None,
                         getattr(stream, "repeat", None))
        cuts = cut_points([os.path.join(tmp, r[0]) + ".keys" for r in runs],
                          [first for first, _ in ranges], decide)
        env.sync(True)
    finally:
        env.close()
    _write_json(plan_path, {
        "fingerprint": fp, "classes": classes, "found": found, "skip_last": state["skip_last"],
        "runs": runs, "ranges": ranges, "cuts": cuts, "rows0": state["skipped"],
        "bytes": state["bytes"], "converted": state["converted"], "split_id": split_id})


def _merge_shard(layout: sh.Layout, j: int, tmp: str, fp: str, plan: dict, opts: Options,
                 counts, decide, most: int) -> None:
    """Shard ``j`` from its starting point to the next shard's (resumed where it stopped)."""
    partial, final = layout.partial(j), layout.final(j)
    env = state = None
    if os.path.exists(partial):
        env = open_partial(partial, "Pass --overwrite to start over", readonly=False,
                           lock=False)
        ino = os.stat(partial).st_ino
        with env.begin() as txn:
            state = _state(txn)
            meta = txn.get(fmt.META_KEY) is not None and fmt.read_metadata(txn, partial)
            has_offsets = txn.get(offsets.OFFSETS_KEY) is not None
        if state is None and meta:  # finished, killed before its rename
            seal(env, partial, ino, meta.num_records, has_offsets)
            return
        if state is not None and state.get("fingerprint") != fp:
            env.close()
            raise ConversionError(f"{partial} is another conversion's; pass --overwrite to "
                                  "start over")
        if state is None:
            env.close()
            sh.remove_files([partial, partial + "-lock"])
            env = None
    elif os.path.exists(final):
        return
    if env is None:
        if j == 0:
            raise ConversionError(f"{partial} (made by rank 0 before the merge) is gone; "
                                  "pass --overwrite to start over")
        c = plan["cuts"][j]
        state = {"fingerprint": fp, "phase": "merge", "run_dir": tmp, "runs": plan["runs"],
                 "offsets": c["offsets"], "merged": c["merged"], "written": c["written"],
                 "skipped": plan["rows0"] + c["rows"], "bytes": plan["bytes"],
                 "converted": plan["converted"], "split_id": plan["split_id"],
                 "classes": plan["classes"], "last_merged": c["last_merged"],
                 "shard": {"index": j, "first": c["written"], "bytes": 0}}
        os.makedirs(os.path.dirname(partial), exist_ok=True)
        env = open_partial(partial, "Pass --overwrite to start over", readonly=False,
                           lock=False)
        with env.begin(write=True) as txn:
            txn.put(fmt.PROGRESS_KEY, json.dumps(state).encode())
        env.sync(True)
        ino = os.stat(partial).st_ino
    sink = ShardSink(layout, env, ino, state, plan["classes"], opts.content(), alone=True)
    try:
        first, n = layout.ranges[j]
        merge_pass(sink, state, tmp, opts, counts, None, 0, decide, most, stop=first + n)
    except (OSError, fmt.DamagedFile) as e:
        if isinstance(e, OSError):
            e.folder = layout.folder(j)
        raise
    finally:
        sink.close()
