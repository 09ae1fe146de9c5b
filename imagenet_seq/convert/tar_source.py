"""Images inside tar archives, read front to back with no extraction.

Two layouts: a tar of an ImageFolder tree (``[prefix/]train/<class>/<image>``, ``val/...``)
and ImageNet's archives: ``ILSVRC2012_img_train.tar`` (one tar per class, ``<wnid>.tar``,
inside the outer tar) and ``ILSVRC2012_img_val.tar`` (flat; labels from ``devkit``).

The converter no longer lists an archive before reading it (``tar_sweep``: one sweep; the
write position of a record is its own, ``write_order``); this module's listing is used where
only names are needed (the classes of ImageNet's train archive for a val-only conversion
without the devkit) and by tools that read members by offset. Listing reads only the
512-byte headers (``tarfile`` seeks over the data), which on a spinning disk costs about one
sequential read of the archive. Reading
then uses each member's absolute byte offset: ``os.pread`` in offset order is one forward
sweep of the archive. Nested tars are members of the outer file, so their images' offsets are
absolute too. Compressed (``.tar.gz``) archives cannot be read this way: decompress first.
Member names are taken as a safe extractor takes them (``tar_names``): resolved, never outside
the archive, the last of a name winning; links are never read.
"""
from __future__ import annotations

import os
import tarfile
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from imagenet_seq.convert.scan import Scan, ScanError, is_image, not_image_reason

from imagenet_seq.convert.source_reader import hint_range
from imagenet_seq.convert.tar_names import Member, Problem, normalise

__all__ = ["list_tar", "TarSource", "scan_files"]


def _tar_error(path: str, what: str, e: Exception) -> ScanError:
    return ScanError(f"{path}: {what} is not a readable tar ({e}); the download may be "
                     "truncated or damaged: check its size/checksum and download it again")


def _members(tf: tarfile.TarFile, path: str, what: str, base: int, problems: List[Problem],
             root: str = "", shown: str = "", progress=None) -> List[tuple]:
    """(name, absolute data offset, size, raw name, TarInfo) of the regular members, names
    normalised below ``root`` (``tar_names.normalise``); the rest goes to ``problems``.
    ``shown``: prefix of the raw names in messages (``"n01440764.tar:"`` in a nested tar)."""
    out = []
    try:
        for m in tf:
            off = base + m.offset_data
            if progress is not None:
                progress(off)
            if m.isdir():
                continue
            name, unsafe = normalise(m.name, root, shown + m.name)
            # the name as the archive spells it; a nested member's safe name is its own
            raw = shown + m.name if shown and unsafe else name if shown else m.name
            if unsafe:
                problems.append(("", off, raw, unsafe))
                continue
            if not m.isfile():
                kind = f"symbolic link to {m.linkname!r}" if m.issym() else \
                    f"hard link to {m.linkname!r}" if m.islnk() else f"tar type {m.type!r}"
                problems.append((name, off, raw, f"not a regular file in the tar ({kind}); "
                                                 "never read"))
                continue
            if m.issparse():
                raise ScanError(f"{path}: member {name} is a sparse file, which cannot be read "
                                "in place; extract the archive (tar -xf) and convert the folder")
            out.append((name, off, m.size, raw, m))
    except tarfile.ReadError as e:
        raise _tar_error(path, what, e) from None
    return out


def list_tar(path: str, progress: Optional[Callable[[int, int], None]] = None,
             nested: bool = True, visit: Optional[Callable[..., None]] = None
             ) -> Tuple[List[Member], List[Problem]]:
    """(regular members, members that are not read), both in archive order
    (``tar_names``' tuples). ``progress(bytes_passed, archive_size)`` is called as the listing
    moves through the file (it reads every header: about one read of the archive).

    Members named ``*.tar`` are opened as nested tars and listed as ``<stem>/<inner name>``
    (ImageNet's train archive: ``n01440764.tar`` -> ``n01440764/n01440764_10026.JPEG``); an
    inner name must stay inside ``<stem>/``. When a nested tar's name occurs twice, the later
    copy replaces the earlier one as a whole (as extracting the outer tar would): the earlier
    copy's members are reported, not read. ``nested=False``: ``*.tar`` members are plain
    members (WebDataset shards).

    ``visit(name, offset, size, read)`` (outer members only) is called for each regular member
    as the listing passes it; ``read()`` returns its bytes, read right then: a small member
    lies beside its header, so reading it costs no extra seek (WebDataset's label files).

    Raises:
        ScanError: not a tar, compressed, truncated, or a nested tar is damaged (named).
    """
    problems: List[Problem] = []
    with open(path, "rb") as f:
        head = f.read(3)
        if head[:2] == b"\x1f\x8b" or head == b"BZh" or head[:3] == b"\xfd7z":
            raise ScanError(f"{path} is compressed; the images are read in place from an "
                            "uncompressed tar: decompress it first (e.g. gunzip)")
        f.seek(0)
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise _tar_error(path, "the file", e) from None
        out: List[Member] = []
        copies: Dict[str, List[Tuple[List[Member], List[Problem]]]] = {}
        total = os.fstat(f.fileno()).st_size
        tick = (lambda at: progress(at, total)) if progress else None
        for name, off, size, raw, m in _members(tf, path, "the archive", 0, problems,
                                                progress=tick):
            if not nested or not name.lower().endswith(".tar"):
                out.append((name, off, size, raw))
                if visit is not None:
                    visit(name, off, size, lambda m=m, name=name: _read_member(tf, m, path, name))
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
                    shown=f"{raw}:", progress=tick):
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


