"""Accuracy parity: does training through imagenet_seq's Loader score what torchvision does?

    pip install -e ".[bench]" torchvision   # here: pip install torch==2.14.1 torchvision==0.29.1
    python benchmarks/fidelity.py                      # 5 seeds, every config (~1 h on 2 cores)
    python benchmarks/fidelity.py --seeds 2 --epochs 2 --configs torchvision,loader   # smoke

Data: benchmarks/fidelity_data.py (scikit-learn's handwritten digits drawn into photo-like
JPEGs, 10 classes). One small CNN, trained with identical settings (same initial weights per
seed, SGD + cosine schedule, batch 64, RandomResizedCrop(64, scale=(0.35, 1)) + flip) through:

  torchvision        ImageFolder + DataLoader(shuffle=True, 2 workers): the reference
  loader             Loader(lmdb, 'train') with its defaults (chunk order + shuffle buffer)
  loader_buffer128   Loader with a 128-record shuffle buffer and 64-record chunks
  loader_ddp2        Loader(distributed=True) in 2 DDP ranks (gloo), 32 images per rank
  loader_opencv      Loader with TrainTransform(antialias=False): OpenCV's bilinear filter,
                     the fast path's default before issue #11 (shows what the benchmark sees)
  class_order        the ablation: the train images written in class order (an ImageFolder
                     tree's order) and read sequentially through a 128-record local shuffle
                     buffer, as the original tool's LocallyShuffleData did (tensorpack#472)

Every model is scored on val through torchvision (ImageFolder + Resize(73) + CenterCrop(64))
and through Loader(lmdb, 'val'). Reported: mean and spread of top-1 per config and val
pipeline; per seed, the paired difference to the torchvision-trained model (same seed, same
initial weights) on torchvision's val pipeline, with its 95 % confidence interval (t
distribution over seeds); and the difference between the two val pipelines on the same weights.
Results go to benchmarks/results/fidelity.{md,json}; finished models are kept in the json and
skipped when the same command runs again (--fresh to start over).
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time
from typing import Dict, Iterator, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from fidelity_data import IMAGE_SIZE, RESIZE_SIZE  # noqa: E402
from imagenet_seq.data import Loader, to_device  # noqa: E402

CONFIGS = ("torchvision", "loader", "loader_buffer128", "loader_ddp2", "loader_opencv",
           "class_order")
SCALE = (0.35, 1.0)
BATCH = 64
DEFAULT_OUT = os.path.join(REPO, "bench_out", "fidelity")
RESULTS = os.path.join(HERE, "results")


def make_model() -> nn.Module:
    def block(cin: int, cout: int, pool: bool) -> List[nn.Module]:
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                  nn.ReLU(inplace=True)]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(*block(3, 16, True), *block(16, 32, True), *block(32, 64, True),
                         *block(64, 96, False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(96, 10))


# -- train-time data, one iterator per config and epoch --------------------------------------

def _tv_train(folder: str, seed: int):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(os.path.join(folder, "train"), T.Compose([
        T.RandomResizedCrop(IMAGE_SIZE, scale=SCALE), T.RandomHorizontalFlip(), T.PILToTensor()]))
    # the transforms draw from torch's RNG, which DataLoader seeds per worker from `generator`
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2,
                                       generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=True)


def _class_order(path: str, seed: int, epoch: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Sequential read of a class-ordered file through a 128-record local buffer, decode, batch."""
    from imagenet_seq.decode.batch import augment_rng
    from imagenet_seq.decode.transforms import TrainTransform
    from imagenet_seq.read.reader import SplitReader
    from imagenet_seq.plan.shuffle import buffered_shuffle

    reader = SplitReader(path, "val")
    reader.reset_state()
    t = TrainTransform(IMAGE_SIZE, SCALE)
    images, labels = [], []
    try:
        for i, jpeg, label in buffered_shuffle(reader.read_all(), 128,
                                               np.random.default_rng([seed, epoch])):
            images.append(t(jpeg, augment_rng(seed, epoch, i)))
            labels.append(label)
            if len(images) == BATCH:
                yield _stack(images, labels)
                images, labels = [], []
        if images:
            yield _stack(images, labels)
    finally:
        reader.close()


