"""The member list of a tar archive (every header read, no data): what ImageNet's train
archive holds when only its names are needed (its classes, for a val-only conversion without
the devkit: ``inputs``).

The converter itself never lists an archive: it reads each one in ONE sweep (``tar_sweep``,
``tree_tar_sweep``, ``wds_sweep``). Listing reads only the 512-byte headers (``tarfile`` seeks
over the data), which on a spinning disk costs about one sequential read of the archive.
Nested tars are members of the outer file, so their members' offsets are absolute too.
Compressed (``.tar.gz``) archives cannot be read this way: decompress first. Member names are
taken as a safe extractor takes them (``tar_names``): resolved, never outside the archive, the
last of a name winning; links are never listed as files.
"""
from __future__ import annotations

import os
import tarfile
from typing import Dict, List, Tuple

from imagenet_seq.convert.tar_names import Member, Problem, normalise, not_a_file, sparse_error
from imagenet_seq.convert.tar_sweep import _tar_error, check_uncompressed

__all__ = ["list_tar"]


def _members(tf: tarfile.TarFile, path: str, what: str, base: int, problems: List[Problem],
             root: str = "", shown: str = "") -> List[tuple]:
    """(name, absolute data offset, size, raw name, TarInfo) of the regular members, names
    normalised below ``root`` (``tar_names.normalise``); the rest goes to ``problems``.
    ``shown``: prefix of the raw names in messages (``"n01440764.tar:"`` in a nested tar)."""
    out = []
    try:
        for m in tf:
            off = base + m.offset_data
            if m.isdir():
                continue
            name, unsafe = normalise(m.name, root, shown + m.name)
            # the name as the archive spells it; a nested member's safe name is its own
            raw = shown + m.name if shown and unsafe else name if shown else m.name
            if unsafe:
                problems.append(("", off, raw, unsafe))
                continue
            if not m.isfile():
                problems.append((name, off, raw, not_a_file(m)))
                continue
            if m.issparse():
                raise sparse_error(path, name)
            out.append((name, off, m.size, raw, m))
    except tarfile.ReadError as e:
        raise _tar_error(path, what, e) from None
    return out


def list_tar(path: str) -> Tuple[List[Member], List[Problem]]:
    """(regular members, members that are not read), both in archive order
    (``tar_names``' tuples). Reads every header: about one read of the archive.

    Members named ``*.tar`` are opened as nested tars and listed as ``<stem>/<inner name>``
    (ImageNet's train archive: ``n01440764.tar`` -> ``n01440764/n01440764_10026.JPEG``); an
    inner name must stay inside ``<stem>/``. When a nested tar's name occurs twice, the later
    copy replaces the earlier one as a whole (as extracting the outer tar would): the earlier
    copy's members are reported, not read.

    Raises:
        ScanError: not a tar, compressed, truncated, or a nested tar is damaged (named).
    """
    problems: List[Problem] = []
    with open(path, "rb") as f:
        check_uncompressed(f, path)
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise _tar_error(path, "the file", e) from None
        out: List[Member] = []
        copies: Dict[str, List[Tuple[List[Member], List[Problem]]]] = {}
        for name, off, size, raw, m in _members(tf, path, "the archive", 0, problems):
            if not name.lower().endswith(".tar"):
                out.append((name, off, size, raw))
                continue
            stem = os.path.splitext(os.path.basename(name))[0]
            try:
                inner = tarfile.open(fileobj=tf.extractfile(m), mode="r:")
            except tarfile.ReadError as e:
                raise _tar_error(path, f"nested tar {name}", e) from None
            mine: List[Member] = []
            bad: List[Problem] = []
            for iname, ioff, isize, iraw, _ in _members(
                    inner, path, f"nested tar {name}", off, bad, root=stem + "/",
                    shown=f"{raw}:"):
                if ioff + isize > off + size:
                    raise _tar_error(path, f"nested tar {name}",
                                     ValueError(f"member {iname} runs past its end"))
                mine.append((iname, ioff, isize, iraw))
            copies.setdefault(name, []).append((mine, bad))
        for name, versions in copies.items():
            for mine, bad in versions[:-1]:  # replaced by a later nested tar of this name
                why = (f"in an earlier copy of the nested tar {name!r}, which a later member "
                       "of the same name replaces, as extraction does; never read")
                problems.extend((n, o, r, why) for n, o, _, r in mine)
                problems.extend((n, o, r, why if n else w) for n, o, r, w in bad)
            mine, bad = versions[-1]
            out.extend(mine)
            problems.extend(bad)
    out.sort(key=lambda m: m[1])
    problems.sort(key=lambda p: p[1])
    return out, problems