def _read_member(tf: tarfile.TarFile, m: tarfile.TarInfo, path: str, name: str) -> bytes:
    try:
        return tf.extractfile(m).read()
    except tarfile.ReadError as e:
        raise _tar_error(path, f"member {name}", e) from None


class TarSource:
    """Reads members of one archive by absolute offset (``source_reader.FolderSource``'s
    contract). The file is opened on first use (under a lock: ``pread`` on the shared
    descriptor is thread-safe) and closed by the reader thread, the only one that reads it.
    ``hint`` asks the kernel to read a member's byte range ahead (``source_reader``)."""

    read_ahead = 1  # members in the read-ahead window by default (source_reader's docstring)

    def __init__(self, path: str, where: Dict[str, Tuple[int, int]], display: str):
        self.path = path
        self.where = where  # rel -> (absolute offset, size)
        self.display = display
        self.f = None
        self._opening = threading.Lock()

    def describe(self, rel: str) -> str:
        return f"{self.path}:{self.display}{rel}" if rel else f"{self.path}:{self.display}"

    def read(self, rel: str) -> Union[bytes, Tuple[str, str]]:
        off, size = self.where[rel]
        try:
            if self.f is None:
                with self._opening:
                    if self.f is None:
                        self.f = open(self.path, "rb", buffering=0)
            data = os.pread(self.f.fileno(), size, off)
        except OSError as e:
            return ("error", f"cannot read {self.path}: {e.strerror or e}; fix the disk or "
                             "the file, then run again with --resume")
        if len(data) != size:
            return ("error", f"{self.path} ends inside member {self.describe(rel)} (got "
                             f"{len(data)} of {size} bytes): the archive was cut short; "
                             "download it again, then run again with --resume")
        return data

    def hint(self, rel: str, budget: int) -> Tuple[int, int, None]:
        """Ask the kernel to read up to ``budget`` bytes of member ``rel`` ahead: (bytes
        hinted, bytes left, None). A failure to open is left to the read, which reports it."""
        off, size = self.where[rel]
        try:
            if self.f is None:
                with self._opening:
                    if self.f is None:
                        self.f = open(self.path, "rb", buffering=0)
        except OSError:
            return 0, 0, None
        n = hint_range(self.f.fileno(), off, min(size, budget))
        return n, size - n, None

    def release(self, rel: str, token: None) -> None:
        pass

    def order(self, rels: Sequence[str], keys: Sequence[int], method: str):
        """Archive order (by offset): one forward sweep, whatever ``method`` says."""
        return sorted(range(len(rels)), key=lambda i: self.where[rels[i]][0]), "tar"

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def scan_files(path: str, display: str, files: Dict[str, Tuple[int, int]], classes: List[str],
               flat: bool, labels: Optional[Dict[str, str]], not_files, labels_name: str) -> Scan:
    """A Scan of ``files`` (rel -> (offset, size)): class folders (``<class>/<image>``), or a
    flat folder labelled by ``labels`` (file stem -> class name)."""
    index = {c: i for i, c in enumerate(classes)}
    entries, not_images = [], list(not_files)
    for rel in sorted(files):
        if not flat and "/" not in rel:  # as the folder scan says of files beside the classes
            not_images.append((rel, "file outside any class folder"))
            continue
        if not is_image(rel):
            not_images.append((rel, not_image_reason(rel)))
            continue
        if flat:
            stem = os.path.splitext(os.path.basename(rel))[0]
            if labels is None or stem not in labels:
                continue  # reported below, all together
            cls = labels[stem]
        else:
            cls = rel.split("/")[0]
        if cls not in index:
            raise ScanError(f"{path}:{display}{rel}: class {cls!r} is not a train class; "
                            "convert the matching train archive (classes = its folders)")
        entries.append((rel, index[cls]))
    if flat:
        images = {os.path.splitext(os.path.basename(r))[0]: r for r in files if is_image(r)}
        unlabelled = sorted(r for s, r in images.items() if labels is None or s not in labels)
        if unlabelled:
            raise ScanError(f"{len(unlabelled)} images in {path}:{display} have no label"
                            f"{' in ' + labels_name if labels_name else ''}, e.g. "
                            f"{unlabelled[:3]}; pass --devkit ILSVRC2012_devkit_t12.tar.gz or "
                            "--val-labels FILE (Kaggle's LOC_val_solution.csv) naming them")
        missing = sorted(set(labels or ()) - set(images))
        if missing:
            raise ScanError(f"{labels_name} names {len(missing)} images not in {path}, e.g. "
                            f"{missing[:3]}; the archive is incomplete, or the labels are for "
                            "another set")
    stats = {rel: files[rel] for rel, _ in entries}
    return Scan(classes, entries, not_images, stats,
                source=TarSource(path, stats, display))
