"""Node-reader benchmark (issue 24): ranks of one node on one emulated disk, per-rank readers
vs one node reader, as a share of ``dd`` through the same device in the same run.

    python benchmarks/node_reader.py [--seconds 15] [--warmup 3] [--devices hdd nfs]
    python benchmarks/node_reader.py --tiny --workdir DIR --out DIR   # a seconds-long check

For each emulated device (``benchmarks/slowfs.py``, mounted fresh -- cold cache -- for every
row), on the ImageNet-like LMDB of ``benchmarks/slow_disk.py`` (same data and cache):

* ``dd``: ``dd if=<the LMDB's data file> of=/dev/null bs=1M``, the device's sequential rate;
* ``per-rank`` x 1, 2, 4, 8: what the Loader does today with ``rank=r, world_size=W``: each
  rank a process with its own ``SplitReader`` reading its ``plan.order.read_spans`` (read-ahead
  in turns on the disk, ``readahead.DiskLock``);
* ``node`` x 1, 2, 4, 8: each rank a process with a ``NodeClient`` (``L = W`` local ranks)
  reading its ``plan.node.epoch_spans`` through the one node reader process.

Ranks consume raw records (decode skipped: bytes counted), read epoch after epoch: they are
``imagenet-seq-bench --ranks``'s rank processes (``imagenet_seq.tools.bench_ranks``). They
start together (each opens its reader, then waits for a common start), and the rate counted is
the bytes all ranks read in ``[start + warmup, start + warmup + seconds]`` (the warm-up leaves
out the first read-ahead fill); ``dd`` is counted over the same window of its own run (``SIGUSR1``
statistics). CPU: ``psutil`` CPU times (user + system) over the window, per MB read: the
reading processes (per-rank: the rank processes, which do nothing but read; node: the node
reader process, and separately its ranks, which copy records out of their rings).

Writes ``<out>/node_reader.json`` and ``<out>/node_reader.md`` (rebuild the table from the
JSON with ``python benchmarks/node_reader_report.py [JSON]``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
RANKS = (1, 2, 4, 8)
TINY_WORKDIR = "/tmp/imagenet_seq_node_reader_tiny"  # never the shared cache: prepare() replaces it
TINY = dict(classes=4, per_class=20, copies=3, seconds=1.5, warmup=0.5,
            hdd_args="--mb-per-s 10", nfs_args="--mb-per-s 10")


# ---------------------------------------------------------------------------------------------
# the parent: mounts, processes, windows, CPU
def _cpu(pids) -> Dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _sleep_until(t: float) -> None:
    while time.monotonic() < t:
        time.sleep(min(0.05, max(0.0, t - time.monotonic())))


def _dd_stats(err: str) -> List[tuple]:
    """(bytes, seconds) of each statistics line dd printed."""
    out = []
    for line in err.splitlines():
        if " bytes" in line and " copied, " in line:
            out.append((int(line.split()[0]), float(line.split(" copied, ")[1].split()[0])))
    return out


def measure_dd(path: str, args) -> dict:
    proc = subprocess.Popen(["dd", f"if={path}", "of=/dev/null", "bs=1M"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, LC_ALL="C"))
    start = time.monotonic()
    try:
        for t in (start + args.warmup, start + args.warmup + args.seconds):
            _sleep_until(t)
            if proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)
            time.sleep(0.05)  # let it print before the next signal
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    stats = _dd_stats(err)
    if len(stats) >= 3:  # two in the window, one at the end
        (b0, s0), (b1, s1) = stats[0], stats[1]
        note = "window"
    elif stats:  # the file ended inside the window: the whole run
        (b0, s0), (b1, s1) = (0, 0.0), stats[-1]
        note = "whole file (it ended inside the window)"
    else:
        raise RuntimeError(f"dd printed no statistics: {err[-1000:]}")
    return dict(bytes=b1 - b0, seconds=s1 - s0, mb_per_s=(b1 - b0) / max(s1 - s0, 1e-9) / 1e6,
                counted=note, window=[start + args.warmup, start + args.warmup + args.seconds])


def measure_ranks(how: str, target: str, world: int, args, tag: str) -> dict:
    from imagenet_seq.tools.bench_ranks import RankRun, window

    run = RankRun(how, target, "train", world, chunk_size=args.chunk_size, seed=SEED,
                  sync=os.path.join(args.workdir, f"sync-{tag}"))
    try:
        ready = run.ready()
        start = time.monotonic() + 0.2
        w0, w1 = start + args.warmup, start + args.warmup + args.seconds
        run.go(start, w1 + 0.3)
        rank_pids = [x["pid"] for x in ready]
        reader_pids = sorted({x["reader_pid"] for x in ready if x["reader_pid"]})
        _sleep_until(w0)
        cpu0 = _cpu(rank_pids + reader_pids)
        _sleep_until(w1)
        cpu1 = _cpu(rank_pids + reader_pids)
        parts = run.results(timeout=args.seconds + 120)
    finally:
        run.close()
    per_rank = window(parts, w0, w1)["bytes"]
    mb = sum(per_rank) / 1e6

    def cpu_of(pids):
        return sum(cpu1[p] - cpu0[p] for p in pids if p in cpu0 and p in cpu1)
    ranks_cpu, reader_cpu = cpu_of(rank_pids), cpu_of(reader_pids)
    out = dict(mb_per_s=mb / args.seconds, seconds=args.seconds,
               per_rank_mb_per_s=[b / 1e6 / args.seconds for b in per_rank],
               records=sum(p["records"] for p in parts),
               epochs_started=max(p["epochs"] for p in parts),
               late_start_s=max(p["t_start"] for p in parts) - start,
               ranks_cpu_s=ranks_cpu, window=[w0, w1])
    if how == "node":
        out.update(reader_cpu_s=reader_cpu, reader_cpu_s_per_mb=reader_cpu / max(mb, 1e-9),
                   ranks_cpu_s_per_mb=ranks_cpu / max(mb, 1e-9),
                   node_reader_processes=len(reader_pids))
    else:  # the rank processes are the readers
        out.update(reader_cpu_s=ranks_cpu, reader_cpu_s_per_mb=ranks_cpu / max(mb, 1e-9),
                   ranks_cpu_s_per_mb=ranks_cpu / max(mb, 1e-9))
    out["total_cpu_s_per_mb"] = (ranks_cpu + reader_cpu) / max(mb, 1e-9)
    return out


def measure(device: str, reader: str, ranks: int, paths: dict, args) -> dict:
    """One row on a fresh mount of ``device``."""
    import slowfs
    from imagenet_seq import format as fmt
    from imagenet_seq.plan import order

    mnt = os.path.join(args.workdir, "mnt")
    trace = os.path.join(args.workdir, "slowfs-trace.txt")
    os.environ["SLOWFS_TRACE"] = trace  # the emulator logs every request: the device's window
    with slowfs.mounted(paths["data"], mnt, device, args.model_args[device]) as stats:
        target = os.path.join(mnt, paths["lmdb"])
        if reader == "dd":
            r = measure_dd(fmt.data_file(target), args)
        else:
            r = measure_ranks(reader, target, ranks, args, f"{device}-{reader}-{ranks}")
    r.update(device=device, reader=reader, ranks=ranks, device_stats=dict(stats))
    r["device_mb_per_s"] = _device_rate(trace, *r["window"])
    if args.traces:  # kept for a closer look (idle gaps, seeks): one line per request
        os.makedirs(args.traces, exist_ok=True)
        os.replace(trace, os.path.join(args.traces, f"{device}-{reader}-{ranks}.txt"))
    else:
        os.remove(trace)
    if reader != "dd":
        r["chunk_records"] = order.effective_chunk_size(args.num_records, ranks, args.chunk_size)
        if reader == "node":  # the node plan reads node chunks of L per-rank chunks
            r["node_chunk_records"] = ranks * r["chunk_records"]
    cpu = f", reader CPU {r['reader_cpu_s_per_mb'] * 1e3:.2f} ms/MB" if reader != "dd" else ""
    print(f"  {device:4} {reader:9} x{ranks}: {r['mb_per_s']:7.1f} MB/s (device "
          f"{r['device_mb_per_s']:.1f}){cpu}", flush=True)
    return r


def _device_rate(trace: str, t0: float, t1: float) -> float:
    """MB/s the emulated device completed in ``[t0, t1]`` (its request log)."""
    done = 0
    with open(trace, errors="replace") as f:
        for line in f:
            parts = line.split(" ", 4)
            if len(parts) == 5 and t0 <= float(parts[1]) < t1:
                done += int(parts[3])
    return done / (t1 - t0) / 1e6


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description="node reader vs per-rank readers on emulated disks")
    p.add_argument("--seconds", type=float, default=15.0, help="the window counted, per row")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds every row reads before its window (first read-ahead fill)")
    p.add_argument("--workdir", default="/tmp/imagenet_seq_slow_disk",
                   help="data cache (shared with slow_disk.py) and mount point")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--classes", type=int, default=15)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--copies", type=int, default=12, help="LMDB copies of each image (~3.2 GB)")
    p.add_argument("--devices", nargs="+", default=["hdd", "nfs"],
                   choices=["hdd", "hdd-fifo", "nfs"],
                   help="hdd-fifo: slowfs's pessimistic HDD (arrival order, every far move a seek)")
    p.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    p.add_argument("--readers", nargs="+", default=["per-rank", "node"],
                   choices=["per-rank", "node"])
    p.add_argument("--chunk-size", type=int, default=None,
                   help="per-rank chunk (records); default: the Loader's automatic chunk")
    p.add_argument("--hdd-args", default="", help="extra slowfs.py options for the HDD")
    p.add_argument("--nfs-args", default="", help="extra slowfs.py options for NFS")
    p.add_argument("--traces", default=None,
                   help="keep the emulator's request log of every row in this folder")
    p.add_argument("--tiny", action="store_true",
                   help="a check that the script works: tiny data, a slowed device, short rows")
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in dict(TINY, workdir=TINY_WORKDIR).items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    if args.seconds <= 0 or args.warmup < 0 or min(args.ranks) < 1:
        p.error(f"--seconds={args.seconds} --warmup={args.warmup} --ranks={args.ranks}; "
                "expected seconds > 0, warmup >= 0, ranks >= 1")
    sys.path.insert(0, HERE)
    import slowfs
    from node_reader_report import goals, shares, write_report
    from slow_disk import _commit, prepare

    reason = slowfs.fuse_unavailable_reason()
    if reason:
        print(f"node_reader: FUSE unavailable ({reason}); nothing measured", file=sys.stderr)
        return 2
    args.model_args = {d: shlex.split(getattr(args, f"{d}_args")) for d in ("hdd", "nfs")}
    args.model_args["hdd-fifo"] = args.model_args["hdd"]
    os.makedirs(args.out, exist_ok=True)
    paths = prepare(args.workdir, args.classes, args.per_class, args.copies)
    from imagenet_seq.read.reader import SplitReader

    meta = SplitReader(os.path.join(paths["data"], paths["lmdb"]), "train").meta
    args.num_records = meta.num_records
    from imagenet_seq import format as fmt

    file_bytes = os.path.getsize(fmt.data_file(os.path.join(paths["data"], paths["lmdb"])))
    setup = {"command": "python benchmarks/node_reader.py " + " ".join(map(shlex.quote, argv)),
             "machine": f"{os.cpu_count()} CPU cores, Linux {os.uname().release}, load average "
                        f"at start {' / '.join(f'{x:.2f}' for x in os.getloadavg())}",
             "commit": _commit(),
             "data": f"{meta.num_records} records ({args.classes * args.per_class} ImageNet-like "
                     f"JPEGs x {args.copies}), {meta.total_bytes / 1e6:.0f} MB of JPEGs, mean "
                     f"{meta.total_bytes / meta.num_records / 1e3:.0f} KB, in a file of "
                     f"{file_bytes / 1e6:.0f} MB (x{file_bytes / meta.total_bytes:.3f}: record "
                     "headers, LMDB pages)",
             "each row": f"fresh mount (cold cache), {args.warmup:g} s warm-up, "
                         f"{args.seconds:g} s counted"}
    if args.tiny:
        setup["tiny"] = "a check that the script runs (tiny file, slowed device): not a measurement"
    rows, failed = [], []
    try:
        for dev in args.devices:
            plan = [("dd", 0)] + [(how, n) for how in args.readers for n in args.ranks]
            for how, n in plan:
                try:
                    rows.append(measure(dev, how, n, paths, args))
                except RuntimeError as e:  # one broken row must not lose the others
                    print(f"  FAILED {dev} {how} x{n}: {str(e)[-800:]}", file=sys.stderr)
                    failed.append(f"{dev} {how} x{n}: {str(e)[-400:]}")
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
    shares(rows)
    setup["load average at end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    setup["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    saved = dict(argv=argv, devices=args.devices, ranks=args.ranks, readers=args.readers,
                 seconds=args.seconds, warmup=args.warmup, chunk_size=args.chunk_size,
                 model_args=args.model_args, tiny=args.tiny)
    result = {"rows": rows, "setup": setup, "failed": failed, "args": saved,
              "goals": [dict(goal=g, measured=v, met=ok) for g, v, ok in goals(rows)]}
    with open(os.path.join(args.out, "node_reader.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(write_report(result, os.path.join(args.out, "node_reader.md")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
