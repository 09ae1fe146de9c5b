"""An archive converted in ONE sequential sweep: no listing pass, every member met once.

ImageNet's ``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class inside) and
``ILSVRC2012_img_val.tar`` (flat, labelled by the devkit or a labels file) are read front to
back: each header, then the member's data right behind it, in one forward pass over the file
(:class:`SeqFile`: ``os.pread`` of 1 MiB pieces, each after the one before, the kernel told
the file is read sequentially). Each member becomes an item of pass 1 (``sweep``) the moment
it is met; its write position is its own (``write_order.sort_key``), so nothing needs the
whole list first. Saves one read of the archive against listing it first (~15 min for
ImageNet's 138 GB train tar on an HDD).

What only the end of the sweep tells is settled at the merge (``settle``): the classes (the
sorted class folders), a name met again later (the last member of a name wins, as extraction
does), a nested tar replaced by a later one of its name. Names are taken as ``tar_names``
takes them (normalised, never outside the archive or the nested tar's folder, links never
read). Resume: an item's token is the byte offsets of its header (the nested tar's and its
own inside it), so ``--resume`` starts reading where the last commit stood.
"""
from __future__ import annotations

import os
import tarfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from imagenet_seq.convert.scan import ScanError, is_image, not_image_reason
from imagenet_seq.convert.sort_runs import NO_ORIGIN
from imagenet_seq.convert.sweep import UNKNOWN, ThreadSweep
from imagenet_seq.convert.tar_names import normalise, not_a_file, sparse_error

__all__ = ["PIECE", "SeqFile", "ArchiveSweep", "check_uncompressed", "open_sweep"]

PIECE = 1 << 20  # bytes per pread


class _Seekable:
    """What ``tarfile`` asks of a file object besides ``read``: a position in ``size`` bytes."""

    mode = "rb"
    pos = size = 0

    def tell(self) -> int:
        return self.pos

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off + (self.pos if whence == 1 else self.size if whence == 2 else 0)
        return self.pos


