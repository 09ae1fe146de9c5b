"""``imagenet-seq-verify ROOT``: check every record of converted splits, or add checksums.

Exit status: 0 every record checks out; 1 a problem was found (each bad record named by key);
2 nothing to check (no split file under ROOT).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from imagenet_seq.format import checksums
from imagenet_seq.format.lmdbdir import is_env_folder
from imagenet_seq import format as fmt
from imagenet_seq.tools.verify import as_dicts, summary, verify_split

__all__ = ["main"]


def _paths(root: str, splits: str) -> List[str]:
    """The split files to check; a folder in a split file's place is kept, so that its
    report says what it is (``format.lmdbdir``) instead of LMDB's "Is a directory"."""
    if os.path.isfile(root):
        return [root]
    names = [fmt.split_filename(s.strip()) for s in splits.split(",") if s.strip()]
    found = [os.path.join(root, n) for n in names if os.path.exists(os.path.join(root, n))]
    if not found and is_env_folder(root):  # the split's "file" given, and it is a folder
        return [root]
    return found


def _bar(path: str, total: int, enabled: bool, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(total=total or None, unit=unit, unit_scale=True, desc=os.path.basename(path),
                disable=not enabled, file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="imagenet-seq-verify",
        description="Check every record of converted LMDBs against the checksums, labels and "
                    "class counts stored at conversion; name each bad record.")
    p.add_argument("root", help="output folder of preprocess_sequential.py, or one .lmdb file")
    p.add_argument("--splits", default="train,val", help="splits to check under a folder")
    p.add_argument("--decode", action="store_true",
                   help="also decode every JPEG (about 10x slower than the checksum check)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--add-checksums", action="store_true",
                   help="store checksums in files converted without them (reads every record "
                        "once, needs write access); they describe the bytes as they are now")
    args = p.parse_args(argv)
    paths = _paths(args.root, args.splits)
    if not paths:
        print(f"error: no {' or '.join(fmt.split_filename(s) for s in args.splits.split(','))} "
              f"in {args.root}; pass the output folder of preprocess_sequential.py",
              file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    if args.add_checksums:
        status = 0
        for path in paths:
            with _bar(path, 0, progress, unit=" records") as bar:
                try:
                    print(checksums.add_to(path, progress=lambda n: bar.update(n)))
                except (fmt.DamagedFile, ValueError, OSError) as e:
                    print(f"error: {e}", file=sys.stderr)
                    status = 1
        return status
    reports = []
    for path in paths:
        total = os.path.getsize(fmt.data_file(path)) if os.path.exists(path) else 0
        with _bar(path, total, progress) as bar:
            reports.append(verify_split(path, decode=args.decode, progress=bar.update))
    if args.json:
        print(json.dumps(as_dicts(reports), indent=1))
    else:
        print(summary(reports))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
