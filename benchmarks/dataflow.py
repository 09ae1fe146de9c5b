"""imagenet_seq.dataflow against tensorpack's recommended ImageNet flow, as ratios in one run.

    python benchmarks/dataflow.py                 # 2000 images, 3 alternating rounds
    python benchmarks/dataflow.py --rounds 1      # a couple of minutes

Same files as benchmarks/throughput.py (benchmarks/data.py: ImageNet-like JPEGs, page cache),
batch 64, 2 workers, RandomResizedCrop(224) + flip, ~4 % shuffle buffer. Peers, each in its own
subprocess, alternating across rounds:

  tensorpack     tensorpack's recommended flow on the original tool's LMDB (benchmarks/peers.py:
                 LMDBSerializer -> LocallyShuffleData -> MultiProcessRunnerZMQ(1) ->
                 MultiProcessMapDataZMQ(2, cv2 decode + GoogleNetRandomCropAndResize + Flip) ->
                 BatchData(64))
  dataflow_zmq   our DataFlows in tensorpack's own stages: LMDBSource -> MultiProcessMapDataZMQ(2,
                 ImageDecoder('train')) -> BatchData(64) (the fast decode, tensorpack's plumbing)
  dataflow_ready LoaderFlow (the Loader's thread workers writing into the batch): NHWC batches

Reports wall-clock images/s and CPU microseconds per image over all of a peer's processes (the
contention-robust figure on a shared machine), medians over rounds, and ratios to tensorpack.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import data as bench_data  # noqa: E402
from peers import BATCH, WORKERS, _timed, run_result_child, run_tensorpack  # noqa: E402

PEERS = ("tensorpack", "dataflow_zmq", "dataflow_ready")


def run_dataflow_zmq(d, warmup: int, measure: int) -> Dict[str, float]:
    from imagenet_seq import dataflow as isdf

    td = isdf.import_tensorpack()
    ds = isdf.LMDBSource(d.lmdb, "train", buffer_size=max(BATCH, d.images // 25))
    ds = td.MultiProcessMapDataZMQ(ds, WORKERS, isdf.ImageDecoder("train"),
                                   buffer_size=4 * BATCH, strict=False)
    ds = td.BatchData(ds, BATCH, use_list=False)
    ds.reset_state()

    def batches():
        while True:
            for b in ds:
                yield len(b[1])
    return _timed(batches(), warmup, measure)


def run_dataflow_ready(d, warmup: int, measure: int) -> Dict[str, float]:
    from imagenet_seq import dataflow as isdf

    flow = isdf.LoaderFlow(d.lmdb, "train", batch_size=BATCH, num_workers=WORKERS,
                           buffer_size=max(BATCH, d.images // 25))
    flow.reset_state()

    def batches():
        while True:
            for b in flow:
                yield len(b[1])
    return _timed(batches(), warmup, measure)


RUNNERS = {"tensorpack": run_tensorpack, "dataflow_zmq": run_dataflow_zmq,
           "dataflow_ready": run_dataflow_ready}


def child(args) -> None:
    d = bench_data.ensure(args.images, args.out, verbose=False)
    import torch  # noqa: F401 - as in a training script (malloc state: benchmarks/peers.py)

    res = RUNNERS[args.peer](d, args.warmup, args.measure)
    print("RESULT " + json.dumps(res), flush=True)
    os._exit(0)


def run_child(peer: str, args, timeout: float = 600) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--peer", peer, "--images",
           str(args.images), "--out", args.out, "--warmup", str(args.warmup), "--measure",
           str(args.measure)]
    return run_result_child(cmd, REPO, timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--out", default=bench_data.DEFAULT_OUT)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--measure", type=int, default=40)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer:
        child(args)
    bench_data.ensure(args.images, args.out)
    bench_data.warm_page_cache(bench_data.ensure(args.images, args.out, verbose=False))
    runs = {p: [] for p in PEERS}
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        for peer in (PEERS if r % 2 == 0 else PEERS[::-1]):
            res = run_child(peer, args)
            runs[peer].append(res)
            print(f"round {r + 1} {peer:15s} " + (
                f"{res['rate']:7.0f} img/s {res['cpu_us']:6.0f} CPU us/img" if "rate" in res
                else res.get("error", "?")), flush=True)
    med = {p: {k: statistics.median(x[k] for x in v if k in x) for k in ("rate", "cpu_us")}
           for p, v in runs.items() if v and all("rate" in x for x in v)}
    print(f"\nloadavg {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"{args.images} images, batch {BATCH}, {WORKERS} workers, {args.rounds} rounds")
    print("| peer | images/s (median) | CPU us/img | vs tensorpack (wall) | vs tensorpack (CPU) |")
    print("|---|---:|---:|---:|---:|")
    base = med.get("tensorpack")
    for p, m in med.items():
        wall = f"{m['rate'] / base['rate']:.2f}x" if base else "-"
        cpu = f"{base['cpu_us'] / m['cpu_us']:.2f}x" if base else "-"
        print(f"| {p} | {m['rate']:.0f} | {m['cpu_us']:.0f} | {wall} | {cpu} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "median": med, "loadavg": [load0, os.getloadavg()[0]],
                       "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
