"""Train-pipeline throughput of imagenet_seq's Loader against its peers, as ratios in one run.

    python benchmarks/throughput.py            # 2000 images, 3 alternating rounds
    python benchmarks/throughput.py --quick    # 600 images, 1 round: a couple of minutes

Same ImageNet-like JPEGs (benchmarks/data.py) for everyone, all in page cache; 2 workers,
batch 64, RandomResizedCrop(224) + horizontal flip. Peers, each in its own subprocess (its own
session, killed as a group afterwards), alternating across rounds:

  decode       single-core cv2.imdecode at full size (malloc tuned, best case): the decode
               limit is 2 x this rate
  tensorpack   tensorpack's recommended ImageNet flow on the original tool's LMDB:
               LMDBSerializer.load -> LocallyShuffleData -> MultiProcessRunnerZMQ(1) ->
               MultiProcessMapDataZMQ(2, cv2 decode + GoogleNetRandomCropAndResize + Flip)
               -> BatchData(64)
  dali         DALI CPU backend: fn.readers.file -> decoders.image_random_crop(cpu) ->
               resize(224) -> flip(coin), num_threads=2
  torchvision  ImageFolder + DataLoader(num_workers=2, shuffle) with the PyTorch ImageNet
               example's transforms (RandomResizedCrop, RandomHorizontalFlip, ToTensor,
               Normalize); runs in --tv-python (a venv: torchvision pulls its own torch)
  ours         imagenet_seq.data.Loader(lmdb, 'train', batch_size=64, num_workers=2),
               worker_type 'process' and 'thread'
  ours_opencv  the same with thread workers and TrainTransform(antialias=False): OpenCV's
               faster filter, other pixels than torchvision (the cost of pixel parity)

Each run skips warm-up batches (worker start, buffer fill), then times a fixed number of
batches, crossing epochs where a peer has them (epoch restarts are part of the cost). Besides
wall-clock images/s it records CPU time per image over all of a peer's processes: on a machine
shared with other work, a peer with more processes gets a larger CPU share, so "cpu" ratios
(2 cores / CPU per image) are the contention-robust comparison.
Peers that are not installed are skipped with a note. Also reports the Loader's memory (RSS
and PSS summed over all its processes, and "own PSS": anonymous + shared-memory pages only, i.e.
without the page cache of the LMDB map the reader touches) at the end of epochs 1..5, per
worker type, each in a fresh process. The peers themselves live in benchmarks/peers.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import data as bench_data  # noqa: E402  (benchmarks/data.py)

from peers import (BATCH, IMPORTS, PEERS, RUNNERS, TARGETS, TV_PYTHON, WORKERS,  # noqa: E402
                   run_result_child)


def child(args) -> int:
    d = bench_data.ensure(args.images, args.out, verbose=False)
    # every peer runs inside a PyTorch training script; importing torch also changes glibc
    # malloc's state, which speeds up OpenCV decoding (see imagenet_seq.malloc)
    import torch  # noqa: F401

    try:
        res = RUNNERS[args.peer](d, args.warmup, args.measure)
    except ImportError as e:
        res = {"skipped": f"not installed: {e}"}
    print("RESULT " + json.dumps(res), flush=True)
    sys.stdout.flush()
    os._exit(0)  # do not wait for peers' background threads/processes; the parent kills the group


# --- parent: orchestration ------------------------------------------------------------------

def python_for(peer: str, tv_python: str) -> Optional[str]:
    return tv_python if peer == "torchvision" else sys.executable


def installed(peer: str, py: str) -> Optional[str]:
    """None if the peer's package imports in ``py``, else a note saying why it is skipped."""
    mod = IMPORTS.get(peer)
    if mod is None:
        return None
    if not os.path.exists(py):
        return f"{py} not found (python -m venv /opt/tv-venv --system-site-packages && " \
               "/opt/tv-venv/bin/pip install torchvision)"
    r = subprocess.run([py, "-c", f"import {mod}"], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"cannot import {mod} with {py}: {last}"
    return None


def run_child(peer: str, py: str, args, timeout: float) -> Dict:
    cmd = [py, os.path.abspath(__file__), "--peer", peer, "--images", str(args.images),
           "--out", args.out, "--warmup", str(args.warmup), "--measure", str(args.measure)]
    return run_result_child(cmd, REPO, timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="600 images, 1 round, short runs")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="batches skipped per run")
    ap.add_argument("--measure", type=int, default=None, help="batches timed per run")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)}")
    ap.add_argument("--no-memory", action="store_true", help="skip the epoch 1 vs 5 RSS run")
    ap.add_argument("--tv-python", default=TV_PYTHON, help="python with torchvision")
    ap.add_argument("--out", default=bench_data.DEFAULT_OUT)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per peer run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.images = args.images or (600 if q else 2000)
    args.rounds = args.rounds or (1 if q else 3)
    args.warmup = args.warmup if args.warmup is not None else (4 if q else 8)
    args.measure = args.measure or (24 if q else 90)
    timeout = args.timeout or (90 if q else 240)
    if args.peer:
        return child(args)

    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad:
        ap.error(f"--peers: unknown {bad}; choose from {','.join(PEERS)}")
    d = bench_data.ensure(args.images, args.out)
    mb = bench_data.warm_page_cache(d) / 2 ** 20
    print(f"{d.images} train images (ImageNet-like, {mb:.0f} MiB of files incl. LMDBs, in page "
          f"cache), {os.cpu_count()} cores, {WORKERS} workers, batch {BATCH}, {args.rounds} "
          f"round(s), {args.warmup} warm-up + {args.measure} timed batches per run", flush=True)
    notes = {}
    for peer in peers:
        why = installed(peer, python_for(peer, args.tv_python))
        if why:
            notes[peer] = why
            print(f"  skip {peer}: {why}", flush=True)
    active = [p for p in peers if p not in notes]
    runs: Dict[str, List[Dict]] = {p: [] for p in active}
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        for peer in (active if r % 2 == 0 else active[::-1]):
            res = run_child(peer, python_for(peer, args.tv_python), args, timeout)
            if "rate" in res:
                runs[peer].append(res)
                print(f"  round {r + 1} {peer:13s} {res['rate']:7.0f} img/s  "
                      f"{res['cpu_us']:6.0f} CPU us/img", flush=True)
            else:
                notes[peer] = res.get("skipped") or res.get("error")
                print(f"  round {r + 1} {peer:13s} {notes[peer]}", flush=True)
    load = (load0, os.getloadavg()[0])
    med = {p: statistics.median(x["rate"] for x in v) for p, v in runs.items() if v}
    cpu = {p: statistics.median(x["cpu_us"] for x in v) for p, v in runs.items() if v}
    memory = None
    if not args.no_memory:  # each worker type in a fresh process
        memory = {wt: run_child(f"memory_{wt}", sys.executable, args, timeout).get("series")
                  for wt in ("thread", "process") if f"ours_{wt}" in med}
    report(med, cpu, runs, notes, memory, load)
    if args.json:
        print(json.dumps({"median_rate": med, "median_cpu_us": cpu, "runs": runs,
                          "notes": notes, "memory": memory, "images": d.images,
                          "rounds": args.rounds, "loadavg": load}))
    return 0


