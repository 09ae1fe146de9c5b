"""Scan an ImageFolder tree: class names, (file, label) entries, and files that are not images.

Class indices are the sorted class folder names of ``train/``: the indices torchvision's
``ImageFolder`` gives, so pretrained-model outputs line up.
"""
from __future__ import annotations

import csv
import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from imagenet_seq.convert.images import IMAGE_EXTENSIONS


class ScanError(ValueError):
    """The input tree cannot be converted as it is; the message names the path and the fix."""


@dataclass
class Scan:
    classes: List[str]
    entries: List[Tuple[str, int]]  # (path relative to the split folder, label), sorted by path
    not_images: List[Tuple[str, str]]  # (relative path, reason): reported, never stored
    # rel -> (inode, size) from the scan's stat: on-disk read order, source bytes, temp space
    stats: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    # where the bytes are: None = files below <root>/<split>; else an object with read(rel),
    # order(rels, keys, method), describe(rel), close() (source_reader.FolderSource's contract)
    source: Optional[object] = None

    def inode_size(self, rel: str) -> Tuple[int, int]:
        return self.stats.get(rel, (0, 0))


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


def _files_under(folder: str, stats: Optional[Dict[str, Tuple[int, int]]] = None
                 ) -> Tuple[List[str], List[Tuple[str, str]]]:
    """(regular files below ``folder``, (path, reason) of what cannot be read), relative, sorted.
    ``stats`` (if given) receives ``rel -> (inode, size)`` of each regular file.

    Recursive and following links to folders, as torchvision's ImageFolder lists files, except
    that a link back to a folder on the way down is reported instead of walked again (os.walk
    would list the same images once per lap until the path length limit).
    """
    files: List[str] = []
    bad: List[Tuple[str, str]] = []

    def walk(path: str, rel: str, ancestors) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:  # like an unreadable file: fix it, do not drop its images
            raise ScanError(f"cannot list {path}: {e.strerror or e}; fix its permissions (or "
                            "the disk) or remove it") from None
        for e in entries:
            r = os.path.join(rel, e.name) if rel else e.name
            if _is_dir(e):
                st = os.stat(e.path)
                if (st.st_dev, st.st_ino) in ancestors:
                    bad.append((r, "symbolic link loop (links to a folder above it)"))
                    continue
                walk(e.path, r, ancestors | {(st.st_dev, st.st_ino)})
                continue
            st, reason = stat_or_reason(e.path)
            if reason:
                bad.append((r, reason))
            else:
                files.append(r)
                if stats is not None and st is not None:
                    stats[r] = (st.st_ino, st.st_size)

    st = os.stat(folder)
    walk(folder, "", frozenset({(st.st_dev, st.st_ino)}))
    return sorted(files), sorted(bad)


def _split_images(folder: str, prefix: str = "", stats=None):
    """(image paths, (path, reason) of the rest) below ``folder``, relative to its parent
    (``prefix`` = the class folder name); ``stats`` receives (inode, size) per image."""
    found: Dict[str, Tuple[int, int]] = {}
    files, bad = _files_under(folder, found)
    images, others = [], []
    for f in files:
        rel = os.path.join(prefix, f) if prefix else f
        if is_image(f):
            images.append(rel)
            if stats is not None and f in found:
                stats[rel] = found[f]
        else:
            others.append((rel, not_image_reason(f)))
    others += [(os.path.join(prefix, f) if prefix else f, reason) for f, reason in bad]
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


def scan_class_folders(split_dir: str, classes: List[str]) -> Scan:
    """``split_dir/<class>/...`` with the given class list (train's)."""
    index = {c: i for i, c in enumerate(classes)}
    present = sorted(e.name for e in os.scandir(split_dir) if _is_dir(e) and
                     not e.name.startswith("."))
    unknown = [c for c in present if c not in index]
    if unknown:
        raise ScanError(f"{split_dir} has class folders not in train: {unknown[:5]}; "
                        "every val class must also be a train class")
    entries, not_images, stats = [], [], {}
    for c in present:
        images, others = _split_images(os.path.join(split_dir, c), prefix=c, stats=stats)
        if not images:
            raise ScanError(f"class folder {os.path.join(split_dir, c)} holds no images; add "
                            "images or remove the folder")
        entries.extend((p, index[c]) for p in images)
        not_images.extend(others)
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


def scan_flat_val(val_dir: str, classes: List[str], labels_file: Optional[str]) -> Scan:
    if labels_file is None:
        raise ScanError(f"{val_dir} has no class folders (flat layout); pass --val-labels FILE "
                        "('<filename> <class>' lines or Kaggle's LOC_val_solution.csv)")
    labels = read_val_labels(labels_file)
    index = {c: i for i, c in enumerate(classes)}
    stats: Dict[str, Tuple[int, int]] = {}
    images, not_images = _split_images(val_dir, stats=stats)
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


def scan_split(root: str, split: str, classes: List[str], val_labels: Optional[str] = None) -> Scan:
    split_dir = os.path.join(root, split)
    if split == "train":
        return scan_class_folders(split_dir, classes)
    if not os.path.isdir(split_dir):
        raise ScanError(f"{split_dir} does not exist; add it or pass --splits train")
    has_dirs = any(_is_dir(e) and not e.name.startswith(".") for e in os.scandir(split_dir))
    if has_dirs:
        return scan_class_folders(split_dir, classes)
    return scan_flat_val(split_dir, classes, val_labels)
