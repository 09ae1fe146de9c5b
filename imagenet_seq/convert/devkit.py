"""ImageNet-1k validation labels from the ILSVRC2012 devkit (``ILSVRC2012_devkit_t12.tar.gz``).

``data/meta.mat`` lists the synsets; the 1000 leaves (``num_children == 0``) are the classes,
each with its ILSVRC2012_ID (1..1000) and WNID. ``data/ILSVRC2012_validation_ground_truth.txt``
holds one ILSVRC2012_ID per line for ``ILSVRC2012_val_00000001.JPEG``, ``..._00000002``, ...
The class index is the position of the WNID among the sorted WNIDs (what torchvision's
ImageFolder over ``train/<wnid>/`` and ``torchvision.datasets.ImageNet`` give), never the
ILSVRC2012_ID order. Reading meta.mat needs scipy (it comes with scikit-learn).
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import Dict, List, Tuple

from imagenet_seq.convert.scan import ScanError

__all__ = ["GROUND_TRUTH", "META", "read_devkit"]

GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"


def _leaf_synsets(raw: bytes, where: str) -> Dict[int, str]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError("reading the devkit's meta.mat needs scipy: pip install scipy (or "
                          "pass --val-labels LOC_val_solution.csv instead of --devkit)") from None
    try:
        synsets = loadmat(io.BytesIO(raw), squeeze_me=True)["synsets"]
        leaves = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets.ravel()
                  if int(s["num_children"]) == 0}
    except Exception as e:  # scipy raises many types for a malformed file
        raise ScanError(f"{where} cannot be read as the devkit's synset table ({e}); download "
                        "ILSVRC2012_devkit_t12.tar.gz again") from None
    if not leaves:
        raise ScanError(f"{where} lists no leaf synsets; it is not ILSVRC2012's meta.mat")
    return leaves


def read_devkit(path: str) -> Tuple[List[str], Dict[str, str]]:
    """(sorted class WNIDs, {val image stem: WNID}) from the devkit archive or its folder.

    Raises:
        ScanError: not the ILSVRC2012 devkit (another year's, or meta.mat / the ground truth
            missing), naming what was found and the file to pass instead.
    """
    files: Dict[str, bytes] = {}
    wanted = (META, GROUND_TRUTH)
    found = []
    if os.path.isdir(path):
        for d, _, fs in os.walk(path):
            for f in fs:
                rel = os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/")
                found.append(rel)
                if rel.endswith(wanted):
                    with open(os.path.join(d, f), "rb") as fh:
                        files[next(w for w in wanted if rel.endswith(w))] = fh.read()
    else:
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    found.append(m.name)
                    w = next((w for w in wanted if m.name.endswith(w)), None)
                    if w and m.isfile():
                        files[w] = tf.extractfile(m).read()
        except (tarfile.ReadError, EOFError, OSError) as e:
            raise ScanError(f"--devkit {path} is not a readable archive ({e}); download "
                            "ILSVRC2012_devkit_t12.tar.gz again") from None
    other_year = [f for f in found if "validation_ground_truth" in f and
                  not f.endswith(GROUND_TRUTH)]
    for w in wanted:
        if w not in files:
            hint = (f" (found {os.path.basename(other_year[0])}: a devkit of another year)"
                    if other_year else "")
            raise ScanError(f"--devkit {path} has no {w}{hint}; ImageNet-1k (ILSVRC2012) needs "
                            "ILSVRC2012_devkit_t12.tar.gz, or pass --val-labels "
                            "LOC_val_solution.csv (Kaggle) instead")
    leaves = _leaf_synsets(files[META], f"{path}:{META}")
    labels = {}
    for i, line in enumerate(files[GROUND_TRUTH].decode().split(), 1):
        cid = int(line)
        if cid not in leaves:
            raise ScanError(f"{path}:{GROUND_TRUTH} line {i}: class id {cid} is not a leaf "
                            "synset of its meta.mat; download the devkit again")
        labels[f"ILSVRC2012_val_{i:08d}"] = leaves[cid]
    return sorted(leaves.values()), labels