def _verdicts(name: str, value: Dict[str, float], limit: Optional[float], notes) -> None:
    for ours in ("ours_process", "ours_thread", "ours_opencv"):
        if ours not in value:
            continue
        parts = []
        for peer, target in TARGETS.items():
            base = limit if peer == "decode_limit" else value.get(peer)
            if not base:
                parts.append(f"{peer} n/a")
                continue
            ratio = value[ours] / base
            parts.append(f"{peer} {ratio:.2f}x{'' if ratio >= target else ' MISS'}")
        print(f"  {name:5s} {ours:13s} " + ", ".join(parts))


def report(med, cpu, runs, notes, memory, load) -> None:
    """Plain-text table: wall-clock rates, CPU per image, ratios against the targets."""
    print(f"\nload average during the runs: {load[0]:.1f} -> {load[1]:.1f} "
          f"({os.cpu_count()} cores; > cores means other work shared the CPUs)")
    print("peer            wall img/s (median; rounds)        CPU us/img   2-core CPU bound")
    for p in med:
        rounds = " ".join(f"{x['rate']:.0f}" for x in runs[p])
        bound = 2e6 / cpu[p]
        print(f"{p:15s} {med[p]:10.0f}  ({rounds:24s}) {cpu[p]:10.0f}   {bound:10.0f}")
    limit = 2 * med["decode"] if "decode" in med else None
    cpu_rate = {p: 2e6 / c for p, c in cpu.items()}
    cpu_limit = cpu_rate.get("decode")  # 2 cores x single-core rate from CPU time
    if limit:
        print(f"{'decode limit':15s} {limit:10.0f}  (2 x single-core cv2.imdecode)"
              f"{'':9s}{cpu_limit:23.0f}")
    print(f"\nratios (targets: >= {TARGETS['tensorpack']}x tensorpack, >= {TARGETS['dali']}x dali, "
          f">= {TARGETS['torchvision']}x torchvision, >= {TARGETS['decode_limit']}x decode limit)")
    _verdicts("wall", med, limit, notes)
    _verdicts("cpu", cpu_rate, cpu_limit, notes)
    for wt, series in (memory or {}).items():
        if not isinstance(series, list) or len(series) < 5:
            print(f"\nLoader memory run ({wt}): {series}")
            continue
        e1, e2, e5 = series[0], series[1], series[4]
        print(f"\nLoader memory, {wt} workers, all processes (MiB, end of each epoch 1..5):")
        for key, name in (("rss_mib", "RSS summed"), ("pss_mib", "PSS summed"),
                          ("own_mib", "own PSS"), ("main_rss_mib", "main RSS")):
            if key not in e1:
                continue
            vals = " ".join(f"{m.get(key, 0):.0f}" for m in series)
            print(f"  {name:11s} {vals}   epoch 1->5 {e5[key] / e1[key] - 1:+.1%}, "
                  f"2->5 {e5[key] / e2[key] - 1:+.1%}  (target growth <= 5 %)")
    for p, why in notes.items():
        print(f"note: {p}: {why}")


if __name__ == "__main__":
    sys.exit(main())
