"""``imagenet-seq-bench ROOT --advise``: measure this machine and disk once, predict the hours
of each choice a user makes before training, recommend one (the orchestration role).

Measures (:mod:`.advise_measure`) in about a minute on an ImageNet-sized split: the disk's
sequential rate and far-move cost, a sample's sizes, decode rates (crop decode on / off,
threads / processes), the sample re-encoded at ``--max-size`` 500 / 400 / 320 (quality 90)
and, with ``--source``, the source's read rate. Predicts (:mod:`.advise_model`) and prints
(:mod:`.advise_report`). Bad input is a :class:`BenchError` naming the value and the fix.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict

from imagenet_seq.tools.bench_measure import MIN_IMAGES, MIN_SECONDS, BenchError

__all__ = ["MIN_RECORDS", "STREAM_SECONDS", "SOURCE_SECONDS", "PLAN_SECONDS", "check", "run_advise"]

#: fewer records than this cannot be measured: the decode sample would be a handful of images
MIN_RECORDS = 32
STREAM_SECONDS = 20.0  # the disk's sequential rate: at most this long (less with --seconds)
SOURCE_SECONDS = 15.0
PLAN_SECONDS = 10.0  # records in an epoch's order: at most this long


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check(args: argparse.Namespace) -> None:
    """``--advise``'s own arguments; BenchError naming the value and the fix."""
    cpus = _cpus()
    if args.world_size < 1:
        raise BenchError(f"--world-size={args.world_size}; expected >= 1 rank")
    if args.world_size > cpus:
        raise BenchError(f"--world-size={args.world_size} is above this machine's {cpus} "
                         f"CPU(s): each rank needs at least one core to decode; pass "
                         f"--world-size {cpus} or less (on a machine with more cores, run "
                         "the advice there)")
    if args.source and not os.path.isdir(args.source):  # before a minute of measuring
        raise BenchError(f"--source {args.source!r} is not a folder; pass the ImageNet folder "
                         "the split was (or will be) converted from, e.g. /data/imagenet")
    if args.ranks:
        raise BenchError("--advise and --ranks: pass one (--advise predicts ranks 1..W "
                         "with --world-size W)")


