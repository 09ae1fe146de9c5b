"""Scan an ImageFolder tree: class names, (file, label) entries, and files that are not images.

Class indices are the sorted class folder names of ``train/``: the indices torchvision's
``ImageFolder`` gives, so pretrained-model outputs line up.

Memory: a folder's scan is a list in memory, ~``passes.PER_IMAGE_BYTES`` (600 bytes) per
file, held for the whole conversion (its read order and the reader's items come from it);
an archive keeps no such list (it is read in one sweep). With a :class:`ScanLimit` (the
conversion's ``--memory-mb`` and ``--workers``) a scan stops, before the list outgrows what
the bound leaves beside the processes and the smallest run buffer, with a ScanError naming
the files found so far and the ways out.
"""
from __future__ import annotations

import csv
import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from imagenet_seq.convert.images import IMAGE_EXTENSIONS

__all__ = ["ScanError", "Scan", "ScanLimit", "is_image", "not_image_reason", "not_a_file_reason",
           "stat_or_reason", "find_classes", "scan_class_folders", "read_val_labels",
           "scan_flat_val", "scan_split"]


class ScanError(ValueError):
    """The input tree cannot be converted as it is; the message names the path and the fix."""


@dataclass
class Scan:
    classes: List[str]
    entries: List[Tuple[str, int]]  # (path relative to the split folder, label), sorted by path
    not_images: List[Tuple[str, str]]  # (relative path, reason): reported, never stored
    # rel -> (inode, size) from the scan's stat: on-disk read order, source bytes, temp space
    stats: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    # an archive read in one sweep (``tar_sweep``, ``wds_sweep``): no file list, the entries
    # and classes are known after the sweep only
    sweep: Optional[object] = None

    def inode_size(self, rel: str) -> Tuple[int, int]:
        return self.stats.get(rel, (0, 0))


class ScanLimit:
    """How many files the scans of one conversion may list within ``memory`` bytes
    (``--memory-mb``) with ``workers`` worker processes (``passes.scan_limit`` makes it). Shared by
    the scans of every split (train's list is still held while val is scanned).

    Raises (:meth:`check`): ScanError naming the files found so far, the ``--memory-mb``
    they alone need (more as the scan would go on) and the ways out."""

    def __init__(self, memory: int, workers: int, most: int,
                 least_mb: Callable[[int], int], per_image: int):
        # the figures from ``passes.scan_limit`` (passes' modules import this one)
        self.memory, self.workers = memory, workers
        self.most, self.least_mb, self.per_image = most, least_mb, per_image
        self.listed = 0  # files of the scans finished with this limit

    def room(self) -> int:
        """Files the next scan may list."""
        return self.most - self.listed

    def add(self, files: int) -> None:
        """A scan is finished: its ``files`` are held from now on."""
        self.listed += files

    def refuse(self, folder: str, found: int) -> "ScanError":
        """The error for a scan of ``folder`` that found ``found`` files past :meth:`room`."""
        n = self.listed + found
        need = self.least_mb(n)
        root = os.path.dirname(os.path.abspath(folder))
        return ScanError(
            f"{folder}: the scan stopped at {n:,} files listed: a folder's file list takes "
            f"~{self.per_image} bytes per image for the whole conversion, and "
            f"--memory-mb {self.memory // 1_000_000} with --workers {self.workers} leaves "
            f"room for {max(0, self.most):,} beside the processes and the smallest run "
            f"buffer. The {n:,} files found so far need --memory-mb {need} or more, and that "
            f"grows by ~{self.per_image} MB per million images as the folder holds "
            "more. Pass a larger --memory-mb, or convert from a tar of the tree (tar -cf "
            f"data.tar -C {root} train val) or from WebDataset shards: an archive is read in "
            "one sweep and keeps no per-image list")


def is_image(path: str) -> bool:
    """An image by its file name (extension; hidden files never): folders and archives alike."""
    name = os.path.basename(path)
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def not_image_reason(path: str) -> str:
    ext = os.path.splitext(path)[1] or os.path.basename(path)
    return f"not an image file ({ext!r} is not one of the image extensions)"


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"))


def not_a_file_reason(path: str) -> Optional[str]:
    """Why ``path`` cannot be an image file without opening it, or None for a regular file.
    (:func:`stat_or_reason` without the stat.)"""
    return stat_or_reason(path)[1]


