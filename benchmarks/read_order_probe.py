"""One reader on a fresh slowfs mount, its request log kept: what order its reads reach the
emulated device in, next to plain sequential readers of the same file.

    python benchmarks/read_order_probe.py [--device hdd-fifo] [--order kernel arrival]
        [--probes dd cat pread fadvise-64m fadvise-steps reader] [--seconds 8] [--out DIR]

Probes, each on its own fresh mount (cold cache) of the LMDB that ``benchmarks/slow_disk.py``
prepares (``--workdir``), for ``--seconds``:

* ``dd``: ``dd bs=1M``; ``cat``; ``pread``: an ``os.pread`` loop of 1 MiB reads, front to back;
* ``fadvise-64m``: ``posix_fadvise(WILLNEED)`` of 64 MB in one call, then ``pread`` of it;
* ``fadvise-steps``: the same 64 MB hinted in 128 KiB calls (as ``read/readahead.py`` does:
  the kernel reads at most ``read_ahead_kb`` per call), then ``pread`` of it;
* ``reader``: the Loader's read path for one rank: a ``SplitReader`` reading the rank's epoch
  spans (offsets index, ``Prefetch`` bursts).

Each log (``<out>/<device>-<order>-<probe>.txt``) is summarised by ``slowfs_trace.py``:
positionings as served and in the kernel's order.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
PROBES = ("dd", "cat", "pread", "fadvise-64m", "fadvise-steps", "reader")
MB = 1 << 20
STEP = 128 << 10


def run_probe(probe: str, path: str, seconds: float) -> None:
    """Read ``path`` (on the mount) the way ``probe`` says, for ``seconds``."""
    end = time.monotonic() + seconds
    if probe in ("dd", "cat"):
        cmd = ["dd", f"if={path}", "of=/dev/null", "bs=1M"] if probe == "dd" else ["cat", path]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return
    if probe == "reader":
        from imagenet_seq.plan import order
        from imagenet_seq.read.reader import SplitReader

        reader = SplitReader(os.path.dirname(path), "train")
        try:
            spans = order.read_spans(len(reader), "train", seed=0, epoch=0)
            for _ in reader.read_spans(spans):
                if time.monotonic() > end:
                    break
        finally:
            reader.close()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        size, off = os.fstat(fd).st_size, 0
        while time.monotonic() < end and off < size:
            if probe == "pread":
                off += len(os.pread(fd, MB, off)) or size
                continue
            if probe == "fadvise-64m":
                os.posix_fadvise(fd, off, 64 * MB, os.POSIX_FADV_WILLNEED)
            else:
                for o in range(off, off + 64 * MB, STEP):
                    os.posix_fadvise(fd, o, STEP, os.POSIX_FADV_WILLNEED)
            for o in range(off, off + 64 * MB, MB):  # waits for the hinted reads
                os.pread(fd, MB, o)
            off += 64 * MB
    finally:
        os.close(fd)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="hdd-fifo", choices=("hdd", "hdd-fifo", "nfs"))
    p.add_argument("--order", nargs="+", default=["kernel", "arrival"],
                   choices=("kernel", "arrival"), help="slowfs --order of each set of probes")
    p.add_argument("--probes", nargs="+", default=list(PROBES), choices=PROBES)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--workdir", default="/tmp/imagenet_seq_slow_disk",
                   help="data cache of slow_disk.py (prepared there if missing)")
    p.add_argument("--out", default="/tmp/imagenet_seq_read_order")
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    import slowfs
    import slowfs_trace
    from slow_disk import prepare

    reason = slowfs.fuse_unavailable_reason()
    if reason:
        print(f"read_order_probe: FUSE unavailable ({reason}); nothing measured", file=sys.stderr)
        return 2
    paths = prepare(args.workdir, 15, 200, 12)  # node_reader.py's data
    os.makedirs(args.out, exist_ok=True)
    mnt = os.path.join(args.out, "mnt")
    print(f"load average at start: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = []
    for order in args.order:
        for probe in args.probes:
            trace = os.path.join(args.out, f"{args.device}-{order}-{probe}.txt")
            os.environ["SLOWFS_TRACE"] = trace
            with slowfs.mounted(paths["data"], mnt, args.device, ["--order", order]) as stats:
                run_probe(probe, os.path.join(mnt, paths["lmdb"]), args.seconds)
            s = slowfs_trace.summary(slowfs_trace.load(trace), 64 << 10)
            results.append(dict(device=args.device, order=order, probe=probe, trace=trace,
                                device_stats=dict(stats), **s))
            k = s.get("kernel_order", {}).get("positionings", "-")
            print(f"{args.device} --order {order:7} {probe:13}: {s.get('mb_per_s', 0):6.1f} MB/s, "
                  f"{s['requests']:5} requests, positionings as served "
                  f"{s['served']['positionings'] if s['requests'] else 0:4}, in the kernel's "
                  f"order {k}", flush=True)
    print(f"load average at end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with open(os.path.join(args.out, "read_order_probe.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
