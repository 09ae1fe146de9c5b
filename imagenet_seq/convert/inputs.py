"""What the converter was given, as one Scan per split: an ImageFolder tree, a tar of one,
ImageNet's own archives (train tar of per-class tars, flat val tar + devkit or Kaggle labels),
or WebDataset shards (``wds_source``).

    preprocess_sequential.py /imagenet DST                      # train/, val/ folders
    preprocess_sequential.py imagenet.tar DST                   # a tar of that tree
    preprocess_sequential.py ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz DST               # or a folder holding them
    preprocess_sequential.py /data/imagenet-22k-wds DST         # WebDataset shards: a folder,
    preprocess_sequential.py '/data/in22k/imagenet22k-train-{0000..4095}.tar' DST  # a pattern
        [--classes imagenet22k_synsets.txt]                     # or a list of shards

A folder is scanned (no image data read); an archive is not listed: each is read in ONE sweep
as it is converted (``tar_sweep``: ImageNet's archives; ``tree_tar_sweep``: a tar of a tree,
all its splits from one sweep; ``wds_sweep``: WebDataset shards), and what only the sweep's
end tells (classes, replaced members) is settled at the merge (``settle``).

For trees and ImageNet's archives class indices are the sorted class names (WNIDs for
ImageNet). WebDataset shards carry their labels: label i is line i + 1 of ``--classes``, or,
without it, the classes are the numbers 0 .. the largest label seen, named ``"0"``, ``"1"``,
... in numeric order, so every label keeps its value.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from imagenet_seq import format as fmt
from imagenet_seq.format import SPLITS
from imagenet_seq.convert import tar_names, tar_source, wds_source
from imagenet_seq.convert.devkit import read_devkit
from imagenet_seq.convert.tar_sweep import ArchiveSweep
from imagenet_seq.convert.tree_tar_sweep import TreeTarSweep
from imagenet_seq.convert.wds_sweep import WdsSweep
from imagenet_seq.convert.scan import (Scan, ScanError, ScanLimit, find_classes, is_image,
                                       read_val_labels, scan_split)
from imagenet_seq.convert.wds_names import SPLIT_WORDS, expand_braces, read_classes, split_of

__all__ = ["Inputs", "resolve"]

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


def _patterns(srcs: List[str]) -> List[str]:
    """Brace patterns the shell did not expand (quoted) -> the files they name."""
    out: List[str] = []
    for s in srcs:
        names = [s] if os.path.exists(s) or "{" not in s else expand_braces(s)
        missing = [n for n in names if not os.path.exists(n)]
        if len(names) > 1 and missing:
            raise ScanError(f"{s} names {len(names)} files, {len(missing)} of which do not "
                            f"exist, e.g. {missing[:3]}; download them, or narrow the pattern")
        out.extend(names)
    return out


def _tars_in(folder: str) -> List[str]:
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".tar")]


def _split_folder_shards(root: str) -> Optional[List[str]]:
    """``root/train/*.tar`` (and ``root/val/*.tar``) with no class folders: WebDataset shards
    named by their folders; None for an ImageFolder tree."""
    dirs = [os.path.join(root, s) for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    if any(e.is_dir() for d in dirs for e in os.scandir(d)):
        return None
    shards = [p for d in dirs for p in _tars_in(d)]
    return shards or None


def _expand(srcs: List[str], devkit: Optional[str]):
    """Folders holding ImageNet's archives or WebDataset shards -> the archives (and the
    devkit beside them)."""
    if len(srcs) == 1 and os.path.isdir(srcs[0]) and not any(
            os.path.isdir(os.path.join(srcs[0], s)) for s in SPLITS):
        names = sorted(os.listdir(srcs[0]))
        tars = _tars_in(srcs[0])
        kits = [os.path.join(srcs[0], n) for n in names if DEVKIT in n.lower()]
        if not tars:
            raise ScanError(f"{srcs[0]} holds neither train/ and val/ folders nor .tar archives "
                            f"(found: {', '.join(names[:6]) or 'nothing'}); expected an "
                            "ImageFolder tree, ILSVRC2012_img_train.tar / _img_val.tar, or "
                            "WebDataset shards (.tar)")
        return tars, devkit or (kits[0] if kits else None)
    return srcs, devkit


_NOT_WDS = ("--classes names the labels of WebDataset shards; the classes of a folder tree or "
            "ImageNet's archives are their sorted class folder names (WNIDs)")

def _train_classes(train: str, cache_dir: Optional[str]) -> List[str]:
    """The classes of ImageNet's train archive: those of its conversion in ``cache_dir`` (the
    output folder) when there is one, else its class folders (every header read)."""
    if cache_dir:
        try:
            from imagenet_seq.format import manifest as mf
            split = mf.open_split(cache_dir, "train")
            env = fmt.open_env(split.paths[0])
            try:
                with env.begin(buffers=True) as txn:
                    return list(fmt.read_metadata(txn, split.paths[0]).classes)
            finally:
                env.close()
        except (OSError, ValueError):
            pass
    members, not_files = tar_source.list_tar(train)
    parts, _ = tar_names.assign(members, not_files, {"train": ""})  # the whole archive
    files, _ = parts["train"]
    return sorted({r.split("/")[0] for r in files if "/" in r and is_image(r)})


def _resolve_wds(shards: List[str], splits: List[str], classes_file: Optional[str]) -> Inputs:
    """Scans of ``splits`` from WebDataset shards, each shard's split read from its name."""
    given: Dict[str, str] = {}
    for p in shards:
        real = os.path.realpath(p)
        if real in given:
            raise ScanError(f"shard {p} is given twice (also as {given[real]}); pass each once")
        given[real] = p
    by_split: Dict[str, List[str]] = {s: [] for s in SPLITS}
    unnamed = []
    for p in shards:
        s = split_of(p)
        (by_split[s] if s else unnamed).append(p)
    if unnamed:
        if len(unnamed) < len(shards) or len(splits) != 1:
            raise ScanError(
                f"{len(unnamed)} of the {len(shards)} shards name no split (e.g. {unnamed[0]}): "
                "a shard's split is a word of its name (imagenet22k-train-0000.tar, "
                "imagenet1k-validation-00.tar) or its folder (train/, val/); rename them, or "
                "convert shards that name none with --splits train (or --splits val) alone")
        by_split[splits[0]] = unnamed
    for s in splits:
        if not by_split[s]:
            other = next(o for o in SPLITS if o != s)
            raise ScanError(
                f"no {s} shards among the {len(shards)} given (a {s} shard's name holds "
                f"{' or '.join(repr(w) for w, t in SPLIT_WORDS.items() if t == s)}); pass them, "
                f"or --splits {other}")
    fixed = read_classes(classes_file) if classes_file is not None else None
    how = f"--classes {classes_file}" if fixed is not None else "the labels seen"
    # each split's shards are read in one sweep as it is converted (wds_sweep): no listing
    scans: Dict[str, Scan] = {s: Scan([], [], [], sweep=WdsSweep(by_split[s], fixed, how,
                                                                 classes_file))
                              for s in splits}
    return Inputs(by_split[splits[0]][0], scans)


def _is_wds(srcs: List[str]) -> bool:
    """Whether the inputs are WebDataset shards: .tar files not named as ImageNet's archives,
    several of them, or one whose first members are WebDataset groups."""
    kinds = [_kind(s) for s in srcs]
    tars = [s for s, k in zip(srcs, kinds) if k == "tree" and not os.path.isdir(s)]
    if not tars or any(k not in ("tree", "devkit") for k in kinds) or len(tars) < len(
            [k for k in kinds if k == "tree"]):
        return False
    return len(tars) > 1 or wds_source.looks_like_shard(tars[0])


def resolve(srcs: List[str], splits: List[str], val_labels: Optional[str] = None,
            devkit: Optional[str] = None, cache_dir: Optional[str] = None,
            classes: Optional[str] = None, limit: Optional[ScanLimit] = None) -> Inputs:
    """Scans of ``splits`` from the sources given on the command line. ``cache_dir``: the
    output folder, where a converted train split gives ImageNet's classes to a val-only
    conversion without the devkit (:func:`_train_classes`; else the train archive is listed).
    ``classes``: ``--classes FILE``, the class names of WebDataset shards' labels.
    ``limit``: the conversion's memory bound for a folder's file lists (``scan.ScanLimit``:
    the scan stops, naming the ways out, before they outgrow it); archives keep none.

    Raises:
        ScanError: a missing/unknown input, a damaged archive, images without labels..., the
            message naming the file or member and the way out.
    """
    srcs = _patterns(srcs)
    for s in srcs:
        if not os.path.exists(s):
            raise ScanError(f"input {s!r} does not exist")
    shards = _split_folder_shards(srcs[0]) if len(srcs) == 1 and os.path.isdir(srcs[0]) \
        else None
    if shards is None and len(srcs) == 1 and os.path.isdir(srcs[0]) and any(
            os.path.isdir(os.path.join(srcs[0], s)) for s in SPLITS):
        if classes is not None:
            raise ScanError(_NOT_WDS)
        if devkit is not None:
            raise ScanError("--devkit labels ImageNet's flat val archive; for a folder tree "
                            "pass --val-labels FILE for a flat val/ folder")
        classes = find_classes(os.path.join(srcs[0], "train"))
        return Inputs(srcs[0], {s: scan_split(srcs[0], s, classes, val_labels, limit)
                                for s in splits})
    srcs, devkit = (shards, devkit) if shards else _expand(srcs, devkit)
    if shards or _is_wds(srcs):
        if devkit is not None or val_labels is not None:
            raise ScanError(f"--{'devkit' if devkit is not None else 'val-labels'} labels "
                            "ImageNet's val archive or a flat val/ folder; WebDataset shards "
                            "carry their labels (<key>.cls or <key>.json)")
        return _resolve_wds([s for s in srcs if _kind(s) == "tree"], splits, classes)
    if classes is not None:
        raise ScanError(_NOT_WDS)
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
    if "tree" in by_kind:  # one sweep feeds every split (tree_tar_sweep): no listing
        shared = TreeTarSweep(by_kind["tree"], splits, labels, labels_name)
        return Inputs(by_kind["tree"], {s: Scan([], [], [], sweep=shared.view(s))
                                        for s in splits})
    # each archive is read in one sweep as it is converted (tar_sweep): no listing first
    if "train" in splits:
        if "train" not in by_kind:
            raise ScanError("no train input: pass ILSVRC2012_img_train.tar (or --splits val)")
        scans["train"] = Scan([], [], [], sweep=ArchiveSweep(
            by_kind["train"], "train", True, kit_classes=kit_classes))
    if "val" in splits:
        if "val" not in by_kind:
            raise ScanError("no val input: pass ILSVRC2012_img_val.tar (or --splits train)")
        if kit_classes is None and "train" not in by_kind:
            raise ScanError("the class list comes from the train archive or the devkit: pass "
                            "ILSVRC2012_img_train.tar or --devkit ILSVRC2012_devkit_t12.tar.gz")
        if labels is None:
            raise ScanError(f"{by_kind['val']} is flat and needs labels: pass --devkit "
                            "ILSVRC2012_devkit_t12.tar.gz or --val-labels LOC_val_solution.csv")
        train = by_kind.get("train")

        def class_list(train=train):
            """The devkit's classes, else the train archive's (its converted split's, or
            its class folders: read only when needed)."""
            return kit_classes or _train_classes(train, cache_dir)
        scans["val"] = Scan([], [], [], sweep=ArchiveSweep(
            by_kind["val"], "val", False, labels, labels_name, class_list))
    return Inputs(srcs[0], scans)
