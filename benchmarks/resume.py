"""Resume latency: ``load_state_dict`` + the first batch after it, at a given split shape.

    python benchmarks/resume.py                       # ImageNet's shape, plan-only replay
    python benchmarks/resume.py --data-images 2000    # and a real resume on benchmark data

Two parts:

* **plan replay at ImageNet's shape** (no data needed): the cost of replaying the epoch plan
  and the shuffle buffer on record ids up to batch ``k`` (what ``load_state_dict`` + the first
  ``iter`` do before reading), for 1,281,167 records, the default ~19,500-record buffer
  (2 GiB / 110 KB), batch 256, at 10 / 50 / 90 % of an epoch, 1 and 8 ranks. Also the number
  of records re-read (the buffer's content at that point: the stated bound is
  ``buffer_size``) and their bytes at the ImageNet mean record (110 KB), with the time an
  HDD at 150 MB/s needs for them.
* **end to end on benchmark data** (``--data-images N``): a Loader is resumed mid-epoch and
  the time from ``load_state_dict`` to the first batch is measured, next to the time to the
  first batch of a fresh epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

IMAGENET_TRAIN = 1_281_167
MEAN_RECORD = 110_000
HDD_BPS = 150e6


def plan_replay(num_records: int, buffer_size: int, batch_size: int, fraction: float,
                rank: int = 0, world_size: int = 1, chunk_size: int = 1024) -> dict:
    from imagenet_seq.plan import order
    from imagenet_seq.plan.shuffle import ShuffleBuffer
    from imagenet_seq.plan.stage import Plan, merge_ids

    plan = Plan(num_records, "train", 0, rank, world_size, True, chunk_size)
    n = order.rank_records(num_records, "train", rank, world_size)
    batches = order.num_batches(n, batch_size, False)
    k = int(batches * fraction)
    t0 = time.perf_counter()
    ids = plan.ids(7).tolist()
    t1 = time.perf_counter()
    buf = ShuffleBuffer(buffer_size, order.shuffle_rng(0, 7, rank))
    consumed = buf.fast_forward(ids, k * batch_size)
    pending = buf.pending_ids()
    spans = merge_ids(pending)
    t2 = time.perf_counter()
    return {"num_records": num_records, "world_size": world_size, "batch": k,
            "of_batches": batches, "plan_s": t1 - t0, "shuffle_replay_s": t2 - t1,
            "replay_s": t2 - t0, "reread_records": len(pending), "reread_spans": len(spans),
            "reread_bytes_at_imagenet_mean": len(pending) * MEAN_RECORD,
            "reread_hdd_s_at_150MBps": len(pending) * MEAN_RECORD / HDD_BPS,
            "resume_reads_from_position": consumed}


def end_to_end(images: int, fraction: float, workers: int) -> dict:
    import data as bench_data
    from imagenet_seq.data import Loader

    d = bench_data.ensure(images, legacy=False, verbose=True)
    bench_data.warm_page_cache(d)
    make = lambda: Loader(d.lmdb, "train", batch_size=64, num_workers=workers)  # noqa: E731
    ld = make()
    ld.set_epoch(1)
    t0 = time.perf_counter()
    it = iter(ld)
    next(it)
    fresh = time.perf_counter() - t0
    k = max(1, int(len(ld) * fraction))
    for _ in range(k - 1):
        next(it)
    sd = ld.state_dict()
    ld.close()
    b = make()
    t0 = time.perf_counter()
    b.load_state_dict(sd)
    b.set_epoch(1)
    next(iter(b))
    resumed = time.perf_counter() - t0
    b.close()
    return {"images": images, "buffer_size": b.buffer_size, "batch": k, "of_batches": len(b),
            "first_batch_fresh_epoch_s": fresh, "first_batch_after_resume_s": resumed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=IMAGENET_TRAIN)
    p.add_argument("--buffer-size", type=int, default=(2 << 30) // MEAN_RECORD)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--data-images", type=int, default=0,
                   help="also resume a real Loader on N benchmark images (benchmarks/data.py)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "resume.json"))
    args = p.parse_args(argv)
    results = []
    print(f"{'ranks':>5} {'batch':>12} {'replay s':>9} {'re-read':>8} {'spans':>6} "
          f"{'GB':>6} {'HDD s':>6}")
    for world in args.world_sizes:
        buffer = args.buffer_size // world  # the per-machine budget split among 8 local ranks
        for frac in args.fractions:
            r = plan_replay(args.records, buffer, args.batch_size, frac, 0, world)
            results.append(r)
            print(f"{world:5d} {r['batch']:6d}/{r['of_batches']:<5d} {r['replay_s']:9.2f} "
                  f"{r['reread_records']:8d} {r['reread_spans']:6d} "
                  f"{r['reread_bytes_at_imagenet_mean'] / 1e9:6.2f} "
                  f"{r['reread_hdd_s_at_150MBps']:6.1f}", flush=True)
    if args.data_images:
        r = end_to_end(args.data_images, 0.5, args.workers)
        results.append(r)
        print(json.dumps(r))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/resume.py " + " ".join(sys.argv[1:] if argv
                                                                         is None else argv),
                   "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
