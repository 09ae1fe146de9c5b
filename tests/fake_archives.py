"""Tiny stand-ins for ImageNet's archives, built from a sample ImageFolder tree.

``ILSVRC2012_img_train.tar``: one ``<class>.tar`` per class inside the outer tar.
``ILSVRC2012_img_val.tar``: flat ``ILSVRC2012_val_%08d.JPEG``.
``ILSVRC2012_devkit_t12.tar.gz``: ``data/meta.mat`` (scipy.io.savemat, the real layout: a
struct array ``synsets`` with ILSVRC2012_ID, WNID, words, gloss, num_children, children,
wordnet_height, num_train_images, leaves first, plus one parent synset) and
``data/ILSVRC2012_validation_ground_truth.txt``. ILSVRC2012_IDs run in REVERSE class-name order,
so a converter that used them as class indices would fail the tests.
WebDataset shards (``wds_shards``): ``<key>.cls`` / ``<key>.jpg`` / ``<key>.json`` groups as
timm's ``imagenet-22k-wds`` holds them.
"""
import io
import json
import os
import random
import shutil
import tarfile

import numpy as np

FIELDS = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
          "wordnet_height", "num_train_images"]


def tar_tree(root, out, prefix="imagenet", extra=()):
    """A tar of the tree at ``root`` (members ``prefix/train/...``); ``extra``: (name, bytes)."""
    with tarfile.open(out, "w") as tf:
        for d, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(d, f)
                tf.add(p, arcname=os.path.join(prefix, os.path.relpath(p, root)))
        for name, data in extra:
            info = tarfile.TarInfo(os.path.join(prefix, name))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out


def _add_bytes(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def train_tar(root, classes, out):
    with tarfile.open(out, "w") as outer:
        for c in classes:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                d = os.path.join(root, "train", c)
                for f in sorted(os.listdir(d), reverse=True):  # archive order != name order
                    inner.add(os.path.join(d, f), arcname=f)
            _add_bytes(outer, f"{c}.tar", buf.getvalue())
    return out


def val_tar(root, classes, out):
    """Flat val archive; returns {val file name: class} and writes nothing else."""
    labels = {}
    with tarfile.open(out, "w") as tf:
        i = 0
        for c in classes:
            d = os.path.join(root, "val", c)
            for f in sorted(os.listdir(d)):
                i += 1
                name = f"ILSVRC2012_val_{i:08d}.JPEG"
                labels[name] = c
                tf.add(os.path.join(d, f), arcname=name)
    return labels


def ilsvrc(root, classes, d):
    """ImageNet's three archives of the tree at ``root``, written in the folder ``d``, and the
    same images as they extract: ``d/folder`` (``train/<class>/...``, a flat ``val/``) with
    ``d/labels.txt`` (``<val file> <class>`` lines). Returns the paths (``train``, ``val``,
    ``devkit``, ``folder``, ``labels_file``) and ``labels`` ({val file name: class})."""
    d = str(d)
    train = train_tar(root, classes, os.path.join(d, "ILSVRC2012_img_train.tar"))
    val = os.path.join(d, "ILSVRC2012_img_val.tar")
    labels = val_tar(root, classes, val)
    kit = devkit(classes, labels, os.path.join(d, "ILSVRC2012_devkit_t12.tar.gz"))
    folder = os.path.join(d, "folder")
    shutil.copytree(os.path.join(root, "train"), os.path.join(folder, "train"))
    os.makedirs(os.path.join(folder, "val"))
    with tarfile.open(val) as tf:
        tf.extractall(os.path.join(folder, "val"))
    labels_file = os.path.join(d, "labels.txt")
    with open(labels_file, "w") as f:
        f.write("".join(f"{n} {c}\n" for n, c in labels.items()))
    return {"train": train, "val": val, "devkit": kit, "folder": folder,
            "labels_file": labels_file, "labels": labels}


def meta_mat(classes, parent=True):
    from scipy.io import savemat

    n = len(classes) + (1 if parent else 0)
    arr = np.zeros((n, 1), dtype=[(f, "O") for f in FIELDS])
    ids = {c: len(classes) - i for i, c in enumerate(classes)}  # reverse of sorted order
    for i, c in enumerate(classes):
        arr[i, 0] = (np.array([[ids[c]]]), c, f"words {c}", "gloss", np.array([[0]]),
                     np.zeros((0, 0)), np.array([[0]]), np.array([[10]]))
    if parent:
        arr[n - 1, 0] = (np.array([[len(classes) + 1]]), "n99999999", "entity", "gloss",
                         np.array([[len(classes)]]),
                         np.arange(1, len(classes) + 1).reshape(1, -1),
                         np.array([[5]]), np.array([[0]]))
    buf = io.BytesIO()
    savemat(buf, {"synsets": arr})
    return buf.getvalue(), ids


def devkit(classes, val_labels, out, year="2012", with_meta=True, drop_last=0):
    """``val_labels``: {val file name: class} in file order."""
    meta, ids = meta_mat(classes)
    gt = "".join(f"{ids[c]}\n" for _, c in sorted(val_labels.items()))
    if drop_last:
        gt = "".join(gt.splitlines(True)[:-drop_last])
    top = f"ILSVRC{year}_devkit"
    with tarfile.open(out, "w:gz") as tf:
        _add_bytes(tf, f"{top}/readme.txt", b"devkit\n")
        if with_meta:
            _add_bytes(tf, f"{top}/data/meta.mat", meta)
        _add_bytes(tf, f"{top}/data/ILSVRC{year}_validation_ground_truth.txt", gt.encode())
    return out


def wds_shards(root, split, classes, out_dir, shards=3, labels=("cls",), extra=(),
               name="imagenet-{split}-{i:04d}.tar", seed=0, ext="jpg"):
    """The images of ``root/<split>/<class>/*`` as WebDataset shards; returns their paths.

    Keys are the image file stems, shuffled (``seed``) and dealt over ``shards`` shards (as
    timm's are pre-shuffled). Each group: ``<key>.cls`` (the class index as text) and/or
    ``<key>.json`` (``{"label": i, "class_name": class, "width": .., "height": ..}``, as timm's
    sidecars), per ``labels``, and ``<key>.<ext>``, members in sorted order (the label before
    the image). ``extra``: ``(shard index, member name, bytes)`` appended to a shard."""
    items = []
    for i, c in enumerate(classes):
        d = os.path.join(root, split, c)
        for f in sorted(os.listdir(d)):
            items.append((os.path.splitext(f)[0], os.path.join(d, f), i, c))
    random.Random(seed).shuffle(items)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k in range(shards):
        path = os.path.join(out_dir, name.format(split=split, i=k))
        with tarfile.open(path, "w") as tf:
            for key, src, label, cls in items[k::shards]:
                members = {ext: open(src, "rb").read()}
                if "cls" in labels:
                    members["cls"] = str(label).encode()
                if "json" in labels:
                    members["json"] = json.dumps({"label": label, "class_name": cls,
                                                  "width": 48, "height": 32}).encode()
                for kind in sorted(members):
                    _add_bytes(tf, f"{key}.{kind}", members[kind])
            for j, member, data in extra:
                if j == k:
                    _add_bytes(tf, member, data)
        paths.append(path)
    return paths
