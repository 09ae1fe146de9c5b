"""``preprocess_sequential.py SRC DST``: convert an ImageFolder tree into sequential LMDBs."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import List, Optional

import lmdb

from imagenet_seq import format as fmt
from imagenet_seq.convert.guards import check_output, write_failure
from imagenet_seq.convert.inputs import resolve
from imagenet_seq.convert.scan import ScanError
from imagenet_seq.convert.passes import buffer_bytes, scan_limit
from imagenet_seq.convert.shards import check_dirs
from imagenet_seq.convert.writer import DEFAULT_MEMORY, ConversionError, convert_split
from imagenet_seq.convert.outcome import (Terminated, options, status as _status,
                                          stopped as _stopped, summary,
                                          write_split_report as _write_report)
from imagenet_seq.format.convlock import Busy, ConversionLock

__all__ = ["build_parser", "Terminated", "options", "summary", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_sequential.py",
        description="Convert an ImageFolder tree (train/<class>/*, val/<class>/* or a flat val/ "
                    "with --val-labels), a tar of one, or ImageNet's archives into "
                    "ILSVRC-train.lmdb / ILSVRC-val.lmdb: raw JPEG bytes + labels, train in a "
                    "seeded random order, val in sorted order. Sources are read once, in "
                    "on-disk order, by one reader; records are sorted through temporary runs.")
    p.add_argument("src", nargs="+",
                   help="dataset root holding train/ and val/; or a tar of such a tree; or "
                        "ImageNet's ILSVRC2012_img_train.tar and/or ILSVRC2012_img_val.tar "
                        "(or a folder holding them); or WebDataset shards (<key>.jpg + "
                        "<key>.cls or <key>.json): a folder of .tar shards, a brace pattern "
                        "'imagenet22k-train-{0000..4095}.tar' or a list, each shard's split a "
                        "word of its name (train, val, validation): read in place, never "
                        "extracted")
    p.add_argument("dst", help="output folder for the .lmdb files")
    p.add_argument("--splits", default="train,val",
                   help="comma-separated splits to convert (default: train,val)")
    p.add_argument("--val-labels", metavar="FILE",
                   help="labels for a flat val/ folder: '<filename> <class>' lines or Kaggle's "
                        "LOC_val_solution.csv")
    p.add_argument("--devkit", metavar="FILE",
                   help="ILSVRC2012_devkit_t12.tar.gz: labels of ILSVRC2012_img_val.tar "
                        "(data/meta.mat + validation ground truth; needs scipy)")
    p.add_argument("--classes", metavar="FILE",
                   help="WebDataset shards: the class names, one per line, label i = line "
                        "i + 1 (e.g. timm's imagenet22k_synsets.txt); default: the labels "
                        "seen, 0 .. the largest, named by their numbers")
    p.add_argument("--seed", type=int, default=0, help="seed of the train write order")
    p.add_argument("--workers", "-j", type=int, default=os.cpu_count() or 1,
                   help="processes that read and validate images (0: in this process)")
    p.add_argument("--max-size", type=int, default=None, metavar="N",
                   help="re-encode images whose longer side exceeds N pixels (default: keep)")
    p.add_argument("--quality", type=int, default=95, metavar="Q",
                   help="JPEG quality of re-encoded images (default: 95)")
    p.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY // 1_000_000, metavar="MB",
                   help="memory bound of the conversion, workers included (default: "
                        "%(default)s MB): what the processes, queues and file list leave is the "
                        "sorted run held before it is written, then the runs' read buffers")
    p.add_argument("--tmp", metavar="DIR",
                   help="folder for the temporary sorted runs, about the size of the sources "
                        "(default: the output folder; another disk than the sources' is best)")
    shards = p.add_mutually_exclusive_group()
    shards.add_argument("--shards", type=int, metavar="K",
                        help="write each split as K shard files ILSVRC-<split>-JJJJJ-of-KKKKK"
                             ".lmdb (each a complete file of the format, the split's records in "
                             "order) and ILSVRC-<split>.manifest.json (default: one file "
                             "ILSVRC-<split>.lmdb)")
    shards.add_argument("--shard-gb", type=float, metavar="N",
                        help="as --shards, with K chosen so that a shard holds about N GB "
                             "(10^9 bytes) of images at most")
    p.add_argument("--shard-dirs", metavar="DIR2,DIR3,...",
                   help="with --shards/--shard-gb: folders beside the output folder (one per "
                        "disk, each must exist) that get shards too, round-robin over "
                        "[output folder, DIR2, DIR3, ...]; the manifest stays in the output "
                        "folder")
    p.add_argument("--read-order", choices=["auto", "inode", "name"], default="auto",
                   help="order in which the source files are read: auto = on-disk order "
                        "(FIEMAP extents where the filesystem tells them, else inode numbers); "
                        "name = sorted paths")
    p.add_argument("--read-ahead", type=int, default=None, metavar="N",
                   help="files the one reader works on at once: the one it reads and the next "
                        "N-1, opened and handed to the kernel to read ahead in read order "
                        "(posix_fadvise WILLNEED, at most 16 MiB ahead); reads stay one at a "
                        "time and in order (default: 8; 1 = no read-ahead). Folders only: an "
                        "archive is read in one forward sweep, the kernel reading ahead")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted conversion; complete splits are kept")
    p.add_argument("--overwrite", action="store_true", help="replace existing output")
    p.add_argument("--strict", action="store_true",
                   help="stop with a non-zero exit at the first broken image")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check(args) -> List[str]:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in fmt.SPLITS]
    if bad or not splits:
        raise ValueError(f"--splits {args.splits!r}; expected a comma-separated subset of "
                         f"{','.join(fmt.SPLITS)}")
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}; expected 0 or more")
    if args.read_ahead is not None and not 1 <= args.read_ahead <= 256:
        raise ValueError(f"--read-ahead {args.read_ahead}; expected 1..256 files (the file "
                         "being read and the next N-1 hinted to the kernel; 1 = no read-ahead)")
    if args.max_size is not None and args.max_size < 16:
        raise ValueError(f"--max-size {args.max_size}; expected at least 16 pixels")
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality {args.quality}; expected 1..100")
    buffer_bytes(args.memory_mb * 1_000_000, args.workers)  # ValueError naming the minimum
    if args.shards is not None and args.shards < 1:
        raise ValueError(f"--shards {args.shards}; expected 1 or more")
    if args.shard_gb is not None and not args.shard_gb > 0:
        raise ValueError(f"--shard-gb {args.shard_gb}; expected a size in GB above 0, e.g. 100")
    args.shard_dirs = [d.strip() for d in (args.shard_dirs or "").split(",") if d.strip()]
    if args.shard_dirs and args.shards is None and args.shard_gb is None:
        raise ValueError("--shard-dirs needs --shards K or --shard-gb N (without them each "
                         "split is one file in the output folder)")
    why = check_dirs(args.dst, args.shard_dirs)
    if why is not None:
        raise ValueError(why)
    for d in args.shard_dirs:  # not inside a split's source folder, as the output folder
        try:
            check_output(args.src, d, None, [])
        except ValueError as e:
            raise ValueError(f"--shard-dirs: {e}") from None
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pick one")
    # a file where the output folder goes, a folder where a split's file goes, an output or
    # --tmp inside a split's source folder: refused before anything is written
    check_output(args.src, args.dst, args.tmp, splits)
    return splits


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    # intermixed: "train.tar val.tar --devkit kit.tar.gz DST" (options between the paths)
    args = build_parser().parse_intermixed_args(argv)
    # only the main thread may set handlers (a library caller in a thread keeps the default)
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return _run(args)
    except KeyboardInterrupt as e:  # before or after the writing (scan, summary)
        print(f"\n{_stopped(e)}", file=sys.stderr)
        return _status(e)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)


def _run(args) -> int:
    try:
        splits = _check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from imagenet_seq.convert import dist_cli
    if dist_cli.is_distributed():  # torchrun: every process converts a part (dist_cli)
        return dist_cli.run(args, splits)
    # one conversion at a time per output folder, from before its first write to its end
    lock = ConversionLock(args.dst)
    try:
        lock.acquire()
    except Busy as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot create the output folder's lock file {lock.path}: "
              f"{e.strerror or e}; pass a folder you can write to", file=sys.stderr)
        return 1
    try:
        return _convert(args, splits)
    finally:
        lock.release()


def _remove_old_listings(dst: str) -> None:
    """Delete the archive listings (``.listing-*.json``) that converters before the one sweep
    kept in the output folder for ``--resume``: every split is complete, and no converter
    now reads them."""
    try:
        names = os.listdir(dst)
    except OSError:
        return
    for name in names:
        if name.startswith(".listing-") and name.endswith(".json"):
            try:
                os.remove(os.path.join(dst, name))
            except OSError:
                pass


def _convert(args, splits: List[str]) -> int:
    try:
        inputs = resolve(args.src, splits, args.val_labels, args.devkit,
                         cache_dir=args.dst,  # a converted train split: its classes
                         classes=args.classes,  # a folder's file list within --memory-mb
                         limit=scan_limit(args.memory_mb * 1_000_000, args.workers))
        scans = inputs.scans
    except (ValueError, ScanError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    few = [s for s in splits if args.shards is not None and scans[s].sweep is None
           and args.shards > max(1, len(scans[s].entries))]
    if few:  # before any split is written
        print(f"error: --shards {args.shards} for the {len(scans[few[0]].entries)} images of "
              f"{few[0]}; a shard holds at least one image's place: pass fewer, or convert "
              f"{few[0]} on its own (--splits) with fewer", file=sys.stderr)
        return 2
    opts = options(args)
    results = []
    for split in splits:
        scan = scans[split]
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            def start(total, initial, phase, split=split):
                nonlocal bar
                if bar is not None:
                    bar.close()
                # one bar per pass: 'read' (sources -> sorted runs), 'merge' (runs -> LMDB)
                bar = tqdm(total=total, initial=initial, unit="img", desc=f"{split} {phase}",
                           smoothing=0.05, dynamic_ncols=True, file=sys.stderr)
                bar.mb = 0.0

            def progress(n, nbytes, skipped):
                bar.mb += nbytes / 1e6
                bar.update(n)
                if bar.n % 256 == 0:
                    el = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix(MBps=f"{bar.mb / el:.1f}", skipped=skipped, refresh=False)
        else:
            start = progress = None
        try:
            res = convert_split(inputs.root, args.dst, split, scan, opts, overwrite=args.overwrite,
                                resume=args.resume, progress=progress, start_progress=start,
                                notice=lambda text: print(text, file=sys.stderr))
        except ConversionError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
        except ScanError as e:  # found by an archive's sweep (damaged, unlabelled images)
            print(f"\nerror: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            print(f"\n{_stopped(e)}; the finished part is kept in {args.dst}: run again with "
                  "--resume to continue", file=sys.stderr)
            return _status(e)
        except (OSError, lmdb.Error) as e:  # disk full, read-only folder, map full
            # the shard folder the failed write went to (writer.py), else the output folder
            print(f"\nerror: {write_failure(e, getattr(e, 'folder', None) or args.dst)}",
                  file=sys.stderr)
            return 1
        finally:
            if bar is not None:
                bar.close()
        # files that are not images are reported beside the broken ones
        res.skipped = [(rel, reason) for rel, reason in scan.not_images] + res.skipped
        res.report = _write_report(args.dst, split, res.skipped)
        results.append(res)
    _remove_old_listings(args.dst)
    return summary(args, results)


if __name__ == "__main__":
    sys.exit(main())
