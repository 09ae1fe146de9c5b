"""Tar member names as a safe extractor treats them, and which split each member belongs to.

The reference is Python's ``tarfile`` data filter (``extractall(filter='data')``): a member is
written where its normalised name points, below the destination, or not at all. Here:

* ``.`` and ``..`` are resolved before the class is read: ``train/C0/../C1/x.JPEG`` is C1's.
* An absolute name (``/abs/x.JPEG``), or one whose normalised path leaves the archive (or, for
  a per-class tar inside ImageNet's train archive, the ``<wnid>/`` folder it extracts to), is
  never read and is reported as unsafe. (The data filter strips a leading ``/``; a name that
  claims to be absolute has no place in ``train/<class>/`` either, so it is refused here.)
* In a tar of a tree, a name that starts in one split folder (``train/``) and leaves it
  through ``..`` is unsafe too: it is stored in no split (GNU tar refuses every ``..`` name).
* The same name twice: the last member wins, as extraction overwrites; the earlier ones are
  reported. A link replaces a file of the same name, as on extraction, and is then reported.
* Symbolic and hard links, devices and FIFOs are never read (the caller reports them).

Entries are plain tuples (``tar_source.list_tar``'s):
``Member = (name, offset, size, raw)`` for regular files and
``Problem = (name, offset, raw, reason)`` for everything that is not read, ``name`` being ``""``
for an unsafe name. ``offset`` is the absolute offset of the member's data, so merging both
lists by offset gives archive order.
"""
from __future__ import annotations

import posixpath
import tarfile
from typing import Dict, List, Optional, Tuple

from imagenet_seq.convert.scan import ScanError

__all__ = ["NEVER_READ", "normalise", "not_a_file", "sparse_error", "split_roots", "assign"]

Member = Tuple[str, int, int, str]
Problem = Tuple[str, int, str, str]
Part = Tuple[Dict[str, Tuple[int, int]], List[Tuple[str, str]]]  # rel -> (offset, size), skips

NEVER_READ = "skipped, never read"


def normalise(raw: str, root: str = "", shown: Optional[str] = None
              ) -> Tuple[str, Optional[str]]:
    """(normalised name, None), or ("", why the name is unsafe).

    ``root``: the folder the member extracts into, relative to the archive (``"n01440764/"``
    for a member of the nested ``n01440764.tar``); the normalised name must stay inside it.
    ``shown``: how the member is named in the reason (default ``raw``).
    """
    shown = raw if shown is None else shown
    if raw.startswith("/"):
        return "", f"unsafe member name {shown!r}: an absolute path; {NEVER_READ}"
    norm = posixpath.normpath(raw) if raw else "."
    if norm == ".":
        return "", (f"unsafe member name {shown!r}: names the top folder "
                    f"{'(' + root + ') ' if root else ''}itself, not a file in it; {NEVER_READ}")
    if norm == ".." or norm.startswith("../"):
        where = f"the folder {root} it extracts to" if root else "the archive"
        return "", (f"unsafe member name {shown!r}: resolves to {norm!r}, outside {where}; "
                    f"{NEVER_READ}")
    return root + norm, None


def not_a_file(m: tarfile.TarInfo) -> str:
    """Why a member that is not a regular file (a link, a device, a FIFO) is not read."""
    kind = f"symbolic link to {m.linkname!r}" if m.issym() else \
        f"hard link to {m.linkname!r}" if m.islnk() else f"tar type {m.type!r}"
    return f"not a regular file in the tar ({kind}); never read"


def sparse_error(path: str, name: str) -> ScanError:
    """A sparse member cannot be read in place: the way out is to extract the archive."""
    return ScanError(f"{path}: member {name} is a sparse file, which cannot be read in place; "
                     "extract the archive (tar -xf) and convert the folder")


def _parts(name: str) -> List[str]:
    """The lexical path components (empty and ``.`` dropped, ``..`` kept), no leading ``/``."""
    return [c for c in name.lstrip("/").split("/") if c not in ("", ".")]


def split_roots(members: List[Member], problems: List[Problem], splits) -> Dict[str, str]:
    """For a tar of an ImageFolder tree: split -> its folder ``[prefix/]<split>/``, from the
    first normalised name with a folder called ``<split>``; splits not found are left out."""
    roots: Dict[str, str] = {}
    names = [m[0] for m in members] + [p[0] for p in problems if p[0]]
    for split in splits:
        for name in names:
            parts = name.split("/")
            if split in parts[:-1]:
                roots[split] = "/".join(parts[:parts.index(split) + 1]) + "/"
                break
    return roots


def _root_of(parts: List[str], roots: Dict[str, List[str]]) -> Optional[str]:
    for split, rp in roots.items():
        if len(parts) > len(rp) and parts[:len(rp)] == rp:
            return split
    return None


def assign(members: List[Member], problems: List[Problem], roots: Dict[str, str]
           ) -> Tuple[Dict[str, Part], List[Tuple[str, str]]]:
    """Each split's files (``rel -> (offset, size)``, rel below its root) and its report rows
    ``(path, reason)``; plus the unsafe members that name no split (``(raw, reason)``).

    ``roots``: split -> folder (``""`` = the whole archive, ImageNet's one-split archives).
    A member belongs to the split whose folder its normalised name lies in; members outside
    every split folder are not part of the conversion (as files beside ``train/`` in a tree).
    Report rows of unsafe names give the name as the archive spells it.
    """
    rparts = {s: _parts(r) for s, r in roots.items()}
    parts: Dict[str, Part] = {s: ({}, []) for s in roots}
    stray: List[Tuple[str, str]] = []
    # archive order: data offsets increase through the file (nested tars' members included)
    entries = sorted([(off, name, raw, size, None) for name, off, size, raw in members]
                     + [(off, name, raw, 0, why) for name, off, raw, why in problems],
                     key=lambda e: e[0])
    kept: Dict[str, List[tuple]] = {s: [] for s in roots}
    for off, name, raw, size, why in entries:
        lexical = _root_of(_parts(raw), rparts)
        if not name:  # unsafe at the archive level: reported where its name points
            (parts[lexical][1] if lexical is not None else stray).append((raw, why))
            continue
        split = _root_of(name.split("/"), rparts)
        if lexical is not None and split != lexical:
            parts[lexical][1].append((raw, f"unsafe member name {raw!r}: resolves to {name!r}, "
                                           f"outside {roots[lexical]}; {NEVER_READ}"))
            continue
        if split is not None:
            kept[split].append((name[len(roots[split]):], off, size, why))
    for split, rows in kept.items():
        files, skipped = parts[split]
        last = {rel: i for i, (rel, _, _, _) in enumerate(rows)}
        for i, (rel, off, size, why) in enumerate(rows):
            if last[rel] != i:
                skipped.append((rel, "duplicate member name: a later member of the archive has "
                                     "the same name and replaces this one, as extraction "
                                     f"does; this copy is {NEVER_READ}"))
            elif why is not None:
                skipped.append((rel, why))
            else:
                files[rel] = (off, size)
    return parts, stray
