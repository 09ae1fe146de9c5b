"""The converter as a torchrun job: ``torchrun --nnodes M --nproc_per_node P -m
imagenet_seq.convert SRC OUT [options]`` (or ``preprocess_sequential.py`` under torchrun).

Every process parses the same command, resolves the same sources and converts its share of
each split (``dist_split``); rank 0 holds the output folder's lock, shows the job's progress,
writes the manifest, the report and the summary (``--json``: per-rank figures under
``"ranks"``). A failure on any rank (its message) or a rank that stops answering stops every
rank with an exit code of 1, naming it (``dist_job``); what each committed is kept, and
``--resume`` with the same command and the same number of processes continues.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List

import lmdb

from imagenet_seq.convert.dist_job import DistJob, PeerFailed, is_distributed
from imagenet_seq.convert.guards import write_failure
from imagenet_seq.convert.inputs import resolve
from imagenet_seq.convert.outcome import options, status as _status, stopped as _stopped, \
    summary, write_split_report as _write_report
from imagenet_seq.convert.passes import ConversionError, scan_limit
from imagenet_seq.convert.scan import ScanError
from imagenet_seq.format.convlock import Busy, ConversionLock

__all__ = ["is_distributed", "run"]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Bar:
    """Rank 0's view of the whole job: one bar per split and pass, the sums over all ranks."""

    def __init__(self, totals: dict):
        self.totals = totals  # (split, phase) -> images in all, where known
        self.bar = None
        self.key = None

    def __call__(self, counts: List[dict]) -> None:
        from tqdm import tqdm
        mine = counts[0] if counts else {}
        key = (mine.get("split"), mine.get("phase"))
        if key[1] not in ("read", "merge"):
            return
        same = [c for c in counts if (c.get("split"), c.get("phase")) == key]
        if key != self.key:
            self.close()
            self.key = key
            self.bar = tqdm(total=self.totals.get(key), unit="img", dynamic_ncols=True,
                            desc=f"{key[0]} {key[1]} ({len(counts)} processes)",
                            file=sys.stderr, smoothing=0.1)
        n = sum(c["images"] for c in same)
        mb = sum(c["bytes"] for c in same) / 1e6
        el = max(1e-9, time.time() - min(c.get("t0", time.time()) for c in same))
        self.bar.set_postfix(MBps=f"{mb / el:.1f}", ranks=len(same), refresh=False)
        self.bar.update(n - self.bar.n)  # tqdm's rate and ETA from the job's sums

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _rank_row(counts: dict) -> dict:
    """One rank's figures for ``--json``: per pass, images, bytes, seconds."""
    return {"rank": counts.get("rank"), "host": counts.get("host"),
            **{p: counts.get("passes", {}).get(p) for p in ("read", "merge")}}


def run(args, splits: List[str]) -> int:
    """The converter's CLI on one rank of a torchrun job (``cli._run`` sends it here)."""
    from imagenet_seq.convert.dist_split import convert_split_dist
    if os.environ.get("RANK") == "0":  # why a plain-looking run may wait for others
        _say(f"imagenet_seq.convert: rank 0 of a torch.distributed job of "
             f"{os.environ.get('WORLD_SIZE')} processes (RANK and WORLD_SIZE are set; unset "
             "them to convert with one process)")
    try:
        job = DistJob()
    except (ValueError, RuntimeError) as e:  # a bad variable, the rendezvous timed out
        _say(f"error: the torch.distributed job could not start: {e}")
        return 1
    lock = None
    bar = None
    code = 1
    try:
        if job.rank == 0:
            lock = ConversionLock(args.dst)
            lock.acquire()
        job.barrier("locked")
        inputs = resolve(args.src, splits, args.val_labels, args.devkit, cache_dir=args.dst,
                         classes=args.classes,
                         limit=scan_limit(args.memory_mb * 1_000_000, args.workers))
        opts = options(args)
        if job.rank == 0 and not args.no_progress:
            bar = _Bar({(s, "read"): len(inputs.scans[s].entries) or None for s in splits})
            job.show = bar
        results, ranks = [], {}
        for split in splits:
            scan = inputs.scans[split]
            res = convert_split_dist(job, inputs.root, args.dst, split, scan, opts,
                                     args.overwrite, args.resume,
                                     lambda text: _say(text) if job.rank == 0 else None)
            job.store.set(f"imagenet_seq/{split}/ranks/{job.rank}", json.dumps(job.counts))
            job.barrier(f"{split}/done")
            if job.rank == 0 and res is not None:
                if bar is not None:
                    bar.close()
                ranks[split] = {"ranks": [_rank_row(json.loads(job.store.get(
                    f"imagenet_seq/{split}/ranks/{r}"))) for r in range(job.world)]}
                res.skipped = [(rel, why) for rel, why in scan.not_images] + res.skipped
                res.report = _write_report(args.dst, split, res.skipped)
                results.append(res)
        code = summary(args, results, ranks) if job.rank == 0 else 0
    except PeerFailed as e:
        _say(f"\nerror: {e}; what every process committed is kept: run the same command with "
             "--resume to continue")
        code = 1
    except KeyboardInterrupt as e:
        other = job.error()  # torchrun stops the others when one rank fails: say why
        if other is not None and not other.startswith(f"rank {job.rank} ("):
            _say(f"\nerror: stopped because {other}; what every process committed is kept: "
                 "run the same command with --resume to continue")
            code = 1
        else:
            job.fail(_stopped(e))
            _say(f"\n{_stopped(e)}; the finished part is kept in {args.dst}: run the same "
                 "command with --resume to continue")
            code = _status(e)
    except (ConversionError, ScanError, ValueError, ImportError, Busy) as e:
        job.fail(str(e))
        _say(f"\nerror: rank {job.rank}: {e}")
        code = 2 if isinstance(e, (ScanError, ValueError, ImportError)) and \
            not isinstance(e, ConversionError) else 1
    except (OSError, lmdb.Error) as e:  # disk full, read-only folder, map full
        msg = write_failure(e, getattr(e, "folder", None) or args.dst)
        job.fail(msg)
        _say(f"\nerror: rank {job.rank}: {msg}")
    finally:
        if bar is not None:
            bar.close()
        job.close()
        if lock is not None:
            lock.release()
    return code
