"""``imagenet-seq-verify ROOT``: check every record of converted splits, or add checksums.

ROOT is an output folder (each split: its manifest and every shard it names, else its one
file), one ``.lmdb`` file (a shard alone too: its report says which shard it is) or a
manifest.

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
from imagenet_seq.format.manifest import find_shard, manifest_filename, read_manifest
from imagenet_seq import format as fmt
from imagenet_seq.tools.verify import as_dicts, summary, verify_split
from imagenet_seq.tools.verify_shards import verify_manifest

__all__ = ["main"]


def _paths(root: str, splits: str) -> List[str]:
    """The split files and manifests to check (a split's manifest stands for its shards);
    a folder in a split file's place is kept, so that its report says what it is
    (``format.lmdbdir``) instead of LMDB's "Is a directory"."""
    if os.path.isfile(root):
        return [root]
    found = []
    for s in (s.strip() for s in splits.split(",") if s.strip()):
        for name in (manifest_filename(s), fmt.split_filename(s)):
            if os.path.exists(os.path.join(root, name)):
                found.append(os.path.join(root, name))
                break  # a one-file split beside a manifest: the manifest's report says so
    if not found and is_env_folder(root):  # the split's "file" given, and it is a folder
        return [root]
    return found


def _shard_paths(manifest: str, shard_dirs: List[str]) -> List[str]:
    """The shards a manifest names that are found (for --add-checksums)."""
    here = os.path.dirname(os.path.abspath(manifest))
    rows = read_manifest(manifest)["shards"]
    return [p for p in (find_shard(here, r, shard_dirs) for r in rows) if p is not None]


def _bar(path: str, total: int, enabled: bool, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(total=total or None, unit=unit, unit_scale=True, desc=os.path.basename(path),
                disable=not enabled, file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="imagenet-seq-verify",
        description="Check every record of converted LMDBs against the checksums, labels and "
                    "class counts stored at conversion; name each bad record.")
    p.add_argument("root", help="output folder of preprocess_sequential.py, one .lmdb file "
                                "(a shard alone too) or a split's .manifest.json")
    p.add_argument("--splits", default="train,val", help="splits to check under a folder")
    p.add_argument("--decode", action="store_true",
                   help="also decode every JPEG (about 10x slower than the checksum check)")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--add-checksums", action="store_true",
                   help="store checksums in files converted without them (reads every record "
                        "once, needs write access); they describe the bytes as they are now")
    p.add_argument("--shard-dirs", metavar="DIR,...",
                   help="folders where shards the manifest places elsewhere are now (a disk "
                        "mounted at another path)")
    args = p.parse_args(argv)
    shard_dirs = [d for d in (args.shard_dirs or "").split(",") if d]
    paths = _paths(args.root, args.splits)
    if not paths:
        print(f"error: no {' or '.join(fmt.split_filename(s) for s in args.splits.split(','))} "
              f"in {args.root}; pass the output folder of preprocess_sequential.py",
              file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    if args.add_checksums:
        status = 0
        try:
            paths = [q for path in paths for q in (
                _shard_paths(path, shard_dirs) if path.endswith(".manifest.json") else [path])]
        except (fmt.DamagedFile, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for path in paths:
            with _bar(path, 0, progress, unit=" records") as bar:
                try:
                    print(checksums.add_to(path, progress=lambda n: bar.update(n)))
                except (fmt.DamagedFile, ValueError, OSError) as e:
                    print(f"error: {e}", file=sys.stderr)
                    status = 1
        return status
    reports = []

    def bar(path):
        total = os.path.getsize(fmt.data_file(path)) if os.path.exists(path) else 0
        return _bar(path, total, progress)
    for path in paths:
        if path.endswith(".manifest.json"):
            reports += verify_manifest(path, shard_dirs, decode=args.decode, bar=bar)
            continue
        with bar(path) as b:
            reports.append(verify_split(path, decode=args.decode, progress=b.update))
    if args.json:
        print(json.dumps(as_dicts(reports), indent=1))
    else:
        print(summary(reports))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
