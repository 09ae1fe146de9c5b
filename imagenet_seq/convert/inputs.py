"""What the converter was given, as one Scan per split: an ImageFolder tree, a tar of one, or
ImageNet's own archives (train tar of per-class tars, flat val tar + devkit or Kaggle labels).

    preprocess_sequential.py /imagenet DST                      # train/, val/ folders
    preprocess_sequential.py imagenet.tar DST                   # a tar of that tree
    preprocess_sequential.py ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz DST               # or a folder holding them

Class indices are always the sorted class names (WNIDs for ImageNet).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from imagenet_seq.format import SPLITS
from imagenet_seq.convert import tar_names, tar_source
from imagenet_seq.convert.devkit import read_devkit
from imagenet_seq.convert.scan import Scan, ScanError, find_classes, is_image, read_val_labels, scan_split

__all__ = ["Inputs", "LISTING_PREFIX", "LISTING_VERSION", "listing_path", "remove_listings",
           "resolve"]

TRAIN_TAR, VAL_TAR, DEVKIT = "img_train", "img_val", "devkit"


@dataclass
class Inputs:
    root: str  # the folder (ImageFolder) or the first archive, for messages
    scans: Dict[str, Scan]


def _kind(path: str) -> str:
    base = os.path.basename(path).lower()
    if DEVKIT in base:
        return "devkit"
    if not base.endswith(".tar") and os.path.isfile(path):
        return "compressed" if base.endswith((".tar.gz", ".tgz")) else "unknown"
    return "train" if TRAIN_TAR in base else "val" if VAL_TAR in base else "tree"


def _expand(srcs: List[str], devkit: Optional[str]):
    """Folders holding ImageNet's archives -> the archives (and the devkit beside them)."""
    if len(srcs) == 1 and os.path.isdir(srcs[0]) and not any(
            os.path.isdir(os.path.join(srcs[0], s)) for s in SPLITS):
        names = sorted(os.listdir(srcs[0]))
        tars = [os.path.join(srcs[0], n) for n in names if n.endswith(".tar")]
        kits = [os.path.join(srcs[0], n) for n in names if DEVKIT in n.lower()]
        if not tars:
            raise ScanError(f"{srcs[0]} holds neither train/ and val/ folders nor .tar archives "
                            f"(found: {', '.join(names[:6]) or 'nothing'}); expected an "
                            "ImageFolder tree or ILSVRC2012_img_train.tar / _img_val.tar")
        return tars, devkit or (kits[0] if kits else None)
    return srcs, devkit


LISTING_PREFIX = ".listing-"  # + a hash of the archive's path + ".json", in the output folder
LISTING_VERSION = 2  # 2: names normalised, links and unsafe names kept with their offsets


