"""Checks on where a conversion writes, made before anything is written; and what a failed
write means.

* The output folder (and ``--tmp``) must be a folder, or a path where one can be made: a regular
  file there is named as a file, not met later as "File exists".
* A split's file must not be a folder (an LMDB made with lmdb's default ``subdir=True``):
  the conversion would end by trying to rename its file over it.
* Neither may lie inside a split's source folder (``<root>/train``, ``<root>/val``): what the
  conversion writes there would be read back as images of an extra class by the next conversion
  and by torchvision's ``ImageFolder`` (every class index after it shifts by one), and a
  conversion stopped there could not be resumed. Such a folder is refused, never excluded from
  the scan: the tree must stay an ImageFolder tree for every other tool reading it too. The
  advice moves the user's folder out of the tree; it never deletes it.
* :func:`write_failure` turns a failed write (LMDB reports a full disk's short write as
  "Input/output error") into a message that says the disk is full where it is.
"""
from __future__ import annotations

import errno
import os
import shlex
import shutil
from typing import List, Optional

from imagenet_seq import format as fmt
from imagenet_seq.format.convlock import LOCK_NAME
from imagenet_seq.format.lmdbdir import in_place_of_output

__all__ = ["check_output", "write_failure", "FULL_BYTES"]

# Below this much free space a failed write is taken to be a full disk: one commit of the
# merge writes up to passes.COMMIT_BYTES (64 MiB) of pages.
FULL_BYTES = 128 << 20


def _inside(path: str, folder: str) -> bool:
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _not_a_folder(path: str, what: str) -> Optional[str]:
    """Why ``path`` cannot be (or become) a folder, or None."""
    if os.path.isdir(path):
        return None
    if os.path.exists(path):
        kind = "an LMDB file" if path.endswith((".lmdb", ".partial")) else "a regular file"
        return (f"{what} {path} is {kind}, not a folder: pass the folder that should hold "
                f"{fmt.split_filename('train')} and {fmt.split_filename('val')} (it is "
                "created if missing)"
                + (f", e.g. {os.path.dirname(os.path.abspath(path))}"
                   if kind == "an LMDB file" else ""))
    up = os.path.dirname(os.path.abspath(path))
    while up and not os.path.exists(up):
        up = os.path.dirname(up)
    if up and not os.path.isdir(up):
        return (f"{what} {path} cannot be made: {up} is a file, not a folder; pass a path "
                "under a folder")
    return None


def _suggest(root: str) -> str:
    """A folder beside the source tree for the output."""
    real = os.path.realpath(root)
    base = os.path.join(os.path.dirname(real), os.path.basename(real) + "-lmdb")
    cand, n = base, 2
    while os.path.exists(cand):
        cand, n = f"{base}-{n}", n + 1
    return cand


def _split_dirs(srcs: List[str]) -> List[str]:
    """The split folders of an ImageFolder source (``<root>/train``, ``<root>/val``)."""
    if len(srcs) != 1 or not os.path.isdir(srcs[0]):
        return []
    return [d for d in (os.path.join(srcs[0], s) for s in fmt.SPLITS) if os.path.isdir(d)]


def _in_tree(srcs: List[str], dst: str, tmp: Optional[str]) -> Optional[str]:
    for d in _split_dirs(srcs):
        split = os.path.basename(d)
        for what, path in (("the output folder", dst), ("--tmp", tmp)):
            if path is None or not _inside(path, d):
                continue
            rel = os.path.relpath(os.path.realpath(path), os.path.realpath(d))
            cls = rel.split(os.sep)[0]
            writes = ("the .lmdb files" if what == "the output folder"
                      else "the temporary sorted runs")
            head = (f"{what} {path} is inside {d}, the source folder of the {split} images: "
                    f"{writes} written there would be read as images "
                    + (f"of a class {cls!r} " if cls != "." else "")
                    + "by the next conversion and by torchvision's ImageFolder (shifting the "
                    "class indices), and a conversion stopped there could not be resumed")
            new = _suggest(srcs[0])
            if what == "--tmp":
                return f"{head}; pass a --tmp folder outside {srcs[0]}, e.g. {new}"
            held = [n for n in (sorted(os.listdir(path)) if os.path.isdir(path) else [])
                    if n != LOCK_NAME]
            keep = (f"; to keep what it holds ({', '.join(held[:4])}"
                    f"{', ...' if len(held) > 4 else ''}), move it out of the tree first: "
                    f"`mv {shlex.quote(path)} {shlex.quote(new)}`, then run with {new} "
                    "(--resume continues an unfinished conversion there)") if held else ""
            return f"{head}; pass an output folder outside {srcs[0]}, e.g. {new}{keep}"
    return None


def check_output(srcs: List[str], dst: str, tmp: Optional[str], splits: List[str]) -> None:
    """Refuse output places that would go wrong, before anything is written.

    Raises:
        ValueError: naming the path, what is wrong with it and the way out.
    """
    why = _not_a_folder(dst, "the output")
    if why is None and tmp is not None:
        why = _not_a_folder(tmp, "--tmp")
        if why is None and not os.path.isdir(tmp):
            why = f"--tmp {tmp!r} is not a folder; create it or pass another"
    if why is None:
        why = _in_tree(srcs, dst, tmp)
    if why is not None:
        raise ValueError(why)
    for split in splits:
        final = os.path.join(dst, fmt.split_filename(split))
        for path in (final, final + ".partial"):
            if os.path.isdir(path):
                raise ValueError(in_place_of_output(path))


def write_failure(e: BaseException, dst: str) -> str:
    """What a failed write of the output means, naming the folder and the way out."""
    if type(e).__name__ == "MapFullError":  # lmdb's: the map, not the disk, is full
        return (f"the .lmdb file in {dst} reached LMDB's map size ({fmt.MAP_SIZE:,} bytes, "
                f"the most one split file may hold here; LMDB: {e}); split the data or raise "
                "format.MAP_SIZE, then run again with --resume: everything committed so far "
                "is kept")
    code = getattr(e, "errno", None)
    text = getattr(e, "strerror", None) or str(e)
    if isinstance(e, OSError) and getattr(e, "filename", None):
        text = f"{e.filename}: {text}"
    folder = dst
    if isinstance(e, OSError) and e.filename and os.path.isdir(os.path.dirname(e.filename)):
        folder = os.path.dirname(e.filename)
    try:
        free: Optional[int] = shutil.disk_usage(folder).free
    except OSError:
        free = None
    quota = code == errno.EDQUOT or os.strerror(errno.EDQUOT) in str(e)
    full = (quota or code == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(e)
            or (free is not None and free < FULL_BYTES))
    if full:
        left = f"{free / 1e6:.1f} MB free" if free is not None else "free space unknown"
        return (f"the disk holding {folder} is full ({left}"
                + ("; your disk quota there is used up" if quota else "")
                + f"; the write failed with: {text}); free space on that disk, then run again "
                "with --resume: everything committed so far is kept")
    return (f"writing {folder} failed: {text} (the disk is not full: "
            + (f"{free / 1e9:.1f} GB free" if free is not None else "free space unknown")
            + "); fix the folder (permissions, a read-only or failing disk: see dmesg), then "
            "run again with --resume: everything committed so far is kept")
