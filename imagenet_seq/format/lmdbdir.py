"""A folder where a split's file should be: what it is and how to get a file this reads.

``lmdb.open(path)`` makes a *folder* by default (``subdir=True``: ``path/data.mdb`` and
``path/lock.mdb``); imagenet_seq keeps each split in ONE file (``subdir=False``), as
preprocess_sequential.py writes it. A folder named ``ILSVRC-train.lmdb`` is therefore never
opened as a split: :func:`folder_error` says what it holds and the way out. When its
``data.mdb`` is itself a file this package reads (an imagenet_seq split, or the original tool's
tensorpack ``LMDBSerializer`` output), moving that file into the folder's place is enough: LMDB's
file is the same with or without the folder around it.
"""
from __future__ import annotations

import os
import shlex
from typing import List, Optional

__all__ = ["folder_error", "in_place_of_output", "is_env_folder"]

CONVERT = "python preprocess_sequential.py /path/to/imagenet OUT_FOLDER"


def is_env_folder(path: str) -> bool:
    """True for a folder holding an LMDB environment (``data.mdb``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "data.mdb"))


def _listing(path: str) -> List[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def in_place_of_output(path: str) -> str:
    """The converter's words for a folder where it is to write a split's file."""
    inside = _listing(path)
    kind = ("an LMDB environment directory (what lmdb.open makes with its default "
            "subdir=True), not a file of the imagenet_seq format" if "data.mdb" in inside
            else "not a file")
    base = path.rstrip(os.sep)
    q, qdir = shlex.quote(base), shlex.quote(base + ".dir")
    return (f"{path} is a folder ({', '.join(inside[:5]) or 'empty'}): {kind}. The conversion "
            f"writes {os.path.basename(base)} as ONE file there: move the folder aside first "
            f"(`mv {q} {qdir}`; nothing is deleted) or pass another output folder")


def folder_error(path: str, what: Optional[str] = None) -> FileNotFoundError:
    """The error for a folder at ``path`` where a split's LMDB file was looked for; ``what``:
    what its ``data.mdb`` holds when it is a file this package reads (``format`` tells)."""
    inside = _listing(path)
    shown = ", ".join(inside[:5]) + (", ..." if len(inside) > 5 else "")
    head = f"{path} is a folder ({shown or 'empty'}), not an LMDB file"
    if "data.mdb" not in inside:
        return FileNotFoundError(
            f"{head}: preprocess_sequential.py writes one file per split; re-copy the file, or "
            f"convert the images: `{CONVERT}`")
    base = path.rstrip(os.sep)
    q, qdir = shlex.quote(base), shlex.quote(base + ".dir")
    if what is not None:
        fix = (f"its data.mdb holds {what}, which this package reads as a file: "
               f"`mv {q} {qdir} && mv {shlex.quote(base + '.dir/data.mdb')} {q}` puts it in "
               "place (nothing is deleted)")
    else:
        fix = (f"convert the images into this format: `{CONVERT}` (a new folder, or move this "
               f"one aside first with `mv {q} {qdir}`: the conversion writes "
               f"{os.path.basename(base)} as a file)")
    return FileNotFoundError(
        f"{head}: it is an LMDB environment directory (what lmdb.open makes with its default "
        "subdir=True), not a file of the imagenet_seq format, which keeps each split in ONE "
        f"LMDB file (subdir=False) as preprocess_sequential.py writes it; {fix}")