def run_advise(args: argparse.Namespace, open_split: Callable, measure_stream: Callable) -> Dict:
    """Measure, predict, recommend; the ``--json`` object.

    ``open_split`` and ``measure_stream`` are the bench's (:mod:`.bench` calls this, so this
    module does not import it): the split opened with its errors named, and the disk's
    sequential rate from a dropped page cache.
    """
    from imagenet_seq.tools import advise_measure as am
    from imagenet_seq.tools.advise_model import predict, recommend
    from imagenet_seq.tools.info import summary_line

    check(args)
    try:
        reader = open_split(args.lmdb, args.split)
    except OSError as e:  # unreadable folder or file (permissions, I/O error)
        raise BenchError(f"cannot read the split in {args.lmdb!r}: {e}; check that the disk "
                         "is mounted and this user can read the files") from None
    records, path = len(reader), reader.path
    if records < MIN_RECORDS:
        reader.close()
        raise BenchError(
            f"the {args.split!r} split in {path} holds {records} record(s); --advise needs "
            f"at least {MIN_RECORDS} to measure decoding and image sizes on a sample (with "
            "fewer the figures would rest on a handful of images); convert more images, "
            "or run the plain bench (without --advise)")
    workers = args.workers if args.workers > 0 else 1
    result: Dict = {"path": args.lmdb, "split": args.split, "records": records,
                    "epochs": args.epochs, "world_size": args.world_size, "workers": workers,
                    "batch_size": args.batch_size, "runtime": summary_line(),
                    "gpu": "unknown", "warnings": [], "notes": [], "measured": {}}
    m = result["measured"]
    quiet = args.json or args.no_progress or not sys.stderr.isatty()
    say = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        say("advise: reading a sample of records ...")
        sample = am.read_sample(reader)
        mean = reader.meta.total_bytes / records if reader.meta.total_bytes else \
            sum(map(len, sample)) / len(sample)
        paths = reader.paths
        say("advise: the disk's sequential rate (page cache dropped) ...")
        s = measure_stream(reader, min(args.seconds, STREAM_SECONDS), not quiet)
        if s.interrupted:
            raise KeyboardInterrupt
        m["disk"] = {"mb_per_s": s.bytes / s.seconds / 1e6 if s.seconds else 0.0,
                     "images": s.images, "bytes": s.bytes, "seconds": s.seconds,
                     "passes": s.passes, "page_cache_evicted": s.evicted, "method": s.method,
                     "note": s.note}
        if not s.images or m["disk"]["mb_per_s"] <= 0:
            raise BenchError(f"no record could be read from {path} in {s.seconds:.1f} s; "
                             "check the disk (dmesg) and the path")
        say("advise: records in a train epoch's order ...")
        m["plan_read"] = am.measure_plan_read(reader, args.split, mean,
                                              min(args.seconds, PLAN_SECONDS))
        say("advise: the cost of a far move ...")
        m["far_move"] = am.measure_far_move(max(paths, key=os.path.getsize),
                                            m["disk"]["mb_per_s"])
        say(f"advise: decoding {len(sample)} sampled images ...")
        m["cpu"] = am.measure_cpu(sample, args.split, workers)
        say("advise: re-encoding the sample at --max-size " +
            "/".join(map(str, am.SIZES)) + f" --quality {am.QUALITY} ...")
        m["sizes"] = am.measure_sizes(sample, args.split)
        if args.source:
            say(f"advise: reading {args.source} in on-disk order ...")
            m["source"] = am.measure_source(args.source, min(args.seconds, SOURCE_SECONDS))
    except OSError as e:
        raise BenchError(f"reading {path} failed: {e}; check the disk (dmesg, smartctl) and "
                         "that this user can read the file") from None
    except KeyboardInterrupt:
        raise BenchError("interrupted before the measurements were complete: nothing to "
                         "predict from; run again and let it finish (about a minute)") from None
    finally:
        reader.close()
    result["mean_record_kb"] = mean / 1e3
    result["rests_on"] = _rests_on(result, len(sample))
    result["rows"] = predict(m, records, mean, args.epochs, args.split, workers,
                             args.world_size, args.batch_size, args.buffer_size)
    result["recommendation"] = recommend(result["rows"])
    if not m["disk"]["page_cache_evicted"]:
        result["warnings"].append(f"disk: {m['disk']['note']}: the disk figures may be RAM "
                                  "speed, and the predictions too fast")
    if not m["cpu"]["crop_decode_built"]:
        result["warnings"].append("the crop-decode extension is not built: both crop-decode "
                                  "rows decode whole images (imagenet-seq-info says why)")
    return result


def _rests_on(result: Dict, sampled: int) -> Dict:
    """What the figures rest on, and a warning when that is little."""
    disk, records = result["measured"]["disk"], result["records"]
    small = records < MIN_IMAGES or disk["images"] < MIN_IMAGES or disk["seconds"] < MIN_SECONDS
    out = {"disk_images": disk["images"], "disk_seconds": disk["seconds"],
           "disk_mb": disk["bytes"] / 1e6, "sample_images": sampled, "small": small}
    if small:
        result["warnings"].append(
            f"a small split: {records:,} records; the disk rate rests on {disk['images']:,} "
            f"record reads ({disk['bytes'] / 1e6:.1f} MB, {disk['passes']} pass(es) in "
            f"{disk['seconds']:.1f} s), decoding and sizes on {sampled} sampled images; "
            f"treat the hours as rough (>= {MIN_IMAGES:,} records and >= {MIN_SECONDS:g} s "
            "give firmer ones)")
    return out
