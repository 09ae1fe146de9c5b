"""What a conversion reports when it ends, and how it stops: the options from the arguments,
the summary (table or ``--json``) and its exit code, the report file, the exit code and words
of an interruption. Shared by the one-process CLI (``cli``) and a torchrun job's (``dist_cli``).
"""
from __future__ import annotations

import json
import signal
import sys
from typing import Optional

from imagenet_seq.convert.options import Options
from imagenet_seq.convert.report import write_report

__all__ = ["Terminated", "stopped", "status", "options", "summary", "write_split_report",
           "table"]


def write_split_report(dst: str, split: str, skipped) -> Optional[str]:
    # one line per skipped file whatever its name holds (tabs, newlines escaped): report.py
    return write_report(dst, split, skipped)


def table(rows) -> str:
    head = ["split", "images", "converted", "skipped", "GB", "seconds", "img/s", "read order",
            "runs"]
    body = [[r.split, r.written, r.converted, len(r.skipped), f"{r.bytes / 1e9:.3f}",
             f"{r.seconds:.1f}", f"{r.written / r.seconds:.0f}" if r.seconds else "-",
             r.read_order, r.runs]
            if not r.already_complete else
            [r.split, r.written, "-", len(r.skipped), f"{r.bytes / 1e9:.3f}", "kept", "-", "-",
             "-"]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in [head] + body]
    for r in rows:  # a sharded split: its shards, where they went
        if r.manifest:
            lines.append(f"{r.split}: {len(r.shards)} shards, manifest {r.manifest}")
            lines += [f"  {s['index']:>5}  {s['records']:>9} images  {s['bytes'] / 1e9:8.3f} GB"
                      f"  {s['path']}" for s in r.shards]
    lines.append("(images: records written; converted: of those, stored changed (EXIF removed, "
                 "CMYK/PNG/other formats re-encoded as RGB JPEG, or --max-size resized), the "
                 "rest are the original bytes; skipped: not stored, see the .report.tsv)")
    return "\n".join(lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: workers killed, committed records kept, --resume hint."""


def stopped(e: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"


def status(e: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


def options(args) -> Options:
    """The conversion's :class:`Options` from the checked arguments."""
    return Options(seed=args.seed, max_size=args.max_size, quality=args.quality,
                   workers=args.workers, strict=args.strict, memory=args.memory_mb * 1_000_000,
                   tmp=args.tmp, read_order=args.read_order, read_ahead=args.read_ahead,
                   shards=args.shards, shard_gb=args.shard_gb,
                   shard_dirs=tuple(args.shard_dirs))


def summary(args, results, extra: Optional[dict] = None) -> int:
    """The summary (table or ``--json``; ``extra``: more keys per split) and the exit code."""
    if args.json:
        print(json.dumps({r.split: dict({
            "path": r.path, "images": r.written, "converted": r.converted,
            "skipped": len(r.skipped), "bytes": r.bytes, "seconds": round(r.seconds, 3),
            "report": r.report, "already_complete": r.already_complete,
            "read_order": r.read_order, "runs": r.runs, "tmp_bytes": r.tmp_bytes,
            "read_seconds": round(r.read_s, 3), "merge_seconds": round(r.merge_s, 3),
            "read_cpu_seconds": round(r.read_cpu_s, 3),
            "merge_cpu_seconds": round(r.merge_cpu_s, 3),
            "manifest": r.manifest, "shards": r.shards}, **(extra or {}).get(r.split, {}))
            for r in results}))
    else:
        print(table(results))
    skipped = sum(len(r.skipped) for r in results)
    if skipped:
        reports = ", ".join(r.report for r in results if r.report)
        print(f"warning: {skipped} files skipped (not stored); reasons in {reports}",
              file=sys.stderr)
        if args.strict:
            return 1
    return 0

