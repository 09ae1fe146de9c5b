"""Ranks of one machine reading one split: per-rank readers against the node reader
(``imagenet-seq-bench --ranks N``), and the rank-window arithmetic the benchmarks share.

Each rank is a process (``python -m imagenet_seq.tools.bench_ranks CONFIG_JSON``, started by
:class:`RankRun`) reading what a Loader
with ``rank=r, world_size=N`` on one machine reads, raw records only (no decode, bytes
counted), epoch after epoch:

* ``per-rank``: its own :class:`~imagenet_seq.read.reader.SplitReader` over the per-rank
  plan's reads (the Loader with ``IMAGENET_SEQ_NODE_READER=0``);
* ``node``: a :class:`~imagenet_seq.read.node_client.NodeClient` over the node plan's reads,
  through the one node reader (the Loader's default under torchrun with N ranks per node).

The ranks open their readers, then start together (a ``go`` file holding a start time on the
monotonic clock, which all processes share); each notes ``(time, bytes, records)`` every
:data:`SAMPLE_RECORDS` records. The rate counted is what they read in ``[start + warmup,
start + warmup + seconds]`` (:func:`window`; the warm-up leaves out the first read-ahead fill).
A DDP job moves at its slowest rank, so rows are compared by ``ranks x slowest rank``.
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

__all__ = ["HOWS", "LABELS", "SAMPLE_RECORDS", "SAME_WITHIN", "bytes_at", "window",
           "all_ranks_window", "warmup_for", "RankRun", "measure", "compare", "main"]

HOWS = ("per-rank", "node")
SAMPLE_RECORDS = 16  # a rank notes (time, bytes, records) this often
#: Rates closer than this (a fraction) are reported as the same.
SAME_WITHIN = 0.05
LABELS = {"per-rank": "per-rank readers", "node": "node reader"}


def warmup_for(seconds: float) -> float:
    """Seconds each row reads before its window: the first read-ahead fill (64 MB a reader)
    left out, at most a quarter of the window."""
    return min(5.0, seconds / 4)


# ------------------------------------------------------------------------------ arithmetic
def bytes_at(samples: Sequence[Sequence[float]], t: float, column: int = 1) -> float:
    """A rank's count (``column`` 1: bytes, 2: records) at time ``t``, linear between its
    ``(time, bytes[, records])`` samples."""
    times = [s[0] for s in samples]
    i = bisect.bisect_right(times, t)
    if i == 0:
        return 0.0
    if i == len(samples):
        return float(samples[-1][column])
    a, b = samples[i - 1], samples[i]
    return a[column] + (b[column] - a[column]) * (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] \
        else float(b[column])


def window(parts: Sequence[dict], t0: float, t1: float) -> Dict[str, list]:
    """Bytes and records each rank (its ``(time, bytes, records)`` samples) read in
    ``[t0, t1]``."""
    return {"bytes": [bytes_at(p["samples"], t1) - bytes_at(p["samples"], t0) for p in parts],
            "records": [bytes_at(p["samples"], t1, 2) - bytes_at(p["samples"], t0, 2)
                        for p in parts]}


def all_ranks_window(parts: Sequence[dict], warmup: float = 0.0) -> dict:
    """Aggregate rate while every rank was reading: from ``warmup`` seconds after the last
    rank's start (``t_start``) to the first rank's end (``t_end``), for ranks that start
    when they are ready rather than together (``(time, bytes)`` samples are enough); {} when
    they never all read at once."""
    t0 = max(p["t_start"] for p in parts) + warmup
    t1 = min(p["t_end"] for p in parts)
    if t1 <= t0:
        return {}
    nbytes = sum(bytes_at(p["samples"], t1) - bytes_at(p["samples"], t0) for p in parts)
    return {"seconds": t1 - t0, "mb_per_s": nbytes / (t1 - t0) / 1e6}


# --------------------------------------------------------------------------------- one rank
def _wait_for(path: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {path} after {timeout:.0f} s")
        time.sleep(0.005)
    with open(path) as f:
        return f.read()


def _write(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _rank(a: SimpleNamespace) -> int:
    from imagenet_seq.plan import node, order
    from imagenet_seq.read.reader import SplitReader

    reader = SplitReader(a.path, a.split)
    n, w, r = len(reader), a.world_size, a.rank
    source, reader_pid = reader, None
    if a.how == "node":
        from imagenet_seq.read.node_client import NodeClient

        source = NodeClient(reader, rank=r, world_size=w, local_world_size=w, seed=a.seed,
                            chunk_size=a.chunk_size, job=a.job, connect_timeout=60)
        reader_pid = source.reader_pid

        def spans(e):
            return node.epoch_spans(n, a.split, seed=a.seed, epoch=e, rank=r, world_size=w,
                                    local_world_size=w, chunk_size=a.chunk_size)
    else:
        reader.reset_state()  # open the file now, not in the window

        def spans(e):
            return order.read_spans(n, a.split, seed=a.seed, epoch=e, rank=r, world_size=w,
                                    chunk_size=a.chunk_size)
    spans(0)  # the plan is computed before the start, as a Loader computes it ahead
    _write(os.path.join(a.sync, f"ready.{r}"), {"pid": os.getpid(), "reader_pid": reader_pid})
    go = json.loads(_wait_for(os.path.join(a.sync, "go"), 300))
    while time.monotonic() < go["start"]:
        time.sleep(0.001)
    t0 = time.monotonic()
    records = nbytes = epoch = 0
    samples = [(t0, 0, 0)]
    done = False
    while not done:
        for _, jpeg, _ in source.read_spans(spans(epoch)):
            records += 1
            nbytes += len(jpeg)
            if records % SAMPLE_RECORDS == 0:
                samples.append((time.monotonic(), nbytes, records))
                if samples[-1][0] >= go["stop"]:
                    done = True
                    break
        epoch += 1
    samples.append((time.monotonic(), nbytes, records))
    # every rank stops reading before any leaves (as DDP ranks end an epoch together)
    open(os.path.join(a.sync, f"done.{r}"), "w").close()
    _wait_for(os.path.join(a.sync, "end"), 120)
    if a.how == "node":
        source.shutdown()
    print("RESULT " + json.dumps(dict(rank=r, records=records, bytes=nbytes, epochs=epoch,
                                      t_start=t0, t_end=samples[-1][0], samples=samples)),
          flush=True)
    return 0


# ------------------------------------------------------------------------------- the parent
class RankRun:
    """``world`` rank processes reading ``path`` the ``how`` way: :meth:`ready` (each opened
    its reader: their pids), :meth:`go` (the common start and stop), :meth:`results`."""

    def __init__(self, how: str, path: str, split: str, world: int, *,
                 chunk_size: Optional[int] = None, seed: int = 0, sync: Optional[str] = None):
        if how not in HOWS:
            raise ValueError(f"how={how!r}; expected one of {HOWS}")
        self.how, self.world = how, world
        self._own_sync = sync is None
        self.sync = tempfile.mkdtemp(prefix="imagenet_seq_ranks_") if sync is None else sync
        os.makedirs(self.sync, exist_ok=True)
        for f in os.listdir(self.sync):
            os.remove(os.path.join(self.sync, f))
        cfg = dict(how=how, path=path, sync=self.sync, split=split, world_size=world, seed=seed,
                   chunk_size=chunk_size, job=f"imagenet-seq-bench-{os.getpid()}-{time.time_ns()}")
        # the ranks import this very package, wherever it was imported from
        home = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [home] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        cmd = [sys.executable, "-m", "imagenet_seq.tools.bench_ranks"]
        self.procs = [subprocess.Popen(cmd + [json.dumps(dict(cfg, rank=r))],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=env, start_new_session=True) for r in range(world)]

    def _failed(self, r: int, what: str) -> RuntimeError:
        self.close()
        err = self.procs[r].communicate()[1] or ""
        return RuntimeError(f"{self.how} rank {r} of {self.world} {what} (status "
                            f"{self.procs[r].returncode}): {err.strip()[-2000:]}")

    def ready(self, timeout: float = 120.0) -> List[dict]:
        out, deadline = [], time.monotonic() + timeout
        for r, proc in enumerate(self.procs):
            path = os.path.join(self.sync, f"ready.{r}")
            while not os.path.exists(path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise self._failed(r, "did not get ready")
                time.sleep(0.02)
            with open(path) as f:
                out.append(json.load(f))
        return out

    def go(self, start: float, stop: float) -> None:
        _write(os.path.join(self.sync, "go"), {"start": start, "stop": stop})

    def results(self, timeout: float = 120.0) -> List[dict]:
        """Each rank's ``RESULT`` (samples, ``t_start``, ``t_end``, totals), once all stopped."""
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(os.path.join(self.sync, f"done.{r}"))
                      for r in range(self.world)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                break  # a rank failed: its error is read below
            time.sleep(0.02)
        time.sleep(0.3)  # the last rank's CANCEL reaches the reader before anyone's BYE
        open(os.path.join(self.sync, "end"), "w").close()
        parts = []
        for r, proc in enumerate(self.procs):
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise self._failed(r, f"ran past {timeout:.0f} s") from None
            line = [x for x in out.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                self.close()
                raise RuntimeError(f"{self.how} rank {r} of {self.world} failed (status "
                                   f"{proc.returncode}): {err.strip()[-2000:]}")
            parts.append(json.loads(line[-1][7:]))
        self.close()
        return parts

    def close(self) -> None:
        """Kill what still runs (each rank's process group) and remove the sync folder."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.communicate()
        if self._own_sync:
            shutil.rmtree(self.sync, ignore_errors=True)


def measure(path: str, split: str, ranks: int, how: str, seconds: float, warmup: float, *,
            chunk_size: Optional[int] = None, evict_path=None) -> dict:
    """One row: ``ranks`` processes reading ``how``, the window's rates. ``evict_path``: the
    file whose page cache is dropped just before the start (so the disk is measured)."""
    from imagenet_seq.read.evict import evict

    run = RankRun(how, path, split, ranks, chunk_size=chunk_size)
    try:
        run.ready()
        evicted, note = evict(evict_path) if evict_path else (False, "page cache kept")
        start = time.monotonic() + 0.2
        w0, w1 = start + warmup, start + warmup + seconds
        run.go(start, w1 + 0.3)
        parts = run.results(timeout=seconds + warmup + 120)
    finally:
        run.close()
    got = window(parts, w0, w1)
    rates = [b / 1e6 / seconds for b in got["bytes"]]
    mb, images = sum(got["bytes"]) / 1e6, sum(got["records"])
    return {"how": how, "ranks": ranks, "seconds": seconds, "warmup": warmup,
            "mb_per_s": mb / seconds, "images_per_s": images / seconds, "images": int(images),
            "per_rank_mb_per_s": rates, "ranks_x_slowest_mb_per_s": ranks * min(rates),
            "ranks_x_slowest_images_per_s": ranks * min(got["records"]) / seconds,
            "page_cache_evicted": evicted, "note": note}


def compare(path: str, split: str, ranks: int, seconds: float, warmup: float, *,
            records: int, epochs: int, node_ok: Optional[str] = None,
            chunk_size: Optional[int] = None, evict_path=None) -> dict:
    """Both rows and the verdict (``faster``: ``node``, ``per-rank`` or ``same``, and by how
    much). ``node_ok``: why the node reader cannot read this file (its row is left out)."""
    out: dict = {"ranks": ranks, "seconds": seconds, "warmup": warmup, "epochs": epochs,
                 "rows": {},
                 "node_reader_env": os.environ.get("IMAGENET_SEQ_NODE_READER")}
    for how in HOWS:
        if how == "node" and node_ok:
            out["node_missing"] = node_ok
            continue
        try:
            row = measure(path, split, ranks, how, seconds, warmup, chunk_size=chunk_size,
                          evict_path=evict_path)
        except RuntimeError as e:
            out["rows"][how] = {"error": str(e)}
            continue
        rate = row["ranks_x_slowest_images_per_s"]
        row["epoch_s"] = records / rate if rate > 0 else float("inf")
        row["hours"] = row["epoch_s"] * epochs / 3600
        out["rows"][how] = row
    rows = out["rows"]
    if all("error" not in rows.get(h, {"error": 1}) for h in HOWS):
        a, b = (rows[h]["ranks_x_slowest_mb_per_s"] for h in HOWS)
        ratio = b / a if a > 0 else float("inf")
        out["ratio"] = ratio  # node / per-rank (ranks x slowest rank)
        out["per_rank_over_node"] = a / b if b > 0 else float("inf")
        out["faster"] = "same" if abs(ratio - 1) < SAME_WITHIN else (
            "node" if ratio > 1 else "per-rank")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """One rank: ``argv[0]`` its configuration (JSON, from :class:`RankRun`)."""
    argv = sys.argv[1:] if argv is None else argv
    return _rank(SimpleNamespace(**json.loads(argv[0])))


if __name__ == "__main__":
    sys.exit(main())