class SeqFile(_Seekable):
    """A file read forward with ``os.pread`` in pieces of ``PIECE`` bytes (the file object
    ``tarfile`` reads through): a seek within the piece in hand costs nothing, a seek past it
    skips the bytes between, never reading them."""

    def __init__(self, path: str):
        self.name = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        advise = getattr(os, "posix_fadvise", None)
        if advise is not None:
            try:  # a larger kernel readahead for this file
                advise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        self.buf = b""
        self.base = self.pos = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = max(0, self.size - self.pos)
        out = []
        while n > 0:
            i = self.pos - self.base
            if 0 <= i < len(self.buf):
                piece = self.buf[i:i + n]
            else:
                if self.pos >= self.size:
                    break
                if n >= PIECE:  # a large member: straight into its own bytes
                    piece = os.pread(self.fd, n, self.pos)
                    if not piece:
                        break
                else:
                    self.buf, self.base = os.pread(self.fd, PIECE, self.pos), self.pos
                    if not self.buf:
                        break
                    continue
            out.append(piece)
            self.pos += len(piece)
            n -= len(piece)
        return out[0] if len(out) == 1 else b"".join(out)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Window(_Seekable):
    """Bytes ``[start, start + size)`` of a SeqFile as a file (a nested tar), unbuffered."""

    def __init__(self, f: SeqFile, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data


def _tar_error(path: str, what: str, e: Exception) -> ScanError:
    return ScanError(f"{path}: {what} is not a readable tar ({e}); the download may be "
                     "truncated or damaged: check its size/checksum and download it again")


def _open(fileobj, path: str, what: str, at: Optional[int]) -> tarfile.TarFile:
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r:")
    except tarfile.ReadError as e:
        raise _tar_error(path, what, e) from None
    if at:  # a resumed sweep: from this header on (at 0: the member just read is that one)
        tf.firstmember, tf.offset = None, at
    return tf


def check_uncompressed(f, path: str) -> None:
    """A ScanError where the file ``f`` (at its start; left there) is gzip, bzip2 or xz."""
    head = f.read(3)
    if head[:2] == b"\x1f\x8b" or head == b"BZh" or head[:3] == b"\xfd7z":
        raise ScanError(f"{path} is compressed; the images are read in place from an "
                        "uncompressed tar: decompress it first (e.g. gunzip)")
    f.seek(0)


def open_sweep(path: str, at: Optional[int]) -> Tuple[SeqFile, tarfile.TarFile]:
    """The archive at ``path`` opened for a sweep from the header at byte ``at`` (None: its
    start): (its SeqFile, to close; the tar read through it).

    Raises:
        ScanError: compressed, or not a tar.
    """
    f = SeqFile(path)
    try:
        check_uncompressed(f, path)
        return f, _open(f, path, "the file", at)
    except BaseException:
        f.close()
        raise


def _members(tf: tarfile.TarFile, path: str, what: str) -> Iterator[tarfile.TarInfo]:
    """The members one by one, none kept (``tarfile`` would keep a list of them all)."""
    while True:
        try:
            m = tf.next()
        except tarfile.ReadError as e:
            raise _tar_error(path, what, e) from None
        tf.members.clear()
        if m is None:
            return
        yield m


class ArchiveSweep:
    """One of ImageNet's archives as a one-sweep source of ``split``: ``nested`` (the train
    archive: ``*.tar`` members are per-class tars, ``<stem>/<name>``), else flat (val:
    ``labels`` maps file stem -> class name). ``class_list()``: the classes where the sweep
    does not give them (val: the devkit's or the train archive's); ``kit_classes``: the
    devkit's, checked against the train archive's class folders."""

    def __init__(self, path: str, split: str, nested: bool,
                 labels: Optional[Dict[str, str]] = None, labels_name: str = "",
                 class_list: Optional[Callable[[], List[str]]] = None,
                 kit_classes: Optional[List[str]] = None):
        self.path, self.split, self.nested = path, split, nested
        self.labels, self.labels_name = labels, labels_name
        self.class_list, self.kit_classes = class_list, kit_classes
        st = os.stat(path)
        self.source_bytes = st.st_size
        self._stamp = [os.path.realpath(path), st.st_size, st.st_mtime_ns]
        self.total = None  # items: known at the end only
        self.how = "tar"
        self.last_wins = True  # the last member of a name wins, as extraction does

    def identity(self) -> str:
        return repr(["archive", self.split, self.nested, self._stamp, self.labels_name,
                     sorted(self.labels.items()) if self.labels else None])

    def describe(self, rel: str) -> str:
        return f"{self.path}:{rel}" if rel else self.path

    def reader(self, cursor: dict, read_ahead: Optional[int]):
        return ThreadSweep(self._items, cursor)

    # -- what the merge needs
    def classes(self, found: dict) -> List[str]:
        if self.nested:
            classes = sorted(found.get("classes", []))
            if self.kit_classes is not None and classes != self.kit_classes:
                extra = sorted(set(classes) ^ set(self.kit_classes))[:3]
                raise ScanError(f"the classes of {self.path} ({len(classes)}) differ from the "
                                f"devkit's ({len(self.kit_classes)}), e.g. {extra}: the devkit "
                                "is of another year or dataset; pass "
                                "ILSVRC2012_devkit_t12.tar.gz")
            return classes
        return self.class_list()

    def resolver(self, found: dict):
        if self.nested:
            return lambda rel: (rel.split("/")[0], None)
        labels = self.labels or {}
        return lambda rel: (labels[os.path.splitext(os.path.basename(rel))[0]], None)

    # -- the sweep
    def _items(self, cursor: dict):
        token = cursor.get("token")
        f, tf = open_sweep(self.path, token[1] if token else None)
        try:
            state = {"seq": token[0] if token else 0, "classes": set(), "stems": set()}
            # inside a nested tar: (its header's offset in it, the nested tar's seq, the item's)
            resume_inner = (token[2], token[3], token[0]) if token and token[2] >= 0 else None
            for m in _members(tf, self.path, "the archive"):
                yield from self._member(f, tf, m, state, resume_inner)
                resume_inner = None
            if self.labels is not None and not token:  # a whole sweep: every label used?
                missing = sorted(set(self.labels) - state["stems"])
                if missing:
                    raise ScanError(f"{self.labels_name} names {len(missing)} images not in "
                                    f"{self.path}, e.g. {missing[:3]}; the archive is "
                                    "incomplete, or the labels are for another set")
        finally:
            f.close()

    def _next(self, state) -> int:
        seq = state["seq"]
        state["seq"] += 1
        return seq

    def _member(self, f, tf, m, state, resume_inner, root="", shown="", base=0,
                origin=NO_ORIGIN, outer=None):
        if m.isdir():
            return
        hdr = [outer, m.offset] if outer is not None else [m.offset, -1]
        name, unsafe = normalise(m.name, root, shown + m.name)
        if unsafe:
            seq = self._next(state)
            yield ((seq, [seq, *hdr, origin], origin, shown + m.name, 0), shown + m.name, 0,
                   ("note", unsafe))
            return
        if not m.isfile():
            seq = self._next(state)
            yield ((seq, [seq, *hdr, origin], origin, name, 0), name, 0, ("note", not_a_file(m)))
            return
        if m.issparse():
            raise sparse_error(self.path, name)
        if self.nested and outer is None and name.lower().endswith(".tar"):
            yield from self._nested(f, m, name, state, resume_inner)
            return
        seq = self._next(state)
        tag = lambda label: (seq, [seq, *hdr, origin], origin, name, label)  # noqa: E731
        flat = not self.nested
        if not flat and "/" not in name:
            yield tag(0), name, 0, ("note", "file outside any class folder")
            return
        if not is_image(name):
            yield tag(0), name, 0, ("note", not_image_reason(name))
            return
        if flat:
            stem = os.path.splitext(os.path.basename(name))[0]
            if self.labels is None or stem not in self.labels:
                raise ScanError(f"images in {self.path} have no label"
                                f"{' in ' + self.labels_name if self.labels_name else ''}, "
                                f"e.g. {[name]}; pass --devkit ILSVRC2012_devkit_t12.tar.gz "
                                "or --val-labels FILE (Kaggle's LOC_val_solution.csv) naming "
                                "them")
            state["stems"].add(stem)
        else:
            cls = name.split("/")[0]
            if cls not in state["classes"]:  # told once per sweep; the item's own seq, so
                state["classes"].add(cls)  # that a resumed sweep numbers the items the same
                yield ((seq, [seq, *hdr, origin], origin, "", 0), "", 0,
                       ("mark", {"class": cls}))
        f.seek(base + m.offset_data)
        data = f.read(m.size)
        if len(data) != m.size:
            raise ScanError(f"{self.path} ends inside member {name} (the archive was cut "
                            "short); download it again")
        yield tag(UNKNOWN), name, UNKNOWN, data

    def _nested(self, f, m, name, state, resume_inner):
        """A per-class tar: its members as ``<stem>/<name>``, held inside that folder."""
        stem = os.path.splitext(os.path.basename(name))[0]
        if resume_inner is not None:
            state["seq"] = resume_inner[1]  # its mark again (before the cursor: dropped)
        cseq = self._next(state)
        yield ((cseq, [cseq, m.offset, -1, -1], NO_ORIGIN, "", 0), "", 0,
               ("mark", {"container": name}))
        what = f"nested tar {name}"
        inner = _open(_Window(f, m.offset_data, m.size), self.path, what,
                      resume_inner[0] if resume_inner is not None else None)
        if resume_inner is not None:
            state["seq"] = resume_inner[2]
        for im in _members(inner, self.path, what):
            if im.isfile() and im.offset_data + im.size > m.size:
                raise _tar_error(self.path, what, ValueError(f"member {im.name} runs past its "
                                                             "end"))
            yield from self._member(f, inner, im, state, None, root=stem + "/",
                                    shown=f"{m.name}:", base=m.offset_data, origin=cseq,
                                    outer=m.offset)