def stat_or_reason(path: str):
    """(os.stat_result or None, why ``path`` cannot be an image file or None for a regular file).

    FIFOs, sockets and devices are never opened (opening a FIFO blocks until a writer comes);
    dangling symbolic links and link loops have no content. All of them are skipped and
    reported, like any other file that is not an image.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "symbolic link loop"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return None, f"dangling symbolic link (to {os.readlink(path)!r})"
        return None, None  # unreadable for another reason: the read reports it
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return st, None
    kind = next((k for test, k in _KINDS if test(mode)), f"mode {mode:o}")
    return st, f"not a regular file ({kind}); never opened"


def _is_dir(entry: os.DirEntry) -> bool:
    """A folder, or a link to one; False for link loops and dangling links (reported as files)."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:  # ELOOP: DirEntry.is_dir swallows only ENOENT
        return False


def _key(st: os.stat_result):
    return (st.st_dev, st.st_ino)


class _Walk:
    """The files below a split folder, each underlying file once.

    Recursive and following links, as torchvision's ImageFolder lists files, except that
    nothing is listed twice: a folder is walked once (a link to a folder above it is a loop,
    a link to a folder already walked is not walked again: one report row each), and a file
    reached twice (a link to it, a hard link, a folder reached twice) is kept once. The copy
    kept is the one reached without following a link, else the first in sorted path order:
    folders are walked before links to folders (which wait, in sorted path order, for the
    next round), and files are ranked by (reached through a link, path). Repeats are
    recognised by (st_dev, st_ino) and by the resolved path (for file systems whose inode
    numbers are not stable). Class folders that are links count as real folders: the class
    folder is where its images are.
    """

    def __init__(self, split_dir: str, limit: Optional[ScanLimit] = None):
        st = os.stat(split_dir)
        self.split_dir = split_dir
        self.limit = limit
        self.room = limit.room() if limit is not None else None
        self.walked: Dict[tuple, str] = {_key(st): ""}  # folder -> rel where it was walked
        self.top = frozenset({_key(st)})
        # (through a link, rel, st_dev, (st_ino, st_size) or None, resolved path if through
        # a link)
        self.found: List[tuple] = []
        self.real_roots: List[Tuple[str, str]] = []  # (resolved path, rel) of each root
        self.bad: List[Tuple[str, str]] = []
        self.links: List[tuple] = []  # (rel, path, ancestors) of links to folders, for later

    def root(self, name: str) -> None:
        """Walk ``split_dir/name`` (``""``: the split folder itself) as a real folder."""
        path = os.path.join(self.split_dir, name) if name else self.split_dir
        st = os.stat(path)
        if name:
            other = self.walked.get(_key(st))
            if other is not None:
                raise ScanError(
                    f"class folder {path} is the same folder as "
                    f"{os.path.join(self.split_dir, other) if other else 'its split folder'} "
                    "(a symbolic link or a bind mount): its images would be stored twice "
                    "under two labels; remove the link, or copy the images if both classes "
                    "must hold them")
            self.walked[_key(st)] = name
        real = os.path.realpath(path)
        self.real_roots.append((real, name))
        self._dir(path, name, real, self.top | {_key(st)}, False)

    def finish(self) -> Tuple[Dict[str, Optional[Tuple[int, int]]], List[Tuple[str, str]]]:
        """(rel -> (inode, size) (None: no stat, the read reports it) of each file kept,
        report rows of what was not kept), after walking the links to folders it met."""
        while self.links:  # one round per link followed, each round in sorted path order
            todo, self.links = sorted(self.links, key=lambda t: t[0]), []
            for rel, path, ancestors in todo:
                st, reason = stat_or_reason(path)
                if st is None:  # changed since it was listed
                    self.bad.append((rel, reason or "cannot be read (changed during the scan)"))
                elif _key(st) in ancestors:
                    self.bad.append((rel, "symbolic link loop (links to a folder above it)"))
                elif _key(st) in self.walked:
                    first = self.walked[_key(st)]
                    self.bad.append((rel, f"link to a folder already in this split "
                                          f"({first or 'the split folder itself'}); not walked "
                                          "again, so its files are not stored twice"))
                else:
                    self.walked[_key(st)] = rel
                    self._dir(path, rel, os.path.realpath(path), ancestors | {_key(st)}, True)
        files: Dict[str, Optional[Tuple[int, int]]] = {}
        seen: Dict[object, str] = {}  # (st_dev, st_ino) or a resolved path -> the rel kept
        self.found.sort(key=lambda f: (f[0], f[1]))  # real paths first, then by path
        for linked, rel, dev, inode_size, real in self.found:
            keys = ([(dev, inode_size[0])] if inode_size and inode_size[0] else []) + \
                ([real] if real is not None else [])
            first = next((seen[k] for k in keys if k in seen), None)
            if first is None and real is not None:
                first = self._reached(real, files)
            if first is not None:
                self.bad.append((rel, f"repeats {first} (the same file, reached through a "
                                      "symbolic link or a hard link); stored once, as "
                                      f"{first}"))
                continue
            seen.update((k, rel) for k in keys)
            files[rel] = inode_size
        self.found = []
        return files, sorted(self.bad)

    def _reached(self, real: str, files) -> Optional[str]:
        """The rel of ``real`` if the walk reached it without a link (and kept it). A real
        path has no link in it, so below a root it is the root's resolved path + the rel."""
        for root_real, root_rel in self.real_roots:
            if real.startswith(root_real.rstrip(os.sep) + os.sep):
                rel = os.path.join(root_rel, real[len(root_real.rstrip(os.sep)) + 1:])
                if rel in files:
                    return rel
        return None

    def _dir(self, path: str, rel: str, real: str, ancestors, linked: bool) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:  # like an unreadable file: fix it, do not drop its images
            raise ScanError(f"cannot list {path}: {e.strerror or e}; fix its permissions (or "
                            "the disk) or remove it") from None
        for e in entries:
            r = os.path.join(rel, e.name) if rel else e.name
            if _is_dir(e):
                if e.is_symlink():
                    self.links.append((r, e.path, ancestors))
                    continue
                st = os.stat(e.path)
                if _key(st) in self.walked:  # a bind mount of a folder above or beside it
                    first = self.walked[_key(st)] or "the split folder itself"
                    self.bad.append((r, f"the same folder as {first} (a bind mount); not "
                                        "walked again"))
                    continue
                self.walked[_key(st)] = r
                self._dir(e.path, r, os.path.join(real, e.name), ancestors | {_key(st)}, linked)
                continue
            st, reason = stat_or_reason(e.path)
            if reason:
                self.bad.append((r, reason))
                continue
            link = e.is_symlink()
            where = os.path.realpath(e.path) if link else \
                os.path.join(real, e.name) if linked else None
            self.found.append((linked or link, r, st.st_dev if st else 0,
                               (st.st_ino, st.st_size) if st else None, where))
            if self.room is not None and len(self.found) > self.room:
                raise self.limit.refuse(self.split_dir, len(self.found))