def _stack(images: List[np.ndarray], labels: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2),
            torch.tensor(labels, dtype=torch.int64))


def train_source(config: str, paths: dict, seed: int):
    """``(epoch, steps)``: ``epoch(e)`` -> iterable of uint8 (images, targets) batches, and the
    number of batches per epoch."""
    from imagenet_seq.decode.transforms import TrainTransform

    if config == "torchvision":
        dl = _tv_train(paths["folder"], seed)
        return (lambda e: dl), len(dl)
    if config == "class_order":
        return (lambda e: _class_order(paths["class_order"], seed, e)), \
            math.ceil(paths["train"] / BATCH)
    kw = dict(batch_size=BATCH, num_workers=2, seed=seed, image_size=IMAGE_SIZE, scale=SCALE)
    if config == "loader_buffer128":
        kw.update(buffer_size=128, chunk_size=64)
    elif config == "loader_opencv":
        kw["transform"] = TrainTransform(IMAGE_SIZE, SCALE, antialias=False)
    elif config == "loader_ddp2":
        kw.update(batch_size=BATCH // 2, num_workers=1, distributed=True)
    loader = Loader(paths["lmdb"], "train", **kw)

    def epoch(e: int) -> Loader:
        loader.set_epoch(e)
        return loader
    return epoch, len(loader)


# -- training and scoring --------------------------------------------------------------------

def train(config: str, paths: dict, seed: int, epochs: int, ddp: bool = False) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights for every config of a seed
    model = make_model()
    source, per_epoch = train_source(config, paths, seed)
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    steps = epochs * per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for e in range(epochs):
        for images, targets in source(e):
            x, y = to_device(images, targets, "cpu")
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.module if ddp else model


@torch.no_grad()
def score(model: nn.Module, paths: dict) -> Dict[str, float]:
    """Top-1 (%) on val through torchvision's pipeline and through Loader(lmdb, 'val')."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    model.eval()
    tv = ImageFolder(os.path.join(paths["folder"], "val"), T.Compose([
        T.Resize(RESIZE_SIZE), T.CenterCrop(IMAGE_SIZE), T.PILToTensor()]))
    sources = {"tv_val": torch.utils.data.DataLoader(tv, batch_size=256, num_workers=2),
               "ours_val": Loader(paths["lmdb"], "val", batch_size=256, num_workers=2,
                                  image_size=IMAGE_SIZE, resize_size=RESIZE_SIZE)}
    out, preds = {}, {}
    for name, src in sources.items():
        correct, total, p = 0, 0, []
        for images, targets in src:
            x, y = to_device(images, targets, "cpu")
            pred = model(x).argmax(1)
            correct += int((pred == y).sum())
            total += len(y)
            p.append(pred)
        out[name] = 100.0 * correct / total
        preds[name] = torch.cat(p)
    out["agree"] = 100.0 * float((preds["tv_val"] == preds["ours_val"]).float().mean())
    return out


def _ddp_rank(rank: int, port: int, paths: dict, seed: int, epochs: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        model = train("loader_ddp2", paths, seed, epochs, ddp=True)
        if rank == 0:
            torch.save(model.state_dict(), path)
    finally:
        torch.distributed.destroy_process_group()


def run_one(config: str, paths: dict, seed: int, epochs: int, out: str) -> Dict[str, float]:
    t0 = time.time()
    if config == "loader_ddp2":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        path = os.path.join(out, f"ddp_{seed}.pt")
        torch.multiprocessing.spawn(_ddp_rank, (port, paths, seed, epochs, path), nprocs=2)
        model = make_model()
        model.load_state_dict(torch.load(path))
    else:
        model = train(config, paths, seed, epochs)
    res = score(model, paths)
    res["seconds"] = round(time.time() - t0, 1)
    return res


if __name__ == "__main__":
    from fidelity_report import main
    sys.exit(main())