def listing_path(cache_dir: str, path: str) -> str:
    """Where the listing of the archive at ``path`` is kept in ``cache_dir``."""
    key = hashlib.sha1(os.path.realpath(path).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(cache_dir, f"{LISTING_PREFIX}{key[:16]}.json")


def _list(path: str, progress, cache_dir: Optional[str] = None):
    """(members, entries that are not files) of the archive at ``path``.

    Listing reads every header, about one sequential read of the archive (~15 min for
    ImageNet's 138 GB train tar on an HDD). With ``cache_dir`` (the output folder) the result
    is kept there until the conversion ends, so ``--resume`` after an interruption does not
    read the archive once more; it is used only while the archive's size and modification
    time are those it was listed with.
    """
    st = os.stat(path)
    stamp = {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "listing": LISTING_VERSION}
    cache = listing_path(cache_dir, path) if cache_dir else None
    if cache and os.path.exists(cache):
        try:
            with open(cache) as f:
                kept = json.load(f)
            if kept.get("stamp") == stamp:
                return ([tuple(m) for m in kept["members"]],
                        [tuple(m) for m in kept["not_files"]])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or from another version: list again
    members, not_files = tar_source.list_tar(path, progress(path) if progress else None)
    if cache:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            with open(cache + ".tmp", "w") as f:
                json.dump({"stamp": stamp, "members": members, "not_files": not_files}, f)
            os.replace(cache + ".tmp", cache)
        except OSError:
            pass  # no room or read-only: the next run lists again, nothing else changes
    return members, not_files


def _archive_files(path: str, split: str, progress, cache_dir: Optional[str]):
    """(name -> (offset, size), report rows) of one of ImageNet's archives: the whole archive
    is the split's folder (``tar_names.assign``)."""
    members, not_files = _list(path, progress, cache_dir)
    parts, stray = tar_names.assign(members, not_files, {split: ""})
    files, skipped = parts[split]
    return files, stray + skipped  # stray: a name with no path at all ('/', '')


def remove_listings(cache_dir: str, srcs: List[str]) -> None:
    """Delete the kept listings of the archives in ``srcs`` (the conversion is complete)."""
    try:
        srcs, _ = _expand(srcs, None)
    except ScanError:
        return
    for s in srcs:
        try:
            os.remove(listing_path(cache_dir, s))
        except OSError:
            pass


def resolve(srcs: List[str], splits: List[str], val_labels: Optional[str] = None,
            devkit: Optional[str] = None, progress=None,
            cache_dir: Optional[str] = None) -> Inputs:
    """Scans of ``splits`` from the sources given on the command line. ``progress(path)``
    gives a callback ``(bytes_passed, size)`` for listing the archive at ``path``, or None.
    ``cache_dir``: where archive listings are kept for a resumed run (:func:`_list`).

    Raises:
        ScanError: a missing/unknown input, a damaged archive, images without labels..., the
            message naming the file or member and the way out.
    """
    for s in srcs:
        if not os.path.exists(s):
            raise ScanError(f"input {s!r} does not exist")
    if len(srcs) == 1 and os.path.isdir(srcs[0]) and any(
            os.path.isdir(os.path.join(srcs[0], s)) for s in SPLITS):
        if devkit is not None:
            raise ScanError("--devkit labels ImageNet's flat val archive; for a folder tree "
                            "pass --val-labels FILE for a flat val/ folder")
        classes = find_classes(os.path.join(srcs[0], "train"))
        return Inputs(srcs[0], {s: scan_split(srcs[0], s, classes, val_labels) for s in splits})
    srcs, devkit = _expand(srcs, devkit)
    by_kind: Dict[str, str] = {}
    for s in srcs:
        k = _kind(s)
        if k in ("compressed", "unknown"):
            raise ScanError(f"{s} is not a folder or an uncompressed .tar; "
                            + ("decompress it first (gunzip)" if k == "compressed" else
                               "expected an ImageFolder tree or tar archives"))
        if k == "devkit":
            devkit = devkit or s
            continue
        if k in by_kind:
            raise ScanError(f"two {k} inputs: {by_kind[k]} and {s}; pass one")
        by_kind[k] = s
    if "tree" in by_kind and len(by_kind) > 1:
        raise ScanError(f"{by_kind['tree']} is neither ILSVRC2012_img_train.tar nor _img_val.tar"
                        "; pass a tar of an ImageFolder tree alone, or ImageNet's archives")
    kit_classes, kit_labels = read_devkit(devkit) if devkit else (None, None)
    labels = read_val_labels(val_labels) if val_labels else kit_labels
    labels_name = val_labels or devkit or ""
    scans: Dict[str, Scan] = {}
    if "tree" in by_kind:
        path = by_kind["tree"]
        members, not_files = _list(path, progress, cache_dir)
        roots = tar_names.split_roots(members, not_files, SPLITS)
        if "train" not in roots:
            raise ScanError(f"{path} holds no train/ folder (first members: "
                            f"{[m[0] for m in members[:3]]}); expected a tar of "
                            "train/<class>/<image> (and val/...)")
        parts, stray = tar_names.assign(members, not_files, roots)
        files = parts["train"][0]
        classes = sorted({r.split("/")[0] for r in files if "/" in r and is_image(r)})
        for s in splits:
            if s not in roots:
                raise ScanError(f"{path} holds no {s}/ folder; add it or pass --splits train")
            prefix, (files, skipped) = roots[s], parts[s]
            if s == splits[0]:  # unsafe names that point into no split: reported once
                skipped = stray + skipped
            flat = s == "val" and not any("/" in r for r in files if is_image(r))
            if flat and labels is None:
                raise ScanError(f"{path}:{prefix} has no class folders (flat layout); pass "
                                "--val-labels FILE ('<filename> <class>' lines or Kaggle's "
                                "LOC_val_solution.csv)")
            scans[s] = tar_source.scan_files(path, prefix, files, classes, flat, labels,
                                             skipped, labels_name)
        return Inputs(path, scans)
    classes = None
    # listing the train archive costs about one read of it: only when its images or its
    # classes (no devkit) are needed
    if "train" in by_kind and ("train" in splits or kit_classes is None):
        files, not_files = _archive_files(by_kind["train"], "train", progress, cache_dir)
        classes = sorted({r.split("/")[0] for r in files if "/" in r and is_image(r)})
        if kit_classes is not None and classes != kit_classes:
            extra = sorted(set(classes) ^ set(kit_classes))[:3]
            raise ScanError(f"the classes of {by_kind['train']} ({len(classes)}) differ from the "
                            f"devkit's ({len(kit_classes)}), e.g. {extra}: the devkit is of "
                            "another year or dataset; pass ILSVRC2012_devkit_t12.tar.gz")
        if "train" in splits:
            scans["train"] = tar_source.scan_files(by_kind["train"], "", files, classes, False,
                                                   None, not_files, "")
    classes = classes or kit_classes
    for s in splits:
        if s in scans:
            continue
        if s == "train" or s not in by_kind:
            raise ScanError(f"no {s} input: pass ILSVRC2012_img_{s}.tar (or --splits "
                            f"{'val' if s == 'train' else 'train'})")
        if classes is None:
            raise ScanError("the class list comes from the train archive or the devkit: pass "
                            "ILSVRC2012_img_train.tar or --devkit ILSVRC2012_devkit_t12.tar.gz")
        if labels is None:
            raise ScanError(f"{by_kind[s]} is flat and needs labels: pass --devkit "
                            "ILSVRC2012_devkit_t12.tar.gz or --val-labels LOC_val_solution.csv")
        files, not_files = _archive_files(by_kind[s], s, progress, cache_dir)
        scans[s] = tar_source.scan_files(by_kind[s], "", files, classes, True, labels,
                                         not_files, labels_name)
    return Inputs(srcs[0], scans)