def _split_images(walk: _Walk, stats):
    """(image paths, (path, reason) of the rest) of a finished walk, relative to the split
    folder; ``stats`` receives (inode, size) per image."""
    files, bad = walk.finish()
    if walk.limit is not None:
        walk.limit.add(len(files))
    images, others = [], list(bad)
    for f, inode_size in sorted(files.items()):
        if is_image(f):
            images.append(f)
            if inode_size is not None:
                stats[f] = inode_size
        else:
            others.append((f, not_image_reason(f)))
    return images, sorted(others)


def find_classes(train_dir: str) -> List[str]:
    if not os.path.isdir(train_dir):
        raise ScanError(f"{train_dir} does not exist; expected the ImageFolder layout "
                        "<root>/train/<class>/<image> (and <root>/val/...)")
    classes = sorted(e.name for e in os.scandir(train_dir) if _is_dir(e) and
                     not e.name.startswith("."))
    if not classes:
        raise ScanError(f"no class folders in {train_dir}; expected {train_dir}/<class>/<image> "
                        "(one folder per class, as torchvision's ImageFolder reads)")
    return classes


def scan_class_folders(split_dir: str, classes: List[str],
                       limit: Optional[ScanLimit] = None) -> Scan:
    """``split_dir/<class>/...`` with the given class list (train's); ``limit``: stop
    once the files listed pass what the memory bound leaves (:class:`ScanLimit`)."""
    index = {c: i for i, c in enumerate(classes)}
    present = sorted(e.name for e in os.scandir(split_dir) if _is_dir(e) and
                     not e.name.startswith("."))
    unknown = [c for c in present if c not in index]
    if unknown:
        raise ScanError(f"{split_dir} has class folders not in train: {unknown[:5]}; "
                        "every val class must also be a train class")
    walk = _Walk(split_dir, limit)
    for c in present:
        walk.root(c)
    stats: Dict[str, Tuple[int, int]] = {}
    images, not_images = _split_images(walk, stats)
    entries = [(p, index[p.split(os.sep)[0]]) for p in images]
    held = {p.split(os.sep)[0] for p in images}
    for c in present:
        if c not in held:
            repeats = sum(1 for p, why in not_images
                          if p.split(os.sep)[0] == c and why.startswith("repeats "))
            raise ScanError(f"class folder {os.path.join(split_dir, c)} holds no images"
                            + (f" of its own (its {repeats} are files stored under another "
                               "path, which they link to)" if repeats else "")
                            + "; add images or remove the folder")
    for e in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if not _is_dir(e):  # files, links, FIFOs ...: reported, never opened
            not_images.append((e.name, "file outside any class folder"))
    return Scan(classes, sorted(entries), not_images, stats)


def read_val_labels(path: str) -> Dict[str, str]:
    """Labels file -> {file stem: class name}.

    Accepts lines ``<filename> <class>`` (whitespace separated) and Kaggle's
    ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the class being the first word of
    PredictionString).
    """
    if not os.path.isfile(path):
        raise ScanError(f"--val-labels {path} does not exist")
    out: Dict[str, str] = {}
    with open(path, newline="") as f:
        head = f.readline()
        f.seek(0)
        if head.startswith("ImageId"):
            for row in csv.DictReader(f):
                pred = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not pred:
                    raise ScanError(f"{path}: row {row!r} has no ImageId or class")
                out[row["ImageId"]] = pred[0]
        else:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise ScanError(f"{path}:{n}: {line.strip()!r}; expected '<filename> <class>'"
                                    " per line or Kaggle's LOC_val_solution.csv")
                out[os.path.splitext(parts[0])[0]] = parts[1]
    if not out:
        raise ScanError(f"--val-labels {path} holds no labels")
    return out


def scan_flat_val(val_dir: str, classes: List[str], labels_file: Optional[str],
                  limit: Optional[ScanLimit] = None) -> Scan:
    if labels_file is None:
        raise ScanError(f"{val_dir} has no class folders (flat layout); pass --val-labels FILE "
                        "('<filename> <class>' lines or Kaggle's LOC_val_solution.csv)")
    labels = read_val_labels(labels_file)
    index = {c: i for i, c in enumerate(classes)}
    walk = _Walk(val_dir, limit)
    walk.root("")
    stats: Dict[str, Tuple[int, int]] = {}
    images, not_images = _split_images(walk, stats)
    stems = {os.path.splitext(p)[0]: p for p in images}
    unknown_files = sorted(set(labels) - set(stems))
    if unknown_files:
        raise ScanError(f"{labels_file} names {len(unknown_files)} files not in {val_dir}, e.g. "
                        f"{unknown_files[:3]}; point --val-labels at the labels of this folder")
    unknown_classes = sorted({c for c in labels.values() if c not in index})
    if unknown_classes:
        raise ScanError(f"{labels_file} names classes not in train: {unknown_classes[:5]}")
    unlabelled = sorted(p for s, p in stems.items() if s not in labels)
    if unlabelled:
        raise ScanError(f"{len(unlabelled)} images in {val_dir} have no label in {labels_file}, "
                        f"e.g. {unlabelled[:3]}; add their labels or remove the files")
    entries = sorted((p, index[labels[s]]) for s, p in stems.items())
    return Scan(classes, entries, not_images, stats)


def scan_split(root: str, split: str, classes: List[str], val_labels: Optional[str] = None,
               limit: Optional[ScanLimit] = None) -> Scan:
    """``root/split`` scanned (class folders, or a flat val folder with ``val_labels``);
    ``limit``: the conversion's memory bound for the file lists (:class:`ScanLimit`, one for
    all splits), None for no limit."""
    split_dir = os.path.join(root, split)
    if split == "train":
        return scan_class_folders(split_dir, classes, limit)
    if not os.path.isdir(split_dir):
        raise ScanError(f"{split_dir} does not exist; add it or pass --splits train")
    has_dirs = any(_is_dir(e) and not e.name.startswith(".") for e in os.scandir(split_dir))
    if has_dirs:
        return scan_class_folders(split_dir, classes, limit)
    return scan_flat_val(split_dir, classes, val_labels, limit)
